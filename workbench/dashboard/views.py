"""The views the pages show: the notebook widgets of :mod:`workbench.widgets` hosted through
``workbench.widgets.panel.to_panel`` (one view, two hosts), with every model access they make
taken under the dashboard's per-model lock. Static figures reuse :mod:`workbench.report` via
``pn.pane.Plotly`` (works offline). When the widgets package is not importable, the grids fall back to
the report's plotly heatmaps so the app still serves.
"""

from __future__ import annotations

import functools
from typing import Callable

import panel as pn
import torch

from .. import report
from .state import Workbench


@functools.lru_cache(maxsize=1)
def widgets_available() -> bool:
    try:
        from ..widgets import AttentionView, HeadGrid, NIAHGrid, RoutingView  # noqa: F401
        from ..widgets.panel import to_panel  # noqa: F401
    except Exception:  # noqa: BLE001 — any import problem means: use the static figures
        return False
    return True


def _to_panel(widget):
    from ..widgets.panel import to_panel

    pane = to_panel(widget)
    pane.css_classes = list(getattr(pane, "css_classes", []) or []) + ["wb-widget"]
    return pane


# --- locked widget subclasses: the widgets run the model when the browser asks; here under the lock --------


EVENT_LOOP_WAIT = 3.0  # seconds a click inside a widget waits for a busy model before saying so


@functools.lru_cache(maxsize=1)
def _locked_classes():
    """Widget subclasses (defined once: ``to_panel`` caches a component class per widget class) whose
    model runs hold the dashboard's lock of their model (``_wb``, ``_dash_model``)."""
    from ..widgets import AttentionView, RoutingView

    class LockedAttentionView(AttentionView):
        def _rows(self, layer, queries):
            # clicks in the view run on the server's event loop: wait briefly, then say "busy" in the view
            with self._dash_wb.using(self._dash_model, timeout=getattr(self, "_dash_timeout", None)):
                return super()._rows(layer, queries)

    class LockedRoutingView(RoutingView):
        def apply(self):
            with self._dash_wb.using(self._dash_model, timeout=getattr(self, "_dash_timeout", None)):
                return super().apply()

    return LockedAttentionView, LockedRoutingView


def locked_attention_view(wb: Workbench, text: str, layer: int, head: int, *, chat: bool = False):
    """An :class:`~workbench.widgets.AttentionView` whose row fetches hold the main model's lock."""
    cls = _locked_classes()[0]
    with wb.using() as m:
        ids = m.encode(text, chat=chat)
        view = cls.__new__(cls)
        view._dash_wb, view._dash_model = wb, None
        view.__init__(m, ids, layer=layer, head=head)
    view._dash_timeout = EVENT_LOOP_WAIT
    return view


def locked_routing_view(wb: Workbench, name: str, text: str, max_new_tokens: int = 8):
    """A :class:`~workbench.widgets.RoutingView` whose edit runs hold model ``name``'s lock."""
    cls = _locked_classes()[1]
    with wb.using(name) as m:
        view = cls.__new__(cls)
        view._dash_wb, view._dash_model = wb, name
        view.__init__(m, text, max_new_tokens=max_new_tokens)
    view._dash_timeout = EVENT_LOOP_WAIT
    return view


# --- grids ------------------------------------------------------------------------------------------------


class HeadGridView:
    """A layer × head grid with a metric selector; ``on_select(layer, head)`` when a cell is clicked.

    Widget host: :class:`~workbench.widgets.HeadGrid` (scores only: the dashboard runs edits itself,
    under the lock). Fallback: :func:`workbench.report.head_grid` in a plotly pane (click → select)."""

    def __init__(self, scores, *, title: str = "", on_select: Callable[[int, int], None] | None = None, zmax=None,
                 on_ablate: Callable[[list], None] | None = None):  # fmt: skip
        self.on_select = on_select
        self.widget = None
        if widgets_available():
            from ..widgets import HeadGrid

            self.widget = HeadGrid(scores, title=title)
            self.widget.observe(self._widget_selected, names="selected")
            if on_ablate is not None:  # shift-click in the grid toggles a head in the ablation set
                self.widget.observe(lambda c: on_ablate([tuple(x) for x in c["new"]]), names="ablate")
            self.panel = _to_panel(self.widget)
        else:
            self.scores = _score_dict(scores)
            names = list(self.scores)
            self.metric = pn.widgets.Select(
                label="metric", options=names, value=names[0], css_classes=["wb-metric"], width=260
            )
            self.plot = pn.pane.Plotly(self._figure(names[0], title, zmax), css_classes=["wb-headgrid"])
            self.metric.param.watch(lambda e: setattr(self.plot, "object", self._figure(e.new, title, zmax)), "value")
            self.plot.param.watch(self._plot_clicked, "click_data")
            self.panel = pn.Column(self.metric, self.plot)

    def _figure(self, name, title, zmax):
        return report.head_grid(
            self.scores[name], f"{title} — {name}" if title else name, colorbar=name[:12], zmax=zmax
        )

    def _widget_selected(self, change):
        sel = change["new"]
        if sel and self.on_select is not None:
            self.on_select(int(sel[0]), int(sel[1]))

    def _plot_clicked(self, event):
        pts = (event.new or {}).get("points") or []
        if pts and self.on_select is not None:
            p = pts[0]
            self.on_select(int(str(p["y"]).lstrip("L")), int(str(p["x"]).lstrip("H")))

    def select(self, layer: int, head: int) -> None:
        """Select a cell from Python (the page's layer/head inputs)."""
        if self.widget is not None:
            self.widget.selected = [int(layer), int(head)]
        elif self.on_select is not None:
            self.on_select(int(layer), int(head))


def _score_dict(scores) -> dict[str, torch.Tensor]:
    if isinstance(scores, dict):
        return scores
    if hasattr(scores, "scores") and hasattr(scores, "variant"):  # RetrievalResult
        return {"retrieval score": scores.scores}
    if hasattr(scores, "mean_alpha"):  # SinkResult
        a = scores.mean_alpha
        return {f"α_{k} sink mass": a[..., k] for k in range(min(a.shape[-1], 4))}
    raise TypeError(f"cannot grid {type(scores).__name__}")


def niah_view(baseline, ablated=None):
    """NIAH accuracy grids (baseline and, when given, ablated) — the NIAHGrid widget or report figures."""
    if widgets_available():
        from ..widgets import NIAHGrid

        return _to_panel(NIAHGrid(baseline, ablated))
    figs = [pn.pane.Plotly(report.niah_grid(baseline.accuracy_grid(), "NIAH accuracy — baseline"))]
    if ablated is not None:
        figs.append(pn.pane.Plotly(report.niah_grid(ablated.accuracy_grid(), "NIAH accuracy — top-K ablated")))
    return pn.Row(*figs)


def attention_figure(att) -> object:
    """Heatmap of one head's exact attention (last query rows × keys) from :meth:`Workbench.head_attention`."""
    import plotly.graph_objects as go

    labels = [f"{i}:{t!r}"[:24] for i, t in enumerate(att.tokens)]
    fig = go.Figure(go.Heatmap(z=att.probs.numpy(), x=labels, y=[labels[q] for q in att.q_positions], colorscale="Blues",
                               zmin=0, colorbar={"title": "p"},
                               hovertemplate="query %{y}<br>key %{x}<br>p=%{z:.3f}<extra></extra>"))  # fmt: skip
    fig.update_layout(title=f"attention of L{att.layer}H{att.head} (last {len(att.q_positions)} queries)",
                      height=max(300, 14 * len(att.q_positions) + 160), margin={"b": 120})  # fmt: skip
    return fig


def routing_figures(outcome) -> list:
    """Top-1 expert per token × layer and expert load per layer (plotly)."""
    import plotly.graph_objects as go

    rec = outcome.record
    T = len(outcome.tokens)
    top1 = rec.experts[..., 0][:, :T].numpy()
    labels = [f"{i}:{t!r}"[:20] for i, t in enumerate(outcome.tokens)]
    f1 = go.Figure(go.Heatmap(z=top1, x=labels, y=[f"L{l}" for l in rec.layers], colorscale="Turbo",
                              hovertemplate="%{y} token %{x}: expert %{z}<extra></extra>"))  # fmt: skip
    f1.update_layout(title="top-1 expert per token", height=300, margin={"b": 110})
    load = outcome.load.numpy()
    f2 = go.Figure(go.Heatmap(z=load, x=[f"E{e}" for e in range(load.shape[1])], y=[f"L{l}" for l in rec.layers],
                              colorscale="Viridis", zmin=0, colorbar={"title": "share"},
                              hovertemplate="%{y} %{x}: %{z:.3f}<extra></extra>"))  # fmt: skip
    f2.update_layout(title="expert load (share of assignments)", height=300, width=520)
    return [f1, f2]

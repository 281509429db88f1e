"""The views the pages show: the notebook widgets of :mod:`workbench.widgets` hosted through
``workbench.widgets.panel.to_panel`` (one view, two hosts), with every model access they make
taken under the dashboard's per-model lock. Static figures (pages) reuse :mod:`workbench.report` via
``pn.pane.Plotly`` (works offline).
"""

from __future__ import annotations

import functools
from typing import Callable

from .state import Workbench


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
        view.__init__(m, ids, layer=layer, head=head, max_queries=wb.caps.max_view_queries)
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
    """The :class:`~workbench.widgets.HeadGrid` (scores only: the dashboard runs edits itself, under the
    lock) with ``on_select(layer, head)`` when a cell is clicked and ``on_ablate(heads)`` on shift-click."""

    def __init__(self, scores, *, title: str = "", on_select: Callable[[int, int], None] | None = None,
                 on_ablate: Callable[[list], None] | None = None):  # fmt: skip
        from ..widgets import HeadGrid

        self.on_select = on_select
        self.widget = HeadGrid(scores, title=title)
        self.widget.observe(self._widget_selected, names="selected")
        if on_ablate is not None:
            self.widget.observe(lambda c: on_ablate([tuple(x) for x in c["new"]]), names="ablate")
        self.panel = _to_panel(self.widget)

    def _widget_selected(self, change):
        sel = change["new"]
        if sel and self.on_select is not None:
            self.on_select(int(sel[0]), int(sel[1]))

    def select(self, layer: int, head: int) -> None:
        """Select a cell from Python (the page's layer/head inputs)."""
        self.widget.selected = [int(layer), int(head)]


def niah_view(baseline, ablated=None):
    """NIAH accuracy grids (baseline and, when given, ablated): the NIAHGrid widget."""
    from ..widgets import NIAHGrid

    return _to_panel(NIAHGrid(baseline, ablated))

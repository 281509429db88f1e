"""Sinks: Gu et al.'s Sink_k^ε across layers, ACT hidden sinks, Sun et al.'s massive activations."""

from __future__ import annotations

import panel as pn
import param

from ...base import plots
from .common import Page, details, table, with_heads
from .validation import box_chars
from .views import HeadGridView


def sink_rate_figure(s, keys: int = 4):
    """Share of heads with α_k > ε per layer, one line per key k (Sink_k^ε across layers)."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for k in range(min(keys, s.mean_alpha.shape[-1])):
        pl = s.per_layer(k)
        fig.add_trace(go.Scatter(x=pl["layer"], y=pl["sink_share"] * 100, mode="lines+markers",
                                 name=f"k={k + 1} (Sink_{k + 1}^ε = {s.sink_rate(k):.1f}%)"))  # fmt: skip
    fig.update_layout(title=f"Sink_k^ε per layer (ε = {s.eps}, T = {s.T})", xaxis_title="layer",
                      yaxis_title="% of heads with α_k > ε", height=340, width=640)  # fmt: skip
    return fig


class SinksPage(Page):
    title = "Sinks"
    T = param.Integer(default=64, bounds=(2, 512), doc="tokens per text (Gu et al.: 64)")
    eps = param.Number(default=0.3, bounds=(0.01, 0.99), doc="ε of Sink_k^ε")

    def __init__(self, wb, **params):
        super().__init__(wb, **params)
        self.param.T.bounds = (2, wb.caps.max_sink_T)
        self.texts = pn.widgets.TextAreaInput(label="texts (optional; one per paragraph, blank line between)", height=90,
                                              max_length=box_chars(wb.caps.max_prompt_chars), sizing_mode="stretch_width")  # fmt: skip
        self.scan_button = pn.widgets.Button(
            label="Scan sinks", color="primary", css_classes=["wb-sinks-scan"], width=120
        )
        self.scan_button.on_click(lambda e: self.scan())
        self.result = None
        self.results_area = pn.Column(sizing_mode="stretch_width")

    def scan(self) -> None:
        raw = (self.texts.value_input or self.texts.value or "").strip()
        texts = [t for t in raw.split("\n\n") if t.strip()] if raw else None
        T, eps = self.T, self.eps
        from .state import Progress

        prog = Progress()
        self.start("sink scan", lambda: self.wb.sinks_scan(T=T, eps=eps, texts=texts, progress=prog), self._show, progress=prog,
                   failed=lambda e: self.results_area.clear())  # an error replaces the last scan: it goes

    def _show(self, s) -> None:
        self.result = s
        mv = s.massive_vs_sinks()
        massive = s.massive.reindex(s.massive["value"].abs().sort_values(ascending=False).index).head(30)
        hidden = with_heads(s.hidden_sinks().sort_values("alpha", ascending=False).head(50))
        grid = HeadGridView(s, title="α_k (Gu et al.)")
        self.follow_selection(grid)
        self.results_area.objects = [
            pn.pane.Markdown(
                f"**Sink_1^{s.eps} = {s.sink_rate(0):.1f}%** of heads (T = {s.T}, {len(s.token_ids)} texts)",
                css_classes=["wb-sink-rate"],
            ),  # fmt: skip
            pn.Row(pn.pane.Plotly(sink_rate_figure(s)), pn.Column(grid.panel, self.rank_row(grid, what="grid (current metric)"))),
            pn.pane.Plotly(plots.bars(s.per_layer(), "layer", "mean_alpha", "mean α₀ per layer")),
            pn.pane.Markdown("### Hidden sinks (ACT: α_k > 0.1, k ≥ 1)"),
            pn.Row(
                table(s.hidden_sink_tokens().head(20), index=False, css_classes=["wb-hidden-tokens"]),
                table(hidden[[c for c in ("head", "position", "token", "alpha") if c in hidden]], index=False, max_rows=50),
            ),  # fmt: skip
            details("hidden sinks: per text", table(hidden, index=False, max_rows=50)),
            pn.pane.Markdown(
                f"### Massive activations (Sun et al.)\n{mv['massive_entries']} entries; share on sink tokens: "
                f"{mv['on_sink_token']:.2f}"
            ),  # fmt: skip
            table(massive[[c for c in ("layer", "position", "token", "dim", "value") if c in massive]], index=False, css_classes=["wb-massive"]),
        ]

    def __panel__(self):
        return pn.Column(
            self.header(
                "## Attention sinks\nGu et al.'s α_k and Sink_k^ε on the shipped prose (or your texts), ACT hidden "
                "sinks and massive activations, from one forward pass per text (no N×N matrix)."
            ),  # fmt: skip
            self.alert,
            self.notice,
            pn.Row(
                pn.widgets.IntInput.from_param(self.param.T, label="T (tokens)", width=120),
                pn.widgets.FloatInput.from_param(self.param.eps, label="ε", step=0.05, width=100),
                self.scan_button,
            ),  # fmt: skip
            self.texts,
            self.status_row(),
            self.results_area,
            sizing_mode="stretch_width",
        )

"""Heads: every head on the head-type axes (previous-token, induction, local, self, attention distance, sink α₀)
at any length, with Wu et al.'s retrieval score joined when this session ran a retrieval scan."""

from __future__ import annotations

from typing import Callable

import panel as pn
import param

from ...measure.taxonomy import RULES
from .common import Page, details, table
from .views import HeadGridView

_COLUMNS = ("name", "kinds", "attn.prev_mass", "attn.induction_mass", "attn.local_mass", "attn.self_mass", "attn.dist_mean",
            "attn.alpha[0]", "retrieval_score")  # fmt: skip


class HeadsPage(Page):
    title = "Heads"
    lengths = param.ListSelector(default=[256], objects=[64, 128, 256, 512, 1024, 2048], doc="tokens per case")
    n_texts = param.Integer(default=2, bounds=(0, 12), doc="prose texts per length (plus one repeated random sequence)")
    local_window = param.Integer(default=8, bounds=(1, 256), doc="w of the local mass")
    kind = param.Selector(default="induction", objects=list(RULES), doc="the kind the table lists")

    def __init__(self, wb, *, retrieval: Callable[[], object] | None = None, **params):
        super().__init__(wb, **params)
        self.param.lengths.objects = [n for n in self.param.lengths.objects if n <= wb.caps.max_taxonomy_length]
        self.param.n_texts.bounds = (0, wb.caps.max_taxonomy_cases)
        self.retrieval = retrieval or (lambda: None)  # this session's retrieval scan, if any
        self.join = pn.widgets.Checkbox(label="join this session's retrieval scan (Wu's axis)", value=True)
        self.scan_button = pn.widgets.Button(label="Scan heads", color="primary", css_classes=["wb-heads-scan"], width=120)
        self.scan_button.on_click(lambda e: self.scan())
        self.result = None
        self.results_area = pn.Column(sizing_mode="stretch_width")
        self.kind_table = pn.Column()
        self.param.watch(lambda e: self._show_kind(), "kind")

    def scan(self) -> None:
        from .state import Progress

        lengths, n_texts, w = list(self.lengths), self.n_texts, self.local_window
        retrieval = self.retrieval() if self.join.value else None
        prog = Progress()
        self.start("head taxonomy", lambda: self.wb.taxonomy_scan(lengths=lengths, n_texts=n_texts, local_window=w,
                                                                  retrieval=retrieval, progress=prog),
                   self._show, progress=prog, failed=lambda e: self.results_area.clear())  # fmt: skip

    def _show(self, r) -> None:
        self.result = r
        grid = HeadGridView(r, title="head-type statistics (pick an axis)")
        self.follow_selection(grid)
        self.results_area.objects = [
            pn.pane.Markdown("```\n" + r.summary() + "\n```", css_classes=["wb-heads-summary"]),
            pn.Row(pn.pane.Plotly(r.figure("kinds"), css_classes=["wb-kind-map"]), pn.pane.Plotly(r.figure("scatter"))),
            grid.panel,
            self.rank_row(grid, what="grid (current axis)"),
            pn.Row(pn.widgets.Select.from_param(self.param.kind, label="heads of kind", width=180)),
            self.kind_table,
            details("cases", table(r.cases, index=False)),
        ]
        self._show_kind()

    def _show_kind(self) -> None:
        if self.result is None:
            return
        df = self.result.heads(self.kind)
        cols = [c for c in _COLUMNS if c in df]
        stat, thr = self.result.rules[self.kind]
        self.kind_table.objects = [
            pn.pane.Markdown(f"{len(df)} heads with mean {stat} > {thr}" if stat in self.result.grids() else
                             f"no {stat} in this scan (run a retrieval scan on the Retrieval tab first)"),  # fmt: skip
            table(df[cols].head(40), index=False, css_classes=["wb-heads-kind"]),
        ]

    def __panel__(self):
        return pn.Column(
            self.header(
                "## Head types\nEvery head's previous-token, induction, local and self mass, mean attention distance and "
                "sink α₀, reduced inside the attention kernel at any length (no N×N matrix), on shipped prose plus a "
                "repeated random sequence (the induction probe). Kinds follow `workbench.taxonomy.RULES`."
            ),  # fmt: skip
            self.alert,
            self.notice,
            pn.Row(
                pn.widgets.MultiChoice.from_param(self.param.lengths, label="lengths (tokens)", width=260),
                pn.widgets.IntInput.from_param(self.param.n_texts, label="texts per length", width=120),
                pn.widgets.IntInput.from_param(self.param.local_window, label="local window w", width=120),
                self.scan_button,
            ),  # fmt: skip
            self.join,
            self.status_row(),
            self.results_area,
            sizing_mode="stretch_width",
        )

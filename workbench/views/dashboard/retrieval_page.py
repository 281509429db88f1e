"""Retrieval: a cancellable NIAH scan with progress in the page, the NIAH grid, top retrieval heads, and
Wu's causal test (top-K vs random-K heads ablated)."""

from __future__ import annotations

import pandas as pd
import panel as pn
import param

from ...attention.edits import ABLATION_MODES
from .common import Page, details, md_escape, table, with_heads
from .state import Progress
from .views import HeadGridView, niah_view

LENGTHS = (300, 500, 1000, 1500, 2000, 3000, 4000, 6000, 8000)


class RetrievalPage(Page):
    title = "Retrieval"
    lengths = param.ListSelector(default=[1000], objects=list(LENGTHS), doc="context lengths (tokens)")
    depths = param.Integer(default=3, bounds=(1, 10))
    needles = param.Integer(default=1, bounds=(1, 3))
    new_tokens = param.Integer(default=24, bounds=(2, 64))
    k = param.Integer(default=10, bounds=(1, 64), doc="heads ablated in the causal test")
    mode = param.Selector(default="uniform", objects=list(ABLATION_MODES))
    seeds = param.Integer(default=2, bounds=(0, 3), doc="random-K runs")

    def __init__(self, wb, **params):
        super().__init__(wb, **params)
        caps = wb.caps
        try:
            ctx = wb.model().spec.max_positions or 10**9
        except Exception:  # noqa: BLE001 — the prompt lab shows the load error
            ctx = 10**9
        allowed = [x for x in LENGTHS if x <= caps.max_scan_length and x + 32 <= ctx] or [min(LENGTHS)]
        self.param.lengths.objects = allowed
        self.lengths = [x for x in self.lengths if x in allowed] or allowed[:1]
        self.param.depths.bounds = (1, caps.max_depths)
        self.param.needles.bounds = (1, caps.max_needles)
        self.param.new_tokens.bounds = (2, caps.max_new_tokens)
        self.new_tokens = min(self.new_tokens, caps.max_new_tokens)
        self.param.k.bounds = (1, caps.max_ablation_k)
        self.param.seeds.bounds = (0, caps.max_seeds)
        self.result = None
        self.ablation: pd.DataFrame | None = None
        self.bar = pn.indicators.Progress(
            label="progress", value=0, max=1, visible=False, width=300, css_classes=["wb-progress"]
        )
        self.progress_text = pn.pane.Markdown("", css_classes=["wb-progress-text"])
        self.scan_button = pn.widgets.Button(label="Scan", color="primary", css_classes=["wb-scan"], width=100)
        self.ablate_button = pn.widgets.Button(
            label="Run top-K vs random-K ablation", css_classes=["wb-ablation"], disabled=True
        )
        self.scan_button.on_click(lambda e: self.scan())
        self.ablate_button.on_click(lambda e: self.run_ablation())
        self.results_area = pn.Column(sizing_mode="stretch_width")
        self.ablation_area = pn.Column(sizing_mode="stretch_width")

    def _on_progress(self, p: Progress) -> None:
        self.bar.visible = True
        self.bar.max = max(p.total, 1)
        self.bar.value = min(p.done, self.bar.max)
        self.progress_text.object = f"{p.message}: {p.done} / {p.total} tests"

    def scan(self) -> None:
        lengths, depths, needles, n = list(self.lengths), self.depths, self.needles, self.new_tokens
        try:
            self.wb.check_scan(lengths, depths, needles, n)
        except Exception as e:  # noqa: BLE001
            self.fail(e)
            return
        prog = Progress()
        self.start("NIAH scan", lambda: self.wb.retrieval_scan(lengths, depths, n_needles=needles, max_new_tokens=n, progress=prog),
                   self._show_scan, progress=prog, on_progress=self._on_progress, failed=self._clear_scan)  # fmt: skip

    def _show_scan(self, r) -> None:
        self.result = r
        self.ablation = None
        top = with_heads(r.heads().head(10)[["layer", "head", "retrieval_score"]])
        sp = r.sparsity()
        note = [] if r.scores.isfinite().any() else [pn.pane.Alert(
            "No NIAH test was answered (ROUGE-1 recall > 0.5): retrieval scores are undefined, so the causal test "
            "has no top heads to ablate. Try other lengths or more new tokens.", alert_type="warning")]  # fmt: skip
        if not r.complete:
            note.append(pn.pane.Alert(f"Cancelled: the {len(r.tests)} test(s) finished before Cancel are shown.", alert_type="info",
                                      css_classes=["wb-partial"]))  # fmt: skip
        self.ablate_button.disabled = bool(note)
        grid = HeadGridView(r, title="retrieval score (Wu et al.)")
        self.follow_selection(grid)
        self.results_area.objects = [
            *note,
            pn.pane.Markdown(
                f"**NIAH accuracy {r.accuracy:.2f}** over {len(r.tests)} tests; "
                f"{sp['above_0.1'] * 100:.1f}% of heads score > 0.1, {sp['zero'] * 100:.0f}% score 0"
            ),  # fmt: skip
            pn.Row(niah_view(r), grid.panel),
            pn.pane.Markdown("### Top retrieval heads"),
            table(top, index=False, css_classes=["wb-top-heads"]),
            self.rank_row(grid, what="scan"),
            pn.pane.Markdown("### Tests"),
            table(r.tests[[c for c in ("length", "depth", "rouge1_recall", "counted", "response") if c in r.tests]], index=False,
                  max_rows=50, css_classes=["wb-tests"]),
            details("test details (needles, token ids)", table(_detail_columns(r.tests), index=False, max_rows=50)),
        ]  # fmt: skip
        self.ablation_area.objects = []

    def _clear_scan(self, err=None) -> None:
        """An error replaces the last scan: its results (and the causal test built on them) go."""
        self.result = None
        self.ablate_button.disabled = True
        self.results_area.clear()
        self.ablation_area.clear()

    def run_ablation(self) -> None:
        if self.result is None:
            self.fail("run a scan first")
            return
        r, k, mode, seeds = self.result, self.k, self.mode, self.seeds
        prog = Progress()
        self.start("ablation", lambda: self.wb.retrieval_ablation(r, k, mode=mode, seeds=seeds, progress=prog), self._show_ablation,
                   progress=prog, on_progress=self._on_progress)  # fmt: skip

    def _show_ablation(self, ab) -> None:
        frame = ab.runs
        self.ablation = frame
        done = [] if ab.complete else [pn.pane.Alert("Cancelled: the runs finished before Cancel are shown.", alert_type="info",
                                                     css_classes=["wb-partial"])]  # fmt: skip
        grids = [niah_view(self.result, ab.accuracy_grid(1))] if (ab.tests["run"] == 1).any() else []
        self.ablation_area.objects = [
            *done,
            pn.pane.Markdown(f"### Causal test ({md_escape(frame['mode'].iloc[0])} ablation, k = {int(frame['k'].max())})"),
            table(frame[[c for c in ("ablated", "seed", "k", "mode", "accuracy", "mean_rouge1_recall") if c in frame]], index=False,
                  css_classes=["wb-ablation-table"]),
            details("which heads were ablated", table(_heads_column(frame), index=False)),
            *grids,
        ]

    def __panel__(self):
        controls = pn.Column(
            pn.widgets.CheckButtonGroup.from_param(self.param.lengths, label="context lengths"),
            pn.Row(
                pn.widgets.IntSlider.from_param(self.param.depths, label="depths", width=180),
                pn.widgets.IntSlider.from_param(self.param.needles, label="needles per cell", width=180),
                pn.widgets.IntSlider.from_param(self.param.new_tokens, label="new tokens", width=180),
            ),  # fmt: skip
            pn.Row(self.scan_button, self.bar, self.progress_text),
        )
        ablation = pn.Row(pn.widgets.IntInput.from_param(self.param.k, label="K", width=90),
                          pn.widgets.Select.from_param(self.param.mode, label="mode", width=120),
                          pn.widgets.IntInput.from_param(self.param.seeds, label="random seeds", width=110), self.ablate_button)  # fmt: skip
        return pn.Column(
            self.header(
                f"## Retrieval heads (Wu et al. 2024)\nAt most {self.wb.caps.max_scan_tests} NIAH tests per scan, "
                f"lengths up to {self.wb.caps.max_scan_length} tokens. The scan takes the model between tests, "
                "so other sessions keep working; Cancel stops after the current test."
            ),  # fmt: skip
            self.alert,
            self.notice,
            controls,
            self.status_row(),
            self.results_area,
            pn.pane.Markdown("### Ablation"),
            ablation,
            self.ablation_area,
            sizing_mode="stretch_width",
        )


def _detail_columns(tests: pd.DataFrame) -> pd.DataFrame:
    """The tests' secondary columns (needle, token ids, …), lists shortened."""
    cols = [c for c in tests.columns if c not in ("length", "depth", "rouge1_recall", "counted", "response")]
    out = tests[cols].copy()
    for c in out.columns:
        out[c] = [_short(v) for v in out[c]]
    return out


def _heads_column(frame: pd.DataFrame) -> pd.DataFrame:
    """Each ablation run's heads as names (``L17H3``)."""
    col = next((c for c in ("heads", "ablated_heads") if c in frame), None)
    if col is None:
        return frame[[c for c in frame.columns if c in ("ablated", "seed")]]
    names = [", ".join(f"L{int(h[0])}H{int(h[1])}" for h in (hs if hs is not None else [])) for hs in frame[col]]
    return pd.DataFrame({"ablated": frame["ablated"], "seed": frame.get("seed"), "heads": names})


def _short(v, width: int = 60):
    s = str(list(v)) if hasattr(v, "__len__") and not isinstance(v, str) else str(v)
    return s if len(s) <= width else s[: width - 1] + "…"

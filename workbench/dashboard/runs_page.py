"""Runs: browse study runs in the runs directory, open their reports, compare two runs."""

from __future__ import annotations

import html

import pandas as pd
import panel as pn

from .common import Page, md_escape, table


class RunsPage(Page):
    title = "Runs"

    def __init__(self, wb, store=None, **params):
        super().__init__(wb, **params)
        self.store = store or wb.runs_store()
        self.table = table(pd.DataFrame(), index=False, sizing_mode="stretch_width", css_classes=["wb-runs-table"])
        self.refresh_button = pn.widgets.Button(label="Refresh", css_classes=["wb-refresh"], width=100)
        self.run_select = pn.widgets.Select(label="run", options=[], width=320, css_classes=["wb-run-select"])
        self.open_button = pn.widgets.Button(label="Open", color="primary", css_classes=["wb-open"], width=100)
        self.report_button = pn.widgets.Button(label="Show report", css_classes=["wb-report"], width=120)
        self.a_select = pn.widgets.Select(label="run A", options=[], width=260)
        self.b_select = pn.widgets.Select(label="run B", options=[], width=260)
        self.compare_button = pn.widgets.Button(label="Compare", css_classes=["wb-compare-runs"], width=100)
        self.detail = pn.Column(sizing_mode="stretch_width")
        self.report_area = pn.Column(sizing_mode="stretch_width")
        self.compare_area = pn.Column(sizing_mode="stretch_width")
        self.refresh_button.on_click(lambda e: self.guarded(self.refresh)())
        self.open_button.on_click(lambda e: self.guarded(self.open)())
        self.report_button.on_click(lambda e: self.show_report())
        self.compare_button.on_click(lambda e: self.guarded(self.compare)())
        self.guarded(self.refresh)()

    def refresh(self) -> None:
        self.clear()
        df = self.store.list()
        self.table.object = df.drop(columns=["path"], errors="ignore")
        ids = [str(x) for x in df["run_id"]] if len(df) else []
        for w in (self.run_select, self.a_select, self.b_select):
            w.options = ids
            if w.value not in ids:
                w.value = ids[0] if ids else None
        if len(ids) > 1:
            self.a_select.value, self.b_select.value = ids[0], ids[1]
        refused = f"; refused (outside the directory): {', '.join(self.store.refused)}" if self.store.refused else ""
        self.status.object = md_escape(f"{len(ids)} runs in {self.store.root}{refused}")

    def open(self) -> None:
        self.clear()
        rid = self.run_select.value
        if not rid:
            self.fail("no run selected")
            return
        run = self.store.run(rid)
        parts = [pn.pane.Markdown(f"### Run {md_escape(rid)}"), pn.pane.Markdown("**Summary**"),
                 table(run.summary(), index=False, max_rows=100, css_classes=["wb-run-summary"])]  # fmt: skip
        fail = run.failures()
        if len(fail):
            parts += [
                pn.pane.Markdown(f"**Failures ({len(fail)})**"),
                table(fail, index=False, max_rows=50),
            ]
        res = run.results()
        parts += [
            pn.pane.Markdown(f"**Results** ({len(res)} rows, first 100)"),
            table(_short(res.head(100)), index=False),
        ]
        self.detail.objects = parts

    def show_report(self) -> None:
        rid = self.run_select.value
        if not rid:
            self.fail("no run selected")
            return
        self.start("report", lambda: self.store.report_html(rid), self._show_report)

    def _show_report(self, page: str) -> None:
        # a sandboxed iframe: the report's own scripts (plotly) run, but not with the app's origin
        # (no allow-same-origin: the report runs in an opaque origin, never the app's)
        frame = (f'<iframe class="wb-report-frame" sandbox="allow-scripts" style="width:100%;height:900px;border:1px solid #ccc" '
                 f'srcdoc="{html.escape(page, quote=True)}"></iframe>')  # fmt: skip
        self.report_area.objects = [pn.pane.HTML(frame, sizing_mode="stretch_width")]

    def compare(self) -> None:
        self.clear()
        a, b = self.a_select.value, self.b_select.value
        if not a or not b or a == b:
            self.fail("choose two different runs")
            return
        self.compare_area.objects = [pn.pane.Markdown(f"### {md_escape(a)} vs {md_escape(b)}"),
                                     table(self.store.compare(a, b), index=False, css_classes=["wb-compare-table"])]  # fmt: skip

    def __panel__(self):
        return pn.Column(
            self.header(f"## Study runs\nRuns under {md_escape(self.store.root)} (only files inside it are opened)."),
            self.alert,
            pn.Row(self.refresh_button, self.status),
            self.table,
            pn.Row(self.run_select, self.open_button, self.report_button),
            self.detail,
            self.report_area,
            pn.pane.Markdown("### Compare two runs"),
            pn.Row(self.a_select, self.b_select, self.compare_button),
            self.compare_area,
            sizing_mode="stretch_width",
        )


def _short(df: pd.DataFrame, width: int = 48) -> pd.DataFrame:
    """Long cells (token id lists, unit configs) cut to ``width`` characters for display."""
    out = df.copy()
    for c in out.columns:
        if out[c].dtype == object or str(out[c].dtype).startswith("str"):
            out[c] = [v if not isinstance(v, (str, list, dict, tuple)) or len(str(v)) <= width else str(v)[: width - 1] + "…"
                      for v in out[c]]  # fmt: skip
    return out

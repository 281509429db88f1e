"""Runs: browse study runs in the runs directory, open their reports, compare two runs."""

from __future__ import annotations

import html

import pandas as pd
import panel as pn

from .common import Page, details, md_escape, table, with_heads


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
        self.more = pn.Column(sizing_mode="stretch_width")
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
        from .runs import run_metric

        metric = run_metric(run)
        parts = [pn.pane.Markdown(f"### Run {md_escape(rid)}"),
                 pn.pane.Markdown(f"**Summary** — `metric_mean` is {md_escape(metric['label'])}"
                                  + (f" (ablation {md_escape(metric['ablation'])}, model {md_escape(metric['model'])})" if metric["task"] else "")),
                 table(run.summary(), index=False, max_rows=100, css_classes=["wb-run-summary"])]  # fmt: skip
        more = []  # secondary detail, behind toggles (tables escape their cells too)
        fail = run.failures()
        if len(fail):
            parts += [
                pn.pane.Markdown(f"**Failures ({len(fail)})**"),
                table(_short(fail[[c for c in ("unit", "error", "worker") if c in fail]] if "error" in fail else fail), index=False,
                      max_rows=50),
            ]  # fmt: skip
            more.append(details("failure details (tracebacks, unit configs)", table(_short(fail, 200), index=False, max_rows=50)))
        res = run.results()
        main, rest = _split_columns(res)
        parts += [
            pn.pane.Markdown(f"**Results** ({len(res)} rows, first 100)"),
            table(_short(with_heads(main.head(100))), index=False, css_classes=["wb-run-results"]),
        ]
        more.append(details("result details (token ids, unit configs, provenance)", table(_short(rest.head(100)), index=False)))
        self.more.objects = more
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
        cmp = self.store.compare(a, b)
        notes = [pn.pane.Alert(md_escape(n), alert_type="warning", css_classes=["wb-compare-note"]) for n in cmp.notes]
        head = f"### {md_escape(a)} vs {md_escape(b)}" + (f" — {md_escape(cmp.metric)}" if cmp.metric else "")
        self.compare_area.objects = [pn.pane.Markdown(head), *notes, table(cmp.frame, index=False, css_classes=["wb-compare-table"])]

    def __panel__(self):
        return pn.Column(
            self.header(f"## Study runs\nRuns under {md_escape(self.store.root)} (only files inside it are opened)."),
            self.alert,
            self.notice,
            pn.Row(self.refresh_button, self.spinner, self.status),
            self.table,
            pn.Row(self.run_select, self.open_button, self.report_button),
            self.detail,
            self.more,
            self.report_area,
            pn.pane.Markdown("### Compare two runs"),
            pn.Row(self.a_select, self.b_select, self.compare_button),
            self.compare_area,
            sizing_mode="stretch_width",
        )


#: result columns shown in the main table; the rest (ids, configs, provenance) go behind the details toggle
MAIN_COLUMNS = ("grid", "select", "k", "seed", "repetition", "layer", "head", "expert", "length", "depth", "item", "metric")


def _split_columns(df: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    main = [c for c in MAIN_COLUMNS if c in df.columns]
    if not main:
        return df, df.iloc[:, :0]
    rest = [c for c in df.columns if c not in main]
    keys = [c for c in ("grid", "k", "seed") if c in df.columns]
    return df[main], df[keys + [c for c in rest if c not in keys]]


def _short(df: pd.DataFrame, width: int = 48) -> pd.DataFrame:
    """Long cells (token id lists, unit configs) cut to ``width`` characters for display."""
    out = df.copy()
    for c in out.columns:
        if out[c].dtype == object or str(out[c].dtype).startswith("str"):
            out[c] = [v if not isinstance(v, (str, list, dict, tuple)) or len(str(v)) <= width else str(v)[: width - 1] + "…"
                      for v in out[c]]  # fmt: skip
    return out

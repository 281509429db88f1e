"""Issue 14, security rows: nothing user- or file-derived is rendered as HTML, run, or written outside its place.

Plain-Python tests here; the served app in a real browser is in tests/test_dashboard_browser.py."""
from __future__ import annotations

import html
import os
import shutil
import stat

import pandas as pd
import pytest

import workbench as wb
from workbench.store import ResultStore


# --- row 5: SQL injection through result file names -------------------------------------------------------


def test_store_sql_file_names_cannot_inject(tmp_path, monkeypatch):
    """A Parquet file whose name closes the quoted path and appends statements (``COPY ... TO``) is only a
    view name: nothing runs, nothing is written."""
    root = tmp_path / "store"
    store = ResultStore(root)
    store.save("ok", pd.DataFrame({"a": [1, 2]}))
    shutil.copy(root / "ok.parquet", root / "x")  # makes the first, injected statement valid
    evil = "x') ; COPY (SELECT 42 AS a) TO 'pwned.csv' ; SELECT 1 --"
    shutil.copy(root / "ok.parquet", root / f"{evil}.parquet")
    quote = 'q"uote'  # a double quote in the name must not end the view's identifier
    shutil.copy(root / "ok.parquet", root / f"{quote}.parquet")
    glob = "a[0-9]*"  # glob characters select only the file of that name
    shutil.copy(root / "ok.parquet", root / f"{glob}.parquet")
    monkeypatch.chdir(tmp_path)
    assert store.sql("SELECT sum(a) AS s FROM ok")["s"][0] == 3
    assert not (tmp_path / "pwned.csv").exists() and not (root / "pwned.csv").exists()
    assert store.sql(f'SELECT count(*) AS n FROM "{evil}"')["n"][0] == 2
    assert store.sql('SELECT count(*) AS n FROM "q""uote"')["n"][0] == 2
    assert store.sql(f'SELECT count(*) AS n FROM "{glob}"')["n"][0] == 2


# --- files the store writes: the user's umask, not mkstemp's 0600 ------------------------------------------


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_store_files_respect_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        path = ResultStore(tmp_path).save("r", pd.DataFrame({"a": [1]}))
        assert _mode(path) == 0o644
        os.umask(0o002)
        path = ResultStore(tmp_path).save("g", pd.DataFrame({"a": [1]}))
        assert _mode(path) == 0o664
    finally:
        os.umask(old)


def test_run_results_read_only_unit_files(tmp_path):
    """Unit files are read through DuckDB by their paths: a file whose name is a glob (``eval-*``) must not pull
    in every other unit's rows (nor be read at all: it is not a unit id)."""
    from workbench.study import Run

    run = Run.create(tmp_path / "run", 'name = "x"\n[task]\nkind = "loss"\n[[grid]]\nselect = "none"\n', resume=False)
    frame = pd.DataFrame({"metric": [1.0], "unit_id": ["eval-0123456789abcdef"]})
    run.units.save("eval-0123456789abcdef", frame)
    run.units.save("eval-*", frame.assign(unit_id="eval-*"))
    assert run.completed() == {"eval-0123456789abcdef"}
    assert len(run.results()) == 1


# --- row 3: writes and deletes stay inside the runs directory ------------------------------------------------

STUDY_TOML = 'name = "x"\n[model]\nsource = "tiny:llama"\n[task]\nkind = "loss"\n[[grid]]\nselect = "none"\n'


def _outside(tmp_path):
    out = tmp_path / "outside"
    out.mkdir()
    (out / "precious.png").write_bytes(b"not yours")
    (out / "secret.csv").write_text("keep me")
    return out


def test_report_symlinked_out_of_the_run_is_refused(tmp_path):
    from workbench.study import Run, StudyError

    outside = _outside(tmp_path)
    run = Run.create(tmp_path / "runs" / "r", STUDY_TOML, resume=False)
    (run.path / "report").symlink_to(outside)
    with pytest.raises(StudyError, match="outside the run directory"):
        run.report(png=False)
    assert sorted(p.name for p in outside.iterdir()) == ["precious.png", "secret.csv"]


def test_report_files_that_are_links_are_replaced_not_written_through(tmp_path):
    from workbench.study import Run

    outside = _outside(tmp_path)
    run = Run.create(tmp_path / "runs" / "r", STUDY_TOML, resume=False)
    (run.path / "report").mkdir()
    (run.path / "report" / "summary.csv").symlink_to(outside / "secret.csv")
    (run.path / "report" / "index.html").symlink_to(outside / "index.html")
    (run.path / "report" / "old.png").symlink_to(outside / "precious.png")
    page = run.report(png=False)
    assert page.is_file() and not page.is_symlink() and not (run.path / "report" / "summary.csv").is_symlink()
    assert (outside / "secret.csv").read_text() == "keep me" and not (outside / "index.html").exists()
    assert (outside / "precious.png").read_bytes() == b"not yours"


def test_listing_runs_writes_nothing_and_does_not_open_links_out(tmp_path):
    from workbench.study import Run, list_runs

    elsewhere = Run.create(tmp_path / "elsewhere", STUDY_TOML, resume=False).path
    (elsewhere / "units").rmdir()
    before = sorted(p.name for p in elsewhere.iterdir())
    root = tmp_path / "runs"
    mine = Run.create(root / "mine", STUDY_TOML, resume=False)
    (mine.path / "units" / "eval-0123456789abcdef.parquet").write_bytes(b"PAR1 half a file")
    (root / "sneaky").symlink_to(elsewhere)
    runs = list_runs(root).set_index("run_id")
    assert sorted(p.name for p in (mine.path / "units").iterdir()) == ["eval-0123456789abcdef.parquet"]  # not moved
    assert sorted(p.name for p in elsewhere.iterdir()) == before  # no failures/ or units/ made over there
    assert runs.loc["sneaky", "status"].startswith("not opened") and runs.loc["mine", "name"] == "x"
    Run(root / "mine")  # opening a run creates nothing either
    assert not (root / "mine" / "failures").exists()


def test_failure_and_unit_folders_linked_out_are_refused(tmp_path):
    from workbench.study import Run, StudyError, load_study
    from workbench.study.plan import Shape, eval_units

    outside = _outside(tmp_path)
    run = Run.create(tmp_path / "runs" / "r", STUDY_TOML, resume=False)
    (run.path / "failures").symlink_to(outside)
    (unit,) = eval_units(load_study(STUDY_TOML), Shape(2, 4, 0), {})
    with pytest.raises(StudyError, match="outside the run directory"):
        run.write_failure(unit, "Traceback ...\nValueError: x", worker="w")
    with pytest.raises(StudyError, match="outside the run directory"):
        run.write_unit(unit, pd.DataFrame({"metric": [1.0]}), _provenance(), seconds=0.0, worker="w")
    assert sorted(p.name for p in outside.iterdir()) == ["precious.png", "secret.csv"]


def _provenance() -> dict:
    return {"model_source": "s", "model_id": None, "revision": None, "weights_hash": "h", "dtype": "float32",
            "bos_policy": "b", "versions": {}}  # fmt: skip


def test_dashboard_report_of_a_linked_report_writes_nothing_outside(tmp_path):
    pytest.importorskip("panel")
    from workbench.dashboard.state import DashboardError, RunsStore
    from workbench.study import Run

    outside = _outside(tmp_path)
    root = tmp_path / "runs"
    run = Run.create(root / "r", STUDY_TOML, resume=False)
    (run.path / "report").symlink_to(outside)
    with pytest.raises(wb.WorkbenchError, match="outside"):
        RunsStore(root).report_html("r")
    assert sorted(p.name for p in outside.iterdir()) == ["precious.png", "secret.csv"]
    assert DashboardError  # the store's own refusals are DashboardErrors (imported for the reader)


# --- row 1: nothing user- or file-derived reaches the page as HTML or Markdown ---------------------------------

XSS = "<img src=x onerror=alert(document.domain)>"


def _no_markup(text: str) -> None:
    """No tag but the line breaks the escaping itself adds."""
    assert "<" not in text.replace("<br>", ""), text


def test_md_escape_shows_text_as_text():
    pytest.importorskip("panel")
    from workbench.dashboard.common import html_text, md_escape

    _no_markup(md_escape(XSS))
    out = md_escape("__bold__ [x](javascript:1) `c`")  # every Markdown special as a character reference: no markup
    assert not set("_[]()`:") & set(out.replace("&#", "")) and html.unescape(out) == "__bold__ [x](javascript:1) `c`"
    assert md_escape("a\nb") == "a<br>\nb" and html_text("<b>\n") == "&lt;b&gt;<br>"


def test_runs_page_escapes_run_names_files_and_errors(tmp_path):
    pytest.importorskip("panel")
    import json

    from workbench.dashboard.runs_page import RunsPage
    from workbench.dashboard.state import RunsStore, Workbench
    from workbench.study import Run

    root = tmp_path / "runs"
    Run.create(root / XSS, STUDY_TOML, resume=False)
    bad = root / "bad_toml"
    bad.mkdir(parents=True)
    (bad / "study.toml").write_text(f'"{XSS}" = 1\n' + STUDY_TOML)
    failed = Run.create(root / "failed", STUDY_TOML, resume=False).path
    (failed / "failures").mkdir(exist_ok=True)
    (failed / "failures" / "eval-0000000000000000.json").write_text(json.dumps({"unit_id": "x", "unit": XSS, "error": XSS}))
    (root / "..link").symlink_to(tmp_path)  # a refused entry: its name goes into the status line
    page = RunsPage(Workbench("tiny:llama", runs=root), store=RunsStore(root))
    _no_markup(page.status.object)
    for rid in page.run_select.options:
        page.run_select.value = rid
        page.guarded(page.open)()
        _no_markup(page.alert.object)
        for part in page.detail.objects:
            if isinstance(part.object, str):
                _no_markup(part.object)
            else:
                assert part.escape  # DataFrame panes escape their cells
        page.show_report()
        page.wait()
        _no_markup(page.alert.object)
    assert XSS in page.run_select.options and page.table.escape
    page.fail(wb.WorkbenchError(f"no run {XSS!r}"))
    _no_markup(page.alert.object)
    assert XSS in page.last_error  # the text itself is kept, only its rendering is escaped


# --- row 4: every list, string and number a browser can send is capped server-side ----------------------------

LONG_TEXT = "The lighthouse keeper climbed the stairs every evening to light the lamp. " * 6


@pytest.fixture(scope="module")
def tiny_llama():
    return wb.load("tiny:llama")


def test_attention_view_caps_queries_from_the_page(tiny_llama):
    import time

    pytest.importorskip("panel")
    from workbench.widgets import AttentionView, to_panel

    view = AttentionView(tiny_llama, LONG_TEXT, max_queries=8)
    T = view.ids.shape[-1]
    assert T > 100
    comp = to_panel(view)
    t = time.perf_counter()
    comp.queries = list(range(T)) * 1000  # the whole prompt, many times over, from the page
    assert time.perf_counter() - t < 2
    assert "at most 8 queries" in view.error and view.queries == [T - 1] and comp.queries == [T - 1]
    comp.queries = [1, 2, 3]
    assert view.queries == [1, 2, 3] and view.error == ""
    with pytest.raises(wb.WorkbenchError, match="at most 8 queries"):
        view.queries = list(range(9))


def test_page_may_set_only_a_widgets_inputs(tiny_llama):
    pytest.importorskip("panel")
    from workbench.widgets import AttentionView, to_panel

    view = AttentionView(tiny_llama, "hello there friend")
    comp = to_panel(view)
    tokens = list(view.tokens)
    comp.tokens = ["x"] * 100_000  # an output trait: the page has no business setting it
    assert view.tokens == tokens and comp.tokens == tokens and "tokens" in view.error
    comp.rows = [{"query": 0, "weights": [1.0] * 100_000}]
    assert len(view.rows[0]["weights"]) <= view.ids.shape[-1]
    view.set_state({"tokens": ["y"], "n_layers": 10**9})  # the Jupyter host's path from the browser
    assert view.tokens == tokens and view.n_layers == tiny_llama.spec.n_layers


def test_head_grid_and_routing_view_cap_their_lists(tiny_llama, tiny):
    import time

    pytest.importorskip("panel")
    import torch

    from workbench.widgets import HeadGrid, RoutingView, to_panel

    grid = HeadGrid({"x": torch.rand(2, 4)})
    comp = to_panel(grid)
    t = time.perf_counter()
    comp.ablate = [[0, 1]] * 200_000
    assert time.perf_counter() - t < 2 and "at most 8" in grid.error and grid.ablate == []
    comp.selected = list(range(100_000))
    assert grid.selected != comp.selected[:2] or grid.error
    moe = tiny("mixtral")
    rv = RoutingView(moe, "the cat sat", max_new_tokens=1)
    rcomp = to_panel(rv)
    n = len(rv.layers) * rv.n_experts
    rcomp.masked = [[rv.layers[0], 0]] * (n + 1)
    assert f"at most {n}" in rv.error and rv.masked == []


def test_dashboard_params_cap_lists_and_strings(tiny_llama):
    pytest.importorskip("panel")
    from workbench.dashboard.state import DashboardError, parse_experts, parse_heads

    spec = tiny_llama.spec
    with pytest.raises(DashboardError, match="at most 8 heads"):
        parse_heads(["L0H1"] * 100_000, spec)
    with pytest.raises(DashboardError, match="not a head"):
        parse_heads(["L0H1" + "0" * 10_000], spec)
    moe = wb.load("tiny:mixtral")
    with pytest.raises(DashboardError, match="at most"):
        parse_experts(["L0E1"] * 100_000, moe.spec)


def test_prompt_lab_sink_keys_are_capped(tiny_llama):
    pytest.importorskip("panel")
    from workbench.dashboard.prompt_lab import PromptLab
    from workbench.dashboard.state import Workbench

    lab = PromptLab(Workbench("tiny:llama", loader=lambda s: tiny_llama))
    lab.sink_keys = ",".join(["1"] * 100_000)
    with pytest.raises(wb.WorkbenchError, match="sink keys"):
        lab.edits()
    lab.sink_keys = "0, 3"
    assert lab.edits().sink_keys == (0, 3)


def test_run_directories_given_as_relative_paths(tmp_path, monkeypatch):
    """Confinement resolves relative paths from the working directory (``study run s.toml --out runs/x``)."""
    from workbench.study import Run, list_runs
    from workbench.study.plan import Shape, eval_units
    from workbench.study import load_study

    monkeypatch.chdir(tmp_path)
    run = Run.create("runs/x", STUDY_TOML, resume=False)
    (unit,) = eval_units(load_study(STUDY_TOML), Shape(2, 4, 0), {})
    run.write_unit(unit, pd.DataFrame({"metric": [1.0]}), _provenance(), seconds=0.0, worker="w")
    run.write_failure(unit, "Traceback\nValueError: x", worker="w")
    assert sorted(p.name for p in (tmp_path / "runs" / "x").iterdir()) == ["failures", "run.json", "study.toml", "units"]
    assert run.completed() == {unit.id} and list_runs("runs")["status"].tolist() == ["failed units"]
    assert run.report(png=False) == (tmp_path / "runs" / "x" / "report" / "index.html").resolve()


# --- reads stay inside the store / run too ------------------------------------------------------------------


def test_store_does_not_read_results_linked_out_of_it(tmp_path):
    """A ``*.parquet`` symlink in a results directory pointing elsewhere is neither listed, queried nor loaded."""
    outside = ResultStore(tmp_path / "elsewhere")
    outside.save("secret", pd.DataFrame({"a": [42]}))
    store = ResultStore(tmp_path / "store")
    store.save("ok", pd.DataFrame({"a": [1]}))
    (store.root / "leak.parquet").symlink_to(outside.root / "secret.parquet")
    assert store.names() == ["ok"]
    with pytest.raises(wb.WorkbenchError, match="outside"):
        store.load("leak")
    with pytest.raises(Exception, match="leak"):  # no such view: DuckDB's catalog error names it
        store.sql("SELECT * FROM leak")
    (store.root / "broken.parquet").write_bytes(b"PAR1 not a parquet file")
    with pytest.raises(wb.WorkbenchError, match="unreadable"):
        store.load("broken")


def test_run_does_not_read_unit_or_failure_files_linked_out(tmp_path):
    from workbench.study import Run

    run = Run.create(tmp_path / "runs" / "r", STUDY_TOML, resume=False)
    other = Run.create(tmp_path / "other", STUDY_TOML, resume=False)
    uid = "eval-0123456789abcdef"
    other.units.save(uid, pd.DataFrame({"metric": [1.0], "unit_id": [uid]}))
    (run.path / "units" / f"{uid}.parquet").symlink_to(other.units.path(uid))
    (tmp_path / "fail.json").write_text('{"unit_id": "x", "error": "secret"}')
    (run.path / "failures").mkdir()
    (run.path / "failures" / "x.json").symlink_to(tmp_path / "fail.json")
    with pytest.warns(UserWarning, match="outside the run directory"):
        assert run.completed(quarantine=False) == set()
    fails = run.failures()
    assert "secret" not in fails["error"].tolist() and "outside the run directory" in fails["error"].iloc[0]


def test_html_report_replaces_a_link_instead_of_writing_through(tmp_path):
    from workbench import report

    outside = _outside(tmp_path)
    out = tmp_path / "results"
    out.mkdir()
    (out / "report.html").symlink_to(outside / "secret.csv")
    (out / "report.tmp").symlink_to(outside / "precious.png")  # the old fixed temp name
    report.write_html(out / "report.html", "t", [("s", "text")])
    assert not (out / "report.html").is_symlink() and "text" in (out / "report.html").read_text()
    assert (outside / "secret.csv").read_text() == "keep me" and (outside / "precious.png").read_bytes() == b"not yours"

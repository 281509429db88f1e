"""Issue 14, security rows: nothing user- or file-derived is rendered as HTML, run, or written outside its place.

Plain-Python tests here; the served app in a real browser is in tests/test_dashboard_browser.py."""
from __future__ import annotations

import html
import json
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
    from workbench.views.dashboard.state import DashboardError, RunsStore
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
    from workbench.views.dashboard.common import html_text, md_escape

    _no_markup(md_escape(XSS))
    out = md_escape("__bold__ [x](javascript:1) `c`")  # every Markdown special as a character reference: no markup
    assert not set("_[]()`:") & set(out.replace("&#", "")) and html.unescape(out) == "__bold__ [x](javascript:1) `c`"
    assert md_escape("a\nb") == "a<br>\nb" and html_text("<b>\n") == "&lt;b&gt;<br>"


def test_runs_page_escapes_run_names_files_and_errors(tmp_path):
    pytest.importorskip("panel")
    import json

    from workbench.views.dashboard.runs_page import RunsPage
    from workbench.views.dashboard.state import RunsStore, Workbench
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


def _count_item_checks(monkeypatch) -> list:
    """Count traitlets' per-item validation (``Int.validate``): a cap checked first leaves it at zero."""
    import traitlets

    calls = []
    original = traitlets.Int.validate

    def counted(self, obj, value):
        calls.append(1)
        return original(self, obj, value)

    monkeypatch.setattr(traitlets.Int, "validate", counted)
    return calls


def test_attention_view_caps_queries_from_the_page(tiny_llama, monkeypatch):
    pytest.importorskip("panel")
    from workbench.views.widgets import AttentionView, to_panel

    view = AttentionView(tiny_llama, LONG_TEXT, max_queries=8)
    T = view.ids.shape[-1]
    assert T > 100
    comp = to_panel(view)
    rows = []
    monkeypatch.setattr(view, "_payload", lambda *a, **k: rows.append(a) or [])
    checks = _count_item_checks(monkeypatch)
    comp.queries = list(range(T)) * 1000  # the whole prompt, many times over, from the page
    assert checks == [] and rows == []  # refused by its length: not one item validated, no row computed
    monkeypatch.undo()
    assert "at most 8 queries" in view.error and view.queries == [T - 1] and comp.queries == [T - 1]
    comp.queries = [1, 2, 3]
    assert view.queries == [1, 2, 3] and view.error == ""
    with pytest.raises(wb.WorkbenchError, match="at most 8 queries"):
        view.queries = list(range(9))


def test_page_may_set_only_a_widgets_inputs(tiny_llama):
    pytest.importorskip("panel")
    from workbench.views.widgets import AttentionView, to_panel

    view = AttentionView(tiny_llama, "hello there friend")
    comp = to_panel(view)
    tokens = list(view.tokens)
    comp.tokens = ["x"] * 100_000  # an output trait: the page has no business setting it
    assert view.tokens == tokens and comp.tokens == tokens and "tokens" in view.error
    comp.rows = [{"query": 0, "weights": [1.0] * 100_000}]
    assert len(view.rows[0]["weights"]) <= view.ids.shape[-1]
    view.set_state({"tokens": ["y"], "n_layers": 10**9})  # the Jupyter host's path from the browser
    assert view.tokens == tokens and view.n_layers == tiny_llama.spec.n_layers


def test_head_grid_and_routing_view_cap_their_lists(tiny_llama, tiny, monkeypatch):
    pytest.importorskip("panel")
    import torch

    from workbench.views.widgets import HeadGrid, RoutingView, to_panel

    grid = HeadGrid({"x": torch.rand(2, 4)})
    comp = to_panel(grid)
    checks = _count_item_checks(monkeypatch)
    comp.ablate = [[0, 1]] * 200_000
    assert checks == []  # the cap came before any of the 400,000 numbers was validated
    monkeypatch.undo()
    assert "at most 8" in grid.error and grid.ablate == []
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
    from workbench.views.dashboard.state import DashboardError, parse_experts, parse_heads

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
    from workbench.views.dashboard.prompt_lab import PromptLab
    from workbench.views.dashboard.state import Workbench

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
    from workbench.views import report

    outside = _outside(tmp_path)
    out = tmp_path / "results"
    out.mkdir()
    (out / "report.html").symlink_to(outside / "secret.csv")
    (out / "report.tmp").symlink_to(outside / "precious.png")  # the old fixed temp name
    report.write_html(out / "report.html", "t", [("s", "text")])
    assert not (out / "report.html").is_symlink() and "text" in (out / "report.html").read_text()
    assert (outside / "secret.csv").read_text() == "keep me" and (outside / "precious.png").read_bytes() == b"not yours"


# === issue 27: hardening, round two (rows 1 and 2 over real sockets: tests/test_security_browser.py) ============

# --- row 1 (the rule; the served attack is in tests/test_security_browser.py): which Host names are accepted -----


def test_host_rule_loopback_and_configured_names_and_with_auth_ip_addresses():
    pytest.importorskip("panel")
    from bokeh.server.auth_provider import NullAuth

    from workbench.views.dashboard.serve import host_problem

    class App:
        websocket_origins = {"127.0.0.1:5006", "dash.example.org:443"}
        auth_provider = NullAuth()

    for ok in ("127.0.0.1:5006", "localhost:5006", "LOCALHOST.", "[::1]:5006", "127.9.9.9", "dash.example.org:443"):
        assert host_problem(ok, App()) is None, ok  # loopback, or the name the operator configured (a proxy's)
    for bad in ("evil.example:5006", "10.0.0.1:5006", "", None, "localhost.evil.example", "dash.example.org.evil.example"):
        assert host_problem(bad, App()), bad
    App.auth_provider = object()  # authentication on: IP addresses too (a rebinding page always has a name)
    assert host_problem("10.0.0.1:5006", App()) is None
    assert "--allow-websocket-origin=evil.example" in host_problem("evil.example:5006", App())


# --- row 3: compiled code is loaded only when nobody but its owner could have changed it ----------------------


def test_compiled_step_refuses_group_writable_code_dirs_and_links(monkeypatch, tmp_path):
    """A planted tile step that is group-writable, sits in a group-writable folder, or is reached through a symlink
    into a world-writable folder is not loaded (its constructor would run in this process)."""
    import torch

    from workbench.attention import native as NS
    from workbench.base.files import untrusted_part

    cache = tmp_path / "cache"
    monkeypatch.setenv("WORKBENCH_CACHE", str(cache))
    monkeypatch.setattr(NS, "_native", {})
    if NS.native_step(torch.float32) is None:
        pytest.skip("no C compiler here")
    (built,) = (cache / "native").glob("flash_step-*.so")

    def loads() -> bool:
        monkeypatch.setattr(NS, "_native", {})
        return NS.native_step(torch.float32) is not None

    assert untrusted_part(built) is None and loads()
    built.chmod(0o775)  # group-writable file: the old check (world bit only) loaded it
    assert "writable by its group" in untrusted_part(built) and not loads()
    built.chmod(0o755)
    (cache / "native").chmod(0o775)  # group-writable folder: anyone in the group can swap the file
    assert str(cache / "native") in untrusted_part(built) and not loads()
    (cache / "native").chmod(0o755)
    assert loads()
    shared = tmp_path / "shared"  # a world-writable folder without the sticky bit, reached through a link
    shared.mkdir()
    shared.chmod(0o777)
    (cache / "native").rename(shared / "native")
    (cache / "native").symlink_to(shared / "native")
    assert str(shared) in untrusted_part(built) and not loads()
    shared.chmod(0o755)
    assert loads()


# --- row 7: crash logs hold no secrets and only their owner can read them ---------------------------------------


def test_serve_crash_log_redacts_secrets_and_is_private(tmp_path, monkeypatch):
    """A crash of ``workbench serve --basic-auth PW --cookie-secret S`` used to write the whole command line (and an
    error quoting the password) to a world-readable log."""
    import socket
    import sys

    from typer.testing import CliRunner

    from workbench.cli import app

    password, cookie = "hunter2-password", "cookie-secret-0123456789"
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path / "cache"))

    def crash(*a, basic_auth=None, **k):
        raise RuntimeError(f"could not read the users file {basic_auth}")  # an error that quotes the secret

    monkeypatch.setattr("workbench.views.dashboard.serve.serve", crash)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = ["serve", "--port", str(port), "--model", "tiny:llama", "--runs", str(tmp_path), "--basic-auth", password,
            f"--cookie-secret={cookie}"]  # fmt: skip
    monkeypatch.setattr(sys, "argv", ["workbench", *args])
    old = os.umask(0o022)  # the usual umask: the old log came out 0644
    try:
        result = CliRunner().invoke(app, args)
    finally:
        os.umask(old)
    assert result.exit_code == 3, result.output
    log = result.output.split("traceback written to ")[1].strip()
    text = open(log).read()
    assert "RuntimeError: could not read the users file [redacted]" in text and "--basic-auth [redacted]" in text
    assert password not in text and cookie not in text and "--cookie-secret=[redacted]" in text
    assert _mode(log) == 0o600 and _mode(os.path.dirname(log)) == 0o700


# --- row 6: every read under a root resolves and confines files and folders --------------------------------------


def test_folders_named_like_results_and_run_files_linked_out_are_not_read(tmp_path):
    """A folder ``evil.parquet/`` in a store (or ``units/eval-….parquet/`` in a run) holding a link to an outside
    Parquet file was read as a dataset by ``ResultStore.sql``/``load``; ``study.toml`` and ``run.json`` linked
    outside were read and shown in the Runs tab."""
    from workbench.study import Run, list_runs

    secret = tmp_path / "outside"
    secret.mkdir()
    ResultStore(secret).save("secret", pd.DataFrame({"a": [42]}))
    store = ResultStore(tmp_path / "store")
    store.save("ok", pd.DataFrame({"a": [1]}))
    (store.root / "evil.parquet").mkdir()
    (store.root / "evil.parquet" / "part-0.parquet").symlink_to(secret / "secret.parquet")
    assert store.names() == ["ok"]
    with pytest.raises(wb.WorkbenchError, match="is a folder, not a file"):
        store.load("evil")
    with pytest.raises(Exception, match="evil"):  # no such view: the folder was never registered
        store.sql("SELECT * FROM evil")

    runs = tmp_path / "runs"
    run = Run.create(runs / "r", STUDY_TOML, resume=False)
    uid = "eval-0123456789abcdef"
    (run.path / "units" / f"{uid}.parquet").mkdir()
    (run.path / "units" / f"{uid}.parquet" / "part-0.parquet").symlink_to(
        ResultStore(secret).save(uid, pd.DataFrame({"metric": [42.0], "unit_id": [uid]})))
    with pytest.warns(UserWarning, match="is a folder"):
        assert run.completed(quarantine=False) == set()
    assert run.results().empty
    # study.toml and run.json linked outside the run: not read, the listing says why
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    (hidden / "study.toml").write_text('name = "SECRET-STUDY-NAME"\n' + STUDY_TOML.split("\n", 1)[1])
    (hidden / "run.json").write_text('{"created": "SECRET-CREATED"}')
    linked = Run.create(runs / "linked", STUDY_TOML, resume=False).path
    (linked / "study.toml").unlink()
    (linked / "study.toml").symlink_to(hidden / "study.toml")
    (linked / "run.json").unlink()
    (linked / "run.json").symlink_to(hidden / "run.json")
    listed = list_runs(runs).set_index("run_id")
    assert "SECRET" not in listed.to_string()
    assert "outside" in listed.loc["linked", "status"] and "study.toml" in listed.loc["linked", "status"]
    with pytest.raises(wb.WorkbenchError, match="outside"):
        Run(linked).study
    with pytest.warns(UserWarning, match="run.json"):
        assert Run._meta(linked) == {}


# --- row 9: exact file lists, never patterns; one head once ------------------------------------------------------


def test_run_directory_with_glob_characters_reads_only_its_own_units(tmp_path):
    """DuckDB expands glob characters even in a list of paths: the results of ``runs/run-*`` held every ``run-…``
    run's rows."""
    from workbench.study import Run

    uid = "eval-0123456789abcdef"
    for name, metric in (("run-a", 1.0), ("run-b", 2.0), ("run-*", 3.0)):
        run = Run.create(tmp_path / name, STUDY_TOML, resume=False)
        run.units.save(uid, pd.DataFrame({"metric": [metric], "unit_id": [uid]}))
    res = Run(tmp_path / "run-*").results()
    assert res["metric"].tolist() == [3.0]


def test_a_set_naming_one_head_twice_is_refused_with_its_line():
    """``sets = [[[0, 0], [0, 0]]]`` ablated one head and was recorded as k = 2."""
    from workbench.study import StudyError, load_study

    text = STUDY_TOML.replace('select = "none"', 'select = "explicit"\nsets = [[[0, 0], [0, 0]]]')
    with pytest.raises(StudyError, match=r"grid\[0\]\.sets \(line 8\): set 0 lists \[0, 0\] twice.*k = 2 for 1 distinct"):
        load_study(text)
    assert load_study(text.replace("[[[0, 0], [0, 0]]]", "[[[0, 0], [0, 1]]]")).grid[0].sets == [[(0, 0), (0, 1)]]


# --- row 5: mean-ablation studies run (the study hands token ids as the reference) -------------------------------


def test_mean_ablation_study_runs_end_to_end(tmp_path):
    """Every ablated unit of a ``mode = "mean"`` study failed with ``TypeError: unhashable type: 'list'``."""
    import torch

    from workbench.study import run_study
    from workbench.study.tasks import texts

    study = (STUDY_TOML.replace('kind = "loss"', 'kind = "loss"\nn_texts = 2\nmax_tokens = 32')
             + '[ablation]\nmode = "mean"\n[[grid]]\nselect = "explicit"\nsets = [[[0, 1]], [[1, 0], [1, 2]]]\n')  # fmt: skip
    path = tmp_path / "mean.toml"
    path.write_text(study)
    run = run_study(path, tmp_path / "run", progress=False)
    assert run.status() == {"n_units": 3, "n_done": 3, "n_failed": 0, "status": "complete"}, run.failures()
    res = run.results()
    model = wb.load("tiny:llama")
    ids = [model.tokenizer.encode(t)[:32] for t in texts(run.study)]
    means = wb.head_output_means(model, ids)  # the token-id reference the study uses, accepted directly
    for uid, part in res[res["select"] == "explicit"].groupby("unit_id"):
        heads = [tuple(h) for h in json.loads(part["targets"].iloc[0])]
        with torch.no_grad(), wb.intervene(model, wb.HeadAblation(heads, mode="mean", means=means)):
            expected = [float(torch.nn.functional.cross_entropy(model.hf(input_ids=torch.tensor([i])).logits[0, :-1], torch.tensor(i[1:])))
                        for i in ids]  # fmt: skip
        assert part.sort_values("item")["metric"].tolist() == pytest.approx(expected, abs=1e-5)
    base = res[res["select"] == "none"]["metric"].mean()
    assert all(res[res["select"] == "explicit"].groupby("unit_id")["metric"].mean() != base)  # the ablation did something


# --- row 4: --resume never mixes units of two models ----------------------------------------------------------------


def test_resume_with_other_weights_is_refused_naming_the_field(tmp_path):
    """Weights changed between a run and its resume gave a "complete" run with units of two weights hashes."""
    import torch

    from workbench.study import StudyError, run_study

    path = tmp_path / "s.toml"
    path.write_text(STUDY_TOML.replace('kind = "loss"', 'kind = "loss"\nn_texts = 1\nmax_tokens = 16')
                    + '[[grid]]\nselect = "explicit"\nsets = [[[0, 1]], [[1, 0]]]\n')  # fmt: skip
    run = run_study(path, tmp_path / "run", progress=False, model=wb.load("tiny:llama"))
    assert run.status()["n_done"] == 3
    first = sorted(run.completed())[0]
    run.units.path(first).unlink()  # as if the run had been interrupted
    other = wb.load("tiny:llama")
    with torch.no_grad():
        other.hf.get_input_embeddings().weight[0, 0] += 1.0  # other weights, same everything else
    with pytest.raises(StudyError, match=r"2 of its 2 finished units were computed with weights_hash blake2b:.*mix results"):
        run_study(path, tmp_path / "run", resume=True, progress=False, model=other)
    assert first not in run.completed()  # nothing ran
    run = run_study(path, tmp_path / "run", resume=True, progress=False, model=wb.load("tiny:llama"))
    assert run.status()["status"] == "complete" and run.results()["weights_hash"].nunique() == 1


# --- row 8: provenance describes the weights and tokenizer actually loaded ----------------------------------------


def test_provenance_names_the_loaded_weights_and_tokenizer(tmp_path, monkeypatch):
    """A byte flip plus a rewritten verification stamp loaded other weights while provenance still named the GGUF;
    an unstamped ``added_tokens.json`` in the cache changed token ids silently."""
    from workbench.models import embedded
    from workbench.base.errors import ModelLoadError
    from workbench.models.zoo.tiny import byte_tokenizer, tiny_hf_model

    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "cache" / embedded.SMOLLM2.name / "safetensors"  # a (tiny) verified conversion
    out.mkdir(parents=True)
    tiny_hf_model("llama").save_pretrained(out)
    byte_tokenizer().save_pretrained(out)
    embedded.write_stamp(out, embedded.SMOLLM2)
    clean = wb.load().provenance
    assert clean.weights_hash.startswith("safetensors-sha256:") and clean.tokenizer_hash.startswith("blake2b:")

    weights = out / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x40  # one byte of the last tensor
    weights.write_bytes(bytes(data))
    embedded.write_stamp(out, embedded.SMOLLM2)  # the attacker rewrites the stamp: the file verifies
    assert wb.load().provenance.weights_hash not in (clean.weights_hash, "gguf-sha256:" + embedded.SMOLLM2.gguf_sha256)

    plain = tmp_path / "plain"  # the same files as a directory source, before the extra file
    shutil.copytree(out, plain)
    added = json.dumps({"ab": 259})
    (out / "added_tokens.json").write_text(added)  # not in the stamp: the conversion is not used as it is
    assert "added_tokens.json is not part of the conversion" in embedded.check_conversion(out, embedded.SMOLLM2, full=False)

    def no_reconversion(*a, **k):
        raise ModelLoadError("reconversion (needs the GGUF) is not part of this test")

    monkeypatch.setattr(embedded, "convert", no_reconversion)
    with pytest.warns(UserWarning, match="added_tokens.json"), pytest.raises(ModelLoadError, match="reconversion"):
        wb.load()
    before = wb.load(str(plain))
    (plain / "added_tokens.json").write_text(added)  # a directory source: it is used, and provenance says so
    after = wb.load(str(plain))
    assert before.encode("ab").tolist() != after.encode("ab").tolist()
    assert before.provenance.tokenizer_hash != after.provenance.tokenizer_hash


# --- row 10: every misuse is a WorkbenchError that says what to do ----------------------------------------------------


def test_misuse_of_captures_hooks_studies_and_models_is_a_clear_error(tiny_llama, tmp_path):
    """Each of these was a bare traceback or a silent empty result."""
    import threading

    import torch

    from workbench.study import load_study

    m = tiny_llama
    block = wb.capture(m, wb.AttentionStats())
    with block:
        m.forward_text("hello there")
    with pytest.raises(wb.WorkbenchError, match="already entered"):  # was AttributeError: ... no attribute 'args'
        with block:
            pass
    shared, errors = wb.capture(m, wb.AttentionStats()), []
    with shared:  # a second thread entering the same block while this one holds it
        t = threading.Thread(target=lambda: errors.append(pytest.raises(wb.WorkbenchError, shared.__enter__)))
        t.start()
        t.join()
    assert errors and "already entered" in str(errors[0].value)
    with pytest.raises(wb.WorkbenchError, match="already entered"):
        once = wb.intervene(m, wb.HeadAblation([(0, 0)]))
        with once, once:
            pass
    # mean reference given as token ids: accepted (a list per text); one flat id list says how to pass it
    ids = m.tokenizer.encode("the cat sat on the mat")
    with wb.intervene(m, wb.HeadAblation([(0, 1)], mode="mean", reference=[ids])):
        m.forward_text("a b c")
    assert torch.equal(wb.head_output_means(m, [ids])[(0, 1)], wb.head_output_means(m, [torch.tensor(ids)])[(0, 1)])
    with pytest.raises(wb.WorkbenchError, match=r"flat list of token ids is one text.*\[ids\]"):
        wb.head_output_means(m, ids)
    # a hook returning a meta tensor (was NotImplementedError deep in torch)
    meta = wb.Hook("blocks.0.hook_resid_post", lambda t, name: torch.empty(t.shape, device="meta"))
    with pytest.raises(wb.WorkbenchError, match="'meta' device"):
        with wb.intervene(m, meta):
            m.forward_text("hello")
    with pytest.raises(wb.WorkbenchError, match="'meta' device"):
        with wb.capture(m, wb.Hook("blocks.0.attn.entropy", lambda t, name: torch.empty(3, device="meta"))):
            m.forward_text("hello")
    # filters that keep nothing (were a capture recording nothing)
    with pytest.raises(wb.WorkbenchError, match="names_filter is empty"):
        wb.capture(m, names_filter=[]).__enter__()
    with pytest.raises(wb.WorkbenchError, match="keeps none of the names"):
        wb.capture(m, wb.AttentionStats(), names_filter=lambda name: False).__enter__()
    # a study file saved with a UTF-8 byte order mark (was "Invalid statement (line 1, column 1)")
    bom = tmp_path / "bom.toml"
    bom.write_bytes(b"\xef\xbb\xbf" + STUDY_TOML.encode())
    assert load_study(bom).name == "x"
    # a model folder that ships code: refused, saying how to opt in (never transformers' y/N prompt)
    folder = tmp_path / "remote"
    m.hf.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModelForCausalLM": "modeling_x.Evil"}}))
    (folder / "modeling_x.py").write_text("raise SystemExit('custom code ran')\n")
    from workbench.models.loading import load_config

    for call in (lambda: wb.load(str(folder)), lambda: load_config(str(folder))):
        with pytest.raises(wb.WorkbenchError, match=r"ships its own Python code .*auto_map.*trust_remote_code=True.*workbench.load\(hf, tokenizer=tok\)"):
            call()


# --- row 2: a closed session frees what it held; drill-downs share one budget ------------------------------------


def _live(*kinds: str) -> dict[str, int]:
    import gc

    gc.collect()
    counts = dict.fromkeys(kinds, 0)
    for o in gc.get_objects():
        name = type(o).__name__
        if name in counts:
            counts[name] += 1
    return counts


def test_closed_sessions_are_freed_and_drilldowns_share_one_budget(tmp_path):
    """Ten tabs with distinct prompts, then closed: every Prompt-lab page, run, view and drill-down of theirs stayed
    alive (ipywidgets' registry held the views), and each tab's drill-down came on top of the 1 GiB cap."""
    import asyncio
    import gc
    import re
    import sys
    import threading
    import time
    import urllib.request

    import torch

    pn = pytest.importorskip("panel")
    from panel.io.state import set_curdoc
    from tornado.httpclient import HTTPRequest
    from tornado.ioloop import IOLoop
    from tornado.websocket import websocket_connect

    from workbench.views.dashboard.app import build
    from workbench.views.dashboard.state import Caps, Workbench
    from workbench.measure.drilldown import qk_elements

    sys.path.insert(0, os.path.dirname(__file__))
    from browser import free_port

    kinds = ("Dashboard", "PromptLab", "PromptOutcome", "PatternView", "HeadGrid", "Drilldown", "Document")
    model = wb.load("tiny:llama")
    prompts = [f"prompt {i}: " + "the cat sat on a mat " * 15 for i in range(10)]
    per_prompt = qk_elements(model.spec, len(model.encode(prompts[0])[0]), model.spec.n_layers)
    cap = 3 * per_prompt  # three prompts' drill-downs, for ten open tabs
    bench = Workbench(model, runs=tmp_path, caps=Caps(max_prompt_chars=4000, max_drilldown_elements=cap), loader=lambda source: source)
    made = []  # (document, dashboard) of each session, dropped before counting

    def factory():
        page = build(bench)
        made.append((pn.state.curdoc, page.dashboard))
        return page

    port, servers = free_port(), []

    def serve():
        asyncio.set_event_loop(asyncio.new_event_loop())
        server = pn.serve({"/": factory}, port=port, address="127.0.0.1", websocket_origin=[f"127.0.0.1:{port}"], show=False,
                          start=False, check_unused_sessions_milliseconds=100, unused_session_lifetime_milliseconds=500)  # fmt: skip
        server.start()
        servers.append(server)
        IOLoop.current().start()

    threading.Thread(target=serve, daemon=True).start()
    while not servers:
        time.sleep(0.05)
    app = servers[0]._tornado._applications["/"]
    before = _live(*kinds)
    tensor_bytes = lambda: sum(t.numel() * t.element_size() for t in gc.get_objects()  # noqa: E731
                               if isinstance(t, torch.Tensor) and not isinstance(t, torch.nn.Parameter))  # fmt: skip
    bytes_before = tensor_bytes()
    closing = threading.Event()

    def tab(token: str) -> None:  # one browser tab: its websocket stays open until `closing`
        async def hold():
            request = HTTPRequest(f"ws://127.0.0.1:{port}/ws", headers={"Origin": f"http://127.0.0.1:{port}"})
            conn = await websocket_connect(request, subprotocols=["bokeh", token])
            while not closing.is_set():
                await asyncio.sleep(0.05)
            conn.close()

        asyncio.run(hold())

    tabs = []
    for text in prompts:
        html = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=60).read().decode()
        tabs.append(threading.Thread(target=tab, args=(re.search(r'"token":\s*"([^"]+)"', html).group(1),), daemon=True))
        tabs[-1].start()
        doc, dash = made[-1]
        lab = dash.pages["Prompt lab"]
        lab.text, lab.prompt.value_input = text, text
        with set_curdoc(doc):
            lab.run()
        for _ in range(2400):  # wait for the worker thread and its hand-back (a count, not a time limit)
            if lab.baseline is not None or lab.last_error:
                break
            time.sleep(0.05)
        assert lab.baseline is not None and lab.view is not None, lab.last_error
    assert len(app.sessions) == 10
    open_now = _live(*kinds)
    opened = {k: open_now[k] - before[k] for k in kinds}  # other tests may have left pages of their own alive
    assert opened["PromptLab"] == 10 and opened["PromptOutcome"] >= 10, opened
    drills = {id(d): d for d in [dash.pages["Prompt lab"].baseline.drill for _, dash in made] + list(bench.drilldowns._items.values())}
    held = sum(d.elements for d in drills.values())  # what the ten tabs and the shared cache hold between them
    assert len(drills) == 10 and 0 < held <= cap, (len(drills), held, cap)  # ten open tabs, one budget
    del drills
    del doc, dash, lab, open_now, opened
    made.clear()
    closing.set()
    for t in tabs:
        t.join()
    for _ in range(400):  # Bokeh discards a session 0.5 s after its last connection closed
        if not app.sessions:
            break
        time.sleep(0.05)
    assert not app.sessions
    after = _live(*kinds)
    for name in ("Dashboard", "PromptLab", "PromptOutcome", "PatternView", "HeadGrid", "Document"):
        assert after[name] <= before[name], (name, before, after)
    assert after["Drilldown"] - before["Drilldown"] <= bench.caps.max_drilldown_prompts  # the shared cache, within its bounds
    leftover = tensor_bytes() - bytes_before
    assert leftover <= 4 * cap + (1 << 20), leftover  # what the shared cache may hold (fp32), plus 1 MiB
    print(f"sessions: tensors {bytes_before / 2**20:.1f} MiB before, {leftover / 2**20:.2f} MiB more after 10 opened and "
          f"closed (drill-down budget {4 * cap / 2**20:.2f} MiB); live objects before {before}, after {after}")
    servers[0].stop()

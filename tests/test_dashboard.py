"""The dashboard's logic in plain Python (no browser): caps, the model lock, path safety, pages' flows.

Tiny random models (``tiny:llama``) and the trained ``tiny-moe`` keep this fast and offline; the
browser test (tests/test_dashboard_browser.py) drives the served app."""

from __future__ import annotations

import threading
from pathlib import Path

import pandas as pd
import pytest
import torch

pytest.importorskip("panel")

from workbench.views.dashboard.state import (  # noqa: E402
    Caps,
    DashboardError,
    HeadEdits,
    Progress,
    RunsStore,
    Workbench,
    compare_frames,
    parse_experts,
    parse_heads,
    safe_path,
)

TEXT = "The lighthouse keeper climbed the stairs every evening to light the lamp."


@pytest.fixture(scope="module")
def wb(tmp_path_factory):
    w = Workbench("tiny:llama", moe_models=["tiny-moe"], runs=tmp_path_factory.mktemp("runs"),
                  caps=Caps(max_prompt_chars=400, max_scan_tests=4, max_new_tokens=16))  # fmt: skip
    w.model(), w.model("tiny-moe")
    return w


# --- caps and validation --------------------------------------------------------------------------------


def test_prompt_caps(wb):
    with pytest.raises(DashboardError, match="characters"):
        wb.run_prompt("x" * 401)
    with pytest.raises(DashboardError, match="prompt first"):
        wb.run_prompt("   ")
    small = Workbench("tiny:llama", caps=Caps(max_prompt_tokens=8), loader=lambda s: wb.model())
    with pytest.raises(DashboardError, match="tokens; the limit is 8"):
        small.run_prompt(TEXT)
    with pytest.raises(DashboardError, match="new tokens"):
        wb.run_prompt(TEXT, max_new_tokens=17)


def test_scan_caps(wb):
    with pytest.raises(DashboardError, match="5 NIAH tests asked for; the limit is 4"):
        wb.check_scan([500], 5, max_new_tokens=8)
    with pytest.raises(DashboardError, match="context lengths"):
        wb.check_scan([100_000], 1, max_new_tokens=8)
    with pytest.raises(DashboardError, match="new tokens"):
        wb.check_scan([500], 1, max_new_tokens=64)
    assert wb.check_scan([1000, 500, 500], 2, max_new_tokens=8) == [500, 1000]
    with pytest.raises(DashboardError, match="T must"):
        wb.sinks_scan(T=10_000)


def test_names_come_from_the_server_only(wb):
    with pytest.raises(DashboardError, match="unknown model"):
        wb.model("/etc/passwd")
    with pytest.raises(DashboardError, match="unknown MoE model"):
        wb.routing_of("gpt2", "hello")
    spec = wb.model().spec
    assert parse_heads(["L1H2", (0, 3), [1, 2]], spec) == ((1, 2), (0, 3))  # ModelSpec.heads: the library's validator
    for bad in (["L9H0"], ["L0H99"], ["nonsense"], ["__import__('os')"], ["1:2"]):
        with pytest.raises(DashboardError):
            parse_heads(bad, spec)
    with pytest.raises(DashboardError, match="layer 9 does not exist"):  # the library's own wording
        parse_heads(["L9H0"], spec)
    moe = wb.moe_model("tiny-moe")
    assert parse_experts(["L1E3", (2, 0), "l1e3"], moe) == ((1, 3), (2, 0))
    with pytest.raises(DashboardError, match="out of range"):  # ExpertMask's own check
        parse_experts(["L1E99"], moe)


def test_safe_path_refuses_traversal(tmp_path):
    root = tmp_path / "runs"
    (root / "a").mkdir(parents=True)
    assert safe_path(root, "a") == (root / "a").resolve()
    assert safe_path(root, root / "a" / "report" / "index.html").parent.parent == (root / "a").resolve()
    for bad in ("../x", "/etc/passwd", "a/../../x", str(tmp_path)):
        with pytest.raises(DashboardError, match="outside the runs directory"):
            safe_path(root, bad)
    (root / "link").symlink_to(tmp_path)  # a symlink out of the store is refused too
    with pytest.raises(DashboardError):
        safe_path(root, "link/secret")


# --- computations ------------------------------------------------------------------------------------------


def test_prompt_edits_change_loss_and_attention_is_exact(wb):
    from workbench.measure import heads

    base = wb.run_prompt(TEXT, max_new_tokens=4)
    with wb.using() as m, wb_capture(m) as cap:
        m.hf(input_ids=torch.tensor([base.token_ids]))
    assert list(base.metrics) == list(heads.summary(cap))  # one vocabulary: the capture names, as in notebooks
    assert "attn.alpha[0]" in base.metrics and all(v.shape == (2, 4) for v in base.metrics.values())
    abl = wb.run_prompt(TEXT, max_new_tokens=4, edits=HeadEdits(ablate=((1, 2), (0, 1)), mode="zero"))
    cal = wb.run_prompt(TEXT, max_new_tokens=4, edits=HeadEdits(calibrate=((1, 2),), sink_keys=(0,), beta=0.4))
    assert abl.loss != pytest.approx(base.loss, abs=1e-6) and cal.loss != pytest.approx(base.loss, abs=1e-6)
    assert wb.run_prompt(TEXT, max_new_tokens=4).loss == pytest.approx(base.loss, abs=1e-6)  # edits detached again


def wb_capture(m):
    import workbench

    return workbench.capture(m, workbench.AttentionStats(sink_keys=4))


def test_loss_counts_only_the_users_tokens(wb):
    """The byte tokenizer prepends <s>: a template token, not counted; the loss is the mean over the user's tokens."""
    out = wb.run_prompt(TEXT, max_new_tokens=0)
    assert out.user == (1, len(out.token_ids)) and out.n_template == 1
    # every next-token prediction targets a user token here (<s> at position 0 is never a target)
    assert len(out.losses) == len(out.token_ids) - 1 and out.loss == pytest.approx(float(out.losses.double().mean()), abs=1e-6)
    assert out.drill is not None and out.drill.layers == [0, 1]  # the same pass kept the drill-down
    assert out.pattern_capture is not None  # and, for a short prompt, every head's pattern


def test_two_sessions_at_once_do_not_mix_captures(wb):
    """Two sessions hammer the same model with different edits; each gets exactly its serial result."""
    edits = {"a": HeadEdits(ablate=((1, 0), (1, 1), (1, 2), (1, 3)), mode="zero"), "b": HeadEdits()}
    want = {k: wb.run_prompt(TEXT, max_new_tokens=2, edits=e) for k, e in edits.items()}
    assert want["a"].loss != pytest.approx(want["b"].loss, abs=1e-6)
    got: dict[str, list] = {"a": [], "b": []}
    errors = []
    barrier = threading.Barrier(2)

    def session(key):
        try:
            barrier.wait()
            for _ in range(6):
                got[key].append(wb.run_prompt(TEXT, max_new_tokens=2, edits=edits[key]))
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    before = wb.lock_stats()["uses"]
    threads = [threading.Thread(target=session, args=(k,)) for k in got]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors
    for key in got:
        for o in got[key]:
            assert o.loss == pytest.approx(want[key].loss, abs=1e-5)
            for name, v in o.metrics.items():
                assert torch.allclose(v, want[key].metrics[name], atol=1e-5, equal_nan=True)
    stats = wb.lock_stats()
    assert stats["uses"] - before == 12 and stats["max_active"] == 1


def test_routing_and_expert_edits(wb):
    r = wb.routing_of("tiny-moe", "def add(a, b):\n    return a + b\n2 + 2 = 4")
    assert r.load.shape == (4, 8) and torch.allclose(r.load.sum(1), torch.ones(4))
    assert list(r.per_token().columns[:2]) == ["position", "token"]
    eff = wb.routing_effect("tiny-moe", "2 + 2 = 4 and 3 + 3 =", mask=["L1E3", "L2E1"], max_new_tokens=4)
    assert eff.max_logit_change > 0
    with pytest.raises(DashboardError, match="choose experts"):
        wb.routing_effect("tiny-moe", "2 + 2", mask=[])


def test_retrieval_scan_progress_and_cancel(wb):
    seen = []
    prog = Progress(lambda p: seen.append((p.done, p.total)))
    r = wb.retrieval_scan([500], 2, max_new_tokens=4, progress=prog)
    assert seen[-1] == (2, 2) and len(r.tests) == 2 and r.scores.shape == (2, 4)
    ab = wb.retrieval_ablation(r, 2, mode="zero", seeds=1)
    assert list(ab.runs["ablated"]) == ["none", "top", "random"] and set(ab.runs["mode"]) == {"zero"}
    assert ab.accuracy_grid(1).shape == r.accuracy_grid().shape
    stop = Progress(lambda p: p.cancel() if p.done >= 1 else None)  # cancelled after the first test
    part = wb.retrieval_scan([500], 3, max_new_tokens=4, progress=stop)
    assert stop.done == 1 and len(part.tests) == 1 and not part.complete  # the finished test is kept


# --- pages ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dash(wb):
    from workbench.views.dashboard.app import build

    return build(wb).dashboard


def test_prompt_lab_one_selection_drives_view_and_edits(dash):
    """Grid click → the page's selection → the pattern view shows that head → the edit button ablates *that* head."""
    lab = dash.pages["Prompt lab"]
    lab.prompt.value = TEXT
    lab.run()
    lab.wait()
    assert lab.last_error == "" and "loss on your tokens" in lab.output_view().object
    grid, view = lab._grid_pane, lab._view_pane
    grid.selected = [1, 3]  # what a click on a grid cell does (the browser sets the component's param)
    lab.wait()
    assert lab.selected == [1, 3] and view.selected == [1, 3] and lab.view.selected == [1, 3]
    assert lab.view.pattern["layer"] == 1 and lab.view.pattern["head"] == 3  # the enlarged pattern followed
    assert lab.view.rows[0]["layer"] == 1 and lab.view.rows[0]["head"] == 3
    view.selected = [0, 2]  # a click on a pattern thumbnail: the grid follows
    lab.wait()
    assert lab.selected == [0, 2] and grid.selected == [0, 2] and lab.grid.selected == [0, 2]
    lab.toggle_ablation()  # "Ablate selected head": the head the user is looking at
    lab.wait()
    assert lab.ablate == [[0, 2]] and grid.ablate == [[0, 2]] and lab.edited is not None
    assert lab.edited.edits.ablate == ((0, 2),)
    assert lab.edited.loss != pytest.approx(lab.baseline.loss, abs=1e-6)
    html = lab.edited_view().object
    assert "With edits" in html and "L0H2" in html and "Δloss per token" in html and "template token" in html
    grid.ablate = [[0, 2], [1, 1]]  # shift-click in the grid adds to the same edit set
    lab.wait()
    assert lab.ablate == [[0, 2], [1, 1]] and lab.edited.edits.ablate == ((0, 2), (1, 1))
    lab.set_heads("L1H0")
    lab.wait()
    assert lab.ablate == [[1, 0]] and lab.edited.edits.ablate == ((1, 0),)
    lab.toggle_ablation()  # L0H2 is selected: added
    lab.param.update(ablate=[])
    lab.wait()
    assert lab.ablate == [] and lab.edited is None


def test_prompt_lab_escapes_heads_the_browser_sends(dash):
    """The page's `ablate` is linked to the grid's, whose value comes from the browser unchecked: a forged
    head name is refused (a message) and shown as text, never as HTML."""
    lab = dash.pages["Prompt lab"]
    lab.prompt.value = TEXT
    lab.run()
    lab.wait()
    lab._grid_pane.ablate = [["<img src=x onerror=alert(1)>", 1]]  # a forged websocket message
    lab.wait()
    shown = lab.selection_view().object
    assert "<img" not in shown and "&#60;img" in shown  # a character reference: shown as text
    assert "layer must be an integer" in lab.last_error and lab.grid.ablate == []
    lab.param.update(ablate=[])
    lab.wait()
    lab.clear()

def test_prompt_lab_clicks_run_in_a_worker_without_the_model_lock(dash, wb):
    """A query click is served from the cached queries and keys in a worker thread: it neither runs on the
    caller's thread (the server's event loop) nor waits for a model another session holds."""
    lab = dash.pages["Prompt lab"]
    lab.prompt.value = TEXT
    lab.run()
    lab.wait()
    view = lab.view
    passes = view.drill.forward_passes
    threads = []
    orig = view.drill.rows
    view.drill.rows = lambda *a, **k: (threads.append(threading.current_thread()), orig(*a, **k))[1]
    held, release = threading.Event(), threading.Event()

    def other_session():
        with wb.using():
            held.set()
            release.wait(30)

    t = threading.Thread(target=other_session)
    t.start()
    held.wait(10)
    try:
        lab._view_pane.queries = [5]  # a click on token 5 in the browser
        lab.wait(20)
        assert view.rows[0]["query"] == 5 and view.error == ""  # answered while the other session holds the model
        assert threads and all(th is not threading.main_thread() for th in threads)
    finally:
        release.set()
        t.join()
        view.drill.rows = orig
    assert view.drill.forward_passes == passes  # no forward pass for a click


def test_a_failing_computation_shows_in_the_page(dash, wb, monkeypatch):
    lab = dash.pages["Prompt lab"]
    lab.prompt.value = "x" * 1000
    lab.run()
    lab.wait()
    assert "characters" in lab.last_error and lab.alert.visible

    def boom(*a, **k):
        raise RuntimeError("kaboom")

    monkeypatch.setattr(wb, "run_prompt", boom)
    lab.prompt.value = TEXT
    lab.run()
    lab.wait()
    assert "internal error (RuntimeError): kaboom" in lab.last_error and not lab.busy
    monkeypatch.undo()
    lab.run()
    lab.wait()
    assert lab.last_error == "" and not lab.alert.visible  # the page keeps working


def test_sinks_routing_retrieval_pages(dash):
    s = dash.pages["Sinks"]
    s.T = 32
    s.scan()
    s.wait()
    assert s.last_error == "" and s.result.T == 32
    r = dash.pages["Routing"]
    r.show_routing()
    r.wait()
    assert r.last_error == "" and r.outcome is not None and "L1E3" in r.mask_input.options
    r.mask_input.value = ["L1E3"]
    r.compare()
    r.wait()
    assert r.last_error == "" and "loss" in r.effect_area.object
    rt = dash.pages["Retrieval"]
    rt.param.update(lengths=[300], depths=1, new_tokens=4)
    rt.scan()
    rt.wait()
    assert rt.last_error == "" and rt.result is not None and rt.bar.value == rt.bar.max == 1
    rt.param.update(depths=10)  # over the cap of 4 tests
    rt.scan()
    assert "limit is 4" in rt.last_error


def test_heads_page_taxonomy_with_the_retrieval_join(dash, wb):
    """The Heads tab scans head types within the caps; the Retrieval tab's scan joins as Wu's axis."""
    with pytest.raises(DashboardError, match="lengths must lie in 16..2048"):
        wb.taxonomy_scan(lengths=[4096])
    with pytest.raises(DashboardError, match="15 cases asked for; the limit is 12"):
        wb.taxonomy_scan(lengths=[64, 128, 256], n_texts=4)
    h = dash.pages["Heads"]
    h.param.update(lengths=[64], n_texts=1)
    h.join.value = False
    h.scan()
    h.wait()
    assert h.last_error == "" and h.result is not None and len(h.result.cases) == 2  # one text + the repeated sequence
    direct = __import__("workbench.measure.taxonomy", fromlist=["scan"]).scan(wb.model(), lengths=[64], n_texts=1, progress=False)
    torch.testing.assert_close(h.result.values, direct.values, equal_nan=True)
    assert "retrieval_score" not in h.result.grids()
    rt = dash.pages["Retrieval"]
    if rt.result is None:
        rt.param.update(lengths=[300], depths=1, new_tokens=4)
        rt.scan()
        rt.wait()
    h.join.value = True
    h.kind = "retrieval"
    h.scan()
    h.wait()
    assert h.last_error == ""
    torch.testing.assert_close(h.result.grids()["retrieval_score"], rt.result.scores, equal_nan=True)
    assert "retrieval_score" in h.kind_table.objects[1].object.columns


# --- runs ----------------------------------------------------------------------------------------------------


class FakeRun:
    def __init__(self, path):
        self.path = Path(path)

    @property
    def study(self):
        from types import SimpleNamespace

        return SimpleNamespace(task=SimpleNamespace(kind="niah"), model=SimpleNamespace(source="tiny:llama"),
                               ablation=SimpleNamespace(target="heads", mode="uniform"))  # fmt: skip

    def summary(self):
        return pd.DataFrame({"condition": ["top", "random"], "accuracy": [0.2 if "a" in self.path.name else 0.5, 0.9]})

    def results(self):
        return pd.DataFrame({"unit": [1, 2], "value": [0.1, 0.2]})

    def failures(self):
        return pd.DataFrame(columns=["unit", "error"])

    def report(self, out_dir=None, png=True):
        page = self.path / "report" / "index.html"
        page.parent.mkdir(exist_ok=True)
        page.write_text(f"<html><body><h1>report {self.path.name}</h1></body></html>")
        return page


class FakeStudy:
    """The workbench.study contract the Runs tab codes against: list_runs(root) and Run(path)."""

    Run = FakeRun

    def __init__(self, extra_path=None):
        self.extra_path = extra_path

    def list_runs(self, root):
        rows = [{"run_id": p.name, "name": p.name, "path": str(p), "created": "2026-11-22", "n_units": 2, "n_done": 2,
                 "n_failed": 0, "status": "done"} for p in sorted(Path(root).iterdir()) if p.is_dir()]  # fmt: skip
        if self.extra_path:
            rows.append({**rows[0], "run_id": "evil", "path": self.extra_path})
        return pd.DataFrame(rows)


def test_runs_compare_refuses_unlike_metrics(tmp_path, wb):
    """A loss run and a logit-difference run: side by side with a warning, no Δ."""
    from types import SimpleNamespace

    from workbench.views.dashboard.runs_page import RunsPage

    class Study(FakeStudy):
        class Run(FakeRun):
            @property
            def study(self):
                kind = "loss" if self.path.name == "run-a" else "logit_diff"
                return SimpleNamespace(task=SimpleNamespace(kind=kind), model=SimpleNamespace(source="tiny:llama"),
                                       ablation=SimpleNamespace(target="heads", mode="zero"))  # fmt: skip

    for name in ("run-a", "run-b"):
        (tmp_path / name).mkdir()
    page = RunsPage(wb, store=RunsStore(tmp_path, api=Study()))
    page.compare()
    note, table = page.compare_area.objects[1], page.compare_area.objects[-1].object
    assert "not comparable" in note.object and "loss" in note.object and "logit difference" in note.object
    assert not [c for c in table.columns if c.startswith("Δ")]


def test_runs_page_lists_opens_and_compares(tmp_path, wb):
    from workbench.views.dashboard.runs_page import RunsPage

    for name in ("run-a", "run-b"):
        (tmp_path / name).mkdir()
    store = RunsStore(tmp_path, api=FakeStudy())
    page = RunsPage(wb, store=store)
    assert page.run_select.options == ["run-a", "run-b"] and page.last_error == ""
    page.run_select.value = "run-b"
    page.open()
    assert page.last_error == "" and len(page.detail.objects) >= 3
    page.show_report()
    page.wait()
    assert "report run-b" in page.report_area.objects[0].object and "sandbox" in page.report_area.objects[0].object
    page.compare()
    table = page.compare_area.objects[-1].object
    assert "Δ accuracy" in table.columns and table.set_index("condition").loc["top", "Δ accuracy"] == pytest.approx(0.3)
    bad = RunsStore(tmp_path, api=FakeStudy(extra_path=str(tmp_path.parent)))
    assert list(bad.list()["run_id"]) == ["run-a", "run-b"] and bad.refused == ["evil"]
    with pytest.raises(DashboardError, match="no run"):
        bad.path("evil")
    with pytest.raises(DashboardError, match="no run"):
        store.path("../../etc")


TINY_STUDY = """
name = "tiny_loss"
[model]
source = "tiny:llama"
[task]
kind = "loss"
n_texts = 1
max_tokens = 32
[ablation]
target = "heads"
mode = "zero"
[[grid]]
select = "none"
[[grid]]
select = "explicit"
sets = [[[1, 2]], [[0, 1], [1, 3]]]
"""


def test_runs_page_on_real_study_runs(tmp_path, wb):
    """Two runs made by workbench.study (tiny model, loss task, ~1 s each), browsed through the Runs tab."""
    study = pytest.importorskip("workbench.study")
    if not hasattr(study, "run_study"):
        pytest.skip("workbench.study.run_study not there yet")
    from workbench.views.dashboard.runs_page import RunsPage

    cfg = tmp_path / "tiny.toml"
    cfg.write_text(TINY_STUDY)
    root = tmp_path / "runs"
    for name in ("first", "second"):
        study.run_study(cfg, root / name, executor="local", resume=False)
    outside = tmp_path / "elsewhere"
    study.run_study(cfg, outside, executor="local", resume=False)
    (root / "sneaky").symlink_to(outside)  # a run dir symlinked out of the store is not offered

    page = RunsPage(wb, store=RunsStore(root))
    assert page.run_select.options == ["first", "second"] and "sneaky" in page.status.object
    page.run_select.value = "second"
    page.open()
    assert page.last_error == "" and len(page.detail.objects) >= 3
    page.show_report()
    page.wait()
    assert page.last_error == "" and "srcdoc" in page.report_area.objects[0].object
    assert (root / "second" / "report" / "index.html").is_file()
    page.compare()
    assert page.last_error == "" and len(page.compare_area.objects[-1].object) == 3
    assert "loss &#40;nats&#41;" in page.compare_area.objects[0].object  # the metric both runs measure is named
    assert len(RunsStore(tmp_path / "missing").list()) == 0


def test_compare_frames_without_keys():
    out = compare_frames(pd.DataFrame({"x": [1.0]}), pd.DataFrame({"x": [3.0]}), "a", "b")
    assert out["Δ x"].iloc[0] == 2.0


def test_prompt_lab_on_the_embedded_model(smollm):
    """The default configuration: SmolLM2 in the prompt lab, chat template on, a mean ablation of a late head."""
    w = Workbench(None, moe_models=[], loader=lambda source: smollm)
    base = w.run_prompt("What is the capital of France?", chat=True, max_new_tokens=3)
    assert base.metrics["attn.alpha[0]"].shape == (30, 9) and base.output.strip()
    edited = w.run_prompt("What is the capital of France?", chat=True, max_new_tokens=3,
                          edits=HeadEdits(ablate=((20, 3), (21, 0)), mode="mean"))  # fmt: skip
    assert edited.loss != pytest.approx(base.loss, abs=1e-6)


def test_retrieval_page_cancel_keeps_finished_tests(dash):
    rt = dash.pages["Retrieval"]
    rt.param.update(lengths=[300], depths=4, new_tokens=8)
    rt.scan()
    rt.cancel()  # from the page's Cancel button: stops between tests, keeping the finished ones
    rt.wait()
    assert rt.last_error == "" and not rt.alert.visible and not rt.busy  # not an error
    assert rt.progress.done < 4 and rt.result is not None and not rt.result.complete
    partial = [o for o in rt.results_area.objects if "wb-partial" in (o.css_classes or [])]
    assert partial and "finished before Cancel are shown" in partial[0].object


def test_prompt_lab_cancel_is_a_notice(dash):
    lab = dash.pages["Prompt lab"]
    lab.prompt.value = TEXT * 5
    lab.run()
    lab.cancel()  # stops the forward pass at the next layer
    lab.wait()
    assert lab.last_error == "" and "stopped" in lab.last_notice and lab.notice.visible and not lab.alert.visible


def test_the_model_line_is_first_come_first_served_visible_and_cancellable():
    """Sessions waiting for a model see who holds it and their place; one that cancels leaves the line; the
    others get the model in the order they came (ModelPool, no browser)."""
    import threading

    from workbench.views.dashboard.pool import ModelPool, Turn
    from workbench.views.dashboard.state import Cancelled

    pool = ModelPool("m", loader=lambda source: object())
    held, release = threading.Event(), threading.Event()
    seen: dict[int, list] = {2: [], 3: [], 4: []}
    order, errors = [], []
    cancel3 = threading.Event()

    def holder():
        with pool.on_behalf(Turn("NIAH scan", 1)), pool.using():
            held.set()
            release.wait(30)

    def waiter(session, cancel=None):
        try:
            with pool.on_behalf(Turn("prompt", session), cancel=cancel, on_wait=seen[session].append), pool.using():
                order.append(session)
        except Cancelled as e:
            errors.append((session, e))

    threads = [threading.Thread(target=holder)]
    threads[0].start()
    held.wait(10)
    for s, c in ((2, None), (3, cancel3), (4, None)):  # one after the other: their places are 1, 2, 3
        threads.append(threading.Thread(target=waiter, args=(s, c)))
        threads[-1].start()
        while len(pool.queue()[1]) < s - 1:
            threading.Event().wait(0.01)
    holding, line = pool.queue()
    assert holding.describe() == "NIAH scan for session 1" and [t.session for t in line] == [2, 3, 4]
    while not seen[4]:
        threading.Event().wait(0.01)
    w = seen[4][-1]
    assert w.place == 3 and [t.session for t in w.ahead] == [2, 3]
    assert "it runs NIAH scan for session 1 since" in w.describe() and "you are 3rd in line" in w.describe()
    cancel3.set()  # session 3 leaves the line
    while len(pool.queue()[1]) != 2:
        threading.Event().wait(0.01)
    release.set()
    for t in threads:
        t.join(30)
    assert order == [2, 4] and [s for s, _ in errors] == [3]
    assert seen[2][-1] is None and seen[4][-1] is None  # told when their turn came
    assert pool.queue() == (None, []) and pool.lock_stats("m")["max_active"] == 1


def test_prompt_limits_are_checked_whole_and_named():
    """The size of the whole text and the limit are in the message; a text that filled its box (which may have
    cut it) says "at least"; the box takes several times the limit, so a paste over the limit arrives whole."""
    from workbench.views.dashboard.validation import DashboardError, box_chars, check_text

    assert box_chars(60_000) > 100_000
    with pytest.raises(DashboardError, match=r"prompt has 100,000 characters; the limit is 60,000 characters.*nothing was cut"):
        check_text("x" * 100_000, limit=60_000)
    with pytest.raises(DashboardError, match=r"prompt has at least 240,000 characters \(the box stops there\); the limit is 60,000"):
        check_text("x" * box_chars(60_000), limit=60_000)
    assert check_text("x" * 60_000, limit=60_000)

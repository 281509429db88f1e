"""Scripted studies: schema errors before any model loads, unit planning, the numbers units produce
(against computations that bypass the study machinery), failures, corrupt files, kill -9 + resume, Ray."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

import workbench as wb
from workbench.study import Run, StudyError, list_runs, load_study, run_study
from workbench.study.plan import Shape, eval_units, rank_units
from workbench.study.rundir import VOLATILE

ROOT = Path(__file__).resolve().parents[1]

LOSS_STUDY = """
name = "tiny-loss"
[model]
source = "tiny:llama"
[task]
kind = "loss"
n_texts = 2
max_tokens = 48
[ablation]
mode = "zero"
[[grid]]
select = "none"
[[grid]]
select = "random"
k = [1, 2]
seeds = [0, 1]
[[grid]]
select = "layer"
layers = [0]
[[grid]]
select = "explicit"
sets = [[[0, 1], [1, 2]]]
"""


def _write(tmp_path, text, name="s.toml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def _table(run: Run) -> pd.DataFrame:
    res = run.results().drop(columns=list(VOLATILE))
    return res.sort_values(["unit_id", "item"]).reset_index(drop=True)


# --- the study file ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "edit, message",
    [
        (("n_texts = 2", "n_texts = 2\ncolour = 3"), r"task.colour \(line 8\): unknown key"),
        (("max_tokens = 48", 'max_tokens = "many"'), r"task.max_tokens \(line 8\): Input should be a valid integer"),
        (("sets = [[[0, 1], [1, 2]]]", "sets = [[[0, 1], [9, 2]]]"), r"grid\[3\] \(explicit\).sets: \[9, 2\] is out of range: the model has 2 layers × 4 heads"),
        (("k = [1, 2]", "k = []"), r"grid\[1\] \(line 13\): select = 'random' needs a non-empty `k`"),
        (('mode = "zero"', 'mode = "deactivate"'), r"ablation \(line 9\): heads take mode zero/mean/uniform"),
        (('kind = "loss"', 'kind = "vibes"'), r"task.kind \(line 6\): Input tag 'vibes' found using 'kind' does not match"),
        (("layers = [0]", "layers = [7]"), r"grid\[2\] \(layer\).layers: layer 7 is out of range"),
    ],
)
def test_bad_study_files_are_rejected_before_any_model_loads(tmp_path, monkeypatch, edit, message):
    def no_load(*a, **k):
        raise AssertionError("a model was loaded before the study file was validated")

    monkeypatch.setattr("workbench.models.loading.load", no_load)
    path = _write(tmp_path, LOSS_STUDY.replace(*edit))
    with pytest.raises(StudyError, match=message):
        run_study(path, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_empty_grid_and_bad_toml(tmp_path):
    with pytest.raises(StudyError, match=r"grid: List should have at least 1 item"):
        load_study({"name": "x", "task": {"kind": "loss"}, "grid": []})
    with pytest.raises(StudyError, match="not valid TOML"):
        load_study("name = \n[task")
    with pytest.raises(StudyError, match="not found"):
        load_study(tmp_path / "missing.toml")
    with pytest.raises(StudyError, match="give `pairs` or `file`"):
        load_study({"name": "x", "task": {"kind": "logit_diff"}, "grid": [{"select": "none"}]})


def test_shipped_study_is_valid_for_the_embedded_model():
    from workbench.models.loading import load_config
    from workbench.study.plan import check

    study = load_study(ROOT / "studies" / "retrieval_ablation.toml")
    check(study, Shape.of_config(load_config("embedded")))
    assert [g.select for g in study.grid] == ["none", "top", "random"] and study.ablation.mode == "uniform"


# --- planning ------------------------------------------------------------------------------------------


def test_units_are_stable_unique_and_random_sets_avoid_the_top():
    study = load_study({"name": "p", "task": {"kind": "niah", "lengths": [500], "depths": [25, 75]},
                        "grid": [{"select": "top", "k": [2, 3]}, {"select": "random", "k": [2, 3], "seeds": [0, 1, 2]}]})  # fmt: skip
    shape = Shape(n_layers=3, n_heads=2, n_experts=0)
    (rank,) = rank_units(study)
    ranking = {rank.condition: [(2, 1), (0, 0), (1, 1), (0, 1), (1, 0), (2, 0)]}
    units = eval_units(study, shape, ranking)
    assert len(units) == 2 * (2 + 6) and len({u.id for u in units}) == len(units)
    assert [u.id for u in eval_units(study, shape, ranking)] == [u.id for u in units]  # deterministic
    for u in units:
        top = ranking[rank.condition][: u.k]
        if u.select == "top":
            assert sorted(u.targets) == sorted(top)
        else:
            assert len(u.targets) == u.k and not set(u.targets) & set(top)
    renamed = load_study(study.model_dump() | {"grid": [g.model_dump() | {"name": f"x{i}"} for i, g in enumerate(study.grid)]})
    assert {u.id for u in eval_units(renamed, shape, ranking)} == {u.id for u in units}  # names are labels only
    other = load_study(study.model_dump() | {"ablation": {"mode": "uniform"}})
    assert not {u.id for u in eval_units(other, shape, ranking)} & {u.id for u in units}


# --- the numbers -------------------------------------------------------------------------------------------


@torch.no_grad()
def _reference_loss(model, texts, heads, max_tokens):
    """Next-token loss with ``heads`` zeroed by a hook on o_proj's input (not the workbench backend)."""
    D = model.spec.head_dim
    hooks = []
    for layer in {l for l, _ in heads}:
        cols = [h for l, h in heads if l == layer]

        def pre(mod, args, cols=cols):
            x = args[0].clone()
            for h in cols:
                x[..., h * D : (h + 1) * D] = 0
            return (x,)

        hooks.append(model.hf.model.layers[layer].self_attn.o_proj.register_forward_pre_hook(pre))
    try:
        out = []
        for t in texts:
            ids = torch.tensor([model.tokenizer.encode(t)[:max_tokens]])
            out.append(float(model.hf(input_ids=ids, labels=ids).loss))
        return out
    finally:
        for h in hooks:
            h.remove()


def test_local_run_matches_independent_losses_and_writes_provenance(tmp_path):
    from workbench.study.tasks import texts

    run = run_study(_write(tmp_path, LOSS_STUDY), tmp_path / "run", progress=False)
    res = run.results()
    assert run.status() == {"n_units": 7, "n_done": 7, "n_failed": 0, "status": "complete"}
    model = wb.load("tiny:llama")
    items = texts(run.study)
    for uid, part in res.groupby("unit_id"):
        heads = [tuple(t) for t in json.loads(part["targets"].iloc[0])]
        expected = _reference_loss(model, items, heads, 48)
        assert part.sort_values("item")["metric"].tolist() == pytest.approx(expected, abs=1e-5), part["grid"].iloc[0]
        assert json.loads(part["token_ids"].iloc[0]) == model.tokenizer.encode(items[0])[:48]
    row = res.iloc[0]
    assert row["model_source"] == "tiny:llama" and row["weights_hash"].startswith("blake2b:") and row["dtype"] == "float32"
    assert "cross-entropy" in row["definition"] and row["unit_id"] == row["unit_id"] and row["bos_policy"]
    summary = run.summary()
    assert set(summary["select"]) == {"none", "random", "layer", "explicit"}
    assert summary.set_index("select").loc["random", "n_units"].tolist() == [2, 2]
    assert run.sql("SELECT count(DISTINCT unit_id) AS n FROM results")["n"][0] == 7
    page = run.report(png=False)
    assert "metric vs k" in page.read_text() and (page.parent / "summary.csv").is_file()
    runs = list_runs(tmp_path)
    assert runs[["run_id", "n_units", "n_done", "status"]].values.tolist() == [["run", 7, 7, "complete"]]


def test_logit_diff_and_generation_match_tasks(tmp_path):
    study = {"name": "t", "model": {"source": "tiny:llama"},
             "task": {"kind": "logit_diff", "pairs": [{"prompt": "The cat sat on the", "target": "m", "foil": "d"}]},
             "grid": [{"select": "none"}, {"select": "explicit", "sets": [[[1, 0], [1, 3]]]}]}  # fmt: skip
    res = run_study(study, tmp_path / "ld", progress=False).results()
    model = wb.load("tiny:llama")
    ids = torch.tensor([model.tokenizer.encode("The cat sat on the")])
    m, d = (model.tokenizer.encode(x, add_special_tokens=False)[0] for x in ("m", "d"))
    with torch.no_grad():
        base = model.hf(input_ids=ids).logits[0, -1]
    assert m != d
    assert res.loc[res["select"] == "none", "metric"].item() == pytest.approx(float(base[m] - base[d]), abs=1e-5)
    assert res.loc[res["select"] == "explicit", "metric"].item() != pytest.approx(float(base[m] - base[d]), abs=1e-5)

    study["task"] = {"kind": "generation_match", "prompts": ["Hello there", "abc"], "max_new_tokens": 6, "chat": False}
    res = run_study(study, tmp_path / "gm", progress=False).results()
    assert res.loc[res["select"] == "none", "metric"].tolist() == [1.0, 1.0]  # unablated = its own baseline
    assert (res["baseline"] == res["baseline"]).all() and res["output"].map(len).gt(0).all()


def test_expert_ranking_by_load_and_failed_units_are_recorded(tmp_path):
    study = {"name": "moe", "model": {"source": "tiny:mixtral"}, "task": {"kind": "loss", "n_texts": 2, "max_tokens": 32},
             "ablation": {"target": "experts", "mode": "deactivate"},
             "grid": [{"select": "top", "k": [1]}, {"select": "explicit", "sets": [[[0, 0]], [[0, 0], [0, 1], [0, 2]]]}]}  # fmt: skip
    path = tmp_path / "moe"
    proc = subprocess.run([sys.executable, "-m", "workbench", "study", "run", str(_write(tmp_path, _toml(study))), "--out", str(path), "--no-report"],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    assert "1 unit(s) failed" in proc.stderr and "Traceback" not in proc.stderr
    run = Run(path)
    fails = run.failures()
    assert len(fails) == 1 and "leaves fewer than the top-2" in fails["error"][0] and "Traceback" in fails["traceback"][0]
    assert run.status()["n_done"] == 3  # rank + two good units
    from workbench.routing import expert_load
    from workbench.study.tasks import texts

    model = wb.load("tiny:mixtral")
    with wb.capture(model, wb.Routing()) as cap:
        for t in texts(run.study):
            model.forward_text(model.tokenizer.encode(t)[:32])
    load = expert_load(cap)
    best = divmod(int(load.flatten().argmax()), load.shape[1])
    top = run.results().query("select == 'top'")
    assert json.loads(top["targets"].iloc[0]) == [list(best)]
    assert run.rankings()["rank"].tolist() == list(range(load.numel()))
    report = subprocess.run([sys.executable, "-m", "workbench", "study", "report", str(path), "--no-png"], capture_output=True, text=True)
    assert report.returncode == 1 and "leaves fewer than" in report.stdout
    assert "Failures (1)" in (path / "report" / "index.html").read_text()


def _toml(d: dict) -> str:
    from workbench.study.runner import _to_toml

    return _to_toml(load_study(d))


# --- reliability ----------------------------------------------------------------------------------------------


def test_existing_run_needs_resume_and_corrupt_files_are_rerun(tmp_path):
    path = _write(tmp_path, LOSS_STUDY)
    run = run_study(path, tmp_path / "run", progress=False)
    before = _table(run)
    with pytest.raises(StudyError, match="already exists: pass --resume"):
        run_study(path, tmp_path / "run", progress=False)
    files = sorted(run.units.root.glob("*.parquet"))
    files[0].write_bytes(files[0].read_bytes()[:200])  # a partial file
    files[1].write_bytes(b"PAR1 garbage")
    with pytest.warns(UserWarning, match="corrupt or partial"):
        assert len(run.completed()) == len(files) - 2
    run = run_study(path, tmp_path / "run", resume=True, progress=False)
    assert _table(run).equals(before)
    assert len(list((run.units.root / "corrupt").iterdir())) == 2


KILL_STUDY = LOSS_STUDY.replace("seeds = [0, 1]", "seeds = " + str(list(range(10))))  # 23 units


def test_kill_9_mid_sweep_then_resume_equals_an_uninterrupted_run(tmp_path):
    path = _write(tmp_path, KILL_STUDY)
    cmd = [sys.executable, "-m", "workbench", "study", "run", str(path), "--no-report"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    killed = tmp_path / "killed"
    proc = subprocess.Popen(cmd + ["--out", str(killed)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while len(list((killed / "units").glob("*.parquet"))) < 3 and time.time() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    n_before = len(list((killed / "units").glob("*.parquet")))
    assert 3 <= n_before < 23, "the runner must be killed mid-sweep"
    resumed = subprocess.run(cmd + ["--out", str(killed), "--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    full = subprocess.run(cmd + ["--out", str(tmp_path / "full")], env=env, capture_output=True, text=True, timeout=300)
    assert full.returncode == 0, full.stderr
    a, b = _table(Run(killed)), _table(Run(tmp_path / "full"))
    assert len(a) == 23 * 2 and not a.duplicated(["unit_id", "item"]).any()
    pd.testing.assert_frame_equal(a, b)
    assert not list((killed / "units").glob(".*.tmp"))  # a temp file the kill left behind is swept on resume


def test_ray_executor_gives_the_local_results_and_survives_lost_workers(tmp_path):
    ray = pytest.importorskip("ray")
    from workbench.models.loading import load_config
    from workbench.study.runner import RayExecutor

    path = _write(tmp_path, LOSS_STUDY)
    local = run_study(path, tmp_path / "local", progress=False)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    try:
        ray_run = run_study(path, tmp_path / "ray", executor="ray", workers=2, progress=False)
        pd.testing.assert_frame_equal(_table(ray_run), _table(local), check_exact=False, atol=1e-5)
        assert ray_run.results()["worker"].str.startswith("ray:").all()

        study = load_study(path)
        units = eval_units(study, Shape.of_config(load_config("tiny:llama")), {})
        ex = RayExecutor(study, workers=2)
        outcomes = ex.map(units)
        got = [next(outcomes)]
        for actor in list(ex.actors):  # both workers lost mid-sweep (one idle, one running a unit)
            ray.kill(actor)
        got += list(outcomes)
        ex.close()
        assert sorted(u.id for u, *_ in got) == sorted(u.id for u in units)  # every unit answered exactly once
        lost = [err for _, _, err, _, worker in got if err is not None]
        assert 1 <= len(lost) <= 2 and all("Ray worker died" in e for e in lost)
        assert all(frame is not None for _, frame, err, *_ in got[-3:])  # fresh actors took over
    finally:
        ray.shutdown()
    with pytest.raises(StudyError, match="only apply to the ray executor"):
        run_study(path, tmp_path / "x", workers=2)


def test_a_model_that_fails_to_load_leaves_no_run_directory(tmp_path, monkeypatch):
    def broken(self, study, model=None):
        raise wb.ModelLoadError("weights unreadable")

    monkeypatch.setattr("workbench.study.tasks.Evaluator.__init__", broken)
    with pytest.raises(wb.ModelLoadError, match="weights unreadable"):
        run_study(_write(tmp_path, LOSS_STUDY), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()  # so the same command works again without --resume


# --- issue 14: studies that cannot finish, or cannot run, are refused before any model loads ------------------


@pytest.fixture
def no_model(monkeypatch):
    def no_load(*a, **k):
        raise AssertionError("a model was loaded before the study was validated")

    monkeypatch.setattr("workbench.models.loading.load", no_load)


@pytest.mark.parametrize(
    "edit, message",
    [
        (("seeds = [0, 1]", "seeds = [0, 0]"), r"grid\[1\].*`seeds` lists 0 twice"),
        (("k = [1, 2]", "k = [2, 2]"), r"grid\[1\].*`k` lists 2 twice"),
        (("layers = [0]", "layers = [1, 1]"), r"`layers` lists 1 twice"),
        (("sets = [[[0, 1], [1, 2]]]", "sets = [[[0, 1], [1, 2]], [[1, 2], [0, 1]]]"), r"`sets` lists \[\[0, 1\], \[1, 2\]\] twice"),
        (('[[grid]]\nselect = "none"', '[[grid]]\nselect = "none"\n[[grid]]\nselect = "none"'), r"grid\[0\] and grid\[1\] are both labelled 'none'"),
        (("seeds = [0, 1]", "seeds = [-1]"), r"seeds\[0\].*greater than or equal to 0"),
        (("seeds = [0, 1]", f"seeds = [{2**63}]"), r"seeds\[0\].*less than or equal to 9223372036854775807"),
        (('name = "tiny-loss"', 'name = "tiny-loss"\nrepetitions = 1e9'), r"repetitions.*less than or equal to 100000"),
        (('name = "tiny-loss"', 'name = "tiny-loss"\nrepetitions = 20000'), r"plans 140,000 units \(1 conditions × 20000 repetitions × 7 ablation sets\); at most 100,000"),
        (('source = "tiny:llama"', 'source = "tiny:llama"\ndevice = "gpu0"'), r"model \(line 3\): device 'gpu0' is not a torch device"),
        (("max_tokens = 48", "max_tokens = 100000"),
         r"task.max_tokens: 100000 exceeds the model's 512 positions"),
        (('[[grid]]\nselect = "random"', '[[grid]]\nselect = "top"\nk = [5]\nrank = { lengths = [500] }\n[[grid]]\nselect = "random"'),
         r"grid\[1\] \(top\).rank.lengths: 500 \+ 24 new tokens exceeds the model's 512 positions"),
        (('[[grid]]\nselect = "random"\nk = [1, 2]', '[[grid]]\nselect = "top"\nk = [5]\nrank = { lengths = [200] }\n[[grid]]\nselect = "random"\nk = [5]'),
         r"5 random heads drawn outside the top-5 need 10 heads; the model has 8"),
    ],
)
def test_studies_that_could_never_finish_are_refused_first(tmp_path, no_model, edit, message):
    with pytest.raises(StudyError, match=message):
        run_study(_write(tmp_path, LOSS_STUDY.replace(*edit)), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_niah_lengths_beyond_the_models_positions(tmp_path, no_model):
    study = {"name": "n", "model": {"source": "tiny:llama"}, "task": {"kind": "niah", "lengths": [500], "depths": [50]},
             "grid": [{"select": "none"}]}  # fmt: skip
    with pytest.raises(StudyError, match=r"task.lengths: 500 \+ 24 new tokens exceeds the model's 512 positions; use lengths ≤ 488"):
        run_study(study, tmp_path / "run", progress=False)


def test_families_planning_the_same_set_each_get_their_results(tmp_path):
    study = LOSS_STUDY.replace('[[grid]]\nselect = "layer"', '[[grid]]\nselect = "random"\nname = "again"\nk = [1]\nseeds = [1]\n[[grid]]\nselect = "layer"')
    run = run_study(_write(tmp_path, study), tmp_path / "run", progress=False)
    plan = [u["id"] for u in run.plan()]
    assert len(plan) == len(set(plan)) == 8
    assert run.status() == {"n_units": 8, "n_done": 8, "n_failed": 0, "status": "complete"}
    summary = run.summary()
    assert set(summary["grid"]) == {"none", "random", "again", "layer", "explicit"}
    same = summary.set_index(["grid", "k"])["metric_mean"]
    assert same[("again", 1)] == pytest.approx(run.results().query("grid == 'random' and k == 1 and seed == 1")["metric"].mean())


def test_resume_with_another_study_is_refused_naming_the_difference(tmp_path, monkeypatch):
    path = _write(tmp_path, LOSS_STUDY)
    run_study(path, tmp_path / "run", progress=False)
    before = (tmp_path / "run" / "study.toml").read_text()
    monkeypatch.setattr("workbench.models.loading.load", lambda *a, **k: (_ for _ in ()).throw(AssertionError("model loaded")))
    other = _write(tmp_path, LOSS_STUDY.replace("n_texts = 2", "n_texts = 3").replace("seeds = [0, 1]", "seeds = [0, 2]"), "other.toml")
    with pytest.raises(StudyError, match=r"cannot resume .*task.n_texts: 2 in the run, 3 in the file; grid\[1\].seeds: \[0, 1\] in the run, \[0, 2\] in the file"):
        run_study(other, tmp_path / "run", resume=True, progress=False)
    assert (tmp_path / "run" / "study.toml").read_text() == before


def test_garbage_run_files_do_not_break_listing(tmp_path):
    root = tmp_path / "runs"
    good = run_study(_write(tmp_path, LOSS_STUDY), root / "good", progress=False)
    for name, target in (("plan", "plan.json"), ("meta", "run.json"), ("fail", "failures/eval-0000000000000000.json")):
        bad = root / name
        bad.mkdir(parents=True)
        (bad / "study.toml").write_text(LOSS_STUDY)
        (bad / target).parent.mkdir(exist_ok=True)
        (bad / target).write_bytes(b"\xff{not json")
    (root / "list").mkdir()
    (root / "list" / "study.toml").write_text(LOSS_STUDY)
    (root / "list" / "plan.json").write_text('{"a": 1}')
    with pytest.warns(UserWarning):
        runs = list_runs(root).set_index("run_id")
    assert runs.loc["good", "status"] == "complete" and good.status()["n_done"] == 7
    assert "plan.json unreadable" in runs.loc["plan", "status"] and "plan.json unreadable" in runs.loc["list", "status"]
    assert runs.loc["meta", "name"] == "tiny-loss" and pd.isna(runs.loc["meta", "created"])
    assert runs.loc["fail", "n_failed"] == 1
    fails = Run(root / "fail").failures()
    assert "failure record is unreadable" in fails["error"][0]


def test_an_unwritable_run_directory_is_refused_before_the_model_loads(tmp_path, no_model, monkeypatch):
    target = tmp_path / "ro"
    target.mkdir()
    if os.geteuid() == 0:  # root writes through permission bits: make the write fail as a read-only mount would
        import tempfile

        def refuse(*a, dir=None, **k):
            if dir is not None and Path(dir) == target:
                raise PermissionError(13, "Permission denied")
            return real(*a, dir=dir, **k)

        real = tempfile.mkstemp
        monkeypatch.setattr(tempfile, "mkstemp", refuse)
    else:
        target.chmod(0o555)
    with pytest.raises(StudyError, match=r"cannot write to .*ro \(Permission denied\); choose a writable --out"):
        run_study(_write(tmp_path, LOSS_STUDY), target, progress=False)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"name = \"x\"\n\xff\xfe", r"is not UTF-8 text \(byte 0xff at offset 11\)"),
        (b"a = " + b"[" * 5000 + b"]" * 5000, r"nested too deeply"),
    ],
)
def test_unreadable_study_files(tmp_path, content, message):
    path = tmp_path / "s.toml"
    path.write_bytes(content)
    with pytest.raises(StudyError, match=message):
        load_study(path)
    with pytest.raises(StudyError, match=r"is a directory; give the study file"):
        load_study(tmp_path)
    with pytest.raises(StudyError, match=r"is a directory"):
        load_study(str(tmp_path))


def test_report_joins_points_of_one_family_only():
    """metric vs k: top-k and random-k sizes are one family (a line); explicit sets are unrelated (points only)."""
    from types import SimpleNamespace

    import pandas as pd

    from workbench.study.report import metric_vs_k

    summary = pd.DataFrame({"grid": ["top", "top", "sets", "sets", "none"], "select": ["top", "top", "explicit", "explicit", "none"],
                            "k": [2, 4, 1, 3, 0], "metric_mean": [0.5, 0.3, 0.9, 0.1, 1.0], "metric_std": [0.0] * 5})  # fmt: skip
    run = SimpleNamespace(study=SimpleNamespace(name="s", task=SimpleNamespace(kind="loss"),
                                                ablation=SimpleNamespace(target="heads", mode="zero")))  # fmt: skip
    modes = {t.name: t.mode for t in metric_vs_k(run, summary).data}
    assert modes == {"top (top)": "lines+markers", "sets (explicit)": "markers"}


def test_logit_diff_pair_files_are_checked(tmp_path):
    """JSONL pairs need prompt, target and foil as strings; a missing key (even with an extra one) or a line
    that is not JSON is a StudyError naming the line, never a KeyError or a decode traceback."""
    from workbench.study.tasks import pairs

    def study(lines):
        f = tmp_path / "pairs.jsonl"
        f.write_text("\n".join(lines) + "\n")
        return load_study({"name": "t", "task": {"kind": "logit_diff", "file": str(f)}, "grid": [{"select": "none"}]})

    good = '{"prompt": "a", "target": "b", "foil": "c", "id": 1}'
    assert pairs(study([good])) == [json.loads(good)]
    for bad in ('{"prompt": "a", "target": "b", "note": "no foil"}', '{"prompt": "a", "target": "b", "foil": 3}', "[1, 2]", "{oops"):
        with pytest.raises(StudyError, match=":2"):
            pairs(study([good, bad]))

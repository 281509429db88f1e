"""Run a study: validate, plan, execute units on a local or Ray executor, write each result as it lands.

Only the driver writes to the run directory (one writer, atomic renames), so a runner killed at any
moment leaves whole unit files behind and ``resume=True`` runs exactly the missing ones."""
from __future__ import annotations

import os
import socket
import time
import traceback
from pathlib import Path
from typing import Iterable, Iterator

from tqdm.auto import tqdm

from .config import Study, StudyError, load_study, read_study_text, study_path
from .plan import Shape, Unit, check, eval_units, rank_units
from .rundir import UNIT_DEFINING, Run, _run_file

EXECUTORS = ("local", "ray")


def _attempt(evaluator, unit: Unit, worker: str) -> tuple:
    """Run one unit; an exception becomes its traceback (the sweep goes on)."""
    t0 = time.perf_counter()
    try:
        frame = evaluator.run(unit)
        if frame.empty:
            raise StudyError(f"unit {unit.describe()} produced no rows")
        return unit, frame, None, time.perf_counter() - t0, worker
    except Exception:  # noqa: BLE001 - recorded, reported, and the exit code says so
        return unit, None, traceback.format_exc(), time.perf_counter() - t0, worker


class LocalExecutor:
    """In-process: one resident model, units in order."""

    def __init__(self, study: Study, model=None):
        from .tasks import Evaluator

        self.evaluator = Evaluator(study, model)
        self.provenance = self.evaluator.provenance
        self.worker = f"local:{socket.gethostname()}:{os.getpid()}"

    def map(self, units: list[Unit]) -> Iterator[tuple]:
        for u in units:
            yield _attempt(self.evaluator, u, self.worker)

    def close(self) -> None:
        pass


class _RayWorker:
    """A Ray actor: loads the model once and keeps it resident while it pulls units."""

    def __init__(self, study_data: dict, threads: int):
        import torch

        from .tasks import Evaluator

        torch.set_num_threads(threads)
        self.evaluator = Evaluator(Study.model_validate(study_data))
        self.worker = f"ray:{socket.gethostname()}:{os.getpid()}"

    def provenance(self) -> dict:
        return self.evaluator.provenance

    def run(self, unit: Unit) -> tuple:
        return _attempt(self.evaluator, unit, self.worker)


class RayExecutor:
    """One actor per GPU (or per CPU slot) on a Ray cluster; idle actors pull the next unit.
    ``address=None`` starts a local Ray with ``workers`` CPUs; ``"auto"`` or ``"ray://host:10001"`` joins a cluster.
    An actor that dies (OOM, lost node) fails only the unit it was running, and a fresh actor replaces it."""

    def __init__(self, study: Study, *, address: str | None = None, workers: int | None = None):
        try:
            import ray
        except ImportError as e:  # pragma: no cover - ray is a declared extra
            raise StudyError("the ray executor needs Ray: pip install 'interp-workbench[ray]'") from e
        self._ray = ray
        self._started = not ray.is_initialized()
        if self._started:
            kw = {"address": address} if address else {"num_cpus": workers or os.cpu_count() or 1, "include_dashboard": False}
            ray.init(**kw, log_to_driver=False, logging_level="ERROR")
        gpus = study.model.gpus_per_worker if (study.model.device.startswith("cuda") or study.model.device_map) else 0
        total = ray.cluster_resources().get("GPU" if gpus else "CPU", 0)
        n = int(workers or total // max(gpus, 1))
        if n < 1:
            raise StudyError(f"the Ray cluster has no {'GPU' if gpus else 'CPU'} for a worker")
        threads = max(1, int(ray.cluster_resources().get("CPU", 1) // n)) if not address else 1
        remote = ray.remote(num_gpus=gpus, num_cpus=1)(_RayWorker)
        self._new_actor = lambda: remote.remote(study.model_dump(mode="json"), threads)
        self.actors = [self._new_actor() for _ in range(n)]
        self.provenance = ray.get(self.actors[0].provenance.remote())

    def map(self, units: list[Unit]) -> Iterator[tuple]:
        ray = self._ray
        queue, idle, running = list(units), list(self.actors), {}
        while queue or running:
            while queue and idle:
                actor, unit = idle.pop(), queue.pop(0)
                running[actor.run.remote(unit)] = (unit, actor)
            (ready,), _ = ray.wait(list(running), num_returns=1)
            unit, actor = running.pop(ready)
            try:
                outcome = ray.get(ready)
            except ray.exceptions.RayActorError as e:
                self.actors[self.actors.index(actor)] = actor = self._new_actor()
                outcome = (unit, None, f"the Ray worker died while running this unit ({type(e).__name__}: {e})\n"
                                       f"{type(e).__name__}: worker lost", 0.0, "ray:lost")  # fmt: skip
            idle.append(actor)
            yield outcome

    def close(self) -> None:
        for a in self.actors:
            self._ray.kill(a)
        if self._started:
            self._ray.shutdown()


def _execute(run: Run, executor, units: list[Unit], *, progress: bool, desc: str) -> int:
    """Run ``units`` and write each outcome as it arrives; returns the number of failures."""
    failed = 0
    bar = tqdm(total=len(units), desc=desc, unit="unit", disable=not progress or not units)
    for unit, frame, error, seconds, worker in executor.map(units):
        if error is None:
            run.write_unit(unit, frame, executor.provenance, seconds=seconds, worker=worker)
        else:
            run.write_failure(unit, error, worker=worker)
            failed += 1
            bar.write(f"unit failed: {unit.describe()}: {error.strip().splitlines()[-1]}")
        bar.update(1)
        bar.set_postfix(failed=failed)
    bar.close()
    return failed


def run_study(
    study: str | Path | dict,
    out: str | Path | None = None,
    *,
    executor: str = "local",
    address: str | None = None,
    workers: int | None = None,
    resume: bool = False,
    progress: bool = True,
    model=None,
) -> Run:
    """Run a study file (path, TOML text or dict) into run directory ``out`` (default ``runs/<name>``).

    Everything in the file is validated (indices against the model's config) before a model loads.
    ``resume=True`` continues an existing directory, running only units without a valid result file.
    ``executor``: ``"local"`` (in-process) or ``"ray"`` (``address``: a cluster, e.g. ``"auto"``;
    ``workers``: actors). ``model``: an already-loaded model for the local executor (notebooks).
    Returns the :class:`Run`; check ``run.failures()`` (the CLI exits 1 when any unit failed)."""
    from ..models.loading import load_config

    if executor not in EXECUTORS:
        raise StudyError(f"executor must be one of {EXECUTORS}, got {executor!r}")
    if executor != "ray" and (address or workers):
        raise StudyError("--address/--workers only apply to the ray executor")
    if executor == "ray" and model is not None:
        raise StudyError("a loaded model can only be used by the local executor (Ray workers load their own)")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise StudyError(f"workers must be a whole number ≥ 1, got {workers!r}")
    spec = load_study(study)
    path = study_path(study) if isinstance(study, (str, Path)) else None
    text = read_study_text(path) if path is not None else _to_toml(spec)
    shape = Shape.of_config(model.hf.config if model is not None else load_config(spec.model.source if spec.model.source != "embedded" else None))
    check(spec, shape)
    target = Path(out) if out else Path("runs") / spec.name
    Run.check_target(target, resume=resume, study=spec)  # a different study, or an unwritable place: refused now
    ex = LocalExecutor(spec, model) if executor == "local" else RayExecutor(spec, address=address, workers=workers)
    try:
        run = Run.create(target, text, resume=resume)  # only once the model loaded: a failed load leaves no directory
    except BaseException:
        ex.close()
        raise
    try:
        done = run.completed()
        if resume:
            _same_model(run, ex.provenance)
        ranks = rank_units(spec)
        _execute(run, ex, [u for u in ranks if u.id not in done], progress=progress, desc="ranking")
        rankings = _rankings(run, ranks)
        units = eval_units(spec, shape, rankings)
        run.save_plan(ranks + units)
        todo = [u for u in units if u.id not in done]
        _execute(run, ex, todo, progress=progress, desc=f"study {spec.name}")
    finally:
        ex.close()
    return run


def _same_model(run: Run, provenance: dict) -> None:
    """Refuse to resume ``run`` with a model whose provenance differs, in a field of ``UNIT_DEFINING``, from what
    its finished units recorded: the run would report "complete" with units of two models mixed."""
    recorded = run.unit_provenance()
    for name in UNIT_DEFINING:
        if name not in recorded.columns:
            continue  # a run written before this field was recorded
        now = provenance.get(name)
        other = sorted({str(v) for v in recorded[name] if v != now})
        if other:
            n = int((recorded[name] != now).sum())
            raise StudyError(f"cannot resume {run.path}: {n} of its {len(recorded)} finished units were computed with "
                             f"{name} {other[0]}{' (and others)' if len(other) > 1 else ''}, but the model loaded now has "
                             f"{name} {now}. Resuming would mix results of two models: restore that model, or start a "
                             "new run with another --out")  # fmt: skip


def _rankings(run: Run, ranks: Iterable[Unit]) -> dict:
    import pyarrow.parquet as pq

    out = {}
    for u in ranks:
        path = run.units.path(u.id)
        if not path.is_file():
            fail = run.failures()
            why = fail.loc[fail.unit_id == u.id, "error"].tolist()
            raise StudyError(f"the ranking scan failed, so `top` sets cannot be chosen: {why[0] if why else 'no result'}")
        frame = pq.read_table(_run_file(run.path, path, "ranking file"), columns=["layer", "unit", "rank"]).to_pandas().sort_values("rank")
        out[u.condition] = [(int(l), int(h)) for l, h in zip(frame["layer"], frame["unit"])]
    return out


def _to_toml(study: Study) -> str:
    """A TOML rendering of a study given as a dict (so every run directory holds a readable study.toml)."""
    import json

    def value(v):
        if isinstance(v, dict):
            return "{ " + ", ".join(f"{k} = {value(x)}" for k, x in v.items() if x is not None) + " }"
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return json.dumps(v)

    d = study.model_dump(mode="json", exclude_defaults=False)
    lines = [f"{k} = {value(d[k])}" for k in ("name", "description", "repetitions")]
    for table in ("model", "task", "ablation"):
        lines += ["", f"[{table}]"] + [f"{k} = {value(v)}" for k, v in d[table].items() if v is not None]
    for g in d["grid"]:
        lines += ["", "[[grid]]"] + [f"{k} = {value(v)}" for k, v in g.items() if v is not None]
    return "\n".join(lines) + "\n"

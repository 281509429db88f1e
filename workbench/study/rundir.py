"""A study run on disk: one Parquet file per completed unit (atomic writes through ResultStore), one JSON
file per failed unit, and DuckDB views over whatever has been validated.

    RUN_DIR/study.toml   the study as given      RUN_DIR/plan.json   unit ids of the current plan
    RUN_DIR/units/       <unit id>.parquet       RUN_DIR/failures/   <unit id>.json (traceback)
    RUN_DIR/report/      index.html, *.png, summary.csv

Opening a run reads only; every write lands inside the run directory (subdirectories are resolved
through symlinks and refused when they point elsewhere) and replaces files atomically, so a symlink
planted in a shared run directory can neither redirect a write nor a delete; unit and failure files
that resolve outside the run are not read either. Garbage in ``plan.json``,
``run.json`` or a failure file is reported, never fatal to reading the other runs.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
import time
import warnings
from pathlib import Path

import pandas as pd

from ..base.errors import WorkbenchError
from ..base.files import OutsideRootError, confined, confined_dir, confined_file, inside, write_text
from ..store.results import ResultStore
from .config import Study, StudyError, load_study
from .plan import Unit

# columns that differ between two runs of the same unit (timing, placement): not part of a result's identity
VOLATILE = ("seconds", "worker", "finished_at")
# provenance fields that define a unit's result: a resumed run whose model differs in one of them would mix results
UNIT_DEFINING = ("weights_hash", "tokenizer_hash", "dtype", "bos_policy")
UNIT_ID = re.compile(r"^(eval|rank)-[0-9a-f]{16}$")  # Unit.id's form; nothing else in units/ is ever read
_FAILURE_COLUMNS = ["unit_id", "unit", "grid", "k", "seed", "error", "traceback", "worker", "finished_at"]


def _write_json(path: Path, data, root: Path) -> None:
    write_text(path, json.dumps(data, indent=1, default=str), root=root)


def _read_json(path: Path, what: str, root: Path):
    """``path``'s JSON, or a :class:`StudyError` saying the file is unreadable (never a bare decode error) or
    not a file inside ``root`` (a link out of the run is never read)."""
    try:
        return json.loads(_run_file(root, path, what).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise StudyError(f"{path}: {what} is unreadable ({type(e).__name__}: {e})") from None


def _run_file(root: Path, path: Path, what: str) -> Path:
    """``path`` resolved, if it is a regular file inside the run ``root``; else a :class:`StudyError` naming it."""
    try:
        return confined_file(root, path)
    except OutsideRootError as e:
        raise StudyError(f"{what}: {e}; not read") from None


def writable(path: Path) -> None:
    """Refuse a directory (or, when missing, its nearest existing parent) this process cannot write, with
    a message naming it: found by creating and removing a file there, not by permission bits."""
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise StudyError(f"{probe} is not a directory, so {path} cannot be created; choose another --out")
    try:
        fd, tmp = tempfile.mkstemp(dir=probe, prefix=".workbench-write-check-")
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise StudyError(f"cannot write to {probe} ({e.strerror or e}); choose a writable --out") from None


class Run:
    """An existing run directory. ``results()``, ``rankings()``, ``failures()``, ``summary()``,
    ``sql(query)`` (views ``results``, ``rankings``, ``failures``) and ``report()``."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not (self.path / "study.toml").is_file():
            raise WorkbenchError(f"{self.path} is not a study run directory (no study.toml)")
        self.units = ResultStore(self.path / "units", create=False)  # nothing is created by opening a run

    def _subdir(self, name: str) -> Path:
        """``RUN_DIR/name`` for writing: created if missing, refused if it resolves outside the run directory."""
        try:
            return confined_dir(self.path, self.path / name)
        except OutsideRootError:
            raise StudyError(f"{self.path / name} points outside the run directory {self.path.resolve()}: "
                             "remove that link; workbench writes only inside the run") from None  # fmt: skip

    @staticmethod
    def check_target(path: str | os.PathLike, *, resume: bool, study: Study | None = None) -> None:
        """Refuse a directory that ``create`` would not take (checked before a model loads): an existing run
        without ``resume``, a resumed run whose study differs from ``study``, a non-run directory, or a
        place this process cannot write."""
        path = Path(path)
        if (path / "study.toml").is_file():
            if not resume:
                raise StudyError(f"run directory {path} already exists: pass --resume to continue it, or another --out")
            if study is not None:
                try:
                    old = load_study(_run_file(path, path / "study.toml", "study.toml"))
                except StudyError as e:
                    raise StudyError(f"cannot resume {path}: its study.toml is unreadable ({e})") from None
                diff = study_differences(old, study)
                if diff:
                    raise StudyError(f"cannot resume {path}: the study file differs from the run's study.toml "
                                     f"({'; '.join(diff[:8])}{' …' if len(diff) > 8 else ''}). Resume with the run's own "
                                     f"study ({path / 'study.toml'}) or start a new run with another --out")  # fmt: skip
        elif path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise StudyError(f"{path} exists and is not a study run directory; choose another --out")
        writable(path)

    @classmethod
    def create(cls, path: str | os.PathLike, study_text: str, *, resume: bool) -> "Run":
        path = Path(path)
        cls.check_target(path, resume=resume)
        path.mkdir(parents=True, exist_ok=True)
        run = cls.__new__(cls)
        run.path = path
        units = run._subdir("units")
        for stale in units.glob(".*.tmp"):  # a killed runner's half-written file: never a result
            stale.unlink()
        write_text(path / "study.toml", study_text, root=path)
        _write_json(path / "run.json", {"created": time.strftime("%Y-%m-%dT%H:%M:%S%z")} | cls._meta(path), path)
        return cls(path)

    @staticmethod
    def _meta(path: Path) -> dict:
        """``run.json`` (``{}`` when missing or unreadable: it only records when the run was created)."""
        old = path / "run.json"
        if not old.is_file():
            return {}
        try:
            meta = _read_json(old, "run.json", path)
        except StudyError as e:
            warnings.warn(str(e))
            return {}
        return meta if isinstance(meta, dict) else {}

    @property
    def study(self) -> Study:
        return load_study(_run_file(self.path, self.path / "study.toml", "study.toml"))

    @property
    def name(self) -> str:
        return self.path.name

    # --- writing ------------------------------------------------------------------------------------
    def save_plan(self, units: list[Unit]) -> None:
        _write_json(self.path / "plan.json", [{"id": u.id, "kind": u.kind, "describe": u.describe()} for u in units], self.path)

    def plan(self) -> list[dict]:
        """The current plan's units (``[]`` before planning). An unreadable or malformed ``plan.json`` warns
        and counts as no plan (``--resume`` writes it again)."""
        p = self.path / "plan.json"
        if not p.is_file():
            return []
        try:
            plan = _read_json(p, "plan.json", self.path)
            if not isinstance(plan, list) or not all(isinstance(u, dict) and isinstance(u.get("id"), str)
                                                     and u.get("kind") in ("eval", "rank") for u in plan):  # fmt: skip
                raise StudyError(f"{p}: plan.json is not a list of units")
        except StudyError as e:
            warnings.warn(f"{e}; rerun with --resume to rewrite it")
            return []
        return plan

    def write_unit(self, unit: Unit, frame: pd.DataFrame, provenance: dict, *, seconds: float, worker: str) -> Path:
        cond = dict(unit.condition)
        frame = frame.assign(
            unit_id=unit.id, kind=unit.kind, grid=unit.grid, select=unit.select, k=unit.k,
            seed=-1 if unit.seed is None else unit.seed, repetition=unit.repetition, targets=json.dumps(unit.targets),
            length=cond.get("length", float("nan")), depth=cond.get("depth", float("nan")),
            mode=unit.study["ablation"]["mode"], target=unit.study["ablation"]["target"],
            unit_config=json.dumps(unit.config, sort_keys=True, default=list),
            model_source=provenance["model_source"], model_id=provenance["model_id"], revision=provenance["revision"],
            weights_hash=provenance["weights_hash"], dtype=provenance["dtype"], bos_policy=provenance["bos_policy"],
            tokenizer_hash=provenance.get("tokenizer_hash"),
            workbench_version=provenance["versions"].get("workbench"),
            transformers_version=provenance["versions"].get("transformers"),
            definition=_definition(unit), seconds=seconds, worker=worker, finished_at=time.time(),
        )  # fmt: skip
        self._subdir("units")
        out = self.units.save(unit.id, frame, provenance | {"unit": unit.config})
        if (self.path / "failures").exists():
            (self._subdir("failures") / f"{unit.id}.json").unlink(missing_ok=True)
        return out

    def write_failure(self, unit: Unit, error: str, *, worker: str) -> None:
        _write_json(self._subdir("failures") / f"{unit.id}.json",
                    {"unit_id": unit.id, "unit": unit.describe(), "grid": unit.grid, "k": unit.k, "seed": unit.seed,
                     "error": error.strip().splitlines()[-1] if error.strip() else "", "traceback": error, "worker": worker,
                     "finished_at": time.time()}, self.path)  # fmt: skip

    # --- reading ------------------------------------------------------------------------------------
    def completed(self, *, quarantine: bool = True) -> set[str]:
        """Ids of units whose Parquet file is whole and belongs to its name. A corrupt or partial file is
        never counted; with ``quarantine`` (what a resumed run does) it is also moved to ``units/corrupt/``
        with a warning, so the unit runs again. Reading a run (status, results, listing) only skips it."""
        import pyarrow.parquet as pq

        done = set()
        if not self.units.root.is_dir():
            return done
        try:
            confined(self.path, self.units.root)
        except OutsideRootError:
            raise StudyError(f"{self.units.root} points outside the run directory {self.path.resolve()}: "
                             "remove that link") from None  # fmt: skip
        for path in sorted(self.units.root.glob("*.parquet")):
            if not UNIT_ID.match(path.stem):  # not a unit's file (a glob-like or foreign name): never read
                continue
            if not inside(self.path, path):  # a unit file linked out of the run: never read, never counted
                warnings.warn(f"{path} points outside the run directory {self.path.resolve()}: not read")
                continue
            if not path.resolve().is_file():  # a folder named like a unit would be read as a dataset of its files
                warnings.warn(f"{path} is a folder, not a unit's file: not read")
                continue
            try:
                ids = pq.read_table(path, columns=["unit_id"]).column("unit_id").unique().to_pylist()
                if ids != [path.stem]:
                    raise ValueError(f"holds unit ids {ids[:3]}")
                pq.read_table(path)  # every column chunk decodes
            except Exception as e:  # noqa: BLE001 - any unreadable file is treated the same way
                if not quarantine:
                    continue
                bad = confined_dir(self.path, self.units.root / "corrupt")
                os.replace(path, bad / f"{path.name}.{int(time.time() * 1000)}")
                warnings.warn(f"{path.name}: corrupt or partial result ({type(e).__name__}: {e}); moved to {bad}, will re-run")
                continue
            done.add(path.stem)
        return done

    def unit_provenance(self) -> pd.DataFrame:
        """The fields of :data:`UNIT_DEFINING` each completed unit recorded (one row per unit; a field a run
        written by an older workbench lacks is absent): what ``--resume`` compares with the model it loaded."""
        import pyarrow.parquet as pq

        rows = []
        for uid in sorted(self.completed(quarantine=False)):
            path = _run_file(self.path, self.units.path(uid), "unit file")
            names = set(pq.read_schema(path).names)
            table = pq.read_table(path, columns=[c for c in UNIT_DEFINING if c in names])
            rows.append({"unit_id": uid, **{c: table.column(c)[0].as_py() for c in table.column_names}})
        return pd.DataFrame(rows)

    def _frames(self, kind: str) -> pd.DataFrame:
        planned = [u["id"] for u in self.plan() if u["kind"] == kind] or None
        done = self.completed(quarantine=False)
        ids = sorted(done & set(planned)) if planned is not None else sorted(i for i in done if i.startswith(kind))
        if not ids:
            return pd.DataFrame()
        import pyarrow as pa
        import pyarrow.parquet as pq

        # exact files, opened one by one: DuckDB's read_parquet expands glob characters even in a list of paths,
        # so a run directory named `run-*` read every matching run's units
        tables = [pq.read_table(_run_file(self.path, self.units.path(i), "unit file")) for i in ids]
        return pa.concat_tables(tables, promote_options="permissive").to_pandas()  # union by name, as before

    def results(self) -> pd.DataFrame:
        """One row per test item of every completed evaluation unit of the current plan."""
        return self._frames("eval")

    def rankings(self) -> pd.DataFrame:
        """The ranking scans' rows (layer, unit = head or expert, metric = score, rank)."""
        return self._frames("rank")

    def failures(self) -> pd.DataFrame:
        """One row per failed unit; an unreadable failure file is a row saying so (its unit still failed)."""
        folder = self.path / "failures"
        rows = []
        readable = folder.is_dir() and inside(self.path, folder)  # a failures/ linked out of the run is not read
        for p in sorted(folder.glob("*.json")) if readable else []:
            try:
                if not inside(self.path, p):
                    raise StudyError(f"{p} points outside the run directory: not read")
                row = _read_json(p, "failure record", self.path)
                if not isinstance(row, dict):
                    raise StudyError(f"{p}: failure record is not a JSON object")
                rows.append({c: row.get(c) for c in _FAILURE_COLUMNS})
            except StudyError as e:
                rows.append({"unit_id": p.stem, "unit": p.stem, "error": str(e), "traceback": "", "worker": None})
        return pd.DataFrame(rows, columns=_FAILURE_COLUMNS)

    def status(self) -> dict:
        planned = {u["id"] for u in self.plan()}  # unique ids: a plan listing one twice can still complete
        done = self.completed(quarantine=False) & planned
        failed = len(self.failures())
        return {"n_units": len(planned), "n_done": len(done), "n_failed": failed,
                "status": "complete" if planned and len(done) == len(planned) else ("failed units" if failed else "incomplete")}  # fmt: skip

    def summary(self, results: pd.DataFrame | None = None) -> pd.DataFrame:
        """Metric per ablation set size: mean over units (seeds, conditions, repetitions), its standard
        deviation across seeds/repetitions, and counts. ``results``: :meth:`results` if already read."""
        res = self.results() if results is None else results
        if res.empty:
            return pd.DataFrame(columns=["grid", "select", "k", "metric_mean", "metric_std", "n_units", "n_items"])
        per_unit = res.groupby(["grid", "select", "k", "seed", "repetition", "unit_id"], as_index=False)["metric"].mean()
        per_seed = per_unit.groupby(["grid", "select", "k", "seed", "repetition"], as_index=False)["metric"].mean()
        out = per_seed.groupby(["grid", "select", "k"], as_index=False)["metric"].agg(metric_mean="mean", metric_std="std")
        counts = res.groupby(["grid", "select", "k"], as_index=False).agg(n_units=("unit_id", "nunique"), n_items=("metric", "size"))
        return out.merge(counts, on=["grid", "select", "k"]).fillna({"metric_std": 0.0}).sort_values(["select", "k", "grid"]).reset_index(drop=True)

    def sql(self, query: str) -> pd.DataFrame:
        """DuckDB over the run: views ``results``, ``rankings`` and ``failures``."""
        import duckdb

        con = duckdb.connect()
        for name, frame in (("results", self.results()), ("rankings", self.rankings()), ("failures", self.failures())):
            if len(frame.columns):  # an empty table (no ranking in this study) has no view
                con.register(name, frame)
        return con.execute(query).df()

    def report(self, out_dir: str | os.PathLike | None = None, *, png: bool = True) -> Path:
        """Write ``report/index.html`` (figures, summary table, failures) and one PNG per figure."""
        from .report import write_report

        return write_report(self, Path(out_dir) if out_dir else self._subdir("report"), png=png)


def _definition(unit: Unit) -> str:
    from .tasks import DEFINITIONS

    key = f"rank:{unit.study['ablation']['target']}" if unit.kind == "rank" else unit.study["task"]["kind"]
    return DEFINITIONS[key] + f"; ablation {unit.study['ablation']['target']}:{unit.study['ablation']['mode']}"


def study_differences(old: Study, new: Study) -> list[str]:
    """What differs between two studies, as ``key: old → new`` (empty when they plan the same units)."""
    a, b = old.model_dump(mode="json"), new.model_dump(mode="json")
    out: list[str] = []

    def walk(x, y, key):
        if isinstance(x, dict) and isinstance(y, dict):
            for k in list(x) + [k for k in y if k not in x]:
                walk(x.get(k), y.get(k), f"{key}.{k}" if key else k)
        elif isinstance(x, list) and isinstance(y, list) and len(x) == len(y) and any(isinstance(v, dict) for v in x):
            for i, (u, v) in enumerate(zip(x, y)):
                walk(u, v, f"{key}[{i}]")
        elif x != y:
            out.append(f"{key}: {json.dumps(x)} in the run, {json.dumps(y)} in the file")

    walk(a, b, "")
    return out


def list_runs(root: str | os.PathLike = "runs") -> pd.DataFrame:
    """One row per run directory under ``root``: run_id, name, path, created, n_units, n_done, n_failed, status.

    Reads only. A directory that resolves outside ``root`` (a symlink) is listed as such and not opened;
    a run whose files are unreadable is listed with the reason, never breaking the list."""
    rows = []
    root = Path(root)
    for d in sorted(root.iterdir()) if root.is_dir() else []:
        try:
            confined(root, d)
        except OutsideRootError:
            rows.append({"run_id": d.name, "name": None, "path": str(d), "created": None,
                         "status": f"not opened: links outside {root}"})  # fmt: skip
            continue
        if not (d / "study.toml").is_file():
            continue
        try:
            run = Run(d)
            meta = Run._meta(d)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # garbage files are reported in the status, not as warnings
                status = run.status()
                if not run.plan() and (d / "plan.json").exists():
                    status["status"] += " (plan.json unreadable)"
            rows.append({"run_id": d.name, "name": run.study.name, "path": str(d), "created": meta.get("created"), **status})
        except Exception as e:  # noqa: BLE001 - one broken run must not hide the others
            rows.append({"run_id": d.name, "name": None, "path": str(d), "created": None,
                         "status": f"unreadable: {e if isinstance(e, WorkbenchError) else f'{type(e).__name__}: {e}'}"})  # fmt: skip
    return pd.DataFrame(rows, columns=["run_id", "name", "path", "created", "n_units", "n_done", "n_failed", "status"])

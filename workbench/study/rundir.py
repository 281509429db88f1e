"""A study run on disk: one Parquet file per completed unit (atomic writes through ResultStore), one JSON
file per failed unit, and DuckDB views over whatever has been validated.

    RUN_DIR/study.toml   the study as given      RUN_DIR/plan.json   unit ids of the current plan
    RUN_DIR/units/       <unit id>.parquet       RUN_DIR/failures/   <unit id>.json (traceback)
    RUN_DIR/report/      index.html, *.png, summary.csv
"""
from __future__ import annotations

import json
import os
import tempfile
import time
import warnings
from pathlib import Path

import pandas as pd

from ..errors import WorkbenchError
from ..store import ResultStore
from .config import Study, StudyError, load_study
from .plan import Unit

# columns that differ between two runs of the same unit (timing, placement): not part of a result's identity
VOLATILE = ("seconds", "worker", "finished_at")


def _write_json(path: Path, data) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1, default=str)
    os.replace(tmp, path)


class Run:
    """An existing run directory. ``results()``, ``rankings()``, ``failures()``, ``summary()``,
    ``sql(query)`` (views ``results``, ``rankings``, ``failures``) and ``report()``."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not (self.path / "study.toml").is_file():
            raise WorkbenchError(f"{self.path} is not a study run directory (no study.toml)")
        self.units = ResultStore(self.path / "units")
        (self.path / "failures").mkdir(exist_ok=True)

    @staticmethod
    def check_target(path: str | os.PathLike, *, resume: bool) -> None:
        """Refuse a directory that ``create`` would not take (checked before a model loads)."""
        path = Path(path)
        if (path / "study.toml").is_file():
            if not resume:
                raise StudyError(f"run directory {path} already exists: pass --resume to continue it, or another --out")
        elif path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise StudyError(f"{path} exists and is not a study run directory; choose another --out")

    @classmethod
    def create(cls, path: str | os.PathLike, study_text: str, *, resume: bool) -> "Run":
        path = Path(path)
        cls.check_target(path, resume=resume)
        path.mkdir(parents=True, exist_ok=True)
        for stale in (path / "units").glob(".*.tmp"):  # a killed runner's half-written file: never a result
            stale.unlink()
        (path / "study.toml").write_text(study_text)
        _write_json(path / "run.json", {"created": time.strftime("%Y-%m-%dT%H:%M:%S%z")} | cls._meta(path))
        return cls(path)

    @staticmethod
    def _meta(path: Path) -> dict:
        old = path / "run.json"
        return json.loads(old.read_text()) if old.is_file() else {}

    @property
    def study(self) -> Study:
        return load_study(self.path / "study.toml")

    @property
    def name(self) -> str:
        return self.path.name

    # --- writing ------------------------------------------------------------------------------------
    def save_plan(self, units: list[Unit]) -> None:
        _write_json(self.path / "plan.json", [{"id": u.id, "kind": u.kind, "describe": u.describe()} for u in units])

    def plan(self) -> list[dict]:
        p = self.path / "plan.json"
        return json.loads(p.read_text()) if p.is_file() else []

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
            workbench_version=provenance["versions"].get("workbench"),
            transformers_version=provenance["versions"].get("transformers"),
            definition=_definition(unit), seconds=seconds, worker=worker, finished_at=time.time(),
        )  # fmt: skip
        out = self.units.save(unit.id, frame, provenance | {"unit": unit.config})
        (self.path / "failures" / f"{unit.id}.json").unlink(missing_ok=True)
        return out

    def write_failure(self, unit: Unit, error: str, *, worker: str) -> None:
        _write_json(self.path / "failures" / f"{unit.id}.json",
                    {"unit_id": unit.id, "unit": unit.describe(), "grid": unit.grid, "k": unit.k, "seed": unit.seed,
                     "error": error.strip().splitlines()[-1] if error.strip() else "", "traceback": error, "worker": worker,
                     "finished_at": time.time()})  # fmt: skip

    # --- reading ------------------------------------------------------------------------------------
    def completed(self) -> set[str]:
        """Ids of units whose Parquet file is whole and belongs to its name. A corrupt or partial file is
        moved to ``units/corrupt/`` with a warning, so the unit runs again and is never read."""
        import pyarrow.parquet as pq

        done = set()
        for path in sorted(self.units.root.glob("*.parquet")):
            try:
                ids = pq.read_table(path, columns=["unit_id"]).column("unit_id").unique().to_pylist()
                if ids != [path.stem]:
                    raise ValueError(f"holds unit ids {ids[:3]}")
                pq.read_table(path)  # every column chunk decodes
            except Exception as e:  # noqa: BLE001 - any unreadable file is treated the same way
                bad = self.units.root / "corrupt"
                bad.mkdir(exist_ok=True)
                os.replace(path, bad / f"{path.name}.{int(time.time() * 1000)}")
                warnings.warn(f"{path.name}: corrupt or partial result ({type(e).__name__}: {e}); moved to {bad}, will re-run")
                continue
            done.add(path.stem)
        return done

    def _frames(self, kind: str) -> pd.DataFrame:
        planned = [u["id"] for u in self.plan() if u["kind"] == kind] or None
        ids = sorted(self.completed() & set(planned)) if planned is not None else sorted(i for i in self.completed() if i.startswith(kind))
        if not ids:
            return pd.DataFrame()
        import duckdb

        files = [self.units.path(i).as_posix() for i in ids]
        return duckdb.connect().execute("SELECT * FROM read_parquet(?, union_by_name = true)", [files]).df()

    def results(self) -> pd.DataFrame:
        """One row per test item of every completed evaluation unit of the current plan."""
        return self._frames("eval")

    def rankings(self) -> pd.DataFrame:
        """The ranking scans' rows (layer, unit = head or expert, metric = score, rank)."""
        return self._frames("rank")

    def failures(self) -> pd.DataFrame:
        rows = [json.loads(p.read_text()) for p in sorted((self.path / "failures").glob("*.json"))]
        return pd.DataFrame(rows, columns=["unit_id", "unit", "grid", "k", "seed", "error", "traceback", "worker", "finished_at"])

    def status(self) -> dict:
        plan = self.plan()
        done = self.completed() & {u["id"] for u in plan}
        failed = len(self.failures())
        return {"n_units": len(plan), "n_done": len(done), "n_failed": failed,
                "status": "complete" if plan and len(done) == len(plan) else ("failed units" if failed else "incomplete")}  # fmt: skip

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

        return write_report(self, Path(out_dir) if out_dir else self.path / "report", png=png)


def _definition(unit: Unit) -> str:
    from .tasks import DEFINITIONS

    key = f"rank:{unit.study['ablation']['target']}" if unit.kind == "rank" else unit.study["task"]["kind"]
    return DEFINITIONS[key] + f"; ablation {unit.study['ablation']['target']}:{unit.study['ablation']['mode']}"


def list_runs(root: str | os.PathLike = "runs") -> pd.DataFrame:
    """One row per run directory under ``root``: run_id, name, path, created, n_units, n_done, n_failed, status."""
    rows = []
    root = Path(root)
    for d in sorted(p for p in root.iterdir() if (p / "study.toml").is_file()) if root.is_dir() else []:
        try:
            run = Run(d)
            meta = Run._meta(d)
            rows.append({"run_id": d.name, "name": run.study.name, "path": str(d), "created": meta.get("created"), **run.status()})
        except WorkbenchError as e:
            rows.append({"run_id": d.name, "name": None, "path": str(d), "created": None, "status": f"unreadable: {e}"})
    return pd.DataFrame(rows, columns=["run_id", "name", "path", "created", "n_units", "n_done", "n_failed", "status"])

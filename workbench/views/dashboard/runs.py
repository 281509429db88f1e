"""The Runs tab's data: study runs under one directory, read through the :mod:`workbench.study` API, nothing
outside that directory opened (:func:`safe_path`), and comparisons that refuse to subtract unlike metrics."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from .validation import DashboardError

#: what each study task's metric is (the study's own definitions: workbench.study.tasks)
METRICS = {"niah": "NIAH accuracy", "loss": "loss (nats)", "logit_diff": "logit difference", "generation_match": "generation match"}


def safe_path(root: str | Path, candidate: str | Path) -> Path:
    """``candidate`` resolved, if it lies inside ``root`` (symlinks resolved too); else an error.
    Relative candidates are taken relative to ``root``."""
    root = Path(root).resolve()
    p = Path(candidate)
    p = (p if p.is_absolute() else root / p).resolve()
    if p != root and root not in p.parents:
        raise DashboardError(f"refused: {candidate} is outside the runs directory")
    return p


def run_metric(run) -> dict:
    """What a run's summary ``metric_mean`` measures: ``{task, label, model, ablation}`` (``task`` None: unknown)."""
    try:
        study = run.study
        task = study.task.kind
        return {"task": task, "label": METRICS.get(task, task), "model": str(study.model.source),
                "ablation": f"{study.ablation.target}:{study.ablation.mode}"}
    except Exception:  # noqa: BLE001 — an unreadable or foreign run: its metric is unknown
        return {"task": None, "label": "an unknown metric", "model": None, "ablation": None}


@dataclass
class Comparison:
    frame: pd.DataFrame
    notes: list[str] = field(default_factory=list)
    comparable: bool = True
    metric: str = ""


class RunsStore:
    """Study runs under one directory, through the :mod:`workbench.study` API; nothing outside it is opened."""

    def __init__(self, root: str | Path, api=None):
        self.root = Path(root)
        self._api = api
        self.refused: list[str] = []  # listed runs whose directory lies outside the root

    @property
    def api(self):
        if self._api is None:
            from ... import study

            self._api = study
        return self._api

    def list(self) -> pd.DataFrame:
        if not self.root.is_dir():
            return pd.DataFrame(
                columns=["run_id", "name", "path", "created", "n_units", "n_done", "n_failed", "status"]
            )
        df = self.api.list_runs(self.root)
        if not len(df):
            return df
        paths, refused = [], []
        for rid, p in zip(df["run_id"], df["path"]):
            try:
                paths.append(str(safe_path(self.root, p)))
            except DashboardError:  # e.g. a symlink out of the store: not listed, never opened
                paths.append(None)
                refused.append(str(rid))
        self.refused = refused
        df = df.assign(path=paths)
        return df[df["path"].notna()].reset_index(drop=True)

    def path(self, run_id: str) -> Path:
        """The directory of run ``run_id`` (which must be listed and lie inside the root)."""
        df = self.list()
        hit = df[df["run_id"].astype(str) == str(run_id)] if len(df) else df
        if not len(hit):
            raise DashboardError(f"no run {run_id!r} in {self.root}")
        return safe_path(self.root, hit["path"].iloc[0])

    def run(self, run_id: str):
        return self.api.Run(self.path(run_id))

    def report_html(self, run_id: str) -> str:
        """The run's HTML report (written by ``Run.report()`` if missing), read from inside the root."""
        run = self.run(run_id)
        existing = self.path(run_id) / "report" / "index.html"
        if existing.is_file():
            page = existing
        else:
            try:
                page = run.report(png=False)  # PNG export needs chromium and takes seconds: not for a click
            except TypeError:
                page = run.report()
        page = safe_path(self.root, page)
        if page.suffix.lower() not in (".html", ".htm"):
            raise DashboardError("the run's report is not an HTML file")
        return page.read_text(encoding="utf-8", errors="replace")

    def compare(self, a: str, b: str) -> "Comparison":
        """Two runs' summaries side by side (columns suffixed with the run ids), with a Δ only when both runs
        measure the same metric; the notes say what differs (another task, model or ablation mode)."""
        ra, rb = self.run(a), self.run(b)
        ma, mb = run_metric(ra), run_metric(rb)
        notes = []
        like = ma.get("task") is not None and ma.get("task") == mb.get("task")
        if not like:
            notes.append(f"not comparable: run {a} measures {ma['label']}, run {b} measures {mb['label']} — shown side by side, "
                         "no Δ computed")  # fmt: skip
        for key, what in (("model", "models"), ("ablation", "ablations")):
            if like and ma.get(key) != mb.get(key):
                notes.append(f"different {what}: {ma.get(key)} vs {mb.get(key)} — the Δ compares those too")
        frame = compare_frames(ra.summary(), rb.summary(), str(a), str(b), delta=like)
        return Comparison(frame=frame, notes=notes, comparable=like, metric=ma["label"] if like else "")


ID_COLUMNS = {"k", "seed", "layer", "head", "expert", "length", "depth", "repetition", "needle", "unit", "unit_id"}


def compare_frames(a: pd.DataFrame, b: pd.DataFrame, name_a: str, name_b: str, *, delta: bool = True) -> pd.DataFrame:
    """Join two summary tables on their shared non-numeric and identifier columns (``k``, ``seed``,
    ``layer``, …); the other numeric columns side by side, with a Δ (``delta=True``)."""
    num = pd.api.types.is_numeric_dtype
    shared = [c for c in a.columns if c in b.columns]
    keys = [c for c in shared if not num(a[c]) or c in ID_COLUMNS]
    nums = [c for c in shared if c not in keys and num(a[c]) and num(b[c])]
    if keys:
        merged = a[keys + nums].merge(b[keys + nums], on=keys, how="outer", suffixes=(f" [{name_a}]", f" [{name_b}]"))
    else:
        merged = pd.concat([a[nums].add_suffix(f" [{name_a}]"), b[nums].add_suffix(f" [{name_b}]")], axis=1)
    if delta:
        for c in nums:
            ca, cb = f"{c} [{name_a}]", f"{c} [{name_b}]"
            if ca in merged and cb in merged:
                merged[f"Δ {c}"] = merged[cb] - merged[ca]
    return merged

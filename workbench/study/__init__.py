"""Scripted studies: declarative head/expert ablation sweeps, run locally or on Ray, results in a
resumable directory of Parquet files.

    import workbench as wb
    run = wb.study.run_study("studies/retrieval_ablation.toml", executor="local", resume=True)
    run.summary(); run.report()

CLI: ``workbench study run FILE [--executor local|ray] [--address ADDR] [--resume]``,
``workbench study report RUN_DIR``.
"""
from __future__ import annotations

from .config import Study, StudyError, load_study
from .plan import Shape, Unit
from .rundir import Run, list_runs
from .runner import EXECUTORS, run_study

__all__ = ["EXECUTORS", "Run", "Shape", "Study", "StudyError", "Unit", "list_runs", "load_study", "run_study"]

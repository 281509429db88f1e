"""benchmarks/gpu_suite.py --dry-run: the GPU suite's code paths on tiny shapes under the Triton interpreter.

Run as a subprocess (its own TRITON_INTERPRET, the way it runs on a GPU box: a script, not a test import);
the table must hold one passing correctness row per (shape, dtype, case) and one speed row per
(shape, length) with every column measured.
"""
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

SUITE = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_suite.py"


def _suite_module():
    spec = importlib.util.spec_from_file_location("gpu_suite", SUITE)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)  # top level imports only the standard library
    return mod


def test_dry_run_table_has_every_row():
    suite = _suite_module()
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, str(SUITE), "--dry-run"], capture_output=True, text=True, env=env, timeout=600)
    out = proc.stdout
    assert proc.returncode == 0, out[-4000:] + proc.stderr[-4000:]
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in out.splitlines() if line.startswith("| ")]
    names = [s.name for s in suite.SHAPES]
    # (a) correctness: shape × (float32 × {prefill, decode} + float16 prefill), all "ok"
    checks = [r for r in rows if len(r) > 3 and r[1] in ("float32", "float16", "bfloat16")]
    want = [(n, "float32", c) for n in names for c in ("prefill", "decode")] + [(n, "float16", "prefill") for n in names]
    assert sorted((r[0], r[1], r[2]) for r in checks) == sorted(want)
    assert all(r[-1].startswith("ok") for r in checks), [r for r in checks if not r[-1].startswith("ok")]
    n_cases = len(want)
    assert f"correctness: {n_cases}/{n_cases} passed" in out
    # (b) speed: one row per (shape, length), SDPA / capture / all stats / decode columns all timed
    speed = {(r[0], int(r[1])): r for r in rows if len(r) == 12 and r[1].isdigit()}
    assert set(speed) == {(n, length) for n in names for length in suite.DRY_LENGTHS}
    number = re.compile(r"^\d+\.\d+$")
    for key, r in speed.items():
        timed = [r[2], r[4], r[5], r[6], r[7], r[8], r[9], r[10]]
        assert all(number.match(c) for c in timed), (key, r)

"""Study throughput: units per minute with the local executor vs Ray with 2 workers, and what the results
store costs per unit (Parquet write + rename, measured around ``Run.write_unit`` in the driver).

    python benchmarks/study_throughput.py --units 12 --tokens 256

The study: the embedded SmolLM2, task ``loss`` on two 256-token essay paragraphs, ``units`` random
4-head zero-ablations (one unit each). Each executor runs the same study into a fresh directory; model
loading is timed apart from the sweep. The local executor uses every core in one process; Ray runs
one actor per CPU slot (1 torch thread each), so on a 2-core machine the two compare parallelism
across units with parallelism inside each unit's matmuls. Store overhead target: < 5% of unit time.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

STUDY = """
name = "throughput"
[model]
source = "embedded"
[task]
kind = "loss"
n_texts = 2
max_tokens = {tokens}
[ablation]
mode = "zero"
[[grid]]
select = "random"
k = [4]
seeds = {seeds}
"""


def measure(executor: str, units: int, tokens: int, workers: int | None) -> dict:
    from workbench.study import rundir, runner

    writes: list[float] = []
    original = rundir.Run.write_unit

    def timed(self, *a, **k):
        t = time.perf_counter()
        try:
            return original(self, *a, **k)
        finally:
            writes.append(time.perf_counter() - t)

    rundir.Run.write_unit = timed
    loaded: list[float] = []
    for cls in (runner.LocalExecutor, runner.RayExecutor):  # time start-up (model load) apart from the sweep
        init = cls.__init__

        def wrapped(self, *a, _init=init, **k):
            t = time.perf_counter()
            _init(self, *a, **k)
            loaded.append(time.perf_counter() - t)

        cls.__init__ = wrapped
    with tempfile.TemporaryDirectory() as d:
        study = Path(d) / "s.toml"
        study.write_text(STUDY.format(tokens=tokens, seeds=list(range(units))))
        t0 = time.perf_counter()
        run = runner.run_study(study, Path(d) / "run", executor=executor, workers=workers, progress=False)
        wall = time.perf_counter() - t0
        res = run.results()
    sweep = wall - sum(loaded)
    per_unit = res.groupby("unit_id")["seconds"].first()
    store = sum(writes) / len(writes)
    return {"executor": executor + (f" ×{workers}" if workers else ""), "units": len(per_unit), "startup_s": sum(loaded),
            "sweep_s": sweep, "units_per_min": 60 * len(per_unit) / sweep, "unit_s": per_unit.mean(),
            "store_ms": 1000 * store, "store_pct": 100 * store / per_unit.mean()}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--units", type=int, default=12)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    rows = [measure("local", args.units, args.tokens, None), measure("ray", args.units, args.tokens, args.workers)]
    print("| executor | units | start-up s | sweep s | units/min | s/unit (compute) | store ms/unit | store % of unit |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['executor']} | {r['units']} | {r['startup_s']:.1f} | {r['sweep_s']:.1f} | {r['units_per_min']:.1f} | "
              f"{r['unit_s']:.2f} | {r['store_ms']:.1f} | {r['store_pct']:.1f}% |")  # fmt: skip
    print(f"ray/local units per minute: {rows[1]['units_per_min'] / rows[0]['units_per_min']:.2f}")


if __name__ == "__main__":
    main()

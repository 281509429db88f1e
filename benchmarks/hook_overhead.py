"""What the named hook core costs, on the embedded SmolLM2 (CPU), measured against plain SDPA in one run.

    python benchmarks/hook_overhead.py --n 1024 [--baseline-src ../wb-baseline]

Each mode runs in its own subprocess (a warm-up, then the minimum of ``--repeats`` forwards):

- ``sdpa``: transformers' SDPA, no capture;
- ``idle``: inside ``wb.capture`` of one tiny statistic on one layer (what an open block costs elsewhere);
- ``stats``: ``AttentionStats(sink_keys=4)`` on every layer (α, top-1, entropy, lse, z-norm per head and row);
- ``names``: the same through ``names_filter`` plus residual norms and a user ``Hook`` on every layer;
- ``baseline``: ``stats`` with the workbench source tree given by ``--baseline-src`` (e.g. a checkout of
  the commit before the named core: ``git worktree add ../wb-baseline 78e8fff``), so "capture through
  names costs no more than before" is a ratio measured in the same run.
Input: random token ids (seed 0): speed does not depend on the text.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def run_one(mode: str, n: int, repeats: int) -> dict:
    import torch

    import workbench as wb

    torch.set_num_threads(os.cpu_count() or 1)
    m = wb.load()
    ids = torch.randint(0, m.spec.vocab_size, (1, n), generator=torch.Generator().manual_seed(0))

    def once():
        with torch.no_grad():
            if mode == "sdpa":
                m.hf.set_attn_implementation("sdpa")
                m.hf(ids)
            elif mode == "idle":
                with wb.capture(m, names_filter="blocks.0.attn.lse"):
                    m.hf(ids)
            elif mode in ("stats", "baseline"):
                with wb.capture(m, wb.AttentionStats(sink_keys=4)) as cap:
                    m.hf(ids)
                entropy = cap.attention.entropy if hasattr(cap, "attention") else cap.stack("attn.entropy")
                assert entropy.shape[-1] == n
            else:
                probes = (wb.AttentionStats(sink_keys=4), wb.Activations("blocks.*.hook_resid_post.norm"),
                          wb.Hook("blocks.*.hook_mlp_out", lambda x, name: x.abs().amax()))  # fmt: skip
                with wb.capture(m, *probes, names_filter=["blocks.*.attn.*", "blocks.*.hook_resid_post.norm"]) as cap:
                    m.hf(ids)
                assert cap.stack("attn.entropy").shape[-1] == n

    once()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        once()
        times.append(time.perf_counter() - t)
    return {"mode": mode, "n": n, "seconds": min(times)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--baseline-src", help="an older workbench source tree to time the same capture with")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.n, args.repeats)))
        return
    modes = ["sdpa", "idle", "stats", "names"] + (["baseline"] if args.baseline_src else [])
    rows = {}
    for mode in modes:
        env = dict(os.environ)
        if mode == "baseline":
            env["PYTHONPATH"] = os.path.abspath(args.baseline_src) + os.pathsep + env.get("PYTHONPATH", "")
        cmd = [sys.executable, __file__, "--one", mode, "--n", str(args.n), "--repeats", str(args.repeats)]
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
        rows[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    base = rows["sdpa"]["seconds"]
    print("| mode | N | seconds | ÷ SDPA |\n|---|---:|---:|---:|")
    for mode, r in rows.items():
        print(f"| {mode} | {r['n']} | {r['seconds']:.2f} | {r['seconds'] / base:.2f} |")
    if "baseline" in rows:
        print(f"\nnamed core ÷ baseline core (stats): {rows['stats']['seconds'] / rows['baseline']['seconds']:.2f}")


if __name__ == "__main__":
    main()

"""Capture overhead on the embedded SmolLM2 (CPU): plain SDPA forward vs our capture vs HF eager.

Every configuration runs in its own subprocess so its peak RSS is its own. Prints, in one run:
seconds and peak RSS per mode and length, and the ratios (b)/(a) and (c)/(a).

    python benchmarks/attention_capture.py --lengths 1024,2048,4096,8192

(a) ``sdpa``: transformers' SDPA attention, no statistics;
(b) ``capture``: our backend recording, for all 270 heads, α for the first 4 keys, top-1 index and
    probability, entropy and log-sum-exp for every query row (chunked torch path on CPU);
(c) ``eager``: HF eager attention with ``output_attentions=True`` (all N×N matrices), skipped where
    the matrices alone would not fit in memory.
Input: random token ids (seed 0): speed does not depend on the text.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

EAGER_BUDGET_GB = 12.0


def run_one(mode: str, n: int, repeats: int) -> dict:
    import torch

    import workbench as wb

    torch.set_num_threads(os.cpu_count() or 1)
    m = wb.load()
    ids = torch.randint(0, m.spec.vocab_size, (1, n), generator=torch.Generator().manual_seed(0))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        with torch.no_grad():
            if mode == "sdpa":
                m.hf.set_attn_implementation("sdpa")
                m.hf(ids)
            elif mode == "eager":
                m.hf.set_attn_implementation("eager")
                out = m.hf(ids, output_attentions=True)
                del out
            else:
                with wb.capture(m, wb.AttentionStats(sink_keys=4, topk=1)) as cap:
                    m.hf(ids)
                assert cap["blocks.0.attn.entropy"].shape[-1] == n
        times.append(time.perf_counter() - t)
    return {"mode": mode, "n": n, "seconds": min(times), "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="1024,2048,4096,8192")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        mode, n = args.one.split(":")
        print(json.dumps(run_one(mode, int(n), args.repeats)))
        return
    import workbench as wb

    spec = wb.load().spec  # also warms the cache so no subprocess pays the conversion
    rows = []
    for n in (int(x) for x in args.lengths.split(",")):
        eager_gb = spec.n_layers * spec.n_heads * n * n * 4 / 2**30
        for mode in ("sdpa", "capture", "eager"):
            if mode == "eager" and eager_gb > EAGER_BUDGET_GB:
                rows.append({"mode": mode, "n": n, "skipped": f"attention matrices alone need {eager_gb:.0f} GB"})
                print(f"N={n:>5} eager   skipped: {rows[-1]['skipped']}", flush=True)
                continue
            cmd = [sys.executable, __file__, "--one", f"{mode}:{n}", "--repeats", str(args.repeats)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                rows.append({"mode": mode, "n": n, "skipped": f"failed: {proc.stderr.strip().splitlines()[-1]}"})
            else:
                rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            r = rows[-1]
            print(f"N={n:>5} {mode:<8}" + (f"{r['seconds']:8.2f} s  peak RSS {r['peak_rss_gb']:.2f} GB" if "seconds" in r else f" {r['skipped']}"), flush=True)
    print("\n|     N | SDPA s | capture s | capture/SDPA | eager s | eager/SDPA | RSS SDPA / capture / eager (GB) |")
    print("|------:|-------:|----------:|-------------:|--------:|-----------:|:--------------------------------|")
    by = {(r["mode"], r["n"]): r for r in rows}
    for n in sorted({r["n"] for r in rows}):
        a, b, c = by[("sdpa", n)], by[("capture", n)], by[("eager", n)]
        ratio = lambda x: f"{x['seconds'] / a['seconds']:.2f}" if "seconds" in x and "seconds" in a else "—"
        sec = lambda x: f"{x['seconds']:.2f}" if "seconds" in x else "skipped"
        rss = lambda x: f"{x['peak_rss_gb']:.2f}" if "peak_rss_gb" in x else "—"
        print(f"| {n:>5} | {sec(a):>6} | {sec(b):>9} | {ratio(b):>12} | {sec(c):>7} | {ratio(c):>10} | {rss(a)} / {rss(b)} / {rss(c)} |")


if __name__ == "__main__":
    main()

"""Benchmark: torch SDPA forward vs the fused Triton attention-statistics kernel vs naive softmax(QKᵀ)V.

On CUDA, for each sequence length N (prefill, M = N, causal) it times
- ``sdpa``:   ``torch.nn.functional.scaled_dot_product_attention`` (output only, the speed bar),
- ``kernel``: ``workbench.kernels.attention_stats.attention_stats_triton`` with the default probe's
  statistics (lse, entropy, top-1, 4 key columns) plus sinks and spans (``--topk``, ``--key-mass`` and
  ``--edits`` add the top-k list, the key-mass pass and every probability edit),
- ``naive``:  materialised fp32 scores -> softmax -> @V (what you would write to get the same stats
  from the probability matrix), skipped when it would not fit,
and prints median milliseconds, the ratio to SDPA and the peak extra memory of each.

Without CUDA it says so and runs a tiny Triton-interpreter smoke check against the float64 reference.
``benchmarks/gpu_suite.py`` is the one-command GPU check (correctness on real shapes + capture vs SDPA).

    python benchmarks/kernel_attention_stats.py                     # defaults: B=1 Hq=32 Hkv=8 D=128 bf16
    python benchmarks/kernel_attention_stats.py --lengths 1024 4096 --dtype float16 --no-naive
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():  # before anything imports triton
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_suite import timed  # noqa: E402  (one timing rule for every GPU benchmark: CUDA events, median)

from workbench.kernels.attention_stats import attention_stats_triton  # noqa: E402
from workbench.kernels.reference import (  # noqa: E402
    BIG, example_edits, max_errors, reference_attention, standard_visibility,
)

DEV = torch.device("cuda")
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def _naive(q, k, v, scale, rep):
    k = k.repeat_interleave(rep, dim=1)
    v = v.repeat_interleave(rep, dim=1)
    s = (q.float() @ k.float().transpose(-1, -2)) * scale
    n = s.shape[-1]
    causal = torch.ones(n, n, dtype=torch.bool, device=q.device).triu_(1)
    s.masked_fill_(causal, float("-inf"))
    p = s.softmax(-1)
    return (p @ v.float()).to(q.dtype)


def bench_cuda(args) -> None:
    dev = torch.device("cuda")
    dtype = DTYPES[args.dtype]
    B, Hq, Hkv, D = args.batch, args.heads, args.kv_heads, args.head_dim
    rep = Hq // Hkv
    scale = D**-0.5
    print(f"device: {torch.cuda.get_device_name()}  B={B} Hq={Hq} Hkv={Hkv} D={D} dtype={args.dtype} causal prefill"
          f"  topk={args.topk} key_mass={args.key_mass} edits={args.edits}")
    header = f"{'N':>6} | {'sdpa ms':>9} | {'kernel ms':>9} {'x sdpa':>7} | {'naive ms':>9} {'x sdpa':>7} | " \
             f"{'sdpa MiB':>9} {'kernel MiB':>10} {'naive MiB':>10}"
    print(header)
    print("-" * len(header))
    notes = []
    for N in args.lengths:
        row = {"N": N}
        try:
            q = torch.randn(B, Hq, N, D, device=dev, dtype=dtype)
            k = torch.randn(B, Hkv, N, D, device=dev, dtype=dtype)
            v = torch.randn(B, Hkv, N, D, device=dev, dtype=dtype)
        except torch.cuda.OutOfMemoryError:
            notes.append(f"N={N}: inputs do not fit, skipped")
            continue
        sinks = torch.zeros(Hq, device=dev)
        cols = torch.tensor([0, 1, N // 2, N - 1], device=dev)
        spans = torch.tensor([[0, 1, BIG], [N // 3, N // 3 + 16, BIG], [0, N, 128]], device=dev)

        def run_sdpa():
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                                                    enable_gqa=rep > 1)

        edits = example_edits(Hq, 0, N, recent=256) if args.edits else ()

        def run_kernel():
            return attention_stats_triton(q, k, v, scale=scale, q_offset=0, causal=True, sinks=sinks,
                                          key_columns=cols, spans=spans, topk=args.topk, key_mass=args.key_mass,
                                          edits=edits)

        for name, fn in (("sdpa", run_sdpa), ("kernel", run_kernel)):
            try:
                row[name] = timed(fn, DEV, args.warmup, args.reps)
            except torch.cuda.OutOfMemoryError:
                notes.append(f"N={N}: {name} out of memory, skipped")
            torch.cuda.empty_cache()
        if not args.no_naive:
            need = B * Hq * N * N * 4 * 2  # fp32 scores + probabilities
            free, _ = torch.cuda.mem_get_info()
            if need > 0.9 * free:
                notes.append(f"N={N}: naive needs ~{need / 2**30:.0f} GiB for the N×N matrix "
                             f"({free / 2**30:.0f} GiB free), skipped")
            else:
                try:
                    row["naive"] = timed(lambda: _naive(q, k, v, scale, rep), DEV, 1, max(1, args.reps // 4))
                except torch.cuda.OutOfMemoryError:
                    notes.append(f"N={N}: naive out of memory, skipped")
        q = k = v = None  # free the inputs before the next length (the closures above are done with them)
        torch.cuda.empty_cache()

        def cell(name):
            if name not in row:
                return f"{'-':>9}", f"{'-':>7}"
            ratio = row[name][0] / row["sdpa"][0] if "sdpa" in row else float("nan")
            return f"{row[name][0]:9.3f}", f"{ratio:7.2f}"

        def mem(name, width):
            return f"{row[name][1]:{width}.1f}" if name in row else f"{'-':>{width}}"

        sd = f"{row['sdpa'][0]:9.3f}" if "sdpa" in row else f"{'-':>9}"
        kt, kr = cell("kernel")
        nt, nr = cell("naive")
        print(f"{N:>6} | {sd} | {kt} {kr} | {nt} {nr} | {mem('sdpa', 9)} {mem('kernel', 10)} {mem('naive', 10)}")
    for note in notes:
        print("note:", note)


def smoke_cpu() -> None:
    print("CUDA is not available: a GPU is needed for timings. Running a tiny Triton-interpreter smoke check.")
    torch.manual_seed(0)
    B, Hq, Hkv, N, D = 1, 4, 2, 48, 16
    q, k, v = torch.randn(B, Hq, N, D), torch.randn(B, Hkv, N, D), torch.randn(B, Hkv, N, D)
    kw = dict(scale=D**-0.5, sinks=torch.randn(Hq), key_columns=torch.tensor([0, 1, 30]),
              spans=torch.tensor([[0, 1, BIG], [10, 14, BIG], [0, N, 8]]), topk=3, key_mass=True,
              tiles=((4, 12, 0, 8),), edits=example_edits(Hq, 0, N))
    t0 = time.perf_counter()
    res = attention_stats_triton(q, k, v, q_offset=0, causal=True, **kw)
    dt = time.perf_counter() - t0
    q_pos = torch.arange(N)
    ref = reference_attention(q, k, v, visible=standard_visibility(q_pos, N), q_pos=q_pos, **kw)
    err = max_errors(res, ref)
    for name, e in err.items():
        print(f"  {name:>16}: {e:.2e}")
    ok = all(e == 0 for n, e in err.items() if n in ("topk_idx", "key_count")) and all(
        e < 1e-4 for n, e in err.items() if n not in ("topk_idx", "key_count", "topk_idx_checked"))
    print(f"  interpreter wall time {dt:.2f} s")
    print("smoke check", "OK" if ok else "FAILED")
    if not ok:
        sys.exit(1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--dtype", choices=list(DTYPES), default="bfloat16")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--no-naive", action="store_true", help="skip the materialised baseline")
    ap.add_argument("--topk", type=int, default=1, help="top-k list length (≤ 8)")
    ap.add_argument("--key-mass", action="store_true", help="also the key-mass pass (α for every key)")
    ap.add_argument("--edits", action="store_true", help="every probability edit on heads 0-3")
    args = ap.parse_args()
    if torch.cuda.is_available():
        bench_cuda(args)
    else:
        smoke_cpu()


if __name__ == "__main__":
    main()

"""GPU suite: the Triton attention-statistics kernel compiled on a real GPU, in one command (< 8 minutes).

(a) Correctness: the compiled kernel in fp32 / fp16 / bf16 against the float64 reference
    (``kernels/reference.py``) on random-init tensors of real model shapes — SmolLM2-135M (9 q / 3 kv
    heads, dim 64), Llama-3-8B (32/8/128), Gemma-3 sliding layers (window 512, dim 256), OLMoE (16/16/128),
    GPT-OSS-20B (64/8/64, learned sinks) — for every statistic (output, lse, entropy, top-5, key columns,
    spans, key mass/count, tiles, distance moments, row-key probabilities) under every edit (uniform,
    calibrate, mask_keys, streaming), on a left-padded prefill batch and on a decode row over a long cache
    (keys split over programs).
(b) Speed: capture vs SDPA (and FlashAttention when importable) for one attention layer at 4K, 16K, 64K
    and 128K tokens (batch 1, bf16, causal prefill, plus a one-row decode step over the same cache),
    timed with CUDA events after warm-up; a Markdown table of times, ratios and peak extra memory, one
    row per (shape, length). "capture" computes what ``AttentionStats()`` asks for (output, entropy,
    lse, top-1, 4 sink columns); "all stats" adds top-8, 3 spans, key mass, distance moments and one row
    key per row. Random weights: speed does not depend on them.

    python benchmarks/gpu_suite.py              # on a CUDA machine
    python benchmarks/gpu_suite.py --dry-run    # the same code paths, tiny shapes, Triton interpreter on CPU

Needs only torch, triton (and optionally flash_attn): ``kernels/`` is loaded straight from this checkout,
so the suite runs on a bare GPU image without installing the workbench. Exit status 1 if any check fails
or any step raises.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.machinery
import importlib.util
import os
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Shape:
    name: str
    heads: int
    kv_heads: int
    head_dim: int
    window: int | None = None
    sinks: bool = False


SHAPES = (
    Shape("SmolLM2-135M", 9, 3, 64),
    Shape("Llama-3-8B", 32, 8, 128),
    Shape("Gemma-3 sliding", 4, 1, 256, window=512),
    Shape("OLMoE-1B-7B", 16, 16, 128),
    Shape("GPT-OSS-20B", 64, 8, 64, sinks=True),
)
LENGTHS = (4096, 16384, 65536, 131072)
DRY_LENGTHS = (16, 20, 24, 32)
# absolute tolerances: statistics are fp32 whatever the input; `out` has the input dtype's accuracy
TOL = {"float32": dict(stats=1e-4, out=1e-4), "float16": dict(stats=1e-4, out=1e-2),
       "bfloat16": dict(stats=2e-4, out=6e-2)}  # fmt: skip
TIE_GAP = 1e-4  # top-k indices are compared where the reference probabilities are this far apart


def dry_shape(s: Shape, max_rep: int = 4) -> Shape:
    """A tiny stand-in of ``s`` for the interpreter: few heads (GQA kept), same head dim, small window."""
    rep = s.heads // s.kv_heads
    kv = 1 if rep > 1 else 2
    return replace(s, heads=kv * min(rep, max_rep), kv_heads=kv, window=None if s.window is None else 8)


def load_kernels():
    """``workbench.kernels`` when the workbench is installed; else ``kernels/`` of this checkout as a package."""
    try:
        return importlib.import_module("workbench.kernels")
    except Exception:  # a bare GPU image: no workbench dependencies, no install
        # kernels/ is a plain folder (no __init__.py, so it never shadows Hugging Face's ``kernels``):
        # give it a package name of its own so its relative imports resolve
        name = "workbench_kernels"
        spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
        spec.submodule_search_locations = [str(ROOT / "kernels")]
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        return mod


# ---------------------------------------------------------------------------------------------------
# (a) correctness
# ---------------------------------------------------------------------------------------------------
def _inputs(B, Hq, Hkv, M, N, D, dtype, dev, seed):
    """HF layout ([B, L, H, D] transposed to [B, H, L, D] views), generated on the CPU (same on any device)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, M, Hq, D, generator=g).mul(1.5)
    k = torch.randn(B, N, Hkv, D, generator=g).mul(1.5)
    v = torch.randn(B, N, Hkv, D, generator=g)
    return [t.to(dtype).to(dev).transpose(1, 2) for t in (q, k, v)]


def row_keys_for(B: int, M: int, N: int, q_offset: int, seed: int):
    """``[B, M]`` row keys of every kind: -1 (none), the previous / own position, random keys anywhere in the
    cache (visible or not) and past its end."""
    import torch

    rk = torch.randint(0, N + 8, (B, M), generator=torch.Generator().manual_seed(seed))
    q_pos = q_offset + torch.arange(M)
    rk[:, 1::4] = q_pos[1::4] - 1
    rk[:, 2::4] = q_pos[2::4]
    rk[:, ::4] = -1
    return rk


def check_case(ks, shape: Shape, dtype_name: str, case: str, dev, dry: bool) -> dict:
    """One kernel call with every statistic and edit vs the reference: {statistic: max error}."""
    import torch

    ats, ref_mod = ks.attention_stats, ks.reference
    dtype = getattr(torch, dtype_name)
    Hq, Hkv, D = shape.heads, shape.kv_heads, shape.head_dim
    if case == "prefill":  # a left-padded batch of 2
        B, N = 2, (24 if dry else 1024)
        M = N
    else:  # one decode row over a long cache: keys split over programs
        B, N, M = 1, (64 if dry else 4096), 1
    q, k, v = _inputs(B, Hq, Hkv, M, N, D, dtype, dev, seed=sum(map(ord, shape.name + case)))
    q_offset = N - M
    key_valid = None
    if B == 2:
        key_valid = torch.ones(B, N, dtype=torch.bool, device=dev)
        key_valid[1, :7] = False
    sinks = torch.randn(Hq, generator=torch.Generator().manual_seed(1)).to(dev) if shape.sinks else None
    cols = torch.tensor([0, 1, N // 2, N - 1], device=dev)
    spans = torch.tensor([[0, 1, ref_mod.BIG], [N // 3, N // 3 + 16, ref_mod.BIG], [0, ref_mod.BIG, 64]], device=dev)
    tiles = ((q_offset, q_offset + 16, 0, 32), (q_offset + M - 8, q_offset + M, N - 40, N))
    edits = ref_mod.example_edits(Hq, q_offset, M, sink=4, recent=64 if not dry else 5)
    row_keys = row_keys_for(B, M, N, q_offset, seed=2).to(dev)
    kw = dict(scale=D**-0.5, sinks=sinks, key_columns=cols, spans=spans, topk=5, tiles=tiles, key_mass=True,
              edits=edits, distance_moments=True, row_keys=row_keys)  # fmt: skip
    res = ats.attention_stats_triton(q, k, v, q_offset=q_offset, window=shape.window, key_valid=key_valid, **kw)
    q_pos = torch.arange(q_offset, q_offset + M, device=dev)
    vis = ref_mod.standard_visibility(q_pos, N, window=shape.window, key_valid=key_valid)
    ref = ref_mod.reference_attention(q, k, v, visible=vis, q_pos=q_pos, **kw)
    err = ref_mod.max_errors(res, ref, tie_gap=TIE_GAP)
    del ref, res
    return err


def judge(err: dict, dtype_name: str) -> list[str]:
    """The statistics outside tolerance (empty: pass)."""
    tol, bad = TOL[dtype_name], []
    for name, e in err.items():
        if name in ("topk_idx", "key_count"):
            ok = e == 0
        elif name == "topk_idx_checked":
            ok = e > 0.5
        else:
            # entropy sums n terms, key mass up to 1024 rows of fp32 probabilities: wider absolute bands;
            # distance moments: relative to their scale (max_errors), summed over n terms like entropy
            wide = {"entropy": 10, "key_mass": 30, "dist_sum": 10, "dist_sq_sum": 10}
            ok = e <= (tol["out"] if name == "out" else tol["stats"] * wide.get(name, 1))
        if not ok:
            bad.append(name)
    return bad


def correctness(ks, shapes, dtypes, dev, dry: bool, log) -> tuple[int, int]:
    cols = ["out", "lse", "entropy", "topk_prob", "topk_idx", "col_prob", "span_mass", "key_mass", "key_count", "tile0",
            "tile1", "dist_sum", "dist_sq_sum", "row_key_prob"]
    log("\n## (a) compiled kernel vs float64 reference (max abs error; top-k idx / key count: mismatches; "
        "distance moments: relative to their scale)\n")
    log("| shape | dtype | case | " + " | ".join(cols) + " | result |")
    log("|---|---|---|" + "---:|" * len(cols) + "---|")
    passed = total = 0
    for shape in shapes:
        for dt in dtypes:
            for case in ("prefill", "decode"):
                if dry and dt != "float32" and case == "decode":  # interpreter time: one fp16 case is enough
                    continue
                total += 1
                t0 = time.perf_counter()
                try:
                    err = check_case(ks, shape, dt, case, dev, dry)
                    bad = judge(err, dt)
                    cells = [f"{err[c]:.0f}" if c in ("topk_idx", "key_count") else f"{err[c]:.1e}" for c in cols]
                    verdict = "ok" if not bad else "FAIL: " + ", ".join(bad)
                    passed += not bad
                except Exception as e:  # report and go on: one GPU run should tell everything
                    cells = ["—"] * len(cols)
                    verdict = f"ERROR: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
                    log(f"<!-- {traceback.format_exc()} -->")
                log(f"| {shape.name} | {dt} | {case} | " + " | ".join(cells) + f" | {verdict} ({time.perf_counter() - t0:.1f} s) |")
    log(f"\ncorrectness: {passed}/{total} passed")
    return passed, total


# ---------------------------------------------------------------------------------------------------
# (b) speed
# ---------------------------------------------------------------------------------------------------
def timed(fn, dev, warmup: int, reps: int):
    """(median ms, peak extra MiB or None): CUDA events after warm-up on GPU, wall clock on CPU."""
    import torch

    for _ in range(warmup):
        fn()
    if dev.type != "cuda":
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times), None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), (torch.cuda.max_memory_allocated() - base) / 2**20


def _flash():
    for mod, fn in (("flash_attn_interface", "flash_attn_func"), ("flash_attn", "flash_attn_func")):
        try:
            return getattr(importlib.import_module(mod), fn)
        except Exception:
            continue
    return None


def bench_row(ks, shape: Shape, N: int, dev, dtype, warmup: int, reps: int) -> dict:
    import torch
    import torch.nn.functional as F

    ats = ks.attention_stats
    Hq, Hkv, D = shape.heads, shape.kv_heads, shape.head_dim
    g = torch.Generator(device=dev.type).manual_seed(0) if dev.type == "cuda" else torch.Generator().manual_seed(0)
    q = torch.randn(1, Hq, N, D, device=dev, dtype=dtype, generator=g)
    k = torch.randn(1, Hkv, N, D, device=dev, dtype=dtype, generator=g)
    v = torch.randn(1, Hkv, N, D, device=dev, dtype=dtype, generator=g)
    scale = D**-0.5
    sinks = torch.zeros(Hq, device=dev) if shape.sinks else None
    cols = torch.arange(4, device=dev)  # AttentionStats(): sink_keys=4, top-1, entropy, lse
    spans = torch.tensor([[0, 1, 2**30], [N // 3, N // 3 + 16, 2**30], [0, 2**30, 128]], device=dev)
    # SDPA gets KV heads repeated to the query heads, as transformers' sdpa path does (its flash kernel
    # is then certain to apply; enable_gqa is not supported by every SDPA backend)
    ks_, vs_ = (t.repeat_interleave(Hq // Hkv, dim=1) for t in (k, v))
    qd = q[:, :, -1:]  # one decode row over the whole cache
    row_keys = row_keys_for(1, N, N, 0, seed=3).to(dev)
    common = dict(scale=scale, window=shape.window, sinks=sinks)
    fns = {
        # SDPA has no sliding-window or sink argument: full causal attention is its speed bar
        "sdpa": lambda: F.scaled_dot_product_attention(q, ks_, vs_, is_causal=True, scale=scale),
        "capture": lambda: ats.attention_stats_triton(q, k, v, q_offset=0, key_columns=cols, **common),
        "all": lambda: ats.attention_stats_triton(q, k, v, q_offset=0, key_columns=cols, spans=spans, topk=8,
                                                  key_mass=True, distance_moments=True, row_keys=row_keys, **common),
        "dec_sdpa": lambda: F.scaled_dot_product_attention(qd, ks_, vs_, scale=scale),
        "dec_capture": lambda: ats.attention_stats_triton(qd, k, v, q_offset=N - 1, key_columns=cols, **common),
    }
    fa = _flash() if dev.type == "cuda" else None
    if fa is not None:
        qt, kt, vt = (t.transpose(1, 2).contiguous() for t in (q, k, v))
        win = (shape.window - 1, 0) if shape.window else (-1, -1)
        fns["fa"] = lambda: fa(qt, kt, vt, causal=True, softmax_scale=scale, window_size=win)
    row = {"shape": shape.name, "N": N}
    for name, fn in fns.items():
        try:
            row[name] = timed(fn, dev, warmup, reps)
        except Exception as e:
            oom = "out of memory" in str(e).lower()
            row[name] = "OOM" if oom else "ERR"
            if not oom:
                row.setdefault("errors", []).append(f"{shape.name} N={N} {name}: {type(e).__name__}: {e}")
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return row


def _ms(cell) -> str:
    return cell if isinstance(cell, str) else ("—" if cell is None else f"{cell[0]:.2f}")


def _ratio(a, b) -> str:
    return f"{a[0] / b[0]:.2f}" if isinstance(a, tuple) and isinstance(b, tuple) and b[0] > 0 else "—"


def _mib(cell) -> str:
    return f"{cell[1]:.0f}" if isinstance(cell, tuple) and cell[1] is not None else "—"


def speed(ks, shapes, lengths, dev, dtype, warmup, reps, deadline, log) -> int:
    log("\n## (b) one attention layer: capture vs SDPA (ms, median; peak extra MiB)\n")
    log("| shape | N | SDPA | FlashAttn | capture | ×SDPA | all stats | ×SDPA | decode SDPA | decode capture | ×SDPA | peak MiB SDPA / capture / all |")
    log("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    errors = []
    for shape in shapes:
        for N in lengths:
            if time.perf_counter() > deadline:
                log(f"| {shape.name} | {N} | skipped: time budget | | | | | | | | | |")
                continue
            row = bench_row(ks, shape, N, dev, dtype, warmup, reps if N <= 65536 else max(1, reps - 1))
            errors += row.get("errors", [])
            s = row["sdpa"]
            log(f"| {shape.name} | {N} | {_ms(s)} | {_ms(row.get('fa'))} | {_ms(row['capture'])} | {_ratio(row['capture'], s)} | "
                f"{_ms(row['all'])} | {_ratio(row['all'], s)} | {_ms(row['dec_sdpa'])} | {_ms(row['dec_capture'])} | "
                f"{_ratio(row['dec_capture'], row['dec_sdpa'])} | {_mib(s)} / {_mib(row['capture'])} / {_mib(row['all'])} |")  # fmt: skip
    log("\nNotes: SDPA runs full causal attention for the sliding-window shape (it has no window argument) and "
        "no sink slot for GPT-OSS; FlashAttention (when importable) gets the window. \"capture\" = output + "
        "entropy + lse + top-1 + 4 key columns; \"all stats\" = + top-8, 3 spans, key mass (an extra pass), "
        "distance moments and one row key per row (a gather pass). "
        "Decode: one query row over all N keys (the kernel splits keys over programs).")
    for e in errors:
        log(f"error: {e}")
    return len(errors)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes under the Triton interpreter on CPU")
    ap.add_argument("--budget-s", type=float, default=440.0, help="start no speed row after this many seconds")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--skip-correctness", action="store_true")
    ap.add_argument("--skip-speed", action="store_true")
    args = ap.parse_args(argv)
    start = time.perf_counter()
    if args.dry_run:  # before anything imports triton
        os.environ["TRITON_INTERPRET"] = "1"
    import torch

    ks = load_kernels()
    importlib.import_module(ks.__name__ + ".attention_stats")
    importlib.import_module(ks.__name__ + ".reference")
    log = lambda s="": print(s, flush=True)  # noqa: E731
    if args.dry_run:
        dev, shapes, lengths = torch.device("cpu"), [dry_shape(s) for s in SHAPES], DRY_LENGTHS
        bench_shapes = [dry_shape(s, max_rep=2) for s in SHAPES]  # timings mean nothing here: fewer heads
        dtypes, bench_dtype = ["float32", "float16"], torch.float32  # bf16 is wrong under the interpreter
        # so that decode rows over a few dozen keys split over programs, as long caches do on a GPU
        ks.attention_stats.INTERPRETER_SMS, ks.attention_stats._MIN_BLOCKS_PER_SPLIT = 64, 1
        args.warmup, args.reps = 0, 1
    else:
        if not torch.cuda.is_available():
            log("no CUDA device: run with --dry-run for the CPU (interpreter) version")
            return 2
        dev, shapes, lengths = torch.device("cuda"), list(SHAPES), LENGTHS
        bench_shapes = shapes
        dtypes, bench_dtype = ["float32", "float16", "bfloat16"], torch.bfloat16
    import triton

    where = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU, Triton interpreter (dry run)"
    log(f"# GPU suite — {where}; torch {torch.__version__}, triton {triton.__version__}")
    failed = 0
    if not args.skip_correctness:
        passed, total = correctness(ks, shapes, dtypes, dev, args.dry_run, log)
        failed += total - passed
    if not args.skip_speed:
        failed += speed(ks, bench_shapes, lengths, dev, bench_dtype, args.warmup, args.reps, start + args.budget_s, log)
    log(f"\ntotal wall time {time.perf_counter() - start:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

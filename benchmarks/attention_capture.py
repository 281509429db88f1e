"""Per-row attention statistics on the embedded SmolLM2 (CPU): workbench against plain SDPA and the peers.

Every configuration runs in its own subprocess (its peak RSS is its own), loads its model, runs one
untimed warm-up forward at the same length, then times ``--repeats`` forwards (the minimum counts);
``--rounds`` repeats the whole sequence of modes (A/B/A/B) and keeps each mode's minimum. All modes
but ``sdpa`` derive the same statistics for every (layer, query head, query row): Gu's α_k of the
first ``--sink-keys`` keys (the mean probability a key receives from the rows that see it), the top-1
key and its probability, and the entropy.

    python benchmarks/attention_capture.py --lengths 1024,2048,4096,8192

modes (``--modes``, default all but ``eager``):
- ``sdpa``: transformers' SDPA attention, no statistics (the baseline, ratio 1.00);
- ``workbench``: ``wb.capture(AttentionStats(sink_keys=4, topk=1))``, statistics reduced inside the
  attention computation (the chunked flash path on CPU), never an N×N matrix;
- ``general``: the same capture forced onto the chunked general path (whole key rows per block,
  probabilities materialised: the CPU path before the flash path existed, still used for probability
  edits, spans, tiles, key mass and top-k > 1);
- ``tlens``: TransformerLens 4.x ``TransformerBridge.run_with_cache(names_filter=…hook_pattern)``,
  statistics from the cached ``[1, H, N, N]`` patterns of every layer;
- ``nnsight``: nnsight ``LanguageModel`` (eager attention) tracing the forward and saving each
  layer's ``self_attn.output[1]`` (the ``[1, H, N, N]`` weights), statistics from them;
- ``eager``: transformers' eager attention with ``output_attentions=True``, statistics from them.

A peer is skipped with a message when its package is not installed, and where all layers' N×N
patterns (layers × heads × N² × 4 bytes) would exceed ``--budget-gb`` (default: half the RAM).
Input: random token ids (seed 0): speed does not depend on the text. After the table, each mode's
statistics are checked against workbench's (per-head α, mean entropy and top-1 agreement).
"""
from __future__ import annotations

import argparse
import datetime
import importlib.metadata as md
import json
import os
import platform
import resource
import subprocess
import sys
import time

MODES = ("sdpa", "workbench", "general", "tlens", "nnsight", "eager")
PEER_PACKAGES = {"tlens": "transformer_lens", "nnsight": "nnsight"}
TITLES = {
    "sdpa": "SDPA",
    "workbench": "workbench",
    "general": "workbench general path",
    "tlens": "TransformerLens {v} bridge run_with_cache",
    "nnsight": "nnsight {v} trace (eager)",
    "eager": "HF eager output_attentions",
}


def _version(pkg: str) -> str:
    try:
        return md.version(pkg.replace("_", "-"))
    except md.PackageNotFoundError:
        return "not installed"


def pattern_stats(patterns, sink_keys: int):
    """α of the first keys, top-1 and entropy per (layer, head[, row]) from full ``[1, H, N, N]`` patterns."""
    import torch

    out = {"alpha": [], "top1": [], "top1_prob": [], "entropy": []}
    for p in patterns:
        p = p[0].float()  # [H, N, N]
        n = p.shape[-1]
        k = min(sink_keys, n)
        seen = (n - torch.arange(k, dtype=p.dtype))  # causal: key j is seen by the N − j rows from j on
        out["alpha"].append(p[..., :k].sum(1) / seen)
        top_p, top_i = p.max(-1)
        out["top1"].append(top_i)
        out["top1_prob"].append(top_p)
        out["entropy"].append(-torch.special.xlogy(p, p).sum(-1))
    return {key: torch.stack(v) for key, v in out.items()}  # [L, H, K] / [L, H, N]


def summary(st) -> dict:
    """Small per-(layer, head) digests of the statistics: what the parent compares across modes."""
    return {
        "alpha": st["alpha"].double().tolist(),
        "entropy_mean": st["entropy"].double().mean(-1).tolist(),
        "top1_prob_mean": st["top1_prob"].double().mean(-1).tolist(),
        "top1_sum": st["top1"].long().sum(-1).tolist(),
    }


def run_one(mode: str, n: int, repeats: int, sink_keys: int) -> dict:
    import torch

    import workbench as wb
    from workbench.models.embedded import converted_dir

    torch.set_num_threads(os.cpu_count() or 1)

    def inputs(vocab):
        return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(0))

    if mode in ("sdpa", "workbench", "general", "eager"):
        if mode == "general":
            from workbench.attention import chunked

            chunked.flash_covers = lambda request: False  # every request takes general_attention
        m = wb.load()
        ids = inputs(m.spec.vocab_size)
        n_layers = m.spec.n_layers

        def forward():
            with torch.no_grad():
                if mode == "sdpa":
                    m.hf.set_attn_implementation("sdpa")
                    m.hf(ids)
                    return None
                if mode == "eager":
                    m.hf.set_attn_implementation("eager")
                    out = m.hf(ids, output_attentions=True)
                    return pattern_stats(out.attentions, sink_keys)
                with wb.capture(m, wb.AttentionStats(sink_keys=sink_keys, topk=1)) as cap:
                    m.hf(ids)
                return {k: cap.stack(f"attn.{k}")[:, 0] for k in ("alpha", "top1", "top1_prob", "entropy")}

    elif mode == "tlens":
        from transformer_lens.model_bridge import TransformerBridge
        from transformers import AutoModelForCausalLM, AutoTokenizer

        d = converted_dir()
        hf = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
        hf.config.architectures = [type(hf).__name__]
        bridge = TransformerBridge.boot_transformers(str(d), hf_model=hf, tokenizer=AutoTokenizer.from_pretrained(d))
        ids = inputs(hf.config.vocab_size)
        n_layers = hf.config.num_hidden_layers

        def forward():
            with torch.no_grad():
                _, cache = bridge.run_with_cache(ids, names_filter=lambda name: name.endswith("hook_pattern"))
            return pattern_stats([cache[f"blocks.{i}.attn.hook_pattern"] for i in range(n_layers)], sink_keys)

    elif mode == "nnsight":
        from nnsight import LanguageModel

        lm = LanguageModel(str(converted_dir()), attn_implementation="eager", dispatch=True, dtype=torch.float32)
        ids = inputs(lm.config.vocab_size)
        n_layers = lm.config.num_hidden_layers

        def forward():
            saved = []  # filled inside the traced block (nnsight runs the block's code, not a closure of it)
            with torch.no_grad(), lm.trace(ids):
                for i in range(n_layers):
                    saved.append(lm.model.layers[i].self_attn.output[1].save())
            return pattern_stats(saved, sink_keys)

    else:
        raise SystemExit(f"unknown mode {mode!r}")
    st = forward()  # warm-up: first-call costs (allocator, compiled step, thread pool) stay out of the timing
    times, cpu = [], []
    for _ in range(repeats):
        del st
        t, c = time.perf_counter(), time.process_time()
        st = forward()
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    res = {"mode": mode, "n": n, "seconds": min(times), "cpu_seconds": min(cpu), "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    if st is not None:
        res["summary"] = summary(st)
    return res


def _compare(rows: list[dict], modes: list[str]) -> list[str]:
    import torch

    lines = []
    for n in sorted({r["n"] for r in rows}):
        ref = next((r for r in rows if r["n"] == n and r["mode"] == "workbench" and "summary" in r), None)
        if ref is None:
            continue
        for mode in modes:
            r = next((r for r in rows if r["n"] == n and r["mode"] == mode and "summary" in r), None)
            if mode == "workbench" or r is None:
                continue
            a, b = ({k: torch.tensor(v) for k, v in x["summary"].items()} for x in (r, ref))
            same_top = (a["top1_sum"] == b["top1_sum"]).float().mean().item()
            lines.append(
                f"N={n} {mode} vs workbench: max|Δα| {(a['alpha'] - b['alpha']).abs().max():.1e}, "
                f"max|Δ mean entropy| {(a['entropy_mean'] - b['entropy_mean']).abs().max():.1e}, "
                f"max|Δ mean top-1 prob| {(a['top1_prob_mean'] - b['top1_prob_mean']).abs().max():.1e}, "
                f"heads with identical top-1 index sums {same_top:.1%}"
            )
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="1024,2048,4096,8192")
    ap.add_argument("--modes", default="sdpa,workbench,tlens,nnsight", help=f"comma-separated, from {','.join(MODES)}")
    ap.add_argument("--repeats", type=int, default=1, help="timed forwards per process, after one warm-up (min counts)")
    ap.add_argument("--rounds", type=int, default=1, help="run the sequence of modes this many times (min counts)")
    ap.add_argument("--sink-keys", type=int, default=4)
    ap.add_argument("--budget-gb", type=float, default=None, help="largest N×N pattern memory a peer may need (default: half the RAM)")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        mode, n = args.one.split(":")
        print(json.dumps(run_one(mode, int(n), args.repeats, args.sink_keys)))
        return
    modes = [m for m in args.modes.split(",") if m]
    for m in modes:
        if m not in MODES:
            raise SystemExit(f"unknown mode {m!r}; modes: {', '.join(MODES)}")
    import workbench as wb

    spec = wb.load().spec  # also builds the cached safetensors copy so no subprocess pays the conversion
    budget = args.budget_gb or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30 / 2
    versions = {p: _version(p) for p in ("torch", "transformers", "transformer_lens", "nnsight")}
    print(f"# {datetime.date.today()} · {platform.processor() or platform.machine()} · {os.cpu_count()} CPU threads · "
          f"torch {versions['torch']}, transformers {versions['transformers']}, transformer_lens {versions['transformer_lens']}, "
          f"nnsight {versions['nnsight']} · budget {budget:.0f} GB", flush=True)  # fmt: skip
    lengths = [int(x) for x in args.lengths.split(",")]
    results: dict = {}
    for rnd in range(args.rounds):
        for n in lengths:
            patterns_gb = spec.n_layers * spec.n_heads * n * n * 4 / 2**30
            for mode in modes:
                key = (mode, n)
                pkg = PEER_PACKAGES.get(mode)
                if pkg is not None and versions[pkg] == "not installed":
                    r = {"mode": mode, "n": n, "skipped": f"{pkg} is not installed"}
                elif mode in ("tlens", "nnsight", "eager") and patterns_gb > budget:
                    r = {"mode": mode, "n": n, "skipped": f"N×N patterns alone need {patterns_gb:.0f} GB (budget {budget:.0f} GB)"}
                else:
                    cmd = [sys.executable, __file__, "--one", f"{mode}:{n}", "--repeats", str(args.repeats), "--sink-keys", str(args.sink_keys)]
                    proc = subprocess.run(cmd, capture_output=True, text=True)
                    if proc.returncode != 0:
                        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
                        r = {"mode": mode, "n": n, "skipped": f"failed: {tail}"}
                    else:
                        r = json.loads(proc.stdout.strip().splitlines()[-1])
                old = results.get(key)
                if old is None or "seconds" not in old or ("seconds" in r and r["seconds"] < old["seconds"]):
                    results[key] = dict(r)
                if old is not None and "seconds" in old and "seconds" in r:  # the peak over rounds, the fastest times
                    results[key]["peak_rss_gb"] = max(r["peak_rss_gb"], old["peak_rss_gb"])
                    results[key]["cpu_seconds"] = min(r["cpu_seconds"], old["cpu_seconds"])
                tag = f"round {rnd + 1} " if args.rounds > 1 else ""
                print(f"{tag}N={n:>5} {mode:<9}" + (f"{r['seconds']:8.2f} s (CPU {r['cpu_seconds']:.2f} s)  peak RSS {r['peak_rss_gb']:.2f} GB" if "seconds" in r else f" skipped: {r['skipped']}"), flush=True)
    rows = list(results.values())
    titles = [TITLES[m].format(v=versions.get(PEER_PACKAGES.get(m, ""), "")) + " s" for m in modes]
    print("\n| N | " + " | ".join(titles) + " | peak RSS (GB): " + " / ".join(modes) + " |")
    print("|---:|" + "---:|" * len(modes) + ":---|")
    for n in lengths:
        base = results.get(("sdpa", n), {})
        cells, rss = [], []
        for mode in modes:
            r = results.get((mode, n), {})
            if "seconds" not in r:
                cells.append("skipped" if "skipped" in r else "—")
            elif mode == "sdpa" or "seconds" not in base:
                cells.append(f"{r['seconds']:.2f}")
            else:
                cells.append(f"{r['seconds']:.2f} ({r['seconds'] / base['seconds']:.2f}×)")
            rss.append(f"{r['peak_rss_gb']:.2f}" if "peak_rss_gb" in r else "—")
        print(f"| {n} | " + " | ".join(cells) + " | " + " / ".join(rss) + " |")
    print("\nCPU seconds of the timed forward (all threads; robust to other processes' time slices, not to spinning):")
    print("| N | " + " | ".join(f"{m} CPU s" for m in modes) + " |")
    print("|---:|" + "---:|" * len(modes))
    for n in lengths:
        base = results.get(("sdpa", n), {})
        cells = []
        for mode in modes:
            r = results.get((mode, n), {})
            if "cpu_seconds" not in r:
                cells.append("—")
            elif mode == "sdpa" or "cpu_seconds" not in base:
                cells.append(f"{r['cpu_seconds']:.2f}")
            else:
                cells.append(f"{r['cpu_seconds']:.2f} ({r['cpu_seconds'] / base['cpu_seconds']:.2f}×)")
        print(f"| {n} | " + " | ".join(cells) + " |")
    skipped = sorted({f"{r['mode']} at N={r['n']}: {r['skipped']}" for r in rows if "skipped" in r})
    if skipped:
        print("\nSkipped: " + "; ".join(skipped))
    checks = _compare(rows, modes)
    if checks:
        print("\n" + "\n".join(checks))


if __name__ == "__main__":
    main()

"""Seconds per NIAH test: our retrieval scan vs the peers' way, on the embedded SmolLM2 (CPU).

    python benchmarks/retrieval_scan.py --lengths 1000,2000

(a) ``ours``: ``workbench.retrieval.run_case`` — the prompt runs on SDPA, each decode step's top-1
    attention comes out of the reducing backend (no attention matrix anywhere);
(b) ``peers``: what Wu et al.'s released code and TransformerLens/nnsight users do — eager attention,
    prompt pass then a manual greedy loop with ``output_attentions=True`` on every decode step, top-1
    taken from the returned matrices.
Both produce identical greedy text (checked) and are timed per test (same needle, depth 50%) in
separate processes so peak RSS is their own. Ratio = peers / ours.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def run_one(mode: str, length: int, new_tokens: int) -> dict:
    import torch

    import workbench as wb
    from workbench import niah, retrieval

    m = wb.load()
    case = niah.build_case(m, niah.needles()[0], length, 50.0, max_new_tokens=new_tokens)
    t = time.perf_counter()
    if mode == "ours":
        out = retrieval.run_case(m, case, max_new_tokens=new_tokens)
        text = out["response"]
    else:
        m.hf.set_attn_implementation("eager")
        ids = case.input_ids
        with torch.no_grad():
            o = m.hf(input_ids=ids, use_cache=True)
            past, tok, gen, tops = o.past_key_values, o.logits[0, -1].argmax(), [], []
            for _ in range(new_tokens - 1):
                gen.append(int(tok))
                o = m.hf(input_ids=tok.view(1, 1), past_key_values=past, use_cache=True, output_attentions=True)
                past = o.past_key_values
                tops.append(torch.stack([a[0, :, -1].argmax(-1) for a in o.attentions]))
                tok = o.logits[0, -1].argmax()
            gen.append(int(tok))
        text = m.tokenizer.decode(gen, skip_special_tokens=True).strip()
    return {"mode": mode, "length": length, "seconds": time.perf_counter() - t, "text": text,
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="1000,2000")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        mode, n = args.one.split(":")
        print(json.dumps(run_one(mode, int(n), args.new_tokens)))
        return
    import workbench as wb

    wb.load()  # warm the conversion cache
    print("|     N | ours s/test | peers s/test | peers/ours | RSS ours / peers (GB) | same text |")
    print("|------:|------------:|-------------:|-----------:|:----------------------|:----------|")
    for n in (int(x) for x in args.lengths.split(",")):
        r = {}
        for mode in ("ours", "peers"):
            cmd = [sys.executable, __file__, "--one", f"{mode}:{n}", "--new-tokens", str(args.new_tokens)]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
            r[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
        a, b = r["ours"], r["peers"]
        print(f"| {n:>5} | {a['seconds']:11.2f} | {b['seconds']:12.2f} | {b['seconds'] / a['seconds']:10.2f} | "
              f"{a['peak_rss_gb']:.2f} / {b['peak_rss_gb']:.2f} | {a['text'] == b['text']} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()

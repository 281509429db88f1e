"""Cost of a query click in the attention drill-down, on the embedded SmolLM2 (CPU), at long prompts.

    python benchmarks/drilldown.py --lengths 1024,4096,8192 [--clicks 20]

Per length, in one process (the model loaded once), on the first N tokens of the shipped haystack:

(a) ``first run``: what the dashboard's prompt lab does when a prompt is run — one forward pass with the
    per-head statistics (``AttentionStats(sink_keys=4)``) and, nested, the drill-down recording (every layer's
    post-RoPE queries and keys, ``AttentionStats(qk=True)``), plus the loss (``Workbench.run_prompt``, no
    continuation); the numbers kept are reported (fp32);
(b) ``click``: a new query token in the view — ``AttentionView.queries = [q]`` on a view sharing that run's
    Drilldown: one layer's rows of the shown head from the cached queries and keys, its top keys, and the
    JSON the browser receives; median and max over ``--clicks`` random (layer, head, query) picks;
(c) ``old click``: what a click cost before — one forward pass over the tokens up to the query with exact
    tiles of that row in every layer (``workbench.views.widgets.attention_rows``, the old AttentionView with
    prefetch), for a query in the middle of the text (a typical click; the default last-token query costs a
    full forward pass). Ratio = (c) / (b) median.
"""
from __future__ import annotations

import argparse
import json
import random
import resource
import statistics
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", default="1024,4096,8192")
    ap.add_argument("--clicks", type=int, default=20)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()

    import torch

    import workbench as wb
    from workbench import niah
    from workbench.views.dashboard.state import Caps, Workbench
    from workbench.views.widgets import AttentionView, attention_rows

    if args.threads:
        torch.set_num_threads(args.threads)
    m = wb.load()
    bench = Workbench(None, moe_models=[], caps=Caps(max_prompt_chars=10**6), loader=lambda source: m)
    ids_all = m.tokenizer.encode(niah.haystack())
    rng = random.Random(0)
    rows = []
    print(f"SmolLM2-135M ({m.spec.n_layers} layers × {m.spec.n_heads} heads), torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads", flush=True)  # fmt: skip
    for n in [int(x) for x in args.lengths.split(",")]:
        text = m.tokenizer.decode(ids_all[: min(n, m.spec.max_positions)])
        t = time.perf_counter()
        out = bench.run_prompt(text, chat=False, max_new_tokens=0)
        first = time.perf_counter() - t
        T = len(out.token_ids)
        drill = out.drill
        kept_mb = drill.elements * 4 / 2**20
        view = AttentionView(m, torch.tensor([out.token_ids]), drilldown=drill, layer=0, head=0, queries=[T - 1])
        passes = drill.forward_passes
        times = []
        for _ in range(args.clicks):
            layer, head, q = rng.randrange(m.spec.n_layers), rng.randrange(m.spec.n_heads), rng.randrange(T)
            t = time.perf_counter()
            with view.hold_trait_notifications():
                view.selected = [layer, head]
                view.queries = [q]
            json.dumps(view.rows)  # what travels to the browser
            times.append(time.perf_counter() - t)
            assert view.rows[0]["query"] == q and view.rows[0]["layer"] == layer
        assert drill.forward_passes == passes, "a click ran the model"
        q_mid = T // 2
        t = time.perf_counter()
        attention_rows(m, torch.tensor([out.token_ids]), range(m.spec.n_layers), [q_mid])
        old = time.perf_counter() - t
        med = statistics.median(times)
        row = {"N": T, "first_run_s": first, "kept_MB": kept_mb, "click_median_ms": med * 1000, "click_max_ms": max(times) * 1000,
               "old_click_s": old, "old_query": q_mid, "ratio": old / med,
               "peak_rss_GB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}  # fmt: skip
        rows.append(row)
        print(json.dumps(row), flush=True)
        del view, out, drill
        bench.drilldowns = type(bench.drilldowns)(bench.caps.max_drilldown_elements)
    print("\n|     N | first run s | kept MB | click median ms | click max ms | old click s (query) | old / new |")
    print("|------:|------------:|--------:|----------------:|-------------:|--------------------:|----------:|")
    for r in rows:
        print(f"| {r['N']:5d} | {r['first_run_s']:11.1f} | {r['kept_MB']:7.0f} | {r['click_median_ms']:15.1f} | "
              f"{r['click_max_ms']:12.1f} | {r['old_click_s']:12.1f} ({r['old_query']}) | {r['ratio']:9.0f} |")  # fmt: skip


if __name__ == "__main__":
    main()

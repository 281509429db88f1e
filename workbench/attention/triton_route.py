"""The backend's route to the Triton kernel (``workbench.kernels.attention_stats``): which requests it
covers on which inputs, and how its results map onto the statistics the chunked torch path returns."""
from __future__ import annotations

import torch

from .chunked import apply_output_edits
from .masks import LazyMask
from .plan import LayerPlan


def covers(use_triton: bool | None, plan: LayerPlan, q, v, mask, sliding_window) -> bool:
    """True when the Triton kernel computes everything ``plan`` asks for on these inputs.
    ``use_triton``: None = on CUDA only; True = also on CPU (interpreter); False = never."""
    if use_triton is False or (use_triton is None and not q.is_cuda):
        return False
    from ..kernels.attention_stats import triton_available

    return (
        triton_available()
        and isinstance(mask, LazyMask)
        and mask.structured(sliding_window)
        and not plan.changes_probabilities
        and plan.topk <= 1
        and not plan.tiles
        and not plan.key_mass
        and not plan.record_outputs
        and q.shape[-1] == v.shape[-1]
    )


def run(q, k, v, scale, mask: LazyMask, sliding_window, sinks, plan: LayerPlan, q_pos):
    """Attention output and statistics from the Triton kernel, or ``(None, None)`` for inputs it refuses."""
    from ..kernels.attention_stats import attention_stats_triton

    try:
        res = attention_stats_triton(
            q, k, v, scale=scale, q_offset=mask.q_offset - mask.kv_offset, causal=True, window=sliding_window,
            key_valid=mask.padding, sinks=sinks,
            key_columns=None if plan.key_columns is None else plan.key_columns.to(q.device) - mask.kv_offset,
            spans=None if plan.spans is None else _local_spans(plan.spans.to(q.device), mask.kv_offset),
        )  # fmt: skip
    except ValueError:  # shape/dtype the kernel does not take: the torch path does
        return None, None
    out = apply_output_edits(res["out"], plan, q_pos)
    if not plan.record:
        return out, {}
    idx = res["top1_idx"]
    stats = {
        "lse": res["lse"], "entropy": res["entropy"],
        "topk_idx": torch.where(idx >= 0, idx + mask.kv_offset, idx)[..., None], "topk_prob": res["top1_prob"][..., None],
    }  # fmt: skip
    if "col_prob" in res:
        stats["col_prob"] = res["col_prob"]
        kc = plan.key_columns.to(q.device)
        j = (kc - mask.kv_offset)[None, None, :]
        vis = (j <= (q_pos - mask.kv_offset)[None, :, None]) & (j >= 0) & (j < k.shape[2])
        if sliding_window:
            vis &= j > (q_pos - mask.kv_offset)[None, :, None] - sliding_window
        pad = mask.padding
        if pad is not None:
            vis = vis & pad[:, None, :].gather(2, j.clamp(0, k.shape[2] - 1).expand(pad.shape[0], 1, -1)).expand(-1, len(q_pos), -1)
        stats["col_visible"] = vis.expand(q.shape[0], -1, -1)
    if "span_mass" in res:
        stats["span_mass"] = res["span_mass"]
    return out, stats


def _local_spans(spans: torch.Tensor, kv_offset: int) -> torch.Tensor:
    s = spans.clone()
    s[:, :2] -= kv_offset
    return s

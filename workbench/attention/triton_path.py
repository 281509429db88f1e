"""The backend's path to the Triton kernel (``workbench.kernels.attention_stats``): which requests it
covers (the capability table, ``workbench.kernels.capabilities``) and how its results map onto the
statistics dict the chunked torch path returns (same keys, shapes, dtypes and absolute coordinates)."""
from __future__ import annotations

import torch

from ..kernels import capabilities, semantics
from .masks import LazyMask
from .request import LayerRequest


def covers(use_triton: bool | None, request: LayerRequest, q, v, mask, sliding_window) -> bool:
    """True when the Triton kernel computes everything ``request`` asks for on these inputs.
    ``use_triton``: None = on CUDA only; True = also on CPU (interpreter); False = never."""
    if use_triton is False or (use_triton is None and not q.is_cuda):
        return False
    from ..kernels.attention_stats import triton_available

    structured = isinstance(mask, LazyMask) and mask.structured(sliding_window)
    return triton_available() and capabilities.triton_covers(capabilities.requested(request, structured_mask=structured))


def run(q, k, v, scale, mask: LazyMask, sliding_window, sinks, request: LayerRequest, q_pos):
    """Attention output and statistics from the Triton kernel, or ``(None, None)`` for inputs it refuses."""
    from ..kernels.attention_stats import attention_stats_triton

    rec = request.record
    try:
        res = attention_stats_triton(
            q, k, v, scale=scale, q_offset=mask.q_offset, kv_offset=mask.kv_offset, causal=True, window=sliding_window,
            key_valid=mask.padding, sinks=sinks,
            key_columns=request.key_columns if rec else None, spans=request.spans if rec else None,
            topk=request.topk if rec else 1, tiles=request.tiles if rec else (), key_mass=rec and request.key_mass,
            edits=[e for e in request.edits if e.kind not in semantics.OUTPUT_EDITS], stats=rec,
            distance_moments=rec and request.distance_moments, row_keys=request.row_keys if rec else None,
        )  # fmt: skip
    except ValueError:  # shape/dtype the kernel does not take: the torch path does
        return None, None
    out = semantics.apply_output_edits(res["out"], request.edits, q_pos)
    stats: dict = {}
    if rec:
        stats = {name: res[name] for name in ("lse", "entropy", "topk_idx", "topk_prob")}
        if request.key_columns is not None:
            stats["col_prob"] = res["col_prob"]
            stats["col_visible"] = _col_visible(request.key_columns.to(q.device), mask, sliding_window, q_pos, q.shape[0], k.shape[2])
        if request.spans is not None:
            stats["span_mass"] = res["span_mass"]
        if request.key_mass:
            stats["key_mass"], stats["key_count"] = res["key_mass"].double(), res["key_count"]
        for t in range(len(request.tiles)):
            stats[f"tile{t}"] = res[f"tile{t}"]
        if request.distance_moments:  # [B, Hq, M] float32
            stats["dist_sum"], stats["dist_sq_sum"] = res["dist_sum"], res["dist_sq_sum"]
        if request.row_keys is not None:  # [B, Hq, M] float32, NaN where row_keys is -1
            stats["row_key_prob"] = res["row_key_prob"]
    if request.record_outputs:
        stats["output_sum"] = out.double().sum(dim=(0, 2))
        stats["output_count"] = torch.tensor(q.shape[0] * q.shape[2], device=q.device)
    return out, stats


def _col_visible(cols: torch.Tensor, mask: LazyMask, sliding_window, q_pos, B: int, N: int) -> torch.Tensor:
    """``[B, M, NK]``: which rows see each tracked key column (structured visibility; columns outside the
    cache are never seen)."""
    local = cols - mask.kv_offset
    valid = ((local >= 0) & (local < N))[None].expand(B, -1)
    pad = mask.padding
    if pad is not None:
        valid = valid & pad.to(cols.device).gather(1, local.clamp(0, N - 1)[None].expand(B, -1))
    return semantics.visibility(q_pos, cols, causal=True, window=sliding_window, key_valid=valid)

"""The ``"workbench"`` attention backend, registered in ``transformers``' ``AttentionInterface``.

Idle layers delegate to ``sdpa_attention_forward`` (identical numbers, no overhead beyond a lookup).
Layers that a capture or intervention touches run the reducing path: the Triton kernel on CUDA when
it covers the request, else the chunked torch path. Both return the normal attention output.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface

from ..errors import ProbeError
from .chunked import apply_output_edits, chunked_attention
from .masks import LazyMask, lazy_mask, visibility_from_tensor
from .plan import LayerPlan

NAME = "workbench"


@dataclass(eq=False)
class BackendState:
    """Per-model registry of what the active captures/interventions want from each layer."""

    planners: list = field(default_factory=list)  # .plan(layer, n_queries) -> LayerPlan | None; .receive(layer, stats, q_pos)
    use_triton: bool | None = None  # None: on CUDA when the kernel covers the request; True: also on CPU (interpreter)

    def plan_for(self, layer: int, n_queries: int) -> tuple[LayerPlan | None, list]:
        plans = [(p, p.plan(layer, n_queries)) for p in self.planners]
        plans = [(p, lp) for p, lp in plans if lp is not None and lp.active]
        if not plans:
            return None, []
        merged = LayerPlan()
        recorders = []
        for owner, lp in plans:
            merged.edits.extend(lp.edits)
            merged.gated = merged.gated or lp.gated
            if lp.record or lp.record_outputs:
                if recorders:
                    # two recorders on one layer would need two stat layouts; keep one probe per layer
                    raise ProbeError(
                        f"two active captures record layer {layer}; give nested captures disjoint layers "
                        "(AttentionStats(layers=...)) or use one probe"
                    )
                recorders.append(owner)
                merged.record, merged.record_outputs = lp.record, lp.record_outputs
                merged.key_columns, merged.spans, merged.topk, merged.tiles = lp.key_columns, lp.spans, lp.topk, lp.tiles
                merged.key_mass = lp.key_mass
        return merged, recorders


def install(hf_model: torch.nn.Module, attention_paths: tuple[str, ...]) -> BackendState:
    """Route ``hf_model``'s attention through the workbench backend (once; idempotent)."""
    register()
    state = getattr(hf_model, "_workbench_state", None)
    if state is None:
        state = BackendState()
        hf_model._workbench_state = state
    for i, path in enumerate(attention_paths):
        mod = hf_model.get_submodule(path)
        mod._workbench_layer = i
        mod._workbench_state = state
    hf_model.set_attn_implementation(NAME)
    return state


_registered = False


def register() -> None:
    global _registered
    if not _registered:
        AttentionInterface.register(NAME, workbench_attention)
        AttentionMaskInterface.register(NAME, lazy_mask)
        _registered = True


def workbench_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Any,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    s_aux: torch.Tensor | None = None,
    **kwargs: Any,
):
    """``AttentionInterface`` function: ``(out [B, M, Hq, Dv], None)``."""
    state: BackendState | None = getattr(module, "_workbench_state", None)
    layer = getattr(module, "_workbench_layer", None)
    plan, recorders = state.plan_for(layer, query.shape[2]) if state is not None else (None, [])
    if plan is None and s_aux is None:
        dense = attention_mask.dense() if isinstance(attention_mask, LazyMask) else attention_mask
        return sdpa_attention_forward(module, query, key, value, dense, dropout=dropout, scaling=scaling, **kwargs)
    if module.training and dropout > 0:
        raise RuntimeError("workbench attention computes statistics in eval mode only; call model.eval()")
    scale = scaling if scaling is not None else 1.0 / math.sqrt(query.shape[-1])
    B, Hq, M, _ = query.shape
    N = key.shape[2]
    if isinstance(attention_mask, LazyMask):
        q_offset, kv_offset = attention_mask.q_offset, attention_mask.kv_offset
        rows_visible = attention_mask.rows
    else:  # a mask built elsewhere (dense tensor or None); positions follow the cache layout
        kv_offset, q_offset = 0, N - M
        rows_visible = visibility_from_tensor(attention_mask, M, N, getattr(module, "is_causal", True), query.device)
    q_pos = torch.arange(M, device=query.device) + q_offset
    plan = plan or LayerPlan()
    out = stats = None
    if plan.gated is not None:
        if plan.record or plan.edits or s_aux is not None:
            raise RuntimeError("gated (DuoAttention) layers cannot be recorded or edited at the same time, nor use learned sinks")
        dense = attention_mask.dense() if isinstance(attention_mask, LazyMask) else attention_mask
        key_pos = torch.arange(N, device=query.device) + kv_offset
        out = plan.gated(query, key, value, scale, dense, q_pos, key_pos)
        return out.transpose(1, 2).contiguous(), None
    if _triton_covers(state, plan, query, value, attention_mask, sliding_window):
        out, stats = _triton_path(query, key, value, scale, attention_mask, sliding_window, s_aux, plan, q_pos)
    if out is None:
        out, stats = chunked_attention(
            query, key, value, scale=scale, rows_visible=rows_visible, q_pos=q_pos, kv_offset=kv_offset, sinks=s_aux, plan=plan
        )
    for owner in recorders:
        owner.receive(layer, stats, q_pos)
    return out.transpose(1, 2).contiguous(), None


def _triton_covers(state, plan: LayerPlan, q, v, mask, sliding_window) -> bool:
    if state is None or state.use_triton is False or (state.use_triton is None and not q.is_cuda):
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


def _triton_path(q, k, v, scale, mask: LazyMask, sliding_window, sinks, plan: LayerPlan, q_pos):
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

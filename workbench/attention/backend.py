"""The ``"workbench"`` attention backend, registered in ``transformers``' ``AttentionInterface``.

Idle layers delegate to ``sdpa_attention_forward`` (identical numbers, no overhead beyond a lookup).
Layers that a capture or intervention touches run the reducing path: the Triton kernel on CUDA when
it covers the request, else the chunked torch path. Both return the normal attention output.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface

from ..base.errors import ProbeError
from . import triton_path
from .chunked import chunked_attention
from .masks import LazyMask, lazy_mask, visibility_from_tensor
from .request import LayerRequest

if TYPE_CHECKING:
    from ..core.hooks import HookManager

NAME = "workbench"


def install(model) -> "HookManager":
    """Send ``model``'s attention (a :class:`workbench.Model`) through the workbench backend, with one
    :class:`~workbench.core.hooks.HookManager` per underlying module tree (idempotent)."""
    from ..core.hooks import HookManager

    register()
    hf = model.hf
    mgr = getattr(hf, "_workbench_state", None)
    if not isinstance(mgr, HookManager):
        mgr = HookManager(model)
        hf._workbench_state = mgr
    for i, path in enumerate(model.spec.attention_paths):
        mod = hf.get_submodule(path)
        mod._workbench_layer = i
        mod._workbench_state = mgr
    hf.set_attn_implementation(NAME)
    return mgr


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
    mgr = getattr(module, "_workbench_state", None)
    layer = getattr(module, "_workbench_layer", None)
    request, receivers = mgr.attention_request(layer) if mgr is not None else (None, [])
    if (request is None or not request.active) and s_aux is None:
        dense = attention_mask.dense() if isinstance(attention_mask, LazyMask) else attention_mask
        out, _ = sdpa_attention_forward(module, query, key, value, dense, dropout=dropout, scaling=scaling, **kwargs)
        if request is not None and (request.z_norm or request.keep_qk):  # head-output norms / q, k only: the fast path serves
            stats = {"z_norm": out.float().norm(dim=-1).transpose(1, 2)}
            if request.keep_qk:
                stats["q"], stats["k_new"] = query, key[:, :, key.shape[2] - query.shape[2] :]
            for receive in receivers:
                receive(stats)
        return out, None
    if module.training and dropout > 0:
        raise ProbeError("workbench attention computes statistics in eval mode only; call model.hf.eval()")
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
    request = request or LayerRequest()
    out = stats = None
    if request.gated is not None:
        if request.record or request.edits or s_aux is not None:
            raise ProbeError("gated (DuoAttention) layers cannot be recorded or edited at the same time, nor use learned sinks")
        dense = attention_mask.dense() if isinstance(attention_mask, LazyMask) else attention_mask
        key_pos = torch.arange(N, device=query.device) + kv_offset
        out = request.gated(query, key, value, scale, dense, q_pos, key_pos)
        return out.transpose(1, 2).contiguous(), None
    if triton_path.covers(mgr.use_triton if mgr is not None else False, request, query, value, attention_mask, sliding_window):
        out, stats = triton_path.run(query, key, value, scale, attention_mask, sliding_window, s_aux, request, q_pos)
    if out is None:
        out, stats = chunked_attention(
            query, key, value, scale=scale, rows_visible=rows_visible, q_pos=q_pos, kv_offset=kv_offset, sinks=s_aux, request=request
        )
    if request.z_norm:
        stats["z_norm"] = out.float().norm(dim=-1)
    stats["kv_offset"] = kv_offset  # cache index j holds key position kv_offset + j
    if request.keep_qk:  # the queries and this call's new keys (the cache appends them last)
        stats["q"], stats["k_new"] = query, key[:, :, N - M :] if N >= M else key
    for receive in receivers:
        receive(stats)
    return out.transpose(1, 2).contiguous(), None

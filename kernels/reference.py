"""Float64 reference for the reducing attention: full N×N matrix, small inputs only.

This file *defines* every statistic the attention backends return; the chunked torch path
(`workbench.attention`) and the Triton kernel (`workbench.kernels.attention_stats`, source in kernels/) are tested against it.

Conventions
- ``q`` is ``[B, Hq, M, D]``; ``k``/``v`` are ``[B, Hkv, N, D]``; query head ``h`` reads KV head
  ``h // (Hq // Hkv)`` (GQA/MQA).
- ``visible`` is a boolean ``[B, M, N]`` (or broadcastable) mask: True where query row ``i`` may attend
  to key ``j``.
- ``q_pos`` ``[M]`` is each query's index in key space (its own key's index), used by windowed spans.
- ``sinks`` ``[Hq]`` are learned sink logits (GPT-OSS): an extra softmax slot that takes mass but
  has no value. ``lse`` and ``entropy`` include that slot; probabilities of real keys exclude it.
- A row that sees no key (and has no sink) has output 0, ``lse = -inf``, entropy 0, top-k index -1.
- A span is ``(start, end, window)``: key ``j`` is in it when ``start <= j < end`` and
  ``q_pos[i] - j < window`` (``window`` ≥ 2**30 means unlimited). BOS = ``(0, 1, BIG)``; a local
  window of width ``w`` = ``(0, N, w)``; a needle = ``(a, b, BIG)``.
"""
from __future__ import annotations

import torch

BIG = 2**30


def standard_visibility(
    q_pos: torch.Tensor,
    n_keys: int,
    *,
    causal: bool = True,
    window: int | None = None,
    key_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal / sliding-window / key-padding visibility as a ``[B or 1, M, N]`` bool tensor."""
    j = torch.arange(n_keys, device=q_pos.device)[None, :]
    i = q_pos[:, None]
    vis = torch.ones(q_pos.shape[0], n_keys, dtype=torch.bool, device=q_pos.device)
    if causal:
        vis &= j <= i
    if window is not None:
        vis &= j > i - window
    vis = vis[None]
    if key_valid is not None:
        vis = vis & key_valid[:, None, :].bool()
    return vis


def span_membership(spans: torch.Tensor, q_pos: torch.Tensor, n_keys: int) -> torch.Tensor:
    """``[NS, M, N]`` bool: key ``j`` lies in span ``s`` for query row ``i``."""
    j = torch.arange(n_keys, device=q_pos.device)[None, None, :]
    start, end, window = (spans[:, c, None, None] for c in range(3))
    return (j >= start) & (j < end) & ((q_pos[None, :, None] - j) < window)


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    visible: torch.Tensor,
    q_pos: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
    key_columns: torch.Tensor | None = None,
    spans: torch.Tensor | None = None,
    topk: int = 1,
) -> dict[str, torch.Tensor]:
    """All statistics from the explicit float64 probability matrix."""
    B, Hq, M, D = q.shape
    N = k.shape[2]
    rep = Hq // k.shape[1]
    qd, kd, vd = (t.double() for t in (q, k, v))
    kd = kd.repeat_interleave(rep, dim=1)
    vd = vd.repeat_interleave(rep, dim=1)
    vis = visible.bool().reshape(-1, 1, M, N) if visible.dim() == 3 else visible.bool()
    vis = vis.expand(B, Hq, M, N)
    s = (qd @ kd.transpose(-1, -2)) * scale
    s = s.masked_fill(~vis, float("-inf"))
    if sinks is not None:
        sink_col = sinks.double().view(1, Hq, 1, 1).expand(B, Hq, M, 1)
        full = torch.cat([s, sink_col], dim=-1)
    else:
        full = s
    lse = torch.logsumexp(full, dim=-1)
    safe_lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    p_full = torch.exp(full - safe_lse[..., None]).masked_fill(~torch.isfinite(lse)[..., None], 0.0)
    p = p_full[..., :N]
    out = p @ vd
    logp = torch.where(p_full > 0, torch.log(p_full.clamp_min(1e-300)), torch.zeros_like(p_full))
    entropy = -(p_full * logp).sum(-1)
    kk = min(topk, N)
    top_prob, top_idx = torch.topk(p.masked_fill(~vis, -1.0), kk, dim=-1)
    top_idx = torch.where(top_prob >= 0, top_idx, torch.full_like(top_idx, -1))
    top_prob = top_prob.clamp_min(0.0)
    res = {"out": out, "lse": lse, "entropy": entropy, "topk_idx": top_idx, "topk_prob": top_prob, "probs": p}
    if key_columns is not None:
        res["col_prob"] = p[..., key_columns.long()]
    if spans is not None:
        if q_pos is None:
            raise ValueError("spans need q_pos")
        member = span_membership(spans.long(), q_pos, N)  # [NS, M, N]
        res["span_mass"] = torch.einsum("bhmn,smn->bhms", p, member.double())
    return res

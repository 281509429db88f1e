"""What both chunked paths share: block sizes, the statistics' buffers and how one row block's probabilities
are reduced into them (entropy, top-k, key columns, spans, tiles, key mass, distance moments, row-key
probabilities)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kernels import semantics
from .request import LayerRequest

#: score elements per block (B·Hq·rows·keys); ~64 MB of float32 scores
BLOCK_ELEMENTS = 16 * 1024 * 1024
#: rows per block at most: small blocks let causal rows skip more of the future
MAX_BLOCK_ROWS = 256
_NEG = -1e30


def _allocate(request: LayerRequest, B, Hq, M, dev) -> dict[str, torch.Tensor]:
    f = dict(device=dev, dtype=torch.float32)
    st = {
        "lse": torch.empty(B, Hq, M, **f),
        "entropy": torch.empty(B, Hq, M, **f),
        "topk_idx": torch.empty(B, Hq, M, request.topk, device=dev, dtype=torch.long),
        "topk_prob": torch.empty(B, Hq, M, request.topk, **f),
    }
    if request.key_columns is not None:
        nk = request.key_columns.numel()
        st["col_prob"] = torch.zeros(B, Hq, M, nk, **f)
        st["col_visible"] = torch.zeros(B, M, nk, device=dev, dtype=torch.bool)
    if request.spans is not None:
        st["span_mass"] = torch.zeros(B, Hq, M, request.spans.shape[0], **f)
    if request.distance_moments:
        st["dist_sum"], st["dist_sq_sum"] = torch.zeros(B, Hq, M, **f), torch.zeros(B, Hq, M, **f)
    if request.row_keys is not None:
        st["row_key_prob"] = torch.zeros(B, Hq, M, **f)
    for t, (q0, q1, k0, k1) in enumerate(request.tiles):
        st[f"tile{t}"] = []
    return st


def _allocate_key_mass(st, B, Hq, N, dev) -> None:
    st["key_mass"] = torch.zeros(B, Hq, N, device=dev, dtype=torch.float64)
    st["key_count"] = torch.zeros(B, N, device=dev, dtype=torch.long)


@dataclass
class _RowStats:
    """One row block: probabilities, centred scores and the softmax pieces they came from."""

    p: torch.Tensor  # probabilities, times l where inv_l ≠ 1: multiply row results by inv_l
    inv_l: torch.Tensor
    s: torch.Tensor  # scores minus ``centre`` (invisible keys ≈ −1e30)
    centre: torch.Tensor  # what was subtracted from the scores (0 on the fused-softmax path)
    p_sink: torch.Tensor | None
    sink_logit: torch.Tensor | None
    key_max: torch.Tensor  # raw row maximum over keys
    arg: torch.Tensor
    seen: torch.Tensor
    lse: torch.Tensor
    edited: bool  # probabilities were edited: read statistics off p, not off the scores


def _record(st, request: LayerRequest, r: _RowStats, vis, vis_h, i0, i1, qp, kp, lo: int) -> None:
    p, inv = r.p, r.inv_l
    st["lse"][:, :, i0:i1] = r.lse.float()
    if r.edited:  # p is normalised here (inv_l = 1)
        ent = semantics.entropy(p, r.p_sink)
    else:  # H = lse − c − Σ p·(s − c) − p_sink·(sink − c), one pass over p (c: the centre)
        ps = torch.einsum("bhcn,bhcn->bhc", p, r.s) * inv
        ent = r.lse - r.centre - ps
        if r.p_sink is not None:
            ent = ent - r.p_sink * (r.sink_logit - r.centre)
        ent = torch.where(torch.isfinite(r.lse), ent, 0.0)
    st["entropy"][:, :, i0:i1] = ent.float()
    k = min(request.topk, p.shape[-1])
    if r.edited:
        ti, tp = semantics.topk(p, vis_h, k)
        ok = ti >= 0
        ti = ti.clamp_min(0)
    elif k == 1:
        tp = torch.exp(r.key_max - r.lse)[..., None]
        ti, ok = r.arg[..., None], r.seen[..., None]
    else:
        tv, ti = torch.topk(r.s, k, dim=-1)
        ok = (tv > _NEG / 2) & r.seen[..., None]
        tp = torch.exp(tv + (r.centre[..., None] if r.centre.dim() else r.centre) - r.lse[..., None])
    st["topk_idx"][:, :, i0:i1] = -1
    st["topk_prob"][:, :, i0:i1] = 0.0
    st["topk_idx"][:, :, i0:i1, :k] = torch.where(ok, kp[ti], -1)
    st["topk_prob"][:, :, i0:i1, :k] = torch.where(ok, tp, 0.0).float()
    if request.key_columns is not None:
        kc = request.key_columns.to(kp.device)
        local = kc - int(kp[0]) if kp.numel() else kc
        inside = (local >= 0) & (local < kp.numel())
        if inside.any():
            li = local[inside]
            st["col_prob"][:, :, i0:i1, inside] = (p[..., li] * inv[..., None]).float()
            st["col_visible"][:, i0:i1][..., inside] = vis[:, 0][..., li].expand(st["col_visible"].shape[0], -1, -1)
    if request.spans is not None:
        sp = request.spans.to(kp.device)
        member = semantics.span_membership(sp, qp, kp)  # [NS, c, n]
        st["span_mass"][:, :, i0:i1] = (torch.einsum("bhcn,scn->bhcs", p, member.to(p.dtype)) * inv[..., None]).float()
    if request.distance_moments:  # linear in p: the unnormalised rows times inv_l (semantics.distance_moments)
        ds, dsq = semantics.distance_moments(p, qp, kp)
        st["dist_sum"][:, :, i0:i1], st["dist_sq_sum"][:, :, i0:i1] = (ds * inv).float(), (dsq * inv).float()
    if request.row_keys is not None:  # one gathered probability per row (semantics.row_key_prob)
        rk = request.row_keys[:, i0:i1].to(p.device)
        st["row_key_prob"][:, :, i0:i1] = (semantics.row_key_prob(p, rk.expand(p.shape[0], -1), kp) * inv).float()
    if request.key_mass:
        w, seen = inv, vis[:, 0]
        if request.query_valid is not None:  # padding query rows see real keys but are not counted
            qv = request.query_valid[:, i0:i1].to(p.device)
            w, seen = inv * qv[:, None], seen & qv[..., None]
        st["key_mass"][..., lo : lo + kp.numel()] += (w.unsqueeze(-2) @ p).squeeze(-2).double()
        st["key_count"][:, lo : lo + kp.numel()] += seen.sum(1).expand(st["key_count"].shape[0], -1)
    for t, (q0, q1, k0, k1) in enumerate(request.tiles):
        rows = (qp >= q0) & (qp < q1)
        if rows.any():
            tile = torch.zeros(p.shape[0], p.shape[1], int(rows.sum()), k1 - k0, dtype=torch.float32, device=p.device)
            kin = (kp >= k0) & (kp < k1)
            tile[..., (kp[kin] - k0)] = (p[:, :, rows][..., kin] * inv[:, :, rows][..., None]).float()
            st[f"tile{t}"].append((qp[rows], tile))

"""The chunked torch path: exact attention + per-head reductions, O(N·chunk) memory, never N×N.

Queries are processed in row blocks; for each block only the keys some row can see are scored
(causal rows skip the future, sliding-window rows the distant past). Every statistic is read off the
probabilities actually used, i.e. after edits, so a probe under an intervention reports what the
model did.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..kernels import semantics
from .plan import HeadEdit, LayerPlan

#: score elements per block (B·Hq·rows·keys); ~64 MB of float32 scores
BLOCK_ELEMENTS = 16 * 1024 * 1024
#: rows per block at most: small blocks let causal rows skip more of the future
MAX_BLOCK_ROWS = 256
_NEG = -1e30


def _rows_in(q_pos: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
    if positions is None:
        return torch.ones_like(q_pos, dtype=torch.bool)
    return torch.isin(q_pos, positions.to(q_pos.device))


def chunked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    rows_visible: Callable[[int, int], torch.Tensor],
    q_pos: torch.Tensor,
    kv_offset: int = 0,
    sinks: torch.Tensor | None = None,
    plan: LayerPlan | None = None,
    block_rows: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Attention output ``[B, Hq, M, Dv]`` and the statistics ``plan`` asks for.

    ``rows_visible(i0, i1)`` gives bool visibility ``[B|1, 1, i1-i0, N]`` of query rows ``i0:i1``;
    ``q_pos`` is each query's absolute position, keys are at ``kv_offset + arange(N)``.
    """
    plan = plan or LayerPlan()
    B, Hq, M, D = q.shape
    Hkv, N, Dv = k.shape[1], k.shape[2], v.shape[-1]
    rep = Hq // Hkv
    cdt = torch.promote_types(q.dtype, torch.float32)
    dev = q.device
    key_pos = torch.arange(N, device=dev) + kv_offset
    if block_rows is None:
        block_rows = max(1, min(M, MAX_BLOCK_ROWS, BLOCK_ELEMENTS // max(1, B * Hq * N)))
    out = torch.empty(B, Hq, M, Dv, dtype=v.dtype, device=dev)
    stats = _allocate(plan, B, Hq, M, dev) if plan.record else {}
    if plan.record and plan.key_mass:
        _allocate_key_mass(stats, B, Hq, N, dev)
    out_sum = torch.zeros(Hq, Dv, dtype=torch.float64, device=dev) if plan.record_outputs else None
    prob_edits = plan.edits_of("uniform", "calibrate", "mask_keys", "streaming")
    sink_logit = sinks.to(cdt).view(1, Hq, 1) if sinks is not None else None
    for i0 in range(0, M, block_rows):
        i1 = min(M, i0 + block_rows)
        vis = rows_visible(i0, i1).to(dev)  # [B|1, 1, c, N]
        cols = vis.reshape(-1, N).any(0)
        idx = cols.nonzero()
        lo, hi = (int(idx[0]), int(idx[-1]) + 1) if idx.numel() else (0, 1)
        vis = vis[..., lo:hi]  # causal rows never score future keys; windowed rows skip the distant past
        kb, vb = k[:, :, lo:hi].to(cdt), v[:, :, lo:hi].to(cdt)
        qb = q[:, :, i0:i1].to(cdt) * scale  # scaling c·D query entries, not c·n scores
        c, n = i1 - i0, hi - lo
        s = (qb.view(B, Hkv, rep, c, D) @ kb[:, :, None].transpose(-1, -2)).view(B, Hq, c, n)
        vis_h = vis.expand(B, Hq, c, n)
        qp, kp = q_pos[i0:i1], key_pos[lo:hi]
        if prob_edits:
            vis_h = _edit_visibility(vis_h.clone(), prob_edits, qp, kp)
        # finite fill, not -inf: keeps p·s well defined (0·NEG) for the single-pass entropy; only the
        # columns from the first hidden key on (the causal triangle, unless there is padding)
        hidden = (~(vis_h if prob_edits else vis)).reshape(-1, n).any(0).nonzero()
        if hidden.numel():
            j0 = int(hidden[0])
            s[..., j0:].masked_fill_(~vis_h[..., j0:], _NEG)
        seen = vis_h.any(-1)  # [B, Hq, c]
        key_max, arg = (t.view(B, Hq, c) for t in s.view(-1, n).max(-1))  # 2-D max with indices is faster
        all_seen = bool(seen.all())
        if sink_logit is None and not prob_edits:
            # fused softmax; lse from the top probability: p_max = exp(max − lse)
            centre = torch.zeros((), dtype=cdt, device=dev)
            p = torch.softmax(s, dim=-1)
            if not all_seen:
                p.masked_fill_(~seen[..., None], 0.0)
            p_top = p.gather(-1, arg[..., None]).squeeze(-1)
            lse = torch.where(seen, key_max - torch.log(p_top.clamp_min(torch.finfo(cdt).tiny)), float("-inf"))
            inv_l, p_sink = torch.ones_like(lse), None
        else:
            centre = key_max if sink_logit is None else torch.maximum(key_max, sink_logit)
            s.sub_(centre[..., None])  # centred scores: exp never overflows
            p = torch.exp(s)  # unnormalised; rows are divided by l only where needed (c·Dv, not c·n, work)
            if not all_seen:
                p.masked_fill_(~seen[..., None], 0.0)
            l = p.sum(-1)
            e_sink = torch.exp(sink_logit - centre) if sink_logit is not None else None
            if e_sink is not None:
                l = l + e_sink
            lse = torch.where(l > 0, centre + torch.log(l), float("-inf"))
            inv_l = 1.0 / l.clamp_min(torch.finfo(cdt).tiny)
            p_sink = e_sink * inv_l if e_sink is not None else None
            if prob_edits:
                p.mul_(inv_l[..., None])
                p = _edit_probabilities(p, vis_h, plan.edits_of("uniform", "calibrate"), qp, kp)
                inv_l = torch.ones_like(inv_l)
        ob = (p.view(B, Hkv, rep, c, n) @ vb[:, :, None]).view(B, Hq, c, Dv) * inv_l[..., None]
        if plan.record:
            rows = _RowStats(p, inv_l, s, centre, p_sink, sink_logit, key_max, arg, seen, lse, edited=bool(prob_edits))
            _record(stats, plan, rows, vis, vis_h, i0, i1, qp, kp, lo)
        out[:, :, i0:i1] = ob.to(out.dtype)
    out = apply_output_edits(out, plan, q_pos)
    if out_sum is not None:
        stats["output_sum"] = out.double().sum(dim=(0, 2))
        stats["output_count"] = torch.tensor(B * M, device=dev)
    return out, stats


def apply_output_edits(out: torch.Tensor, plan: LayerPlan, q_pos: torch.Tensor) -> torch.Tensor:
    """Zero / mean ablation act on a head's output rows, whatever path computed them."""
    edits = plan.edits_of("zero", "mean")
    if not edits:
        return out
    out = out.clone()
    for e in edits:
        rows = _rows_in(q_pos, e.positions)
        value = 0.0 if e.kind == "zero" else e.mean.to(out.dtype).to(out.device)
        out[:, e.head, rows] = value
    return out


def _edit_visibility(vis: torch.Tensor, edits: list[HeadEdit], qp: torch.Tensor, kp: torch.Tensor) -> torch.Tensor:
    for e in edits:
        rows = _rows_in(qp, e.positions)[:, None]
        if e.kind == "mask_keys":
            drop = torch.isin(kp, e.keys.to(kp.device))[None, :] & rows
        elif e.kind == "streaming":
            keep = (kp[None, :] < e.sink) | (kp[None, :] > qp[:, None] - e.recent)
            drop = ~keep & rows
        else:
            continue
        vis[:, e.head] &= ~drop
    return vis


def _edit_probabilities(p, vis, edits: list[HeadEdit], qp, kp) -> torch.Tensor:
    for e in edits:
        rows = _rows_in(qp, e.positions)
        ph = p[:, e.head]
        if e.kind == "uniform":
            v = vis[:, e.head].to(p.dtype)
            new = v / v.sum(-1, keepdim=True).clamp_min(1.0)
        else:  # ACT calibration: sinks scaled by beta, the freed mass goes to the other keys pro rata
            is_sink = torch.isin(kp, e.keys.to(kp.device))
            sink_mass = (ph * is_sink).sum(-1, keepdim=True)
            other = (ph * ~is_sink).sum(-1, keepdim=True)  # summed, not 1 − sink: exact when sinks dominate
            factor = (other + (1.0 - e.beta) * sink_mass) / other.clamp_min(1e-30)
            new = torch.where(is_sink, ph * e.beta, ph * factor)
            new = torch.where(other > 1e-12, new, ph)  # a row that sees only sinks has nowhere to move mass
        p[:, e.head] = torch.where(rows[None, :, None], new, ph)
    return p


def _allocate(plan: LayerPlan, B, Hq, M, dev) -> dict[str, torch.Tensor]:
    f = dict(device=dev, dtype=torch.float32)
    st = {
        "lse": torch.empty(B, Hq, M, **f),
        "entropy": torch.empty(B, Hq, M, **f),
        "topk_idx": torch.empty(B, Hq, M, plan.topk, device=dev, dtype=torch.long),
        "topk_prob": torch.empty(B, Hq, M, plan.topk, **f),
    }
    if plan.key_columns is not None:
        nk = plan.key_columns.numel()
        st["col_prob"] = torch.zeros(B, Hq, M, nk, **f)
        st["col_visible"] = torch.zeros(B, M, nk, device=dev, dtype=torch.bool)
    if plan.spans is not None:
        st["span_mass"] = torch.zeros(B, Hq, M, plan.spans.shape[0], **f)
    if plan.distance_moments:
        st["dist_sum"], st["dist_sq_sum"] = torch.zeros(B, Hq, M, **f), torch.zeros(B, Hq, M, **f)
    if plan.row_keys is not None:
        st["row_key_prob"] = torch.zeros(B, Hq, M, **f)
    for t, (q0, q1, k0, k1) in enumerate(plan.tiles):
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


def _record(st, plan: LayerPlan, r: _RowStats, vis, vis_h, i0, i1, qp, kp, lo: int) -> None:
    p, inv = r.p, r.inv_l
    st["lse"][:, :, i0:i1] = r.lse.float()
    tiny = torch.finfo(p.dtype).tiny
    if r.edited:  # p is normalised here (inv_l = 1)
        ent = -(p * torch.log(p.clamp_min(tiny))).sum(-1)
        if r.p_sink is not None:
            ent = ent - r.p_sink * torch.log(r.p_sink.clamp_min(tiny))
    else:  # H = lse − c − Σ p·(s − c) − p_sink·(sink − c), one pass over p (c: the centre)
        ps = torch.einsum("bhcn,bhcn->bhc", p, r.s) * inv
        ent = r.lse - r.centre - ps
        if r.p_sink is not None:
            ent = ent - r.p_sink * (r.sink_logit - r.centre)
        ent = torch.where(torch.isfinite(r.lse), ent, 0.0)
    st["entropy"][:, :, i0:i1] = ent.float()
    k = min(plan.topk, p.shape[-1])
    if r.edited:
        tp, ti = torch.topk(p.masked_fill(~vis_h, -1.0), k, dim=-1)
        ok = tp >= 0
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
    if plan.key_columns is not None:
        kc = plan.key_columns.to(kp.device)
        local = kc - int(kp[0]) if kp.numel() else kc
        inside = (local >= 0) & (local < kp.numel())
        if inside.any():
            li = local[inside]
            st["col_prob"][:, :, i0:i1, inside] = (p[..., li] * inv[..., None]).float()
            st["col_visible"][:, i0:i1][..., inside] = vis[:, 0][..., li].expand(st["col_visible"].shape[0], -1, -1)
    if plan.spans is not None:
        sp = plan.spans.to(kp.device)
        member = (kp[None, None, :] >= sp[:, 0, None, None]) & (kp[None, None, :] < sp[:, 1, None, None])
        member = member & ((qp[None, :, None] - kp[None, None, :]) < sp[:, 2, None, None])  # [NS, c, n]
        st["span_mass"][:, :, i0:i1] = (torch.einsum("bhcn,scn->bhcs", p, member.to(p.dtype)) * inv[..., None]).float()
    if plan.distance_moments:  # linear in p: the unnormalised rows times inv_l (semantics.distance_moments)
        ds, dsq = semantics.distance_moments(p, qp, kp)
        st["dist_sum"][:, :, i0:i1], st["dist_sq_sum"][:, :, i0:i1] = (ds * inv).float(), (dsq * inv).float()
    if plan.row_keys is not None:  # one gathered probability per row (semantics.row_key_prob)
        rk = plan.row_keys[:, i0:i1].to(p.device)
        st["row_key_prob"][:, :, i0:i1] = (semantics.row_key_prob(p, rk.expand(p.shape[0], -1), kp) * inv).float()
    if plan.key_mass:
        w, seen = inv, vis[:, 0]
        if plan.query_valid is not None:  # padding query rows see real keys but are not counted
            qv = plan.query_valid[:, i0:i1].to(p.device)
            w, seen = inv * qv[:, None], seen & qv[..., None]
        st["key_mass"][..., lo : lo + kp.numel()] += (w.unsqueeze(-2) @ p).squeeze(-2).double()
        st["key_count"][:, lo : lo + kp.numel()] += seen.sum(1).expand(st["key_count"].shape[0], -1)
    for t, (q0, q1, k0, k1) in enumerate(plan.tiles):
        rows = (qp >= q0) & (qp < q1)
        if rows.any():
            tile = torch.zeros(p.shape[0], p.shape[1], int(rows.sum()), k1 - k0, dtype=torch.float32, device=p.device)
            kin = (kp >= k0) & (kp < k1)
            tile[..., (kp[kin] - k0)] = (p[:, :, rows][..., kin] * inv[:, :, rows][..., None]).float()
            st[f"tile{t}"].append((qp[rows], tile))

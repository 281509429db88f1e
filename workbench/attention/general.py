"""The general chunked path: whole key rows per row block, probabilities materialised and edited (probability
edits: uniform, calibrate, mask_keys, streaming; and any differentiated forward). O(N·block) memory."""
from __future__ import annotations

from typing import Callable

import torch

from ..kernels import semantics
from .reduce import _NEG, BLOCK_ELEMENTS, MAX_BLOCK_ROWS, _allocate, _allocate_key_mass, _record, _RowStats
from .request import LayerRequest


def general_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    rows_visible: Callable[[int, int], torch.Tensor],
    q_pos: torch.Tensor,
    kv_offset: int = 0,
    sinks: torch.Tensor | None = None,
    request: LayerRequest | None = None,
    block_rows: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Every request: whole key rows per block, probabilities materialised (edits act on them; spans, tiles,
    key mass and top-k > 1 read them)."""
    request = request or LayerRequest()
    B, Hq, M, D = q.shape
    Hkv, N, Dv = k.shape[1], k.shape[2], v.shape[-1]
    rep = Hq // Hkv
    cdt = torch.promote_types(q.dtype, torch.float32)
    dev = q.device
    key_pos = torch.arange(N, device=dev) + kv_offset
    if block_rows is None:
        block_rows = max(1, min(M, MAX_BLOCK_ROWS, BLOCK_ELEMENTS // max(1, B * Hq * N)))
    out = torch.empty(B, Hq, M, Dv, dtype=v.dtype, device=dev)
    stats = _allocate(request, B, Hq, M, dev) if request.record else {}
    if request.record and request.key_mass:
        _allocate_key_mass(stats, B, Hq, N, dev)
    out_sum = torch.zeros(Hq, Dv, dtype=torch.float64, device=dev) if request.record_outputs else None
    prob_edits = request.edits_of("uniform", "calibrate", "mask_keys", "streaming")
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
            vis_h = semantics.edit_visibility(vis_h, prob_edits, qp, kp)
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
                p, p_sink = semantics.edit_probabilities(p, vis_h, prob_edits, qp, kp, p_sink)
                inv_l = torch.ones_like(inv_l)
        ob = (p.view(B, Hkv, rep, c, n) @ vb[:, :, None]).view(B, Hq, c, Dv) * inv_l[..., None]
        if request.record:
            rows = _RowStats(p, inv_l, s, centre, p_sink, sink_logit, key_max, arg, seen, lse, edited=bool(prob_edits))
            _record(stats, request, rows, vis, vis_h, i0, i1, qp, kp, lo)
        out[:, :, i0:i1] = ob.to(out.dtype)
    out = semantics.apply_output_edits(out, request.edits, q_pos)
    if out_sum is not None:
        stats["output_sum"] = out.double().sum(dim=(0, 2))
        stats["output_count"] = torch.tensor(B * M, device=dev)
    return out, stats

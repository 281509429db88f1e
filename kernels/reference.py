"""Float64 reference for the reducing attention: the full N×N matrix, small inputs only.

This file computes every statistic and edit the attention backends support the obvious way, from the
explicit probability matrix, using the definitions of :mod:`.semantics` (visibility, spans, edits,
top-k tie-break). The chunked torch path (``workbench.attention.chunked``) and the Triton kernel
(:mod:`.attention_stats`) are tested against it.

Conventions
- ``q`` is ``[B, Hq, M, D]``; ``k``/``v`` are ``[B, Hkv, N, D|Dv]``; query head ``h`` reads KV head
  ``h // (Hq // Hkv)`` (GQA/MQA).
- ``visible`` is the *structured* visibility, bool ``[B|1, M, N]`` (``[B|1, 1, M, N]`` also taken):
  True where query row ``i`` may attend to key ``j`` (see :func:`standard_visibility`).
- Positions are absolute: keys sit at ``kv_offset + arange(N)``, query row ``i`` at ``q_pos[i]``
  (default: the cache layout ``kv_offset + N - M + arange(M)``). Key columns, spans, tiles and edits
  are given in absolute positions; top-k indices come back as absolute key positions.
- ``sinks`` ``[Hq]`` are learned sink logits (GPT-OSS): an extra softmax slot that takes mass but
  has no value. ``lse`` and ``entropy`` include that slot; probabilities of real keys exclude it.
- A row that sees no key (and has no sink) has output 0, ``lse = -inf``, entropy 0, top-k index -1.
- ``edits``: ``HeadEdit``-like objects (see :mod:`.semantics`). ``lse`` is that of the scores after
  visibility edits; everything else is read off the edited probabilities.

Returned keys: ``out``, ``lse``, ``entropy``, ``topk_idx``, ``topk_prob``, ``probs`` (edited, real keys),
``p_sink`` (with sinks), and on request ``col_prob`` ``[B, Hq, M, NK]`` + ``col_visible`` ``[B, M, NK]``,
``span_mass`` ``[B, Hq, M, NS]``, ``key_mass`` ``[B, Hq, N]`` (Σ over rows of p) + ``key_count``
``[B, N]`` (rows that see each key, structured visibility), ``tile{t}`` = ``(q positions [r], probs
[B, Hq, r, k1 - k0])`` for each tile ``(q0, q1, k0, k1)`` (rows in ``[q0, q1)`` present in this call;
keys outside the cache are 0), ``dist_sum`` / ``dist_sq_sum`` ``[B, Hq, M]`` (:func:`semantics.distance_moments`),
``row_key_prob`` ``[B, Hq, M]`` for ``row_keys`` ``[B, M]`` (:func:`semantics.row_key_prob`).
"""
from __future__ import annotations

from typing import Sequence

import torch

from . import semantics
from .semantics import BIG

__all__ = ["BIG", "reference_attention", "standard_visibility"]


def standard_visibility(
    q_pos: torch.Tensor,
    n_keys: int,
    *,
    causal: bool = True,
    window: int | None = None,
    key_valid: torch.Tensor | None = None,
    kv_offset: int = 0,
) -> torch.Tensor:
    """Causal / sliding-window / key-padding visibility as a ``[B or 1, M, N]`` bool tensor
    (:func:`semantics.visibility` for keys at ``kv_offset + arange(n_keys)``)."""
    key_pos = semantics.key_positions(n_keys, kv_offset, q_pos.device)
    vis = semantics.visibility(q_pos, key_pos, causal=causal, window=window, key_valid=key_valid)
    return vis if key_valid is not None else vis[None]


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    visible: torch.Tensor,
    q_pos: torch.Tensor | None = None,
    kv_offset: int = 0,
    sinks: torch.Tensor | None = None,
    key_columns: torch.Tensor | None = None,
    spans: torch.Tensor | None = None,
    topk: int = 1,
    tiles: Sequence[tuple[int, int, int, int]] = (),
    key_mass: bool = False,
    edits: Sequence = (),
    distance_moments: bool = False,
    row_keys: torch.Tensor | None = None,
) -> dict:
    """All statistics from the explicit float64 probability matrix (see the module docstring)."""
    B, Hq, M, D = q.shape
    N = k.shape[2]
    rep = Hq // k.shape[1]
    dev = q.device
    key_pos = semantics.key_positions(N, kv_offset, dev)
    if q_pos is None:
        q_pos = key_pos[N - M :] if M <= N else torch.arange(M, device=dev) + kv_offset + N - M
    q_pos = q_pos.to(dev)
    qd, kd, vd = (t.double() for t in (q, k, v))
    kd = kd.repeat_interleave(rep, dim=1)
    vd = vd.repeat_interleave(rep, dim=1)
    vis_s = visible.bool().to(dev)
    if vis_s.dim() == 4:
        vis_s = vis_s[:, 0]
    vis_s = vis_s.expand(B, M, N)  # structured visibility, per sequence
    vis = semantics.edit_visibility(vis_s[:, None].expand(B, Hq, M, N), edits, q_pos, key_pos)
    s = (qd @ kd.transpose(-1, -2)) * scale
    s = s.masked_fill(~vis, float("-inf"))
    p, p_sink, lse = semantics.sink_softmax(s, sinks.double().to(dev).view(1, Hq, 1, 1) if sinks is not None else None)
    p, p_sink = semantics.edit_probabilities(p, vis, edits, q_pos, key_pos, p_sink)
    out = semantics.apply_output_edits(p @ vd, edits, q_pos)
    top_idx, top_prob = semantics.topk(p, vis, topk)
    top_idx = torch.where(top_idx >= 0, top_idx + kv_offset, -1)
    res = {"out": out, "lse": lse, "entropy": semantics.entropy(p, p_sink), "topk_idx": top_idx,
           "topk_prob": top_prob, "probs": p}  # fmt: skip
    if p_sink is not None:
        res["p_sink"] = p_sink
    if key_columns is not None:
        local = key_columns.to(dev).long() - kv_offset
        inside = (local >= 0) & (local < N)
        li = local.clamp(0, N - 1)
        res["col_prob"] = torch.where(inside, p[..., li], 0.0)
        res["col_visible"] = vis_s[..., li] & inside
    if spans is not None:
        member = semantics.span_membership(spans, q_pos, key_pos)  # [NS, M, N]
        res["span_mass"] = torch.einsum("bhmn,smn->bhms", p, member.double())
    if distance_moments:
        res["dist_sum"], res["dist_sq_sum"] = semantics.distance_moments(p, q_pos, key_pos)
    if row_keys is not None:
        res["row_key_prob"] = semantics.row_key_prob(p, row_keys.to(dev), key_pos)
    if key_mass:
        res["key_mass"] = p.sum(2)
        res["key_count"] = vis_s.sum(1)
    for t, (q0, q1, k0, k1) in enumerate(tiles):
        rows = (q_pos >= q0) & (q_pos < q1)
        kk = torch.arange(k0, k1, device=dev) - kv_offset
        inside = (kk >= 0) & (kk < N)
        tile = torch.where(inside, p[:, :, rows][..., kk.clamp(0, N - 1)], 0.0)
        res[f"tile{t}"] = (q_pos[rows], tile)
    return res


def example_edits(n_heads: int, q_first: int, n_rows: int, *, key_first: int = 0, sink: int = 2, recent: int = 5) -> list:
    """One edit of every probability kind on heads 0..3 (mod ``n_heads``), some limited to the later two
    thirds of the query rows (absolute positions ``q_first…q_first+n_rows``): the set the kernel tests and
    the GPU suite run. Keys are absolute positions from ``key_first``."""
    pos = torch.arange(q_first + n_rows // 3, q_first + n_rows)
    a = key_first
    return [
        semantics.Edit("uniform", 0 % n_heads, positions=pos),
        semantics.Edit("calibrate", 1 % n_heads, keys=torch.tensor([a, a + 2]), beta=0.4),
        semantics.Edit("mask_keys", 2 % n_heads, keys=torch.arange(a + 1, a + 4)),
        semantics.Edit("mask_keys", 2 % n_heads, keys=torch.tensor([q_first + n_rows // 2]), positions=pos),
        semantics.Edit("streaming", 3 % n_heads, sink=a + sink, recent=recent),
    ]


def max_errors(res: dict, ref: dict, *, tie_gap: float = 1e-5) -> dict[str, float]:
    """How far a backend's results ``res`` are from this reference's ``ref``, per statistic present in both.

    Largest absolute difference for ``out``, ``lse`` (``inf`` where finiteness differs), ``entropy``,
    ``topk_prob``, ``col_prob``, ``span_mass``, ``key_mass`` and each ``tile{t}`` (``inf`` if its rows differ);
    the number of mismatches for ``key_count`` and for ``topk_idx`` on the slots whose reference probability
    is apart from its neighbours by more than ``tie_gap`` or exactly tied (exact ties follow the lower-
    position rule everywhere); ``topk_idx_checked`` is the fraction of slots so compared.
    ``row_key_prob``: largest absolute difference (``inf`` where the NaN rows differ). The distance moments
    are compared relative to their scale, floored at one position: ``dist_sq_sum`` as
    ``|Δ| / max(1, ref)``, ``dist_sum`` as ``|Δ| / max(1, √ref_dist_sq_sum)`` (≥ ``Σ p·|d|``: the scale of
    the sum even where signed distances cancel)."""
    err: dict[str, float] = {}
    d = lambda t: t.detach().double().to(ref["lse"].device)  # noqa: E731
    for name in ("out", "entropy", "topk_prob", "col_prob", "span_mass", "key_mass"):
        if name in res and name in ref:
            a, r = d(res[name]), ref[name]
            err[name] = float("inf") if a.shape != r.shape else float((a - r).abs().max()) if r.numel() else 0.0
    if "lse" in res:
        a, r = d(res["lse"]), ref["lse"]
        fin = torch.isfinite(r)
        same = torch.equal(torch.isfinite(a), fin) and torch.equal(a[~fin], r[~fin])
        err["lse"] = float((a[fin] - r[fin]).abs().max()) if same and fin.any() else (0.0 if same else float("inf"))
    if "topk_idx" in res:
        p = ref["topk_prob"]
        gaps = (p[..., :-1] - p[..., 1:]).abs()
        sep = (gaps > tie_gap) | (gaps == 0)
        ones = torch.ones_like(p[..., :1], dtype=torch.bool)
        clear = torch.cat([ones, sep], -1) & torch.cat([sep, ones], -1)
        a = res["topk_idx"].to(p.device)
        err["topk_idx"] = float("inf") if a.shape != p.shape else float((a[clear] != ref["topk_idx"][clear]).sum())
        err["topk_idx_checked"] = float(clear.double().mean()) if clear.numel() else 1.0
    if "row_key_prob" in res and "row_key_prob" in ref:
        a, r = d(res["row_key_prob"]), ref["row_key_prob"]
        nan = torch.isnan(r)
        same = a.shape == r.shape and torch.equal(torch.isnan(a), nan)
        err["row_key_prob"] = float("inf") if not same else float((a - r).abs()[~nan].max()) if (~nan).any() else 0.0
    if "dist_sum" in ref and "dist_sq_sum" in ref:
        r1, r2 = ref["dist_sum"], ref["dist_sq_sum"]
        for name, r, scale in (("dist_sum", r1, r2.clamp_min(0).sqrt()), ("dist_sq_sum", r2, r2.abs())):
            if name in res:
                a = d(res[name])
                err[name] = (float("inf") if a.shape != r.shape else
                             float(((a - r).abs() / scale.clamp_min(1.0)).max()) if r.numel() else 0.0)
    if "key_count" in res and "key_count" in ref:
        err["key_count"] = float((res["key_count"].to(ref["key_count"].device) != ref["key_count"]).sum())
    t = 0
    while f"tile{t}" in ref:
        rq, rp = ref[f"tile{t}"]
        got = res.get(f"tile{t}")
        if got is None:
            err[f"tile{t}"] = float("inf")
        elif not rq.numel():
            err[f"tile{t}"] = 0.0 if got == [] else float("inf")
        else:
            kq = torch.cat([q for q, _ in got]).to(rq.device)  # a backend may return the rows in parts
            kp = torch.cat([p for _, p in got], dim=2)
            ok = torch.equal(kq, rq) and kp.shape == rp.shape
            err[f"tile{t}"] = float((d(kp) - rp).abs().max()) if ok else float("inf")
        t += 1
    return err

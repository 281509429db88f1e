"""What the reducing attention *means*: one definition of visibility, spans and every edit (torch).

Every backend — the float64 reference (:mod:`.reference`), the chunked torch path
(``workbench.attention.chunked``) and the Triton kernel (:mod:`.attention_stats`, whose device code
mirrors these functions and is tested against them) — follows the definitions below. The functions
are small, work on any leading dimensions and take *positions as tensors*, so a backend can call them
on a block of rows (``q_pos`` = the block's absolute query positions, ``key_pos`` = the keys it scored).

Coordinates. Positions are absolute: a query row sits at ``q_pos`` (its own key's position); keys sit
at ``key_pos`` (``kv_offset + arange(N)`` for a cache that starts at ``kv_offset``).

Visibility (structured: what the kernel handles natively). Query ``i`` sees key ``j`` iff
``(not causal or key_pos[j] <= q_pos[i])`` and ``(window is None or key_pos[j] > q_pos[i] - window)``
and ``key_valid[b, j]`` (key padding; query rows are never masked: a padded query row still sees the
real keys, and its statistics are simply ignored by the caller). This is transformers'
``causal_mask_function`` + ``sliding_window_overlay`` + ``padding_mask_function``.

Learned sinks (GPT-OSS ``s_aux``): one extra softmax slot per head with logit ``sinks[h]`` and no
value. It takes probability mass, so real keys' probabilities sum to ``1 - p_sink``; ``lse`` and
``entropy`` include the slot.

Spans ``(start, end, window)``: key ``j`` is in the span for row ``i`` iff
``start <= key_pos[j] < end`` and ``q_pos[i] - key_pos[j] < window`` (``window >= BIG`` = unlimited).

Edits (``HeadEdit``-like objects with ``kind, head, positions, keys, beta, sink, recent``), each on one
query head and, when ``positions`` is given, only on the rows whose ``q_pos`` is in it:

- visibility edits, applied to the scores before the softmax (so ``lse`` reflects them):
  ``mask_keys`` removes ``keys`` from view; ``streaming`` keeps only keys with
  ``key_pos < sink`` or ``key_pos > q_pos - recent`` (the first ``sink`` positions and the last
  ``recent`` keys up to the query);
- probability edits, applied to the normalised probabilities (``lse`` keeps the unedited value):
  ``uniform`` makes a row uniform over its visible keys (the learned-sink slot, if any, gets 0: the
  row is a distribution over keys; its output is the mean value of the visible keys);
  ``calibrate`` (ACT) scales the probabilities of ``keys`` by ``beta`` and gives the removed mass to
  the other keys in proportion to their probability, ``p_j *= (O + (1-β)·S) / O`` with ``S``/``O`` the
  row's mass on sink / other keys (the learned-sink slot is untouched; rows with ``O <= 1e-12`` have
  nowhere to move mass and stay unchanged).
  Visibility edits come first, then ``uniform``/``calibrate`` in list order.
- output edits (``zero``, ``mean``) replace a head's output rows after attention.

Statistics read off the *edited* probabilities ``p`` (what the model used): entropy (with the sink
slot), top-k (ties broken towards the lower key position; rows that see fewer than k keys get index
-1 and probability 0), key columns, span mass, tiles, ``key_mass[b, h, j] = Σ_i p[b, h, i, j]``.
``key_count[b, j]`` counts the rows that see key ``j`` under the *structured* visibility (edits are per
head, the count is per sequence).

Head-taxonomy statistics (docs/definitions.md), per row, off the same edited ``p``:
:func:`distance_moments` (``Σ_j p_ij·(q_pos_i − key_pos_j)`` and ``Σ_j p_ij·(q_pos_i − key_pos_j)²``) and
:func:`row_key_prob` (``p_{i, row_keys[b, i]}``, one chosen key per row: induction mass with
:func:`induction_keys`). Both are sums over keys, so a backend that scores keys in blocks adds the
blocks' results; both are linear in ``p`` (unnormalised rows times ``1/l`` give the same values).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

BIG = 2**30  # "unlimited" span window
VISIBILITY_EDITS = ("mask_keys", "streaming")
PROBABILITY_EDITS = ("uniform", "calibrate")
OUTPUT_EDITS = ("zero", "mean")
#: calibration leaves a row alone when its non-sink mass is below this (nowhere to move mass)
CALIBRATE_MIN_OTHER = 1e-12


@dataclass
class Edit:
    """One edit on one query head (``positions``: only those absolute query positions), the one type the
    reference, the chunked paths and the Triton wrapper read; the backend names it
    ``workbench.attention.request.HeadEdit``. Defined here so that ``kernels/`` imports without the rest of the
    library (e.g. on a GPU box)."""

    kind: str  # zero | mean | uniform | calibrate | mask_keys | streaming
    head: int
    positions: torch.Tensor | None = None
    keys: torch.Tensor | None = None  # calibrate: sink keys; mask_keys: removed keys
    beta: float = 1.0
    sink: int = 0  # streaming: first `sink` keys stay visible
    recent: int = 0  # streaming: and the last `recent` keys
    mean: torch.Tensor | None = None  # mean: replacement output [Dv]


def key_positions(n_keys: int, kv_offset: int = 0, device=None) -> torch.Tensor:
    """Absolute positions of ``n_keys`` cached keys starting at ``kv_offset``."""
    return torch.arange(n_keys, device=device) + kv_offset


def visibility(
    q_pos: torch.Tensor,
    key_pos: torch.Tensor,
    *,
    causal: bool = True,
    window: int | None = None,
    key_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Structured visibility: bool ``[M, N]``, or ``[B, M, N]`` with ``key_valid`` ``[B, N]`` (aligned with
    ``key_pos``). ``q_pos`` ``[M]`` and ``key_pos`` ``[N]`` are absolute positions."""
    i = q_pos[:, None]
    j = key_pos.to(q_pos.device)[None, :]
    vis = torch.ones(i.shape[0], j.shape[1], dtype=torch.bool, device=q_pos.device)
    if causal:
        vis &= j <= i
    if window is not None:
        vis &= j > i - window
    if key_valid is not None:
        vis = vis[None] & key_valid.to(q_pos.device).bool()[:, None, :]
    return vis


def span_membership(spans: torch.Tensor, q_pos: torch.Tensor, key_pos: torch.Tensor) -> torch.Tensor:
    """``[NS, M, N]`` bool: key ``key_pos[j]`` lies in span ``s = (start, end, window)`` for row ``q_pos[i]``."""
    sp = spans.to(q_pos.device).long()
    j = key_pos.to(q_pos.device)[None, None, :]
    start, end, window = (sp[:, c, None, None] for c in range(3))
    return (j >= start) & (j < end) & ((q_pos[None, :, None] - j) < window)


def rows_in(q_pos: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
    """``[M]`` bool: the rows an edit limited to ``positions`` (None = all rows) applies to."""
    if positions is None:
        return torch.ones_like(q_pos, dtype=torch.bool)
    return torch.isin(q_pos, positions.to(q_pos.device))


def streaming_visibility(q_pos: torch.Tensor, key_pos: torch.Tensor, sink: int, recent: int) -> torch.Tensor:
    """``[M, N]`` True where a streaming head may look: the first ``sink`` keys or the last ``recent`` (the
    ``streaming`` edit, and DuoAttention's streaming half during gate training)."""
    return (key_pos[None, :] < sink) | (key_pos[None, :] > q_pos[:, None] - recent)


def sink_softmax(s: torch.Tensor, sinks: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Softmax over the keys of scores ``s`` ``[..., N]`` (invisible keys ``-inf``) with the learned-sink slot:
    one more logit per row, ``sinks`` broadcast to ``s[..., :1]`` (``None``: no slot). Returns ``(p, p_sink,
    lse)``: ``p`` ``[..., N]`` sums to ``1 - p_sink``, ``lse`` includes the slot; a row that sees nothing (and
    has no slot) gets 0 everywhere and ``lse = -inf``."""
    full = torch.cat([s, sinks.expand(*s.shape[:-1], 1)], -1) if sinks is not None else s
    lse = torch.logsumexp(full, dim=-1)
    seen = torch.isfinite(lse)
    p_full = torch.exp(full - torch.where(seen, lse, 0.0)[..., None]).masked_fill(~seen[..., None], 0.0)
    return p_full[..., : s.shape[-1]], (p_full[..., -1] if sinks is not None else None), lse


def edit_visibility(vis: torch.Tensor, edits: Sequence, q_pos: torch.Tensor, key_pos: torch.Tensor) -> torch.Tensor:
    """Apply the ``mask_keys`` / ``streaming`` edits to per-head visibility ``[..., Hq, M, N]`` (a new tensor;
    other kinds are ignored)."""
    vis = vis.clone()
    kp = key_pos.to(q_pos.device)
    for e in edits:
        if e.kind not in VISIBILITY_EDITS:
            continue
        rows = rows_in(q_pos, e.positions)[:, None]
        if e.kind == "mask_keys":
            drop = torch.isin(kp, e.keys.to(kp.device))[None, :]
        else:
            drop = ~streaming_visibility(q_pos, kp, e.sink, e.recent)
        vis[..., e.head, :, :] &= ~(drop & rows)
    return vis


def edit_probabilities(
    p: torch.Tensor,
    vis: torch.Tensor,
    edits: Sequence,
    q_pos: torch.Tensor,
    key_pos: torch.Tensor,
    p_sink: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Apply the ``uniform`` / ``calibrate`` edits to normalised probabilities ``p`` ``[..., Hq, M, N]``
    (``vis``: the visibility they were computed under, after :func:`edit_visibility`; ``p_sink``
    ``[..., Hq, M]``: the learned-sink slot's probability, if any). Returns new ``(p, p_sink)``."""
    p = p.clone()
    p_sink = None if p_sink is None else p_sink.clone()
    kp = key_pos.to(q_pos.device)
    for e in edits:
        if e.kind not in PROBABILITY_EDITS:
            continue
        rows = rows_in(q_pos, e.positions)
        ph = p[..., e.head, :, :]
        if e.kind == "uniform":
            v = vis[..., e.head, :, :].to(p.dtype)
            new = v / v.sum(-1, keepdim=True).clamp_min(1.0)
            if p_sink is not None:
                p_sink[..., e.head, :] = torch.where(rows, 0.0, p_sink[..., e.head, :])
        else:
            is_sink = torch.isin(kp, e.keys.to(kp.device))
            sink_mass = (ph * is_sink).sum(-1, keepdim=True)
            other = (ph * ~is_sink).sum(-1, keepdim=True)  # summed, not 1 − S: exact when sinks dominate
            factor = (other + (1.0 - e.beta) * sink_mass) / other.clamp_min(1e-30)
            new = torch.where(is_sink, ph * e.beta, ph * factor)
            new = torch.where(other > CALIBRATE_MIN_OTHER, new, ph)
        p[..., e.head, :, :] = torch.where(rows[:, None], new, ph)
    return p, p_sink


def apply_output_edits(out: torch.Tensor, edits: Sequence, q_pos: torch.Tensor) -> torch.Tensor:
    """``zero`` / ``mean`` edits on output rows ``out`` ``[B, Hq, M, Dv]`` (a new tensor when any applies)."""
    edits = [e for e in edits if e.kind in OUTPUT_EDITS]
    if not edits:
        return out
    out = out.clone()
    for e in edits:
        rows = rows_in(q_pos, e.positions)
        value = 0.0 if e.kind == "zero" else e.mean.to(out.dtype).to(out.device)
        out[:, e.head, rows] = value
    return out


def entropy(p: torch.Tensor, p_sink: torch.Tensor | None = None) -> torch.Tensor:
    """Entropy (nats) of rows ``p`` ``[..., N]`` plus the learned-sink slot ``p_sink`` ``[...]``."""
    tiny = torch.finfo(p.dtype).tiny
    h = -(p * torch.log(p.clamp_min(tiny))).sum(-1)
    if p_sink is not None:
        h = h - p_sink * torch.log(p_sink.clamp_min(tiny))
    return h


def topk(p: torch.Tensor, vis: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` keys of rows ``p`` ``[..., N]`` among the visible ones: ``(index [..., k], prob [..., k])``.
    Ties go to the lower index (``torch.topk`` leaves tie order unspecified); slots beyond a row's visible
    keys hold index -1 and probability 0. Indices are into the last dimension."""
    n = p.shape[-1]
    masked = p.masked_fill(~vis.expand_as(p), -1.0)
    kk = min(k, n)
    if kk == 1:
        val, idx = masked.max(-1, keepdim=True)  # the first maximal index on ties (documented by torch.max)
    else:
        val, idx = _topk_lower_index_first(masked, kk)
    ok = val >= 0
    idx = torch.where(ok, idx, -1)
    prob = torch.where(ok, val, 0.0)
    if k > n:
        pad = [0, k - n]
        idx = torch.nn.functional.pad(idx, pad, value=-1)
        prob = torch.nn.functional.pad(prob, pad, value=0.0)
    return idx, prob


def _topk_lower_index_first(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``x.topk(k)`` (2 ≤ k ≤ N) with ties going to the lower index, as a stable descending sort would give,
    without sorting whole rows: the k winners are reordered stably, and only rows where equal values
    straddle the k-th place (e.g. a uniform row) are sorted in full."""
    n = x.shape[-1]
    val, idx = x.topk(min(k + 1, n), dim=-1)
    straddle = None
    if n > k:
        straddle = (val[..., k - 1] == val[..., k]) & (val[..., k - 1] >= 0)  # hidden keys (−1) are dropped anyway
        val, idx = val[..., :k], idx[..., :k]
    idx, order = idx.sort(-1)  # winners by index, then stably by value: equal values keep index order
    val, order = val.gather(-1, order).sort(dim=-1, descending=True, stable=True)
    idx = idx.gather(-1, order)
    if straddle is not None and bool(straddle.any()):
        sv, si = x[straddle].sort(dim=-1, descending=True, stable=True)
        val[straddle], idx[straddle] = sv[..., :k], si[..., :k]
    return val, idx


def distance_moments(p: torch.Tensor, q_pos: torch.Tensor, key_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention-weighted distance moments of rows ``p`` ``[..., M, N]`` (edited probabilities of real keys):
    ``(dist_sum, dist_sq_sum)``, each ``[..., M]``, with ``d_ij = q_pos[i] − key_pos[j]``::

        dist_sum[i]    = Σ_j p_ij · d_ij          (mean distance: the row's real-key mass is 1 without sinks)
        dist_sq_sum[i] = Σ_j p_ij · d_ij²         (variance = dist_sq_sum − dist_sum²)

    Over real keys only: the learned-sink slot has no position and contributes 0 (with sinks the row's
    real-key mass is ``1 − p_sink``); invisible keys have ``p = 0``, so a row that sees no key gives 0.
    Causal rows have ``d ≥ 0`` (0 = the row's own key); non-causal rows may have negative distances.
    A previous-token head gives (1, 1), a self head (0, 0), a first-token (BOS) head
    ``(q_pos, q_pos²)``; local heads have a small mean, induction heads a mean near the repeat distance.

    Blockwise: ``q_pos`` ``[M]`` / ``key_pos`` ``[N]`` are the block's absolute positions; add the results
    of a row block's key blocks. Computed in ``p``'s dtype (``d`` is exact below 2^24 in float32; ``d²``
    is rounded there; pass float64 ``p`` for exact sums at long lengths)."""
    d = (q_pos.to(p.device)[:, None] - key_pos.to(p.device)[None, :]).to(p.dtype)  # [M, N]
    return torch.einsum("...mn,mn->...m", p, d), torch.einsum("...mn,mn->...m", p, d * d)


def row_key_prob(p: torch.Tensor, row_keys: torch.Tensor, key_pos: torch.Tensor) -> torch.Tensor:
    """Probability each row puts on its own chosen key: ``[B, Hq, M]`` from ``p`` ``[B, Hq, M, N]`` and
    ``row_keys`` ``[B, M]`` (absolute key positions, ``-1`` = none; every query head of a sequence uses
    the same key)::

        row_key_prob[b, h, i] = p[b, h, i, j]  where key_pos[j] == row_keys[b, i]

    0 when that key is not visible to the row (after edits) or not among ``key_pos`` (outside the cache),
    NaN where ``row_keys`` is negative (nothing to measure: e.g. the token has not occurred before). The
    learned-sink slot is never a row key. With ``row_keys`` = :func:`induction_keys` this is the
    induction mass ``p_{i, j*+1}``.

    Blockwise: ``key_pos`` ``[N]`` are the block's absolute key positions (any order); add the results of
    a row block's key blocks (0 outside the block; NaN stays NaN)."""
    rk = row_keys.to(p.device).long()
    hit = (rk[..., None] == key_pos.to(p.device)[None, None, :]).to(p.dtype)  # [B, M, N], one-hot or empty
    val = torch.einsum("bhmn,bmn->bhm", p, hit)  # exact: a single p (or nothing) survives per row
    return torch.where(rk[:, None, :] < 0, float("nan"), val)


def induction_keys(token_ids: torch.Tensor, q_pos: torch.Tensor | None = None,
                   valid: torch.Tensor | None = None) -> torch.Tensor:
    """The induction key of each row: ``j* + 1`` where ``j*`` is the most recent earlier position with
    ``token[j*] == token[i]``, ``-1`` when the token has not occurred before (docs/definitions.md).

    ``token_ids`` ``[B, T]`` are the tokens at absolute positions ``0..T-1`` (the cache and the current
    rows); ``q_pos`` ``[M]`` picks the rows (default: all ``T``); ``valid`` ``[B, T]`` (False = padding)
    keeps padding positions out (never an occurrence, row key ``-1``). Returns ``[B, M]`` long, the
    ``row_keys`` of :func:`row_key_prob`. ``j* + 1 ≤ i`` (a repeated token ``a a`` points at the row itself).
    O(T log T): a stable sort groups each token's positions in order."""
    ids = token_ids.long()
    B, T = ids.shape
    pos = torch.arange(T, device=ids.device).expand(B, T)
    if valid is not None:  # padding: distinct negative ids that match nothing
        ids = torch.where(valid.to(ids.device).bool(), ids, -1 - pos)
    vals, order = torch.sort(ids, dim=-1, stable=True)
    same = vals[:, 1:] == vals[:, :-1]
    prev = torch.full((B, T), -1, dtype=torch.long, device=ids.device)
    prev.scatter_(1, order[:, 1:], torch.where(same, order[:, :-1], -1))
    keys = torch.where(prev >= 0, prev + 1, -1)
    if valid is not None:
        keys = torch.where(valid.to(ids.device).bool(), keys, -1)
    return keys if q_pos is None else keys[:, q_pos.to(ids.device).long()]

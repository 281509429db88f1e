"""Fused attention forward + reduced statistics and edits, FlashAttention-style (Triton), never N×N.

What it computes (definitions: :mod:`.semantics`; float64 ground truth: :mod:`.reference`):

- ``out``        ``[B, Hq, M, Dv]`` (dtype of ``q``): softmax(QKᵀ·scale)V over the visible keys, after edits;
- ``lse``        ``[B, Hq, M]``: log-sum-exp over the visible keys (after visibility edits) and the
  learned-sink slot; probability edits (uniform, calibrate) leave it unchanged;
- ``entropy``    ``[B, Hq, M]``: entropy (nats) of the used distribution incl. the sink slot;
- ``topk_idx`` / ``topk_prob`` ``[B, Hq, M, k]`` (k ≤ 8): top-k absolute key positions and their
  probabilities, ties to the lower position, ``-1`` / ``0`` beyond a row's visible keys;
- ``col_prob``   ``[B, Hq, M, NK]``: probabilities of given absolute key positions (0 if unseen);
- ``span_mass``  ``[B, Hq, M, NS]``: probability mass on spans ``(start, end, window)``;
- ``key_mass``   ``[B, Hq, N]`` and ``key_count`` ``[B, N]``: attention each key receives summed over
  the rows, and how many rows see it (structured visibility);
- ``tile{t}``    ``(q positions [r], probs [B, Hq, r, k1-k0])``: exact windows of the matrix;
- ``dist_sum`` / ``dist_sq_sum`` ``[B, Hq, M]``: ``Σ_j p_ij·(q_pos_i − key_pos_j)`` and ``Σ_j p_ij·(…)²``
  over real keys (head taxonomy: mean / variance of the attended distance);
- ``row_key_prob`` ``[B, Hq, M]``: ``p`` at one absolute key per row (``row_keys`` ``[B, M]``; NaN where -1).
All statistics are float32 whatever the input dtype (fp16 / bf16 / fp32).

Visibility is structured: causal, sliding window (``key > q - window``) and key padding, with query
row ``i`` at absolute position ``q_offset + i`` and key ``j`` at ``kv_offset + j``. Programs skip key
blocks outside their causal / window band. Edits (per query head, optionally limited to query
positions) are compiled on the host into a per-(head, row) flag word and a per-(head, key) flag word:
bits 0-7 = ``mask_keys`` edit slot e applies to the row / drops the key, bit 8 = ``streaming``,
bit 9 = ``uniform``, bit 10 = ``calibrate`` (key flag: an ACT sink key).

Every probability edit is an *adjustment of the scores* before an ordinary softmax, so one online
softmax serves them all and every statistic is read off the probabilities actually used:
``mask_keys`` / ``streaming`` set scores to −∞; ``uniform`` sets the visible scores to 0 and drops the
sink slot; ``calibrate`` adds ``log β`` to sink-key scores and ``log c``, ``c = (O + (1-β)S)/O``, to the
others — this keeps the normaliser (βS + cO = S + O), so the result is exactly ACT's rescaled rows.

Passes (each a kernel; only the ones a request needs run):

A. ``_norm_kernel`` (rows of heads with ``uniform``/``calibrate`` edits): one sweep over the visible
   keys (QKᵀ only) for the row max ``m``, ``l_S = Σ_sink-keys e^{s-m}`` and ``l_O`` (the rest, summed
   separately: exact when sinks dominate) → the unedited ``lse`` that is reported and calibration's
   ``c``. Split over keys like pass B; pass B merges the partials in its prologue.
B. ``_fwd_kernel``: one program per (``BLOCK_M`` rows, batch·head[, key split]). Online softmax over
   the adjusted scores with running max ``m``, ``l = Σ e^{s-m}``, ``U = Σ e^{s-m}(s-m)`` (entropy
   ``H = log l − U/l`` plus the sink-slot terms), ``acc = Σ e^{s-m}v``, span accumulators, the distance
   state (mean ``μ`` and centred second moment ``M2 = Σ e^{s-m}(d − μ)²``: each key block's own mean and
   moment, exactly centred inside the block, merged by Chan's pairwise update and rescaled like ``l``),
   and a running top-k list in registers (each key block gives up its k best by repeated max; a candidate
   replaces the list's worst — lowest score, then highest position — only if strictly better, which with
   key blocks visited in order yields the lower-position tie-break). Decode steps (few rows, long cache) split the
   keys over several programs (flash-decoding) that write partial states.
C. ``_combine_kernel`` (split only): merges the partial states (lse-weighted: ``e^{m_s-m}``; distance
   states by the same pairwise update; top-k lists by insertion in split order) and runs the same
   epilogue as B (``_finish``).
D. ``_key_mass_kernel`` (``key_mass``): one program per (key block, batch·query head) sweeps the rows that
   can see the block, recomputes the adjusted scores and sums ``p = e^{s'-nrm}`` over rows with the row
   normaliser ``nrm`` saved by B; counts the rows that see each key (written by head 0 of each batch).
E. ``_probs_at_kernel`` (``key_columns``, tiles, ``row_keys``): probabilities at given rows × given keys
   from the saved normalisers (a second pass; it never needs more than the requested cells). Row keys:
   each row block gathers its rows' own keys, scores that ``BLOCK_M × BLOCK_M`` tile and keeps its diagonal.

Numerics: scores, softmax and all statistics accumulate in float32 (``tl.dot`` on float32 inputs uses
``input_precision="ieee"``: no TF32). For fp16/bf16 inputs the probabilities are cast to the input
dtype for the ``P·V`` product (the usual FlashAttention practice), so ``out`` has input-dtype accuracy.
Running maxima start at −1e30, not −∞ (−∞·0 = NaN).
Distance moments: distances are exact integers in float32 (below 2^24); no raw ``Σ p·d²`` is ever summed
— each block contributes its mass, its mean and its centred moment (offsets < ``BLOCK_N``), merged with
``M2 += M2_b + (μ_b − μ)²·l·l_b/(l + l_b)`` — so ``μ`` and ``M2/l`` keep float32 *relative* precision even
where the variance is tiny next to ``μ²`` (a sharp head 100K tokens back). The outputs
``dist_sum = w·μ`` and ``dist_sq_sum = w·(M2/l + μ²)`` (``w``: the real keys' mass) are then within a few
1e-7 relative of float64 (measured at 131072 keys), i.e. as exact as the probabilities; a variance formed
from them in float32 carries an absolute error ~``2^-24·dist_sq_sum`` (±~10³ positions² at a mean
distance of 10⁵), a limit of the float32 outputs, not of the accumulation.

The Triton functions are JIT-decorated lazily on first use (:func:`_build`), so ``TRITON_INTERPRET=1``
only has to be set before the first *call* (not before importing this module) to run on CPU.
"""
from __future__ import annotations

import os
from typing import Sequence

import torch

from . import semantics
from .capabilities import MAX_MASK_EDITS, MAX_SPANS, MAX_TOPK

try:  # triton is optional: the library falls back to its torch path without it
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - depends on the environment
    triton = None
    tl = None

__all__ = ["attention_stats_triton", "triton_available", "MAX_TOPK", "MAX_SPANS", "MAX_MASK_EDITS"]

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256
#: decode splitting: aim for this many programs per SM, each split covering at least this many key blocks
_PROGRAMS_PER_SM = 2
_MIN_BLOCKS_PER_SPLIT = 4
#: the SM count the split heuristic assumes under the interpreter (tests raise it to exercise splitting)
INTERPRETER_SMS = 1
_NEG = -1.0e30

# flag words (see the module docstring); the device code reads the same values through the
# tl.constexpr copies below
MASK_BITS = 0xFF
STREAM_BIT = 1 << 8
UNIFORM_BIT = 1 << 9
CALIB_BIT = 1 << 10

_BUILT = False


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def triton_available() -> bool:
    """True when triton imports and either CUDA is available or ``TRITON_INTERPRET=1``; never raises."""
    try:
        if triton is None:
            return False
        return bool(_interpreting() or torch.cuda.is_available())
    except Exception:  # pragma: no cover
        return False


def _next_pow2(x: int) -> int:
    return 1 if x <= 1 else 1 << (int(x) - 1).bit_length()


# ---------------------------------------------------------------------------------------------------
# Device code. Plain functions here; _build() replaces each module global by its triton.jit version
# (device functions first, so kernels resolve their callees as jitted functions).
# ---------------------------------------------------------------------------------------------------
_DEVICE_FUNCTIONS = ("_band", "_struct_vis", "_key_flags", "_edit_vis", "_adjust", "_topk_insert", "_topk_pop",
                     "_pre_rows", "_moments_merge", "_scan", "_finish")  # fmt: skip
_KERNELS = ("_norm_kernel", "_fwd_kernel", "_combine_kernel", "_key_mass_kernel", "_probs_at_kernel")

if tl is not None:
    _MASK_BITS_C = tl.constexpr(MASK_BITS)
    _STREAM_BIT_C = tl.constexpr(STREAM_BIT)
    _UNIFORM_BIT_C = tl.constexpr(UNIFORM_BIT)
    _CALIB_BIT_C = tl.constexpr(CALIB_BIT)
    _PRE_BITS_C = tl.constexpr(UNIFORM_BIT | CALIB_BIT)
    _NEG_C = tl.constexpr(_NEG)
    _BIG_IDX_C = tl.constexpr(2**30)
    _CAL_MIN_OTHER_C = tl.constexpr(semantics.CALIBRATE_MIN_OTHER)

    def _struct_vis(cols, cvalid, q_pos, row_ok, kvm, window, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                    HAS_KV: tl.constexpr):
        """semantics.visibility for local key indices ``cols`` and local query positions ``q_pos``."""
        vis = row_ok[:, None] & cvalid[None, :]
        if CAUSAL:
            vis = vis & (cols[None, :] <= q_pos[:, None])
        if HAS_WINDOW:
            vis = vis & (cols[None, :] > q_pos[:, None] - window)
        if HAS_KV:
            vis = vis & (kvm != 0)[None, :]
        return vis

    def _key_flags(KeyF, h, N, cols, cvalid, HAS_KEYF: tl.constexpr):
        if HAS_KEYF:
            kf = tl.load(KeyF + h * N + cols, mask=cvalid, other=0)
        else:
            kf = tl.full(cols.shape, 0, dtype=tl.int32)
        return kf

    def _edit_vis(vis, cols, q_pos, rowf, kf, st_sink, st_recent, HAS_KEYF: tl.constexpr, HAS_STREAM: tl.constexpr):
        """semantics.edit_visibility: mask_keys (flag bits 0-7 shared by row and key) and streaming."""
        if HAS_KEYF:
            vis = vis & ((rowf[:, None] & kf[None, :] & _MASK_BITS_C) == 0)
        if HAS_STREAM:
            keep = (cols[None, :] < st_sink) | (cols[None, :] > q_pos[:, None] - st_recent)
            vis = vis & (keep | ((rowf & _STREAM_BIT_C) == 0)[:, None])
        return vis

    def _adjust(s, vis, rowf, kf, log_ms, log_mo, HAS_UNIFORM: tl.constexpr, HAS_CALIB: tl.constexpr):
        """Scores whose plain softmax is the edited distribution (−∞ where invisible)."""
        if HAS_CALIB:  # log β on sink keys, log c on the others (both 0 on rows not calibrated)
            s = s + tl.where(((kf & _CALIB_BIT_C) != 0)[None, :], log_ms[:, None], log_mo[:, None])
        if HAS_UNIFORM:
            s = tl.where(((rowf & _UNIFORM_BIT_C) != 0)[:, None], 0.0, s)
        return tl.where(vis, s, float("-inf"))

    def _topk_insert(tv, ti, v, j, slot_ok):
        """Insert candidate (score ``v``, key ``j``) per row into the running list if strictly better than
        its worst entry (lowest score, then highest key: unfilled slots hold −∞ and distinct negative keys)."""
        wv = tl.min(tl.where(slot_ok, tv, float("inf")), 1)
        worst = slot_ok & (tv == wv[:, None])
        wi = tl.max(tl.where(worst, ti, -_BIG_IDX_C), 1)
        hit = worst & (ti == wi[:, None]) & (v > wv)[:, None]
        return tl.where(hit, v[:, None], tv), tl.where(hit, j[:, None], ti)

    def _topk_pop(tv, ti, slot_ok):
        """Remove and return the best entry per row (highest score, then lowest key)."""
        bv = tl.max(tl.where(slot_ok, tv, float("-inf")), 1)
        best = slot_ok & (tv == bv[:, None])
        bi = tl.min(tl.where(best, ti, _BIG_IDX_C), 1)
        hit = best & (ti == bi[:, None])
        return tl.where(hit, float("-inf"), tv), bv, bi

    def _pre_rows(PreM, PreLS, PreLO, pid_bh, BH, offs_m, row_ok, M, S, rowf, sink, beta,
                  HAS_SINK: tl.constexpr, HAS_CALIB: tl.constexpr):
        """Merge pass A's split partials: the unedited lse of each row and calibration's log-multipliers."""
        base = pid_bh.to(tl.int64) * M + offs_m
        plane = (BH * M).to(tl.int64)  # one split's [BH, M] plane; 64-bit: splits·BH·M may pass 2^31
        m = tl.full(offs_m.shape, _NEG_C, dtype=tl.float32)
        for s in range(S):
            m = tl.maximum(m, tl.load(PreM + s * plane + base, mask=row_ok, other=_NEG_C))
        l_s = tl.full(offs_m.shape, 0, dtype=tl.float32)
        l_o = tl.full(offs_m.shape, 0, dtype=tl.float32)
        for s in range(S):
            w = tl.exp(tl.load(PreM + s * plane + base, mask=row_ok, other=_NEG_C) - m)
            l_s += tl.load(PreLS + s * plane + base, mask=row_ok, other=0.0) * w
            l_o += tl.load(PreLO + s * plane + base, mask=row_ok, other=0.0) * w
        l = l_s + l_o
        if HAS_SINK:
            mx = tl.maximum(m, sink)
            lse = mx + tl.log(l * tl.exp(m - mx) + tl.exp(sink - mx))
        else:
            lse = tl.where(l > 0.0, m + tl.log(tl.where(l > 0.0, l, 1.0)), float("-inf"))
        log_ms = tl.full(offs_m.shape, 0, dtype=tl.float32)
        log_mo = tl.full(offs_m.shape, 0, dtype=tl.float32)
        if HAS_CALIB:
            lse_s = tl.where(l > 0.0, lse, 0.0)  # finite everywhere: no inf·0 in lanes that where() drops
            other = tl.where(l > 0.0, l_o * tl.exp(m - lse_s), 0.0)  # O as a fraction of the row (incl. sink slot)
            on = ((rowf & _CALIB_BIT_C) != 0) & (other > _CAL_MIN_OTHER_C)
            c = (l_o + (1.0 - beta) * l_s) / tl.maximum(l_o, 1e-30)
            log_ms = tl.where(on, tl.log(beta), 0.0)
            log_mo = tl.where(on, tl.log(tl.where(on, c, 1.0)), 0.0)
        return lse, log_ms, log_mo

    def _moments_merge(mu, m2, l, mu_b, m2_b, l_b):
        """Merge two weighted distance states (mass ``l``, mean ``mu``, centred second moment
        ``m2 = Σ w·(d − mu)²``), Chan et al.'s pairwise update: no large raw moments are ever summed,
        so the variance keeps its relative precision where it is small next to ``mu²``."""
        tot = l + l_b
        w_b = tl.where(l_b > 0.0, l_b / tl.where(tot > 0.0, tot, 1.0), 0.0)
        dl = mu_b - mu
        return mu + dl * w_b, m2 + m2_b + dl * dl * l * w_b

    def _scan(q, k_base, v_base, skn, skd, svn, svd, KeyValid, kv_base, skvn, KeyF, Spans,
              h, N, q_pos, row_ok, rowf, log_ms, log_mo, st_sink, st_recent, window, scale, NS, lo, hi,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_D: tl.constexpr, D_PAD: tl.constexpr,
              HEAD_DV: tl.constexpr, DV_PAD: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
              HAS_KV: tl.constexpr, HAS_KEYF: tl.constexpr, HAS_STREAM: tl.constexpr, HAS_UNIFORM: tl.constexpr,
              HAS_CALIB: tl.constexpr, STATS: tl.constexpr, TOPK: tl.constexpr, KPAD: tl.constexpr,
              HAS_SPANS: tl.constexpr, NS_PAD: tl.constexpr, DOT_PREC: tl.constexpr, DIST: tl.constexpr):
        """Online softmax of the adjusted scores over key blocks [lo, hi): (m, l, U, acc, top-k, spans,
        distance mean and centred second moment)."""
        offs_n0 = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, D_PAD)
        offs_dv = tl.arange(0, DV_PAD)
        slot = tl.arange(0, KPAD)
        slot_ok = (slot < TOPK)[None, :]
        m_i = tl.full([BLOCK_M], _NEG_C, dtype=tl.float32)
        l_i = tl.full([BLOCK_M], 0, dtype=tl.float32)
        u_i = tl.full([BLOCK_M], 0, dtype=tl.float32)
        acc = tl.full([BLOCK_M, DV_PAD], 0, dtype=tl.float32)
        tv = tl.full([BLOCK_M, KPAD], float("-inf"), dtype=tl.float32)
        ti = tl.full([BLOCK_M, KPAD], 0, dtype=tl.int32) - 1 - slot[None, :]  # distinct placeholders
        span_cols = tl.arange(0, NS_PAD)
        span_acc = tl.full([BLOCK_M, NS_PAD], 0, dtype=tl.float32)
        mu_i = tl.full([BLOCK_M], 0, dtype=tl.float32)
        m2_i = tl.full([BLOCK_M], 0, dtype=tl.float32)
        # distance of key column c from the block's middle; d_ij = q_pos_i - start_n - (BLOCK_N-1)/2 + t_c
        t_col = (BLOCK_N - 1) * 0.5 - offs_n0.to(tl.float32)
        for start_n in range(lo, hi, BLOCK_N):
            offs_n = start_n + offs_n0
            col_ok = offs_n < N
            kt = tl.load(k_base + offs_n[None, :] * skn + offs_d[:, None] * skd,
                         mask=col_ok[None, :] & (offs_d[:, None] < HEAD_D), other=0.0)
            s = tl.dot(q, kt, input_precision=DOT_PREC) * scale
            if HAS_KV:
                kvm = tl.load(KeyValid + kv_base + offs_n * skvn, mask=col_ok, other=0)
            else:
                kvm = col_ok
            kf = _key_flags(KeyF, h, N, offs_n, col_ok, HAS_KEYF)
            vis = _struct_vis(offs_n, col_ok, q_pos, row_ok, kvm, window, CAUSAL, HAS_WINDOW, HAS_KV)
            vis = _edit_vis(vis, offs_n, q_pos, rowf, kf, st_sink, st_recent, HAS_KEYF, HAS_STREAM)
            s = _adjust(s, vis, rowf, kf, log_ms, log_mo, HAS_UNIFORM, HAS_CALIB)

            if STATS:  # the block maximum is also the first top-k candidate
                bv, bj = tl.max(s, 1, return_indices=True, return_indices_tie_break_left=True)
            else:
                bv = tl.max(s, 1)
            m_new = tl.maximum(m_i, bv)
            alpha = tl.exp(m_i - m_new)
            sm = tl.where(vis, s - m_new[:, None], 0.0)
            p = tl.where(vis, tl.exp(sm), 0.0)
            if STATS:  # before l is updated: U rescales with the old l
                u_i = (u_i + (m_i - m_new) * l_i) * alpha + tl.sum(p * sm, 1)
            p_sum = tl.sum(p, 1)
            if DIST:  # the block's (mass, mean distance, centred moment), exactly centred, merged in
                t_bar = tl.sum(p * t_col[None, :], 1) / tl.where(p_sum > 0.0, p_sum, 1.0)
                dt = t_col[None, :] - t_bar[:, None]  # |dt| < BLOCK_N: small, no raw d² is ever formed
                m2_b = tl.sum(p * dt * dt, 1)
                mu_b = (q_pos - start_n).to(tl.float32) - (BLOCK_N - 1) * 0.5 + t_bar
                mu_i, m2_i = _moments_merge(mu_i, m2_i * alpha, l_i * alpha, mu_b, m2_b, p_sum)
            l_i = l_i * alpha + p_sum
            vb = tl.load(v_base + offs_n[:, None] * svn + offs_dv[None, :] * svd,
                         mask=col_ok[:, None] & (offs_dv[None, :] < HEAD_DV), other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(vb.dtype), vb, input_precision=DOT_PREC)
            if STATS:
                sw = s
                for t in tl.static_range(TOPK):  # the block's best keys, in rank order
                    if t > 0:
                        sw = tl.where(offs_n0[None, :] == bj[:, None], float("-inf"), sw)
                        bv, bj = tl.max(sw, 1, return_indices=True, return_indices_tie_break_left=True)
                    tv, ti = _topk_insert(tv, ti, bv, start_n + bj, slot_ok)
                if HAS_SPANS:
                    span_acc = span_acc * alpha[:, None]
                    for si in range(NS):
                        st = tl.load(Spans + si * 3)
                        en = tl.load(Spans + si * 3 + 1)
                        wn = tl.load(Spans + si * 3 + 2)
                        if (st < start_n + BLOCK_N) & (en > start_n):
                            mem = ((offs_n[None, :] >= st) & (offs_n[None, :] < en)
                                   & ((q_pos[:, None] - offs_n[None, :]) < wn))
                            c = tl.sum(tl.where(mem, p, 0.0), 1)
                            span_acc += tl.where(span_cols[None, :] == si, c[:, None], 0.0)
            m_i = m_new
        return m_i, l_i, u_i, acc, tv, ti, span_acc, mu_i, m2_i

    def _finish(m, l, u, acc, tv, ti, span_acc, mu, m2, rowf, lse_raw, sink, pid_bh, b, h, offs_m, row_ok, M,
                kv_off, Out, sob, soh, som, sod, Lse, Ent, TopIdx, TopProb, SpanMass, Aux, DistSum, DistSq, log_ms,
                log_mo, BH, NS,
                BLOCK_M: tl.constexpr, HEAD_DV: tl.constexpr, DV_PAD: tl.constexpr, HAS_SINK: tl.constexpr,
                HAS_UNIFORM: tl.constexpr, HAS_PRE: tl.constexpr, STATS: tl.constexpr, TOPK: tl.constexpr,
                KPAD: tl.constexpr, HAS_SPANS: tl.constexpr, NS_PAD: tl.constexpr, STORE_AUX: tl.constexpr,
                DIST: tl.constexpr):
        """Epilogue shared by the unsplit forward and the split combine: normalise and store."""
        has = l > 0.0
        l_safe = tl.where(has, l, 1.0)
        if HAS_SINK:
            sl = tl.full([BLOCK_M], 0, dtype=tl.float32) + sink
            if HAS_UNIFORM:  # a uniform row is a distribution over its keys: no sink slot
                sl = tl.where((rowf & _UNIFORM_BIT_C) != 0, _NEG_C, sl)
            live = has | (sl > _NEG_C)
            mx = tl.maximum(m, sl)
            nrm = tl.where(live, mx + tl.log(l * tl.exp(m - mx) + tl.exp(sl - mx)), float("-inf"))
            nrm_s = tl.where(live, nrm, 0.0)  # finite: no inf·0 in lanes that where() drops
            f = tl.where(has, 1.0 / (l_safe + tl.exp(tl.minimum(sl - m, 80.0))), 0.0)  # e^-80: below fp32 probs
            p_sink = tl.where(live, tl.exp(sl - nrm_s), 0.0)
            ent = tl.where(has, l * f * ((nrm_s - m) - u / l_safe), 0.0)
            ent += tl.where(p_sink > 0.0, p_sink * (nrm_s - sl), 0.0)
        else:
            nrm = tl.where(has, m + tl.log(l_safe), float("-inf"))
            nrm_s = tl.where(has, nrm, 0.0)
            f = tl.where(has, 1.0 / l_safe, 0.0)
            ent = tl.where(has, tl.log(l_safe) - u / l_safe, 0.0)

        offs_dv = tl.arange(0, DV_PAD)
        tl.store(Out + b * sob + h.to(tl.int64) * soh + offs_m[:, None] * som + offs_dv[None, :] * sod,
                 (acc * f[:, None]).to(Out.dtype.element_ty), mask=row_ok[:, None] & (offs_dv[None, :] < HEAD_DV))
        row_off = pid_bh.to(tl.int64) * M + offs_m
        if STORE_AUX:  # what passes D/E need to rebuild any probability: normaliser, calibration multipliers
            tl.store(Aux + row_off, nrm_s, mask=row_ok)  # rows that see nothing never use it
            tl.store(Aux + BH * M + row_off, log_ms, mask=row_ok)
            tl.store(Aux + 2 * BH * M + row_off, log_mo, mask=row_ok)
        if STATS:
            lse = nrm
            if HAS_PRE:  # rows under uniform / calibrate report the unedited lse
                lse = tl.where((rowf & _PRE_BITS_C) != 0, lse_raw, nrm)
            tl.store(Lse + row_off, lse, mask=row_ok)
            tl.store(Ent + row_off, ent, mask=row_ok)
            slot_ok = (tl.arange(0, KPAD) < TOPK)[None, :]
            for t in tl.static_range(TOPK):
                tv, bv, bi = _topk_pop(tv, ti, slot_ok)
                ok = bv > float("-inf")
                tl.store(TopIdx + row_off * TOPK + t, tl.where(ok, bi.to(tl.int64) + kv_off, -1), mask=row_ok)
                tl.store(TopProb + row_off * TOPK + t, tl.where(ok, tl.exp(bv - nrm_s), 0.0),
                         mask=row_ok)
            if HAS_SPANS:
                span_cols = tl.arange(0, NS_PAD)
                tl.store(SpanMass + row_off[:, None] * NS + span_cols[None, :], span_acc * f[:, None],
                         mask=row_ok[:, None] & (span_cols[None, :] < NS))
            if DIST:  # Σ p·d = w·mu, Σ p·d² = w·(m2/l + mu²); w = l·f: the real keys' mass (sink slot: no d)
                w = l * f
                tl.store(DistSum + row_off, mu * w, mask=row_ok)
                tl.store(DistSq + row_off, m2 * f + mu * mu * w, mask=row_ok)

    def _norm_kernel(
        Q, K, KeyValid, RowF, KeyF, StreamSink, StreamRecent, HeadPre, PreM, PreLS, PreLO,
        sqb, sqh, sqm, sqd, skb, skh, skn, skd, skvb, skvn,
        H, REP, M, N, q_off, window, scale, split_lo, chunk,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_D: tl.constexpr, D_PAD: tl.constexpr,
        CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_KV: tl.constexpr, HAS_KEYF: tl.constexpr,
        HAS_STREAM: tl.constexpr, HAS_CALIB: tl.constexpr, DOT_PREC: tl.constexpr,
    ):
        """Pass A: unedited row max and (sink-key, other) masses over the visible keys of one split."""
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        pid_s = tl.program_id(2)
        BH = tl.num_programs(1)
        b = (pid_bh // H).to(tl.int64)
        h = pid_bh % H
        hk = (h // REP).to(tl.int64)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n0 = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, D_PAD)
        row_ok = offs_m < M
        q_pos = q_off + offs_m
        q = tl.load(Q + b * sqb + h.to(tl.int64) * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
                    mask=row_ok[:, None] & (offs_d[None, :] < HEAD_D), other=0.0)
        rowf = tl.load(RowF + h * M + offs_m, mask=row_ok, other=0)
        st_sink = tl.load(StreamSink + h)
        st_recent = tl.load(StreamRecent + h)
        k_base = K + b * skb + hk * skh
        lo, hi = _band(pid_m, q_off, M, N, window, BLOCK_M, BLOCK_N, CAUSAL, HAS_WINDOW)
        lo = tl.maximum(lo, split_lo + pid_s * chunk)
        hi = tl.minimum(hi, split_lo + (pid_s + 1) * chunk)
        if tl.load(HeadPre + h) == 0:  # heads without uniform/calibrate edits need no pass A
            hi = lo
        m_i = tl.full([BLOCK_M], _NEG_C, dtype=tl.float32)
        l_s = tl.full([BLOCK_M], 0, dtype=tl.float32)
        l_o = tl.full([BLOCK_M], 0, dtype=tl.float32)
        for start_n in range(lo, hi, BLOCK_N):
            offs_n = start_n + offs_n0
            col_ok = offs_n < N
            kt = tl.load(k_base + offs_n[None, :] * skn + offs_d[:, None] * skd,
                         mask=col_ok[None, :] & (offs_d[:, None] < HEAD_D), other=0.0)
            s = tl.dot(q, kt, input_precision=DOT_PREC) * scale
            if HAS_KV:
                kvm = tl.load(KeyValid + b * skvb + offs_n * skvn, mask=col_ok, other=0)
            else:
                kvm = col_ok
            kf = _key_flags(KeyF, h, N, offs_n, col_ok, HAS_KEYF)
            vis = _struct_vis(offs_n, col_ok, q_pos, row_ok, kvm, window, CAUSAL, HAS_WINDOW, HAS_KV)
            vis = _edit_vis(vis, offs_n, q_pos, rowf, kf, st_sink, st_recent, HAS_KEYF, HAS_STREAM)
            s = tl.where(vis, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp(m_i - m_new)
            p = tl.where(vis, tl.exp(s - m_new[:, None]), 0.0)
            if HAS_CALIB:
                is_sink = ((kf & _CALIB_BIT_C) != 0)[None, :]
                l_s = l_s * alpha + tl.sum(tl.where(is_sink, p, 0.0), 1)
                l_o = l_o * alpha + tl.sum(tl.where(is_sink, 0.0, p), 1)
            else:
                l_o = l_o * alpha + tl.sum(p, 1)
            m_i = m_new
        part = (pid_s * BH + pid_bh).to(tl.int64) * M + offs_m
        tl.store(PreM + part, m_i, mask=row_ok)
        tl.store(PreLS + part, l_s, mask=row_ok)
        tl.store(PreLO + part, l_o, mask=row_ok)

    def _band(pid_m, q_off, M, N, window, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
              HAS_WINDOW: tl.constexpr):
        """Key range [lo, hi) (lo aligned to BLOCK_N) that rows pid_m·BLOCK_M… can see at all."""
        lo = pid_m * 0  # tensors, not constexprs, whatever the flags
        hi = pid_m * 0 + N
        if CAUSAL:
            hi = tl.minimum(N, q_off + tl.minimum((pid_m + 1) * BLOCK_M, M))
        if HAS_WINDOW:
            lo = tl.maximum(q_off + pid_m * BLOCK_M - window + 1, 0)
            lo = (lo // BLOCK_N) * BLOCK_N
        return lo, hi

    def _fwd_kernel(
        Q, K, V, Out, Lse, Ent, TopIdx, TopProb, SpanMass, Aux, DistSum, DistSq,
        KeyValid, Sinks, Spans, RowF, KeyF, StreamSink, StreamRecent, Beta, PreM, PreLS, PreLO,
        PartM, PartL, PartU, PartAcc, PartTv, PartTi, PartSpan, PartMu, PartM2,
        sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, som, sod, skvb, skvn,
        H, REP, M, N, q_off, kv_off, window, scale, NS, S_PRE, split_lo, chunk,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_D: tl.constexpr, D_PAD: tl.constexpr,
        HEAD_DV: tl.constexpr, DV_PAD: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
        HAS_KV: tl.constexpr, HAS_SINK: tl.constexpr, HAS_KEYF: tl.constexpr, HAS_STREAM: tl.constexpr,
        HAS_UNIFORM: tl.constexpr, HAS_CALIB: tl.constexpr, HAS_PRE: tl.constexpr, HAS_ROWF: tl.constexpr,
        STATS: tl.constexpr, TOPK: tl.constexpr, KPAD: tl.constexpr, HAS_SPANS: tl.constexpr,
        NS_PAD: tl.constexpr, STORE_AUX: tl.constexpr, SPLIT: tl.constexpr, DOT_PREC: tl.constexpr,
        DIST: tl.constexpr,
    ):
        """Pass B: one row block of one (batch, head), over all its keys or (SPLIT) one key split."""
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        pid_s = tl.program_id(2)
        BH = tl.num_programs(1)
        b = (pid_bh // H).to(tl.int64)
        h = pid_bh % H
        hk = (h // REP).to(tl.int64)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, D_PAD)
        row_ok = offs_m < M
        q_pos = q_off + offs_m
        q = tl.load(Q + b * sqb + h.to(tl.int64) * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
                    mask=row_ok[:, None] & (offs_d[None, :] < HEAD_D), other=0.0)
        if HAS_ROWF:
            rowf = tl.load(RowF + h * M + offs_m, mask=row_ok, other=0)
        else:
            rowf = tl.full([BLOCK_M], 0, dtype=tl.int32)
        st_sink = tl.load(StreamSink + h)
        st_recent = tl.load(StreamRecent + h)
        sink = tl.load(Sinks + h).to(tl.float32)  # a placeholder buffer without sinks: read, never used
        beta = tl.load(Beta + h)
        if HAS_PRE:
            lse_raw, log_ms, log_mo = _pre_rows(PreM, PreLS, PreLO, pid_bh, BH, offs_m, row_ok, M, S_PRE, rowf, sink,
                                                beta, HAS_SINK, HAS_CALIB)
        else:
            lse_raw = tl.full([BLOCK_M], 0, dtype=tl.float32)
            log_ms = tl.full([BLOCK_M], 0, dtype=tl.float32)
            log_mo = tl.full([BLOCK_M], 0, dtype=tl.float32)
        lo, hi = _band(pid_m, q_off, M, N, window, BLOCK_M, BLOCK_N, CAUSAL, HAS_WINDOW)
        if SPLIT:
            lo = tl.maximum(lo, split_lo + pid_s * chunk)
            hi = tl.minimum(hi, split_lo + (pid_s + 1) * chunk)
        m, l, u, acc, tv, ti, span_acc, mu, m2 = _scan(
            q, K + b * skb + hk * skh, V + b * svb + hk * svh, skn, skd, svn, svd, KeyValid, b * skvb, skvn, KeyF,
            Spans, h, N, q_pos, row_ok, rowf, log_ms, log_mo, st_sink, st_recent, window, scale, NS, lo, hi,
            BLOCK_M, BLOCK_N, HEAD_D, D_PAD, HEAD_DV, DV_PAD, CAUSAL, HAS_WINDOW, HAS_KV, HAS_KEYF, HAS_STREAM,
            HAS_UNIFORM, HAS_CALIB, STATS, TOPK, KPAD, HAS_SPANS, NS_PAD, DOT_PREC, DIST)
        if SPLIT:  # partial state of this split; _combine_kernel finishes
            part = (pid_s * BH + pid_bh).to(tl.int64) * M + offs_m
            tl.store(PartM + part, m, mask=row_ok)
            tl.store(PartL + part, l, mask=row_ok)
            tl.store(PartU + part, u, mask=row_ok)
            offs_dv = tl.arange(0, DV_PAD)
            tl.store(PartAcc + part[:, None] * DV_PAD + offs_dv[None, :], acc, mask=row_ok[:, None])
            if STATS:
                slot_ok = (tl.arange(0, KPAD) < TOPK)[None, :]
                for t in tl.static_range(TOPK):  # stored best first: the combine inserts in rank order
                    tv, bv, bi = _topk_pop(tv, ti, slot_ok)
                    tl.store(PartTv + part * TOPK + t, bv, mask=row_ok)
                    tl.store(PartTi + part * TOPK + t, bi, mask=row_ok)
                if HAS_SPANS:
                    span_cols = tl.arange(0, NS_PAD)
                    tl.store(PartSpan + part[:, None] * NS_PAD + span_cols[None, :], span_acc, mask=row_ok[:, None])
                if DIST:
                    tl.store(PartMu + part, mu, mask=row_ok)
                    tl.store(PartM2 + part, m2, mask=row_ok)
        else:
            _finish(m, l, u, acc, tv, ti, span_acc, mu, m2, rowf, lse_raw, sink, pid_bh, b, h, offs_m, row_ok, M,
                    kv_off, Out, sob, soh, som, sod, Lse, Ent, TopIdx, TopProb, SpanMass, Aux, DistSum, DistSq, log_ms,
                    log_mo, BH, NS, BLOCK_M, HEAD_DV, DV_PAD, HAS_SINK, HAS_UNIFORM, HAS_PRE, STATS, TOPK, KPAD,
                    HAS_SPANS, NS_PAD, STORE_AUX, DIST)

    def _combine_kernel(
        Out, Lse, Ent, TopIdx, TopProb, SpanMass, Aux, DistSum, DistSq, Sinks, RowF, Beta, PreM, PreLS, PreLO,
        PartM, PartL, PartU, PartAcc, PartTv, PartTi, PartSpan, PartMu, PartM2,
        sob, soh, som, sod, H, M, kv_off, NS, S, S_PRE,
        BLOCK_M: tl.constexpr, HEAD_DV: tl.constexpr, DV_PAD: tl.constexpr, HAS_SINK: tl.constexpr,
        HAS_UNIFORM: tl.constexpr, HAS_CALIB: tl.constexpr, HAS_PRE: tl.constexpr, HAS_ROWF: tl.constexpr,
        STATS: tl.constexpr, TOPK: tl.constexpr, KPAD: tl.constexpr, HAS_SPANS: tl.constexpr,
        NS_PAD: tl.constexpr, STORE_AUX: tl.constexpr, DIST: tl.constexpr,
    ):
        """Merge the S key-split partial states of a row block (flash-decoding), then the shared epilogue."""
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        BH = tl.num_programs(1)
        b = (pid_bh // H).to(tl.int64)
        h = pid_bh % H
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = offs_m < M
        offs_dv = tl.arange(0, DV_PAD)
        span_cols = tl.arange(0, NS_PAD)
        slot = tl.arange(0, KPAD)
        slot_ok = (slot < TOPK)[None, :]
        base = pid_bh.to(tl.int64) * M + offs_m
        plane = (BH * M).to(tl.int64)  # one split's [BH, M] plane
        m = tl.full([BLOCK_M], _NEG_C, dtype=tl.float32)
        for s in range(S):
            m = tl.maximum(m, tl.load(PartM + s * plane + base, mask=row_ok, other=_NEG_C))
        l = tl.full([BLOCK_M], 0, dtype=tl.float32)
        u = tl.full([BLOCK_M], 0, dtype=tl.float32)
        acc = tl.full([BLOCK_M, DV_PAD], 0, dtype=tl.float32)
        span_acc = tl.full([BLOCK_M, NS_PAD], 0, dtype=tl.float32)
        tv = tl.full([BLOCK_M, KPAD], float("-inf"), dtype=tl.float32)
        ti = tl.full([BLOCK_M, KPAD], 0, dtype=tl.int32) - 1 - slot[None, :]
        mu = tl.full([BLOCK_M], 0, dtype=tl.float32)
        m2 = tl.full([BLOCK_M], 0, dtype=tl.float32)
        for s in range(S):
            part = s * plane + base
            m_s = tl.load(PartM + part, mask=row_ok, other=_NEG_C)
            l_s = tl.load(PartL + part, mask=row_ok, other=0.0)
            w = tl.exp(m_s - m)
            if DIST:  # before l grows: the merge weighs the state so far by its mass
                mu, m2 = _moments_merge(mu, m2, l, tl.load(PartMu + part, mask=row_ok, other=0.0),
                                        tl.load(PartM2 + part, mask=row_ok, other=0.0) * w, l_s * w)
            l += l_s * w
            acc += tl.load(PartAcc + part[:, None] * DV_PAD + offs_dv[None, :], mask=row_ok[:, None], other=0.0) * w[:, None]
            if STATS:
                u += (tl.load(PartU + part, mask=row_ok, other=0.0) + (m_s - m) * l_s) * w
                for t in tl.static_range(TOPK):
                    cv = tl.load(PartTv + part * TOPK + t, mask=row_ok, other=float("-inf"))
                    ci = tl.load(PartTi + part * TOPK + t, mask=row_ok, other=-1)
                    tv, ti = _topk_insert(tv, ti, cv, ci, slot_ok)
                if HAS_SPANS:
                    span_acc += tl.load(PartSpan + part[:, None] * NS_PAD + span_cols[None, :], mask=row_ok[:, None],
                                        other=0.0) * w[:, None]
        if HAS_ROWF:
            rowf = tl.load(RowF + h * M + offs_m, mask=row_ok, other=0)
        else:
            rowf = tl.full([BLOCK_M], 0, dtype=tl.int32)
        sink = tl.load(Sinks + h).to(tl.float32)  # a placeholder buffer without sinks: read, never used
        beta = tl.load(Beta + h)
        if HAS_PRE:
            lse_raw, log_ms, log_mo = _pre_rows(PreM, PreLS, PreLO, pid_bh, BH, offs_m, row_ok, M, S_PRE, rowf, sink,
                                                beta, HAS_SINK, HAS_CALIB)
        else:
            lse_raw = tl.full([BLOCK_M], 0, dtype=tl.float32)
            log_ms = tl.full([BLOCK_M], 0, dtype=tl.float32)
            log_mo = tl.full([BLOCK_M], 0, dtype=tl.float32)
        _finish(m, l, u, acc, tv, ti, span_acc, mu, m2, rowf, lse_raw, sink, pid_bh, b, h, offs_m, row_ok, M,
                kv_off, Out, sob, soh, som, sod, Lse, Ent, TopIdx, TopProb, SpanMass, Aux, DistSum, DistSq, log_ms,
                log_mo, BH, NS, BLOCK_M, HEAD_DV, DV_PAD, HAS_SINK, HAS_UNIFORM, HAS_PRE, STATS, TOPK, KPAD,
                HAS_SPANS, NS_PAD, STORE_AUX, DIST)

    def _key_mass_kernel(
        Q, K, KeyMass, KeyCount, Aux, KeyValid, RowF, KeyF, StreamSink, StreamRecent,
        sqb, sqh, sqm, sqd, skb, skh, skn, skd, skvb, skvn,
        H, REP, M, N, q_off, window, scale,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_D: tl.constexpr, D_PAD: tl.constexpr,
        CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_KV: tl.constexpr, HAS_KEYF: tl.constexpr,
        HAS_STREAM: tl.constexpr, HAS_UNIFORM: tl.constexpr, HAS_CALIB: tl.constexpr, HAS_ROWF: tl.constexpr,
        DOT_PREC: tl.constexpr,
    ):
        """Pass D: Σ over rows of p for one key block of one (batch, query head); row counts from head 0."""
        pid_n = tl.program_id(0)
        pid_bh = tl.program_id(1)
        BH = tl.num_programs(1)
        b = (pid_bh // H).to(tl.int64)
        h = pid_bh % H
        hk = (h // REP).to(tl.int64)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, D_PAD)
        col_ok = offs_n < N
        kt = tl.load(K + b * skb + hk * skh + offs_n[None, :] * skn + offs_d[:, None] * skd,
                     mask=col_ok[None, :] & (offs_d[:, None] < HEAD_D), other=0.0)
        if HAS_KV:
            kvm = tl.load(KeyValid + b * skvb + offs_n * skvn, mask=col_ok, other=0)
        else:
            kvm = col_ok
        kf = _key_flags(KeyF, h, N, offs_n, col_ok, HAS_KEYF)
        st_sink = tl.load(StreamSink + h)
        st_recent = tl.load(StreamRecent + h)
        # rows that can see this key block: causal q ≥ first key; window q < last key + window
        lo = 0
        hi = M
        if CAUSAL:
            lo = tl.maximum(pid_n * BLOCK_N - q_off, 0)
            lo = (lo // BLOCK_M) * BLOCK_M
        if HAS_WINDOW:
            hi = tl.minimum(M, pid_n * BLOCK_N + BLOCK_N - 1 + window - q_off)
        mass = tl.full([BLOCK_N], 0, dtype=tl.float32)
        count = tl.full([BLOCK_N], 0, dtype=tl.int32)
        for start_m in range(lo, hi, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            row_ok = offs_m < M
            q_pos = q_off + offs_m
            q = tl.load(Q + b * sqb + h.to(tl.int64) * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
                        mask=row_ok[:, None] & (offs_d[None, :] < HEAD_D), other=0.0)
            if HAS_ROWF:
                rowf = tl.load(RowF + h * M + offs_m, mask=row_ok, other=0)
            else:
                rowf = tl.full([BLOCK_M], 0, dtype=tl.int32)
            row_off = pid_bh.to(tl.int64) * M + offs_m
            nrm = tl.load(Aux + row_off, mask=row_ok, other=0.0)
            log_ms = tl.load(Aux + BH * M + row_off, mask=row_ok, other=0.0)
            log_mo = tl.load(Aux + 2 * BH * M + row_off, mask=row_ok, other=0.0)
            s = tl.dot(q, kt, input_precision=DOT_PREC) * scale
            vis = _struct_vis(offs_n, col_ok, q_pos, row_ok, kvm, window, CAUSAL, HAS_WINDOW, HAS_KV)
            count += tl.sum(vis.to(tl.int32), 0)
            vis = _edit_vis(vis, offs_n, q_pos, rowf, kf, st_sink, st_recent, HAS_KEYF, HAS_STREAM)
            s = _adjust(s, vis, rowf, kf, log_ms, log_mo, HAS_UNIFORM, HAS_CALIB)
            mass += tl.sum(tl.where(vis, tl.exp(s - nrm[:, None]), 0.0), 0)
        tl.store(KeyMass + pid_bh.to(tl.int64) * N + offs_n, mass, mask=col_ok)
        if h == 0:  # counts are per sequence (structured visibility): one head writes them
            tl.store(KeyCount + b * N + offs_n, count, mask=col_ok)

    def _probs_at_kernel(
        Q, K, P, Aux, Cols, KeyValid, RowF, KeyF, StreamSink, StreamRecent,
        sqb, sqh, sqm, sqd, skb, skh, skn, skd, skvb, skvn,
        H, REP, M, N, q_off, window, scale, r0, R, NC,
        BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, HEAD_D: tl.constexpr, D_PAD: tl.constexpr,
        CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_KV: tl.constexpr, HAS_KEYF: tl.constexpr,
        HAS_STREAM: tl.constexpr, HAS_UNIFORM: tl.constexpr, HAS_CALIB: tl.constexpr, HAS_ROWF: tl.constexpr,
        DOT_PREC: tl.constexpr, PER_ROW: tl.constexpr,
    ):
        """Pass E: probabilities of rows r0..r0+R × local key indices Cols (−1 / ≥ N: not a key → 0).
        PER_ROW (row keys): Cols is ``[B, M]``, one key per row; the tile's columns are its own rows' keys
        (BLOCK_C == BLOCK_M, r0 = 0) and only its diagonal is stored, into ``P`` ``[B·Hq, M]``."""
        pid_m = tl.program_id(0)
        pid_c = tl.program_id(1)
        pid_bh = tl.program_id(2)
        BH = tl.num_programs(2)
        b = (pid_bh // H).to(tl.int64)
        h = pid_bh % H
        hk = (h // REP).to(tl.int64)
        offs_r = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_m = r0 + offs_r
        row_ok = (offs_r < R) & (offs_m < M)
        q_pos = q_off + offs_m
        offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        if PER_ROW:
            cmask = row_ok
            cols = tl.load(Cols + b * M + offs_m, mask=row_ok, other=-1)
        else:
            cmask = offs_c < NC
            cols = tl.load(Cols + offs_c, mask=cmask, other=-1)
        cvalid = cmask & (cols >= 0) & (cols < N)
        offs_d = tl.arange(0, D_PAD)
        q = tl.load(Q + b * sqb + h.to(tl.int64) * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
                    mask=row_ok[:, None] & (offs_d[None, :] < HEAD_D), other=0.0)
        kc = tl.load(K + b * skb + hk * skh + cols[None, :] * skn + offs_d[:, None] * skd,
                     mask=cvalid[None, :] & (offs_d[:, None] < HEAD_D), other=0.0)
        s = tl.dot(q, kc, input_precision=DOT_PREC) * scale
        if HAS_KV:
            kvm = tl.load(KeyValid + b * skvb + cols * skvn, mask=cvalid, other=0)
        else:
            kvm = cvalid
        kf = _key_flags(KeyF, h, N, cols, cvalid, HAS_KEYF)
        if HAS_ROWF:
            rowf = tl.load(RowF + h * M + offs_m, mask=row_ok, other=0)
        else:
            rowf = tl.full([BLOCK_M], 0, dtype=tl.int32)
        row_off = pid_bh.to(tl.int64) * M + offs_m
        nrm = tl.load(Aux + row_off, mask=row_ok, other=0.0)
        log_ms = tl.load(Aux + BH * M + row_off, mask=row_ok, other=0.0)
        log_mo = tl.load(Aux + 2 * BH * M + row_off, mask=row_ok, other=0.0)
        vis = _struct_vis(cols, cvalid, q_pos, row_ok, kvm, window, CAUSAL, HAS_WINDOW, HAS_KV)
        vis = _edit_vis(vis, cols, q_pos, rowf, kf, tl.load(StreamSink + h), tl.load(StreamRecent + h),
                        HAS_KEYF, HAS_STREAM)
        s = _adjust(s, vis, rowf, kf, log_ms, log_mo, HAS_UNIFORM, HAS_CALIB)
        p = tl.where(vis, tl.exp(s - nrm[:, None]), 0.0)
        if PER_ROW:
            diag = tl.arange(0, BLOCK_M)[:, None] == tl.arange(0, BLOCK_C)[None, :]
            tl.store(P + pid_bh.to(tl.int64) * M + offs_m, tl.sum(tl.where(diag, p, 0.0), 1), mask=row_ok)
        else:
            out_row = pid_bh.to(tl.int64) * R + offs_r
            tl.store(P + out_row[:, None] * NC + offs_c[None, :], p, mask=(offs_r < R)[:, None] & cmask[None, :])


def _build() -> None:
    """JIT-decorate the device functions and kernels (once per process, in the mode chosen then)."""
    global _BUILT
    if _BUILT:
        return
    g = globals()
    for name in _DEVICE_FUNCTIONS:
        g[name] = _device_jit(g[name])
    for name in _KERNELS:
        g[name] = triton.jit(g[name])
    _BUILT = True


def _device_jit(fn):
    """``triton.jit`` for a device function. Under the interpreter, the AST-rewritten Python function
    instead: the interpreter re-patches ``triton.language`` on *every* device-function call (~2 ms, most
    of an interpreted launch here) although the launching kernel has already patched it."""
    if _interpreting():
        try:
            from triton.runtime.interpreter import InterpretedFunction

            return InterpretedFunction(fn).rewrite()
        except Exception:  # pragma: no cover - another triton's interpreter internals: the plain way
            pass
    return triton.jit(fn)


# ---------------------------------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------------------------------
def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(f"attention_stats_triton: {msg}")


def attention_stats_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    q_offset: int,
    kv_offset: int = 0,
    causal: bool = True,
    window: int | None = None,
    key_valid: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
    key_columns: torch.Tensor | None = None,
    spans: torch.Tensor | None = None,
    topk: int = 1,
    tiles: Sequence[tuple[int, int, int, int]] = (),
    key_mass: bool = False,
    edits: Sequence = (),
    stats: bool = True,
    distance_moments: bool = False,
    row_keys: torch.Tensor | None = None,
) -> dict:
    """Attention output plus the statistics asked for, after the probability edits ``edits``.

    ``q`` ``[B, Hq, M, D]``, ``k`` ``[B, Hkv, N, D]``, ``v`` ``[B, Hkv, N, Dv]`` (any strides). Query row
    ``i`` sits at absolute position ``q_offset + i``, key ``j`` at ``kv_offset + j``; ``key_columns``,
    ``spans``, ``tiles`` and the edits' positions/keys are absolute, and so are the returned top-k
    indices. ``key_valid`` ``[B, N]`` marks real (non-padding) keys; ``sinks`` ``[Hq]`` are learned sink
    logits. ``edits``: ``HeadEdit``-like objects of kinds ``mask_keys``, ``streaming``, ``uniform``,
    ``calibrate`` (output edits are the caller's). ``stats=False`` returns only ``out``.
    ``distance_moments``: also ``dist_sum`` / ``dist_sq_sum``; ``row_keys`` ``[B, M]`` (absolute key
    positions, -1 = none): also ``row_key_prob``.

    Returns ``out`` and, with ``stats``, ``lse``, ``entropy``, ``topk_idx``, ``topk_prob``, plus
    ``col_prob``, ``span_mass``, ``key_mass``/``key_count``, ``tile{t}``, ``dist_sum``/``dist_sq_sum`` and
    ``row_key_prob`` when requested (shapes in the module docstring). Raises ``ValueError`` for inputs it
    does not take (the caller then uses its torch path); everything is checked before any launch.
    """
    return _attention_stats(q, k, v, scale=scale, q_offset=q_offset, kv_offset=kv_offset, causal=causal,
                            window=window, key_valid=key_valid, sinks=sinks, key_columns=key_columns, spans=spans,
                            topk=topk, tiles=tiles, key_mass=key_mass, edits=edits, stats=stats,
                            distance_moments=distance_moments, row_keys=row_keys)  # fmt: skip


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _validate(q, k, v, q_offset, kv_offset, window, topk, tiles):
    if triton is None:
        raise ValueError("attention_stats_triton: triton is not installed")
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check(isinstance(t, torch.Tensor), f"{name} must be a torch.Tensor")
        _check(t.dim() == 4, f"{name} must be 4-D [B, H, L, D], got shape {tuple(t.shape)}")
        _check(t.dtype in _SUPPORTED_DTYPES, f"{name} dtype {t.dtype} not supported (float16/bfloat16/float32)")
    _check(q.dtype == k.dtype == v.dtype, f"q/k/v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    _check(q.device == k.device == v.device, "q/k/v must be on the same device")
    B, Hq, M, D = q.shape
    Bk, Hkv, N, Dk = k.shape
    _check(tuple(v.shape[:3]) == (Bk, Hkv, N), f"k {tuple(k.shape)} and v {tuple(v.shape)} differ in [B, H, N]")
    _check(Bk == B, f"batch mismatch: q has {B}, k/v have {Bk}")
    _check(Dk == D, f"head dim mismatch: q has {D}, k has {Dk}")
    _check(Hkv >= 1 and Hq % Hkv == 0, f"query heads ({Hq}) must be a multiple of KV heads ({Hkv})")
    _check(1 <= D <= MAX_HEAD_DIM and 1 <= v.shape[-1] <= MAX_HEAD_DIM,
           f"head dims {D}/{v.shape[-1]} unsupported: must lie in [1, {MAX_HEAD_DIM}]")
    if _interpreting():
        _check(q.device.type == "cpu", "TRITON_INTERPRET=1 needs CPU tensors")
        _check(q.dtype != torch.bfloat16, "bfloat16 is silently wrong under the Triton interpreter (TRITON_INTERPRET=1)")
    else:
        _check(q.is_cuda, "needs CUDA tensors (or TRITON_INTERPRET=1 with CPU tensors)")
    _check(_is_int(q_offset) and _is_int(kv_offset), "q_offset and kv_offset must be ints")
    _check(window is None or (_is_int(window) and window >= 1), "window must be an int ≥ 1 or None")
    _check(_is_int(topk) and 1 <= topk <= MAX_TOPK, f"topk must be an int in [1, {MAX_TOPK}], got {topk!r}")
    for t in tiles:
        _check(len(t) == 4 and all(_is_int(x) for x in t) and t[0] < t[1] and t[2] < t[3],
               f"tile {t} must be (q0, q1, k0, k1) ints with q0 < q1, k0 < k1")


def _compile_edits(edits, Hq, M, N, q_pos, key_pos, kv_offset, dev) -> dict:
    """Per-(head, row) / per-(head, key) flag words and per-head parameters for the probability edits."""
    c = {"rowf": None, "keyf": None, "stream_sink": torch.zeros(Hq, dtype=torch.int32),
         "stream_recent": torch.zeros(Hq, dtype=torch.int32), "beta": torch.ones(Hq, dtype=torch.float32),
         "head_pre": torch.zeros(Hq, dtype=torch.int32), "kinds": set()}  # fmt: skip
    if not edits:
        return c
    rowf = torch.zeros(Hq, M, dtype=torch.int32, device=dev)
    keyf = torch.zeros(Hq, N, dtype=torch.int32, device=dev)
    n_mask = [0] * Hq
    seen: dict[tuple[int, str], int] = {}
    for e in edits:
        kind, h = e.kind, e.head
        _check(kind in semantics.VISIBILITY_EDITS + semantics.PROBABILITY_EDITS,
               f"edit kind {kind!r} is not a probability edit (zero/mean outputs are the caller's)")
        _check(_is_int(h) and 0 <= h < Hq, f"edit head {h!r} out of range [0, {Hq})")
        rows = semantics.rows_in(q_pos, e.positions)
        c["kinds"].add(kind)
        if kind == "mask_keys":
            slot = n_mask[h]
            _check(slot < MAX_MASK_EDITS, f"at most {MAX_MASK_EDITS} mask_keys edits per head")
            n_mask[h] += 1
            bit = 1 << slot
            rowf[h, rows] |= bit
            keyf[h, torch.isin(key_pos, e.keys.to(dev))] |= bit
            continue
        _check((h, kind) not in seen, f"at most one {kind} edit per head (head {h})")
        seen[(h, kind)] = 1
        if kind == "streaming":
            rowf[h, rows] |= STREAM_BIT
            c["stream_sink"][h] = int(e.sink) - kv_offset  # "key_pos < sink" in local key indices
            c["stream_recent"][h] = int(e.recent)
        elif kind == "uniform":
            rowf[h, rows] |= UNIFORM_BIT
            c["head_pre"][h] = 1
        else:  # calibrate
            _check(0.0 < float(e.beta) <= 1.0, f"calibrate beta must lie in (0, 1], got {e.beta}")
            rowf[h, rows] |= CALIB_BIT
            keyf[h, torch.isin(key_pos, e.keys.to(dev))] |= CALIB_BIT
            c["beta"][h] = float(e.beta)
            c["head_pre"][h] = 1
    _check(not any((h, "uniform") in seen and (h, "calibrate") in seen for h in range(Hq)),
           "uniform and calibrate on the same head are not supported")
    c["rowf"] = rowf
    if "mask_keys" in c["kinds"] or "calibrate" in c["kinds"]:
        c["keyf"] = keyf
    return c


def _sm_count(dev: torch.device) -> int:
    if dev.type == "cuda":
        return torch.cuda.get_device_properties(dev).multi_processor_count
    return INTERPRETER_SMS


def _attention_stats(
    q, k, v, *, scale, q_offset, kv_offset=0, causal=True, window=None, key_valid=None, sinks=None,
    key_columns=None, spans=None, topk=1, tiles=(), key_mass=False, edits=(), stats=True,
    distance_moments=False, row_keys=None,
    block_m: int | None = None, block_n: int | None = None, num_warps: int | None = None,
    num_stages: int | None = None, splits: int | None = None,
):
    """:func:`attention_stats_triton` with the launch parameters exposed (tests, benchmarks)."""
    _validate(q, k, v, q_offset, kv_offset, window, topk, tiles)
    B, Hq, M, D = q.shape
    Hkv, N, Dv = k.shape[1], k.shape[2], v.shape[-1]
    dev = q.device
    BH = B * Hq
    q_off = int(q_offset) - int(kv_offset)  # local key index of query row 0
    q_pos = torch.arange(M, device=dev) + q_offset
    key_pos = semantics.key_positions(N, kv_offset, dev)

    if key_valid is not None:
        _check(tuple(key_valid.shape) == (B, N), f"key_valid must be [B, N] = {(B, N)}, got {tuple(key_valid.shape)}")
        kv = key_valid.to(dev)
        kv = kv.view(torch.uint8) if kv.dtype == torch.bool else (kv != 0).view(torch.uint8)
    if sinks is not None:
        _check(tuple(sinks.shape) == (Hq,), f"sinks must be [Hq] = ({Hq},), got {tuple(sinks.shape)}")
        sk = sinks.to(device=dev, dtype=torch.float32).contiguous()
    NS = 0
    if spans is not None and stats:
        _check(spans.dim() == 2 and spans.shape[1] == 3 and not spans.dtype.is_floating_point,
               "spans must be an integer tensor [NS, 3] of (start, end, window)")
        NS = spans.shape[0]
        _check(NS <= MAX_SPANS, f"at most {MAX_SPANS} spans per call, got {NS}")
        sp = spans.to(device=dev, dtype=torch.int64).clone()
        sp[:, :2] -= kv_offset  # start/end in local key indices; the window is relative
        sp = sp.contiguous()
    if key_columns is not None and stats:
        _check(key_columns.dim() == 1 and not key_columns.dtype.is_floating_point,
               "key_columns must be a 1-D integer tensor of absolute key positions")
    dist = bool(distance_moments) and stats
    if row_keys is not None and stats:
        _check(isinstance(row_keys, torch.Tensor) and tuple(row_keys.shape) == (B, M)
               and not row_keys.dtype.is_floating_point and row_keys.dtype != torch.bool,
               f"row_keys must be an integer tensor [B, M] = {(B, M)} of absolute key positions (-1: none)")
        rk_abs = row_keys.to(device=dev, dtype=torch.int64)
        rk_local = rk_abs - kv_offset
        rk_local = torch.where((rk_abs >= 0) & (rk_local >= 0) & (rk_local < N), rk_local, -1)
        rk_local = rk_local.to(torch.int32).contiguous()
    else:
        row_keys = None
    ed = _compile_edits(list(edits), Hq, M, N, q_pos, key_pos, kv_offset, dev)
    kinds = ed["kinds"]

    out = torch.empty((B, Hq, M, Dv), dtype=q.dtype, device=dev)
    f32 = dict(dtype=torch.float32, device=dev)
    lse = torch.empty((B, Hq, M), **f32)
    ent = torch.empty_like(lse)
    top_idx = torch.empty((B, Hq, M, topk), dtype=torch.int64, device=dev)
    top_prob = torch.empty((B, Hq, M, topk), **f32)
    span_mass = torch.empty((B, Hq, M, NS), **f32) if NS else None
    dist_sum = torch.empty((B, Hq, M), **f32) if dist else None
    dist_sq = torch.empty((B, Hq, M), **f32) if dist else None
    res = {"out": out}
    if stats:
        res.update(lse=lse, entropy=ent, topk_idx=top_idx, topk_prob=top_prob)
        if NS:
            res["span_mass"] = span_mass
        if dist:
            res.update(dist_sum=dist_sum, dist_sq_sum=dist_sq)
    if M == 0 or BH == 0:
        if row_keys is not None:
            res["row_key_prob"] = torch.zeros((B, Hq, M), **f32)
        return _empty_extras(res, stats, key_columns, key_mass, tiles, B, Hq, N, dev)

    # Fixed heuristics (no autotune: it breaks the interpreter and would retune at every decode
    # length). Chosen from ptxas register/spill reports for sm_90; fp32 uses exact "ieee" dots on
    # CUDA cores, which needs smaller key blocks.
    fp32 = q.dtype == torch.float32
    D_PAD, DV_PAD = max(16, _next_pow2(D)), max(16, _next_pow2(Dv))
    wide = max(D_PAD, DV_PAD)
    if block_m is None:
        block_m = min(64, max(16, _next_pow2(M)))
    if block_n is None:
        block_n = 32 if (fp32 or wide >= 256 or wide == 64) else 64
    if num_warps is None:
        num_warps = 4 if (wide <= 64 or block_m <= 16) else 8
    if num_stages is None:
        num_stages = 1 if (fp32 or wide >= 256) else 2
    kpad = max(2, _next_pow2(topk))
    ns_pad = max(2, _next_pow2(NS))
    need_aux = stats and (key_columns is not None or key_mass or bool(tiles) or row_keys is not None)
    has_pre = bool(kinds & {"uniform", "calibrate"})
    dot_prec = "ieee" if fp32 else None

    # key splits (flash-decoding): only when the row blocks alone leave SMs idle (decode steps, short
    # chunks over a long cache); a causal prefill that fills the machine keeps one program per row block
    row_blocks = triton.cdiv(M, block_m)
    lo_key = max(0, q_off - window + 1) if window is not None else 0
    hi_key = min(N, q_off + M) if causal else N
    split_lo = (lo_key // block_n) * block_n
    n_blocks = max(1, triton.cdiv(hi_key - split_lo, block_n))
    if splits is None:
        sms, programs = _sm_count(dev), row_blocks * BH
        want = triton.cdiv(_PROGRAMS_PER_SM * sms, programs) if programs < sms else 1
        splits = max(1, min(want, n_blocks // _MIN_BLOCKS_PER_SPLIT))
    splits = max(1, min(int(splits), n_blocks))
    chunk = triton.cdiv(n_blocks, splits) * block_n
    splits = triton.cdiv(n_blocks * block_n, chunk)  # no empty trailing split

    _build()
    dummy = lse  # placeholder pointer for absent optional inputs (never dereferenced)
    i32 = lambda t: t.to(device=dev, dtype=torch.int32).contiguous()  # noqa: E731
    st_sink, st_recent, head_pre = i32(ed["stream_sink"]), i32(ed["stream_recent"]), i32(ed["head_pre"])
    beta = ed["beta"].to(dev).contiguous()
    rowf = ed["rowf"] if ed["rowf"] is not None else dummy
    keyf = ed["keyf"] if ed["keyf"] is not None else dummy
    kv_arg = kv if key_valid is not None else dummy
    kv_strides = kv.stride() if key_valid is not None else (0, 0)
    common = dict(CAUSAL=bool(causal), HAS_WINDOW=window is not None, HAS_KV=key_valid is not None,
                  HAS_KEYF=ed["keyf"] is not None, HAS_STREAM="streaming" in kinds, DOT_PREC=dot_prec,
                  num_warps=num_warps, num_stages=num_stages)  # fmt: skip
    win = int(window) if window is not None else 0

    pre_s = splits if has_pre else 0
    pre = [torch.empty((max(1, pre_s), BH, M), **f32) for _ in range(3)] if has_pre else [dummy] * 3
    if has_pre:  # pass A
        _norm_kernel[(row_blocks, BH, splits)](
            q, k, kv_arg, rowf, keyf, st_sink, st_recent, head_pre, *pre,
            *q.stride(), *k.stride(), *kv_strides,
            Hq, Hq // Hkv, M, N, q_off, win, float(scale), split_lo, chunk,
            BLOCK_M=block_m, BLOCK_N=block_n, HEAD_D=D, D_PAD=D_PAD, HAS_CALIB="calibrate" in kinds, **common,
        )  # fmt: skip

    aux = torch.empty((3, BH, M), **f32) if need_aux else dummy
    split = splits > 1
    if split:
        parts = [torch.empty((splits, BH, M), **f32) for _ in range(3)]
        parts.append(torch.empty((splits, BH, M, DV_PAD), **f32))
        parts.append(torch.empty((splits, BH, M, topk), **f32))
        parts.append(torch.empty((splits, BH, M, topk), dtype=torch.int32, device=dev))
        parts.append(torch.empty((splits, BH, M, ns_pad), **f32) if NS else dummy)
        parts += [torch.empty((splits, BH, M), **f32) if dist else dummy for _ in range(2)]
    else:
        parts = [dummy] * 9
    flags = dict(HAS_SINK=sinks is not None, HAS_UNIFORM="uniform" in kinds, HAS_CALIB="calibrate" in kinds,
                 HAS_PRE=has_pre, HAS_ROWF=ed["rowf"] is not None, STATS=bool(stats), TOPK=topk, KPAD=kpad,
                 HAS_SPANS=NS > 0, NS_PAD=ns_pad, STORE_AUX=need_aux, DIST=dist)  # fmt: skip
    sinks_arg = sk if sinks is not None else dummy
    _fwd_kernel[(row_blocks, BH, splits)](
        q, k, v, out, lse, ent, top_idx, top_prob, span_mass if NS else dummy, aux,
        dist_sum if dist else dummy, dist_sq if dist else dummy,
        kv_arg, sinks_arg, sp if NS else dummy, rowf, keyf, st_sink, st_recent, beta, *pre, *parts,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *kv_strides,
        Hq, Hq // Hkv, M, N, q_off, int(kv_offset), win, float(scale), NS, pre_s, split_lo, chunk,
        BLOCK_M=block_m, BLOCK_N=block_n, HEAD_D=D, D_PAD=D_PAD, HEAD_DV=Dv, DV_PAD=DV_PAD, SPLIT=split,
        **flags, **common,
    )  # fmt: skip
    if split:
        _combine_kernel[(row_blocks, BH)](
            out, lse, ent, top_idx, top_prob, span_mass if NS else dummy, aux, dist_sum if dist else dummy,
            dist_sq if dist else dummy, sinks_arg, rowf, beta, *pre, *parts,
            *out.stride(), Hq, M, int(kv_offset), NS, splits, pre_s,
            BLOCK_M=block_m, HEAD_DV=Dv, DV_PAD=DV_PAD, **flags, num_warps=num_warps,
        )  # fmt: skip
    if not stats:
        return res

    later = dict(HAS_UNIFORM="uniform" in kinds, HAS_CALIB="calibrate" in kinds, HAS_ROWF=ed["rowf"] is not None,
                 **common)  # fmt: skip
    geo = (*q.stride(), *k.stride(), *kv_strides, Hq, Hq // Hkv, M, N, q_off, win, float(scale))
    if key_mass:  # pass D
        km = torch.empty((B, Hq, N), **f32)
        kc = torch.zeros((B, N), dtype=torch.int32, device=dev)
        _key_mass_kernel[(triton.cdiv(N, block_n), BH)](
            q, k, km, kc, aux, kv_arg, rowf, keyf, st_sink, st_recent, *geo,
            BLOCK_M=block_m, BLOCK_N=block_n, HEAD_D=D, D_PAD=D_PAD, **later,
        )  # fmt: skip
        res["key_mass"], res["key_count"] = km, kc.long()

    def probs_at(r0: int, R: int, cols_abs: torch.Tensor) -> torch.Tensor:  # pass E
        local = cols_abs.to(device=dev, dtype=torch.int64) - kv_offset
        local = torch.where((local >= 0) & (local < N), local, -1).to(torch.int32).contiguous()
        nc = local.numel()
        p = torch.zeros((B, Hq, R, nc), **f32)
        if R and nc:
            bc = min(64, max(16, _next_pow2(nc)))
            _probs_at_kernel[(triton.cdiv(R, block_m), triton.cdiv(nc, bc), BH)](
                q, k, p, aux, local, kv_arg, rowf, keyf, st_sink, st_recent, *geo, r0, R, nc,
                BLOCK_M=block_m, BLOCK_C=bc, HEAD_D=D, D_PAD=D_PAD, PER_ROW=False, **later,
            )  # fmt: skip
        return p

    if key_columns is not None:
        res["col_prob"] = probs_at(0, M, key_columns)
    for t, (q0, q1, k0, k1) in enumerate(tiles):
        r0, r1 = max(q0 - int(q_offset), 0), min(q1 - int(q_offset), M)
        res[f"tile{t}"] = [(q_pos[r0:r1], probs_at(r0, r1 - r0, torch.arange(k0, k1)))] if r1 > r0 else []
    if row_keys is not None:  # pass E, one key per row: a BLOCK_M × BLOCK_M tile whose diagonal is kept
        prk = torch.zeros((B, Hq, M), **f32)
        _probs_at_kernel[(row_blocks, 1, BH)](
            q, k, prk, aux, rk_local, kv_arg, rowf, keyf, st_sink, st_recent, *geo, 0, M, M,
            BLOCK_M=block_m, BLOCK_C=block_m, HEAD_D=D, D_PAD=D_PAD, PER_ROW=True, **later,
        )  # fmt: skip
        res["row_key_prob"] = torch.where((rk_abs < 0)[:, None, :], float("nan"), prk)
    return res


def _empty_extras(res, stats, key_columns, key_mass, tiles, B, Hq, N, dev):
    """Shapes for a call with no rows (or no heads): nothing to compute."""
    if not stats:
        return res
    if key_columns is not None:
        res["col_prob"] = torch.zeros((B, Hq, 0, key_columns.numel()), dtype=torch.float32, device=dev)
    if key_mass:
        res["key_mass"] = torch.zeros((B, Hq, N), dtype=torch.float32, device=dev)
        res["key_count"] = torch.zeros((B, N), dtype=torch.long, device=dev)
    for t in range(len(tiles)):
        res[f"tile{t}"] = []
    return res

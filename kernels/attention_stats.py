"""Fused attention forward + reduced statistics in one FlashAttention-style pass (Triton).

One program handles a block of ``BLOCK_M`` query rows of one (batch, query head). It streams the
visible key blocks once (online softmax) and returns, without ever materialising the ``M×N``
probability matrix:

- ``out``        ``[B, Hq, M, D]`` (dtype of ``q``): softmax(QKᵀ·scale)V, the sink slot has no value;
- ``lse``        ``[B, Hq, M]`` float32: natural-log log-sum-exp over visible keys *and* the sink slot;
- ``entropy``    ``[B, Hq, M]`` float32: entropy (nats) of the full distribution incl. the sink slot;
- ``top1_idx``   ``[B, Hq, M]`` int64: argmax key (``-1`` when the row sees no key);
- ``top1_prob``  ``[B, Hq, M]`` float32: its probability ``exp(max_score - lse)``;
- ``col_prob``   ``[B, Hq, M, NK]`` float32 (only with ``key_columns``): probability of given
  absolute key columns (0 where invisible);
- ``span_mass``  ``[B, Hq, M, NS]`` float32 (only with ``spans``): probability mass on key spans
  ``(start, end, window)``.

Semantics are defined by :mod:`kernels.reference` (float64, dense). Visibility is structured:
query row ``i`` sits at key position ``q_pos = q_offset + i``; key ``j`` is visible iff
``(not causal or j <= q_pos) and (window is None or j > q_pos - window) and key_valid[b, j]``.
Causal / windowed programs skip key blocks that lie entirely outside their band.

Single-pass entropy. With running max ``m`` over real scores, ``l = Σ e^{s-m}`` and
``U = Σ e^{s-m}(s-m)`` (both rescaled by ``α = e^{m_old-m_new}`` when ``m`` grows, ``U`` also picks
up ``(m_old-m_new)·l_old``), the probability of a real key is ``p_j = e^{s_j-m}·f`` with
``f = e^{m-lse} = 1/(l + e^{sink-m})``; the real mass is ``P = l·f`` and the sink mass
``p_σ = e^{sink-lse}``. Then ``H = Σ_x p_x (lse - s_x) = P·((lse - m) - U/l) + p_σ·(lse - sink)``,
which without a sink is ``log l - U/l``.

Numerics: scores, softmax and all statistics are accumulated in float32. ``tl.dot`` on float32
inputs uses ``input_precision="ieee"`` (no TF32), so fp32 results are as exact as fp32 allows;
for fp16/bf16 inputs the probabilities are cast to the input dtype for the ``P·V`` product (the
usual FlashAttention practice), so ``out`` has input-dtype accuracy while the statistics stay fp32.

The Triton kernel is JIT-decorated lazily on first use, so ``TRITON_INTERPRET=1`` only has to be
set before the first *call* (not before importing this module) to run on CPU.
"""
from __future__ import annotations

import os

import torch

try:  # triton is optional: the library falls back to its torch path without it
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - depends on the environment
    triton = None
    tl = None

__all__ = ["attention_stats_triton", "triton_available"]

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_KERNEL_CACHE: dict[bool, object] = {}
_MAX_SPANS = 64  # span accumulators live in registers ([BLOCK_M, next_pow2(NS)])


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


if tl is not None:

    def _attention_stats_fwd(
        Q, K, V, Out, Lse, Ent, TopIdx, TopProb,
        KeyValid, Sinks, Cols, ColProb, Spans, SpanMass,
        sqb, sqh, sqm, sqd,
        skb, skh, skn, skd,
        svb, svh, svn, svd,
        sob, soh, som, sod,
        skvb, skvn,
        H, REP, M, N, q_offset, window, scale, NK, NS,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_D: tl.constexpr,
        CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_KV: tl.constexpr, HAS_SINK: tl.constexpr,
        NK_BLOCK: tl.constexpr, HAS_SPANS: tl.constexpr, NS_PAD: tl.constexpr, DOT_PREC: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = (pid_bh // H).to(tl.int64)
        h = pid_bh % H
        hk = (h // REP).to(tl.int64)
        h64 = h.to(tl.int64)

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n0 = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_D)
        row_ok = offs_m < M
        q_pos = q_offset + offs_m

        q = tl.load(Q + b * sqb + h64 * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
                    mask=row_ok[:, None], other=0.0)
        k_base = K + b * skb + hk * skh
        v_base = V + b * svb + hk * svh

        m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        u_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        best = tl.full([BLOCK_M], -1, dtype=tl.int32)
        acc = tl.zeros([BLOCK_M, HEAD_D], dtype=tl.float32)
        span_cols = tl.arange(0, NS_PAD)
        span_acc = tl.zeros([BLOCK_M, NS_PAD], dtype=tl.float32)

        # key-block range this query block can see at all
        lo = 0
        hi = N
        if CAUSAL:
            hi = tl.minimum(hi, q_offset + tl.minimum((pid_m + 1) * BLOCK_M, M))
        if HAS_WINDOW:
            lo = tl.maximum(q_offset + pid_m * BLOCK_M - window + 1, 0)
            lo = (lo // BLOCK_N) * BLOCK_N

        for start_n in range(lo, hi, BLOCK_N):
            offs_n = start_n + offs_n0
            col_ok = offs_n < N
            kt = tl.load(k_base + offs_n[None, :] * skn + offs_d[:, None] * skd,
                         mask=col_ok[None, :], other=0.0)
            s = tl.dot(q, kt, input_precision=DOT_PREC) * scale
            vis = row_ok[:, None] & col_ok[None, :]
            if CAUSAL:
                vis = vis & (offs_n[None, :] <= q_pos[:, None])
            if HAS_WINDOW:
                vis = vis & (offs_n[None, :] > q_pos[:, None] - window)
            if HAS_KV:
                kvm = tl.load(KeyValid + b * skvb + offs_n * skvn, mask=col_ok, other=0)
                vis = vis & (kvm != 0)[None, :]
            s = tl.where(vis, s, float("-inf"))

            bmax, barg = tl.max(s, 1, return_indices=True, return_indices_tie_break_left=True)
            m_new = tl.maximum(m_i, bmax)
            best = tl.where(bmax > m_i, start_n + barg, best)
            alpha = tl.exp(m_i - m_new)
            sm = tl.where(vis, s - m_new[:, None], 0.0)
            p = tl.where(vis, tl.exp(sm), 0.0)
            u_i = (u_i + (m_i - m_new) * l_i) * alpha + tl.sum(p * sm, 1)
            l_i = l_i * alpha + tl.sum(p, 1)

            vb = tl.load(v_base + offs_n[:, None] * svn + offs_d[None, :] * svd,
                         mask=col_ok[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(vb.dtype), vb, input_precision=DOT_PREC)

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

        # ---- epilogue -------------------------------------------------------------------------
        has = l_i > 0.0
        l_safe = tl.where(has, l_i, 1.0)
        if HAS_SINK:
            sink = tl.load(Sinks + h).to(tl.float32)
            mx = tl.maximum(m_i, sink)
            lse = mx + tl.log(l_i * tl.exp(m_i - mx) + tl.exp(sink - mx))
            f = 1.0 / (l_safe + tl.exp(tl.minimum(sink - m_i, 80.0)))
            p_real = l_i * f
            p_sink = tl.exp(sink - lse)
            ent = tl.where(has, p_real * ((lse - m_i) - u_i / l_safe), 0.0) + p_sink * (lse - sink)
        else:
            lse = tl.where(has, m_i + tl.log(l_safe), float("-inf"))
            f = 1.0 / l_safe
            ent = tl.where(has, tl.log(l_safe) - u_i / l_safe, 0.0)
        f = tl.where(has, f, 0.0)

        out = acc * f[:, None]
        tl.store(Out + b * sob + h64 * soh + offs_m[:, None] * som + offs_d[None, :] * sod,
                 out.to(Out.dtype.element_ty), mask=row_ok[:, None])
        row_off = pid_bh.to(tl.int64) * M + offs_m
        tl.store(Lse + row_off, lse, mask=row_ok)
        tl.store(Ent + row_off, ent, mask=row_ok)
        tl.store(TopIdx + row_off, best.to(tl.int64), mask=row_ok)
        tl.store(TopProb + row_off, f, mask=row_ok)

        if HAS_SPANS:
            tl.store(SpanMass + row_off[:, None] * NS + span_cols[None, :], span_acc * f[:, None],
                     mask=row_ok[:, None] & (span_cols[None, :] < NS))

        if NK_BLOCK > 0:  # epilogue: recompute the requested columns' scores with the final m, l
            for c0 in range(0, NK, NK_BLOCK):
                offs_c = c0 + tl.arange(0, NK_BLOCK)
                cmask = offs_c < NK
                cols = tl.load(Cols + offs_c, mask=cmask, other=-1)
                cvalid = cmask & (cols >= 0) & (cols < N)
                kc = tl.load(k_base + cols[None, :] * skn + offs_d[:, None] * skd, mask=cvalid[None, :], other=0.0)
                sc = tl.dot(q, kc, input_precision=DOT_PREC) * scale
                cvis = cvalid[None, :] & has[:, None]
                if CAUSAL:
                    cvis = cvis & (cols[None, :] <= q_pos[:, None])
                if HAS_WINDOW:
                    cvis = cvis & (cols[None, :] > q_pos[:, None] - window)
                if HAS_KV:
                    ckv = tl.load(KeyValid + b * skvb + cols * skvn, mask=cvalid, other=0)
                    cvis = cvis & (ckv != 0)[None, :]
                sc = tl.where(cvis, sc - m_i[:, None], 0.0)
                cp = tl.where(cvis, tl.exp(tl.minimum(sc, 0.0)) * f[:, None], 0.0)
                tl.store(ColProb + row_off[:, None] * NK + offs_c[None, :], cp,
                         mask=row_ok[:, None] & cmask[None, :])


def _get_kernel():
    interp = _interpreting()
    kern = _KERNEL_CACHE.get(interp)
    if kern is None:
        kern = triton.jit(_attention_stats_fwd)
        _KERNEL_CACHE[interp] = kern
    return kern


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
    causal: bool = True,
    window: int | None = None,
    key_valid: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
    key_columns: torch.Tensor | None = None,
    spans: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Attention output plus lse / entropy / top-1 / column probabilities / span masses in one pass.

    ``q`` ``[B, Hq, M, D]``, ``k``/``v`` ``[B, Hkv, N, D]`` (any strides), query row ``i`` at key
    position ``q_offset + i``. Raises ``ValueError`` for unsupported inputs (the caller then uses
    its torch path). Keys ``col_prob`` / ``span_mass`` are present only when requested.
    """
    return _attention_stats(q, k, v, scale=scale, q_offset=q_offset, causal=causal, window=window,
                            key_valid=key_valid, sinks=sinks, key_columns=key_columns, spans=spans)


def _attention_stats(
    q, k, v, *, scale, q_offset, causal=True, window=None, key_valid=None, sinks=None,
    key_columns=None, spans=None, block_m: int | None = None, block_n: int | None = None,
    num_warps: int | None = None, num_stages: int | None = None,
):
    if triton is None:
        raise ValueError("attention_stats_triton: triton is not installed")
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check(isinstance(t, torch.Tensor), f"{name} must be a torch.Tensor")
        _check(t.dim() == 4, f"{name} must be 4-D [B, H, L, D], got shape {tuple(t.shape)}")
        _check(t.dtype in _SUPPORTED_DTYPES, f"{name} dtype {t.dtype} not supported (float16/bfloat16/float32)")
    _check(q.dtype == k.dtype == v.dtype, f"q/k/v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    _check(q.device == k.device == v.device, "q/k/v must be on the same device")
    B, Hq, M, D = q.shape
    _check(tuple(k.shape) == tuple(v.shape), f"k {tuple(k.shape)} and v {tuple(v.shape)} shapes differ")
    Bk, Hkv, N, Dk = k.shape
    _check(Bk == B, f"batch mismatch: q has {B}, k/v have {Bk}")
    _check(Dk == D, f"head dim mismatch: q has {D}, k/v have {Dk}")
    _check(Hkv >= 1 and Hq % Hkv == 0, f"query heads ({Hq}) must be a multiple of KV heads ({Hkv})")
    _check(D >= 16 and (D & (D - 1)) == 0 and D <= 256,
           f"head dim {D} unsupported: must be a power of two in [16, 256]")
    interp = _interpreting()
    if interp:
        _check(q.device.type == "cpu", "TRITON_INTERPRET=1 needs CPU tensors")
        _check(q.dtype != torch.bfloat16, "bfloat16 is silently wrong under the Triton interpreter (TRITON_INTERPRET=1)")
    else:
        _check(q.is_cuda, "needs CUDA tensors (or TRITON_INTERPRET=1 with CPU tensors)")
    _check(isinstance(q_offset, int) and not isinstance(q_offset, bool), "q_offset must be an int")
    if window is not None:
        _check(isinstance(window, int) and not isinstance(window, bool), "window must be an int or None")
    dev = q.device

    if key_valid is not None:
        _check(tuple(key_valid.shape) == (B, N), f"key_valid must be [B, N] = {(B, N)}, got {tuple(key_valid.shape)}")
        kv = key_valid.to(dev)
        kv = kv.view(torch.uint8) if kv.dtype == torch.bool else (kv != 0).view(torch.uint8)
    if sinks is not None:
        _check(tuple(sinks.shape) == (Hq,), f"sinks must be [Hq] = ({Hq},), got {tuple(sinks.shape)}")
        sk = sinks.to(device=dev, dtype=torch.float32).contiguous()
    NK = 0
    if key_columns is not None:
        _check(key_columns.dim() == 1 and not key_columns.dtype.is_floating_point,
               "key_columns must be a 1-D integer tensor")
        NK = key_columns.shape[0]
        cols = key_columns.to(device=dev, dtype=torch.int64)
        cols = torch.where(cols < 0, cols + N, cols).contiguous()  # python-style negative indices
    NS = 0
    if spans is not None:
        _check(spans.dim() == 2 and spans.shape[1] == 3 and not spans.dtype.is_floating_point,
               "spans must be an integer tensor [NS, 3] of (start, end, window)")
        NS = spans.shape[0]
        _check(NS <= _MAX_SPANS, f"at most {_MAX_SPANS} spans per call, got {NS}")
        sp = spans.to(device=dev, dtype=torch.int64).contiguous()

    out = torch.empty((B, Hq, M, D), dtype=q.dtype, device=dev)
    lse = torch.empty((B, Hq, M), dtype=torch.float32, device=dev)
    ent = torch.empty_like(lse)
    top_idx = torch.empty((B, Hq, M), dtype=torch.int64, device=dev)
    top_prob = torch.empty_like(lse)
    col_prob = torch.empty((B, Hq, M, NK), dtype=torch.float32, device=dev) if key_columns is not None else None
    span_mass = torch.empty((B, Hq, M, NS), dtype=torch.float32, device=dev) if spans is not None else None
    res = {"out": out, "lse": lse, "entropy": ent, "top1_idx": top_idx, "top1_prob": top_prob}
    if col_prob is not None:
        res["col_prob"] = col_prob
    if span_mass is not None:
        res["span_mass"] = span_mass
    if M == 0 or B * Hq == 0:
        return res

    # Fixed heuristics (no autotune: it breaks the interpreter and would retune at every decode
    # length). Chosen from ptxas register/spill reports for sm_90; fp32 uses exact "ieee" dots on
    # CUDA cores, which needs smaller key blocks.
    fp32 = q.dtype == torch.float32
    if block_m is None:
        block_m = min(64, max(16, _next_pow2(M)))
    if block_n is None:
        block_n = 32 if (fp32 or D >= 256 or D == 64) else 64
    if num_warps is None:
        num_warps = 4 if (D <= 64 or block_m <= 16) else 8
    if num_stages is None:
        num_stages = 1 if (fp32 or D >= 256) else 2
    dummy = lse  # placeholder pointer for absent optional inputs (never dereferenced)
    kv_arg = kv if key_valid is not None else dummy
    grid = (triton.cdiv(M, block_m), B * Hq)
    _get_kernel()[grid](
        q, k, v, out, lse, ent, top_idx, top_prob,
        kv_arg, sk if sinks is not None else dummy,
        cols if NK else dummy, col_prob if NK else dummy,
        sp if NS else dummy, span_mass if NS else dummy,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        *(kv.stride() if key_valid is not None else (0, 0)),
        Hq, Hq // Hkv, M, N, int(q_offset), int(window) if window is not None else 0, float(scale), NK, NS,
        BLOCK_M=block_m, BLOCK_N=block_n, HEAD_D=D,
        CAUSAL=bool(causal), HAS_WINDOW=window is not None, HAS_KV=key_valid is not None,
        HAS_SINK=sinks is not None,
        NK_BLOCK=min(64, max(16, _next_pow2(NK))) if NK else 0, HAS_SPANS=NS > 0, NS_PAD=_next_pow2(NS),
        DOT_PREC="ieee" if q.dtype == torch.float32 else None,
        num_warps=num_warps, num_stages=num_stages,
    )
    return res

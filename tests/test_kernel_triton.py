"""The Triton attention-statistics kernel against the float64 reference (CPU: Triton interpreter)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():  # must precede the first `import triton` in the process
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")

try:
    import workbench.kernels  # noqa: F401
except ImportError:  # plain `pytest` from elsewhere: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workbench.kernels.attention_stats import _attention_stats, attention_stats_triton, triton_available  # noqa: E402
from workbench.kernels.reference import BIG, reference_attention, standard_visibility  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA and TRITON_INTERPRET is not 1", allow_module_level=True)

# (probabilities / entropy / lse, out) absolute tolerances. fp16 inputs still get fp32 scores and
# statistics; only `out` sees fp16 rounding (P is cast to fp16 for P·V, the output is fp16).
TOL = {torch.float32: (1e-5, 1e-4), torch.float16: (1e-4, 5e-3)}


def _inputs(B, Hq, Hkv, M, N, D, dtype, seed, hf_layout=False):
    g = torch.Generator().manual_seed(seed)
    if hf_layout:  # HF keeps [B, L, H, D] and hands the kernel transposed views
        q = torch.randn(B, M, Hq, D, generator=g).transpose(1, 2)
        k = torch.randn(B, N, Hkv, D, generator=g).transpose(1, 2)
        v = torch.randn(B, N, Hkv, D, generator=g).transpose(1, 2)
    else:
        q, k, v = (torch.randn(B, H, L, D, generator=g) for H, L in ((Hq, M), (Hkv, N), (Hkv, N)))
    # scores with a decent spread so the distributions are not flat
    return [t.mul(1.5).to(dtype).to(DEVICE) for t in (q, k, v)]


def _check(res, ref, visible, dtype, n_cols=None, n_spans=None):
    tp, to = TOL[dtype]
    torch.testing.assert_close(res["out"].double().cpu(), ref["out"], atol=to, rtol=0)
    torch.testing.assert_close(res["lse"].double().cpu(), ref["lse"], atol=tp, rtol=tp)
    torch.testing.assert_close(res["entropy"].double().cpu(), ref["entropy"], atol=tp, rtol=0)
    torch.testing.assert_close(res["top1_prob"].double().cpu(), ref["topk_prob"][..., 0], atol=tp, rtol=0)
    # top-1 index: compare only where the reference top-2 gap is unambiguous
    p = ref["probs"].masked_fill(~visible, -1.0)
    top2 = p.topk(min(2, p.shape[-1]), dim=-1).values
    gap = (top2[..., 0] - top2[..., 1]) if top2.shape[-1] > 1 else torch.ones_like(top2[..., 0])
    clear = (gap > 1e-4) | (ref["topk_idx"][..., 0] < 0)
    idx = res["top1_idx"].cpu()
    assert idx.dtype == torch.int64
    assert torch.equal(idx[clear], ref["topk_idx"][..., 0][clear])
    assert clear.float().mean() > 0.9
    if n_cols is None:
        assert "col_prob" not in res
    else:
        assert res["col_prob"].shape[-1] == n_cols
        torch.testing.assert_close(res["col_prob"].double().cpu(), ref["col_prob"], atol=tp, rtol=0)
    if n_spans is None:
        assert "span_mass" not in res
    else:
        assert res["span_mass"].shape[-1] == n_spans
        torch.testing.assert_close(res["span_mass"].double().cpu(), ref["span_mass"], atol=tp, rtol=0)


def _run(B=1, Hq=2, Hkv=2, M=37, N=37, D=16, q_offset=0, causal=True, window=None, pad=None, sinks=False,
         cols=True, spans=True, dtype=torch.float32, hf_layout=False, blocks=(16, 16), seed=0):
    q, k, v = _inputs(B, Hq, Hkv, M, N, D, dtype, seed, hf_layout)
    scale = D**-0.5
    key_valid = None
    if pad is not None:  # left padding: batch row b has pad[b] padding keys at the front
        key_valid = torch.ones(B, N, dtype=torch.bool)
        for b, n_pad in enumerate(pad):
            key_valid[b, :n_pad] = False
    sink_t = torch.linspace(-1.0, 2.0, Hq) if sinks else None
    col_t = torch.tensor([0, 1, N // 2, N - 1]) if cols else None
    w = 6
    span_t = torch.tensor([[0, 1, BIG], [N // 3, N // 3 + 4, BIG], [0, N, w]]) if spans else None
    kw = dict(scale=scale, q_offset=q_offset, causal=causal, window=window,
              key_valid=None if key_valid is None else key_valid.to(DEVICE),
              sinks=None if sink_t is None else sink_t.to(DEVICE),
              key_columns=None if col_t is None else col_t.to(DEVICE),
              spans=None if span_t is None else span_t.to(DEVICE))
    if blocks is None:
        res = attention_stats_triton(q, k, v, **kw)
    else:
        res = _attention_stats(q, k, v, block_m=blocks[0], block_n=blocks[1], **kw)
    q_pos = q_offset + torch.arange(M)
    vis = standard_visibility(q_pos, N, causal=causal, window=window, key_valid=key_valid)
    ref = reference_attention(q.cpu(), k.cpu(), v.cpu(), scale=scale, visible=vis, q_pos=q_pos, sinks=sink_t,
                              key_columns=col_t, spans=span_t)
    assert res["out"].dtype == dtype and res["out"].shape == (B, Hq, M, D)
    for key in ("lse", "entropy", "top1_prob"):
        assert res[key].dtype == torch.float32 and res[key].shape == (B, Hq, M)
    _check(res, ref, vis.expand(B, Hq, M, N) if vis.dim() == 4 else vis[:, None].expand(B, Hq, M, N), dtype,
           n_cols=None if col_t is None else len(col_t), n_spans=None if span_t is None else len(span_t))
    return res


CASES = {
    # odd length, ragged last blocks, 3x3 blocks of 16, causal block skipping
    "causal_37": dict(),
    # non-causal, GQA 4:2, batch 2, no extras requested (keys must be absent)
    "noncausal_gqa_50": dict(B=2, Hq=4, Hkv=2, M=50, N=50, causal=False, cols=False, spans=False, seed=1),
    # MQA + sliding window (blocks before the window are skipped), D=32
    "mqa_window": dict(Hq=4, Hkv=1, M=50, N=50, D=32, window=7, seed=2),
    # non-causal sliding window (future keys visible)
    "noncausal_window": dict(M=40, N=40, causal=False, window=9, seed=3),
    # decode step with a KV cache + GQA + sinks, default (public) block sizes
    "decode": dict(Hq=4, Hkv=2, M=1, N=45, q_offset=44, sinks=True, blocks=None, seed=4),
    # prefill with a cache (M < N) + window, HF transposed (non-contiguous) layout
    "prefill_cache_hf": dict(Hq=4, Hkv=2, M=20, N=53, q_offset=33, window=16, hf_layout=True, seed=5),
    # left-padded batch of 2: rows 0..9 of batch 1 see no key at all (lse -inf, idx -1)
    "padding": dict(B=2, M=33, N=33, pad=(0, 10), seed=6),
    # same with sinks: fully padded rows put all mass on the sink (lse = sink, entropy 0)
    "padding_sinks": dict(B=2, M=33, N=33, pad=(3, 10), sinks=True, seed=7),
    # one multi-block run through the public entry point with its default blocks
    "public_130": dict(M=130, N=130, D=64, Hq=1, Hkv=1, sinks=True, blocks=None, seed=8),
}


@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference_fp32(name):
    res = _run(**CASES[name])
    if name == "noncausal_gqa_50":
        assert set(res) == {"out", "lse", "entropy", "top1_idx", "top1_prob"}
    if name == "padding":
        assert torch.isneginf(res["lse"][1, :, :10]).all()
        assert (res["top1_idx"][1, :, :10] == -1).all()
        assert (res["out"][1, :, :10] == 0).all()


@pytest.mark.parametrize("name", ["causal_37", "decode", "padding_sinks", "prefill_cache_hf"])
def test_matches_reference_fp16(name):
    _run(**{**CASES[name], "dtype": torch.float16})


def test_many_columns_and_spans():
    """> 64 key columns (several epilogue chunks, python-style negative index) and 5 spans."""
    B, H, M, N, D = 1, 2, 70, 70, 16
    q, k, v = _inputs(B, H, H, M, N, D, torch.float32, seed=10)
    cols = torch.cat([torch.arange(N), torch.tensor([-1, 3])])
    spans = torch.tensor([[0, 1, BIG], [5, 9, BIG], [0, N, 4], [20, 60, 10], [69, 70, BIG]])
    res = attention_stats_triton(q, k, v, scale=0.25, q_offset=0, key_columns=cols.to(DEVICE), spans=spans.to(DEVICE))
    q_pos = torch.arange(M)
    vis = standard_visibility(q_pos, N)
    ref = reference_attention(q.cpu(), k.cpu(), v.cpu(), scale=0.25, visible=vis, q_pos=q_pos, key_columns=cols,
                              spans=spans)
    _check(res, ref, vis[:, None].expand(B, H, M, N), torch.float32, n_cols=len(cols), n_spans=len(spans))
    torch.testing.assert_close(res["col_prob"][..., :N].double().cpu(), ref["probs"], atol=1e-6, rtol=0)


def test_skips_invisible_key_blocks():
    """Key blocks wholly past the diagonal / before the window are never read (NaN there is harmless)."""
    B, Hq, M, N, D, q_offset, window = 1, 2, 8, 96, 16, 40, 10
    q, k, v = _inputs(B, Hq, Hq, M, N, D, torch.float32, seed=9)
    # visible keys for q_pos 40..47 with window 10: 31..47 -> blocks of 16 [16, 48) are the only ones read
    k[:, :, 48:] = float("nan")
    v[:, :, 48:] = float("nan")
    k[:, :, :16] = float("nan")
    v[:, :, :16] = float("nan")
    res = _attention_stats(q, k, v, scale=0.25, q_offset=q_offset, causal=True, window=window, block_m=16, block_n=16)
    q_pos = q_offset + torch.arange(M)
    vis = standard_visibility(q_pos, N, window=window)
    clean = [t.nan_to_num(0.0).cpu() for t in (q, k, v)]
    ref = reference_attention(*clean, scale=0.25, visible=vis, q_pos=q_pos)
    _check(res, ref, vis[:, None].expand(B, Hq, M, N), torch.float32)


def test_entropy_extremes():
    """Uniform attention has entropy log(#visible); a dominant key has ~0 entropy and top1_prob ~1."""
    B, H, N, D = 1, 1, 24, 16
    q = torch.zeros(B, H, N, D, device=DEVICE)
    k = torch.randn(B, H, N, D, device=DEVICE)
    v = torch.randn(B, H, N, D, device=DEVICE)
    res = _attention_stats(q, k, v, scale=1.0, q_offset=0, block_m=16, block_n=16)
    n_vis = torch.arange(1, N + 1, dtype=torch.float32)
    torch.testing.assert_close(res["entropy"][0, 0].cpu(), n_vis.log(), atol=1e-5, rtol=0)
    torch.testing.assert_close(res["lse"][0, 0].cpu(), n_vis.log(), atol=1e-5, rtol=0)
    q2 = torch.zeros(B, H, 1, D, device=DEVICE)
    q2[..., 0] = 1.0
    k2 = torch.zeros(B, H, N, D, device=DEVICE)
    k2[:, :, 17, 0] = 200.0
    res2 = attention_stats_triton(q2, k2, v, scale=1.0, q_offset=N - 1)
    assert res2["top1_idx"].item() == 17
    assert abs(res2["top1_prob"].item() - 1.0) < 1e-6 and abs(res2["entropy"].item()) < 1e-5


def _bad(**over):
    q = torch.randn(1, 4, 8, 16, device=DEVICE)
    k = torch.randn(1, 2, 8, 16, device=DEVICE)
    args = dict(q=q, k=k, v=k.clone(), scale=0.25, q_offset=0)
    args.update(over)
    return args


@pytest.mark.parametrize("args", [
    _bad(q=torch.randn(1, 3, 8, 16, device=DEVICE)),  # Hq % Hkv != 0
    _bad(q=torch.randn(1, 4, 8, 24, device=DEVICE), k=torch.randn(1, 2, 8, 24, device=DEVICE),
         v=torch.randn(1, 2, 8, 24, device=DEVICE)),  # head dim not a power of two
    _bad(q=torch.randn(1, 4, 8, 8, device=DEVICE), k=torch.randn(1, 2, 8, 8, device=DEVICE),
         v=torch.randn(1, 2, 8, 8, device=DEVICE)),  # head dim < 16
    _bad(q=torch.randn(1, 4, 8, 16, dtype=torch.float64, device=DEVICE)),  # dtype
    _bad(v=torch.randn(1, 2, 9, 16, device=DEVICE)),  # k/v mismatch
    _bad(q=torch.randn(4, 8, 16, device=DEVICE)),  # not 4-D
    _bad(key_valid=torch.ones(1, 7, dtype=torch.bool, device=DEVICE)),
    _bad(sinks=torch.zeros(2, device=DEVICE)),
    _bad(spans=torch.zeros(2, 2, dtype=torch.long, device=DEVICE)),
    _bad(spans=torch.zeros(65, 3, dtype=torch.long, device=DEVICE)),  # too many spans
] + ([_bad(q=torch.randn(1, 4, 8, 16).bfloat16(), k=torch.randn(1, 2, 8, 16).bfloat16(),
           v=torch.randn(1, 2, 8, 16).bfloat16())] if DEVICE == "cpu" else []),  # bf16 under the interpreter
    ids=["heads", "dim24", "dim8", "float64", "kv_shape", "ndim", "key_valid", "sinks", "spans", "spans65"]
    + (["bf16_interpreter"] if DEVICE == "cpu" else []))
def test_bad_input_raises(args):
    with pytest.raises(ValueError):
        attention_stats_triton(**args)


def test_triton_available():
    assert triton_available() is True

"""The Triton attention-statistics kernel against the float64 reference (CPU: Triton interpreter).

Every statistic (output, lse, entropy, top-k, key columns, spans, key mass/count, tiles, distance
moments, row-key probabilities) and every edit (uniform, calibrate, mask_keys, streaming, with and
without query positions) is compared with ``kernels/reference.py`` on small shapes: GQA/MQA, windows,
padding, learned sinks, KV-cache offsets, decode rows split over keys, odd head dims, fp32 and fp16;
planted heads check the head-taxonomy statistics against answers known by hand.
"""
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

from workbench.attention.request import HeadEdit, LayerRequest  # noqa: E402
from workbench.kernels import attention_stats as ats  # noqa: E402
from workbench.kernels.attention_stats import _attention_stats, attention_stats_triton, triton_available  # noqa: E402
from workbench.kernels import capabilities, semantics  # noqa: E402
from workbench.kernels.reference import BIG, example_edits, max_errors, reference_attention, standard_visibility  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA and TRITON_INTERPRET is not 1", allow_module_level=True)

# absolute tolerances. fp16 inputs still get fp32 scores and statistics (fp16 products are exact in
# fp32); only `out` sees fp16 rounding (P is cast to fp16 for P·V).
TOL = {torch.float32: dict(stats=3e-6, out=1e-5), torch.float16: dict(stats=3e-6, out=4e-3)}


def _inputs(B, Hq, Hkv, M, N, D, Dv, dtype, seed, hf_layout=False):
    g = torch.Generator().manual_seed(seed)
    if hf_layout:  # HF keeps [B, L, H, D] and hands the kernel transposed views
        q = torch.randn(B, M, Hq, D, generator=g).transpose(1, 2)
        k = torch.randn(B, N, Hkv, D, generator=g).transpose(1, 2)
        v = torch.randn(B, N, Hkv, Dv, generator=g).transpose(1, 2)
    else:
        q = torch.randn(B, Hq, M, D, generator=g)
        k = torch.randn(B, Hkv, N, D, generator=g)
        v = torch.randn(B, Hkv, N, Dv, generator=g)
    # scores with a decent spread so the distributions are not flat
    return [t.mul(1.5).to(dtype).to(DEVICE) for t in (q, k, v)]


#: the distance moments are compared relative to their scale (see max_errors), like entropy's sums
LOOSE = ("entropy", "key_mass", "dist_sum", "dist_sq_sum")


def check(res, ref, dtype, *, topk, n_cols=0, n_spans=0, tiles=(), key_mass=False, dist=False, row_keys=False):
    """Every statistic the call returned is within tolerance of the reference, and exactly the requested ones."""
    tol = TOL[dtype]
    assert res["topk_idx"].shape[-1] == topk and res["topk_idx"].dtype == torch.int64
    for name, n in (("col_prob", n_cols), ("span_mass", n_spans), ("key_mass", key_mass), ("key_count", key_mass),
                    ("dist_sum", dist), ("dist_sq_sum", dist), ("row_key_prob", row_keys)):  # fmt: skip
        assert (name in res) == bool(n), name
        if n and name in ("dist_sum", "dist_sq_sum", "row_key_prob"):
            assert res[name].dtype == torch.float32 and res[name].shape == res["lse"].shape, name
    assert {f"tile{t}" for t in range(len(tiles))} == {k for k in res if k.startswith("tile")}
    errors = max_errors(res, ref)
    assert {"dist_sum", "dist_sq_sum"} <= set(errors) if dist else True
    assert "row_key_prob" in errors if row_keys else True
    for name, e in errors.items():
        if name in ("topk_idx", "key_count"):
            assert e == 0, f"{name}: {e:.0f} mismatches"
        elif name == "topk_idx_checked":
            assert e > 0.8, "too many near-ties to compare top-k indices"
        else:
            limit = tol["out"] if name == "out" else tol["stats"] * (10 if name in LOOSE else 1)
            assert e <= limit, f"{name}: max error {e:.2e} > {limit:.0e}"


def run_case(B=1, Hq=2, Hkv=2, M=37, N=37, D=16, Dv=None, q_offset=None, kv_offset=0, causal=True, window=None,
             pad=None, sinks=False, topk=3, cols=True, spans=True, tiles=True, key_mass=True, edits=False,
             dist=False, row_keys=False, dtype=torch.float32, hf_layout=False, blocks=None, splits=None, seed=0):
    """Everything requested at once through the kernel and through the reference; returns both."""
    Dv = Dv or D
    q, k, v = _inputs(B, Hq, Hkv, M, N, D, Dv, dtype, seed, hf_layout)
    if q_offset is None:
        q_offset = kv_offset + N - M  # the cache layout: the last M keys are the queries'
    scale = D**-0.5
    key_valid = None
    if pad is not None:  # left padding: sequence b has pad[b] padding keys at the front
        key_valid = torch.ones(B, N, dtype=torch.bool)
        for b, n_pad in enumerate(pad):
            key_valid[b, :n_pad] = False
    a = kv_offset  # absolute position of the first key
    sink_t = torch.linspace(-1.0, 2.0, Hq) if sinks else None
    col_t = torch.tensor([a, a + 1, a + N // 2, a + N - 1, a + N + 3]) if cols else None  # the last: beyond the cache
    span_t = torch.tensor([[a, a + 1, BIG], [a + N // 3, a + N // 3 + 4, BIG], [0, BIG, 6]]) if spans else None
    tile_t = ((q_offset, q_offset + 5, a, a + 7), (q_offset + M - 3, q_offset + M + 9, a + N - 4, a + N + 2)) if tiles else ()
    edit_l = example_edits(Hq, q_offset, M, key_first=kv_offset) if edits else []
    rk_t = _row_keys(B, M, N, q_offset, kv_offset, seed) if row_keys else None
    kw = dict(distance_moments=dist, row_keys=rk_t,
              scale=scale, q_offset=q_offset, kv_offset=kv_offset, causal=causal, window=window,
              key_valid=None if key_valid is None else key_valid.to(DEVICE),
              sinks=None if sink_t is None else sink_t.to(DEVICE),
              key_columns=None if col_t is None else col_t.to(DEVICE),
              spans=None if span_t is None else span_t.to(DEVICE), topk=topk, tiles=tile_t, key_mass=key_mass,
              edits=edit_l)
    bm, bn = blocks if blocks else (None, None)
    res = _attention_stats(q, k, v, block_m=bm, block_n=bn, splits=splits, **kw)
    q_pos = q_offset + torch.arange(M)
    vis = standard_visibility(q_pos, N, causal=causal, window=window, key_valid=key_valid, kv_offset=kv_offset)
    ref = reference_attention(q.cpu(), k.cpu(), v.cpu(), scale=scale, visible=vis, q_pos=q_pos, kv_offset=kv_offset,
                              sinks=sink_t, key_columns=col_t, spans=span_t, topk=topk, tiles=tile_t,
                              key_mass=key_mass, edits=edit_l, distance_moments=dist, row_keys=rk_t)
    assert res["out"].dtype == dtype and res["out"].shape == (B, Hq, M, Dv)
    for name in ("lse", "entropy"):
        assert res[name].dtype == torch.float32 and res[name].shape == (B, Hq, M)
    check(res, ref, dtype, topk=topk, n_cols=0 if col_t is None else len(col_t),
          n_spans=0 if span_t is None else len(span_t), tiles=tile_t, key_mass=key_mass, dist=dist, row_keys=row_keys)
    return res, ref


def _row_keys(B, M, N, q_offset, kv_offset, seed):
    """Row keys of every kind: none (-1), the row's previous and own position, random keys that are visible,
    in the future, padded, masked by an edit, or outside the cache (before ``kv_offset`` and past its end)."""
    g = torch.Generator().manual_seed(100 + seed)
    rk = kv_offset + torch.randint(max(-3, -kv_offset), N + 3, (B, M), generator=g)
    q_pos = q_offset + torch.arange(M)
    rk[:, 1::5] = q_pos[1::5] - 1
    rk[:, 2::5] = q_pos[2::5]
    rk[:, ::5] = -1
    return rk


CASES = {
    # odd length, ragged last blocks of 16, causal block skipping, top-3, every statistic
    "causal_37": dict(blocks=(16, 16)),
    # non-causal, GQA 4:2, batch 2 with left padding, top-2
    "noncausal_gqa_pad": dict(B=2, Hq=4, Hkv=2, M=24, N=24, causal=False, pad=(0, 5), topk=2, seed=1),
    # MQA + sliding window (blocks before the window skipped) + every edit, D=32
    "mqa_window_edits": dict(Hq=4, Hkv=1, M=40, N=40, D=32, window=7, edits=True, blocks=(16, 16), seed=2),
    # decode row over a cache, keys split over 3 programs and combined, GQA + sinks + every edit, top-4
    "decode_split_edits": dict(Hq=4, Hkv=2, M=1, N=70, sinks=True, edits=True, topk=4, blocks=(16, 16), splits=3, seed=3),
    # decode rows, split, padding + sinks, top-8 over 6 keys (slots past the keys: -1 / 0)
    "decode_split_top8": dict(B=2, Hq=2, Hkv=1, M=2, N=6, pad=(0, 2), sinks=True, topk=8, blocks=(16, 16), splits=2, seed=4),
    # prefill continuation (M < N) with a cache that starts at position 5 (absolute coordinates),
    # window, HF transposed (non-contiguous) layout, every edit
    "prefill_cache_offset": dict(Hq=4, Hkv=2, M=20, N=53, kv_offset=5, window=16, hf_layout=True, edits=True, seed=5),
    # left-padded batch with sinks and every edit: fully padded rows put all mass on the sink, except
    # under `uniform`, where such a row has nothing (lse keeps the sink, entropy 0, top-k -1)
    "padding_sinks_edits": dict(B=2, Hq=4, Hkv=2, M=21, N=21, pad=(3, 10), sinks=True, edits=True, seed=6),
    # head dims that are not powers of two, Dv ≠ D (DeepSeek-style), 3 query heads on 1 KV head
    "odd_head_dims": dict(Hq=3, Hkv=1, M=19, N=19, D=24, Dv=40, seed=7),
    # the public defaults over several 64-row blocks and key blocks, sinks, top-1 only
    "public_130": dict(M=130, N=130, D=64, Hq=1, Hkv=1, sinks=True, topk=1, tiles=False, seed=8),
    # head-taxonomy statistics (distance moments, row-key probabilities): a prefill continuation over a
    # cache at offset 3 with left padding, GQA, a window, learned sinks and every edit, beside key columns,
    # spans and tiles (the row-key pass reuses the saved normalisers); 3 key blocks per row: moment merges
    "taxonomy_prefill": dict(B=2, Hq=4, Hkv=2, M=40, N=48, kv_offset=3, pad=(0, 9), window=12, sinks=True, edits=True,
                             dist=True, row_keys=True, key_mass=False, blocks=(64, 16), seed=15),
    # ...and decode rows split over keys (partial moment states merged by the combine: a split of two key
    # blocks and one of one), padding, sinks, every edit
    "taxonomy_decode_split": dict(B=2, Hq=4, Hkv=2, M=2, N=70, kv_offset=5, pad=(0, 6), window=40, sinks=True,
                                  edits=True, dist=True, row_keys=True, cols=False, spans=False, tiles=False,
                                  key_mass=False, blocks=(16, 32), splits=2, seed=16),
}
# distance moments over negative distances (non-causal) and with the other statistics of existing cases
CASES["noncausal_gqa_pad"].update(dist=True, row_keys=True)


@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference_fp32(name):
    res, ref = run_case(**CASES[name])
    if name == "padding_sinks_edits":  # rows of sequence 1 that see no key
        assert torch.isfinite(res["lse"][1, :, :10]).all()  # the sink slot is always there...
        assert (res["topk_idx"][1, :, :10] == -1).all()
        assert (res["out"][1, :, :10] == 0).all()
        assert (res["entropy"][1, 0, 7:10] == 0).all()  # ...but not under uniform (rows 7.. are edited)


@pytest.mark.parametrize("name", ["causal_37", "decode_split_edits", "padding_sinks_edits", "taxonomy_prefill"])
def test_matches_reference_fp16(name):
    run_case(**{**CASES[name], "dtype": torch.float16})


def test_edits_change_what_they_should():
    """The edits above are not no-ops: each edited head differs from the unedited reference, the others
    do not (so the edit comparisons can fail)."""
    B, Hq, M, N = 1, 4, 24, 24
    q, k, v = _inputs(B, Hq, 2, M, N, 16, 16, torch.float32, 9)
    vis = standard_visibility(torch.arange(M), N)
    kw = dict(scale=0.25, visible=vis, q_pos=torch.arange(M))
    plain = reference_attention(q, k, v, **kw)
    edited = reference_attention(q, k, v, edits=example_edits(Hq, 0, M), **kw)
    tri = attention_stats_triton(q, k, v, scale=0.25, q_offset=0, edits=example_edits(Hq, 0, M))
    for h in range(Hq):
        assert (edited["out"][:, h] - plain["out"][:, h]).abs().max() > 1e-2
        torch.testing.assert_close(tri["out"][:, h].double(), edited["out"][:, h], atol=2e-6, rtol=0)
    torch.testing.assert_close(edited["probs"].sum(-1), torch.ones(B, Hq, M, dtype=torch.float64))
    rows = torch.arange(M) >= M // 3
    assert torch.equal(edited["lse"][:, 0], plain["lse"][:, 0])  # uniform keeps the unedited lse
    assert (edited["entropy"][:, 0, rows] - torch.arange(1, M + 1, dtype=torch.float64)[rows].log()).abs().max() < 1e-12


def test_top_k_ties_go_to_the_lower_position():
    """Identical keys give exactly tied scores; the lower key position wins, as in the reference."""
    B, H, M, N, D = 1, 1, 6, 40, 16
    g = torch.Generator().manual_seed(10)
    q = torch.randn(B, H, M, D, generator=g)
    k = torch.randn(B, H, N, D, generator=g)
    k[:, :, 20:] = k[:, :, :20]  # key j+20 duplicates key j
    v = torch.randn(B, H, N, D, generator=g)
    res = _attention_stats(q, k, v, scale=0.25, q_offset=0, causal=False, topk=4, block_m=16, block_n=16)
    ref = reference_attention(q, k, v, scale=0.25, visible=torch.ones(1, M, N, dtype=torch.bool), topk=4)
    assert torch.equal(res["topk_idx"], ref["topk_idx"])
    i = res["topk_idx"][0, 0]  # each duplicated pair is adjacent in rank, the lower copy first
    assert torch.equal(i[:, 1], i[:, 0] + 20) and torch.equal(i[:, 3], i[:, 2] + 20)


def test_decode_split_equals_unsplit():
    """Flash-decoding's combine gives the unsplit results (same statistics, same top-k order)."""
    kw = dict(Hq=4, Hkv=2, M=1, N=48, sinks=True, topk=3, edits=True, cols=False, tiles=False, key_mass=False,
              blocks=(16, 16), seed=11)
    one, _ = run_case(splits=1, **kw)
    many, _ = run_case(splits=6, **kw)
    for name in ("out", "lse", "entropy", "topk_prob", "span_mass"):
        torch.testing.assert_close(one[name], many[name], atol=1e-6, rtol=0, msg=name)
    assert torch.equal(one["topk_idx"], many["topk_idx"])


def test_split_heuristic_uses_idle_programs(monkeypatch):
    """Decode steps split over keys when the rows alone leave programs idle; long prefill does not."""
    ats._build()
    real, grids = ats._fwd_kernel, []

    class Spy:  # records each launch grid (rows, batch·heads, splits)
        def __getitem__(self, grid):
            grids.append(grid)
            return real[grid]

    monkeypatch.setattr(ats, "_fwd_kernel", Spy())
    monkeypatch.setattr(ats, "INTERPRETER_SMS", 8)
    q, k, v = _inputs(1, 2, 1, 1, 256, 16, 16, torch.float32, 12)
    dec = attention_stats_triton(q, k, v, scale=0.25, q_offset=255, topk=2)
    assert grids[-1][2] > 1  # keys split: 2 heads cannot fill 8 "SMs"
    vis = standard_visibility(torch.tensor([255]), 256)
    check(dec, reference_attention(q, k, v, scale=0.25, visible=vis, topk=2), torch.float32, topk=2)
    monkeypatch.setattr(ats, "INTERPRETER_SMS", 1)
    q2, k2, v2 = _inputs(1, 2, 1, 64, 64, 16, 16, torch.float32, 13)
    attention_stats_triton(q2, k2, v2, scale=0.25, q_offset=0)
    assert grids[-1][2] == 1


def test_stats_off_returns_only_the_output():
    q, k, v = _inputs(1, 2, 2, 12, 12, 16, 16, torch.float32, 14)
    res = attention_stats_triton(q, k, v, scale=0.25, q_offset=0, key_columns=torch.tensor([0]), key_mass=True,
                                 edits=[HeadEdit("uniform", 1)], stats=False)
    assert set(res) == {"out"}
    vis = standard_visibility(torch.arange(12), 12)
    ref = reference_attention(q, k, v, scale=0.25, visible=vis, edits=[HeadEdit("uniform", 1)])
    torch.testing.assert_close(res["out"].double(), ref["out"], atol=2e-6, rtol=0)


def test_skips_invisible_key_blocks():
    """Key blocks wholly past the diagonal / before the window are never read (NaN there is harmless)."""
    B, Hq, M, N, D, q_offset, window = 1, 2, 8, 96, 16, 40, 10
    q, k, v = _inputs(B, Hq, Hq, M, N, D, D, torch.float32, seed=9)
    # visible keys for q_pos 40..47 with window 10: 31..47 -> blocks of 16 [16, 48) are the only ones read
    for t in (k, v):
        t[:, :, 48:] = float("nan")
        t[:, :, :16] = float("nan")
    res = _attention_stats(q, k, v, scale=0.25, q_offset=q_offset, window=window, topk=2, block_m=16, block_n=16)
    q_pos = q_offset + torch.arange(M)
    vis = standard_visibility(q_pos, N, window=window)
    clean = [t.nan_to_num(0.0).cpu() for t in (q, k, v)]
    ref = reference_attention(*clean, scale=0.25, visible=vis, q_pos=q_pos, topk=2)
    check(res, ref, torch.float32, topk=2)


def test_entropy_extremes():
    """Uniform attention has entropy log(#visible); a dominant key has ~0 entropy and top-1 prob ~1."""
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
    assert res2["topk_idx"].item() == 17
    assert abs(res2["topk_prob"].item() - 1.0) < 1e-6 and abs(res2["entropy"].item()) < 1e-5


def _bad(**over):
    q = torch.randn(1, 4, 8, 16, device=DEVICE)
    k = torch.randn(1, 2, 8, 16, device=DEVICE)
    args = dict(q=q, k=k, v=k.clone(), scale=0.25, q_offset=0)
    args.update(over)
    return args


BAD = {
    "heads": _bad(q=torch.randn(1, 3, 8, 16, device=DEVICE)),  # Hq % Hkv != 0
    "dim300": _bad(q=torch.randn(1, 4, 8, 300, device=DEVICE), k=torch.randn(1, 2, 8, 300, device=DEVICE),
                   v=torch.randn(1, 2, 8, 300, device=DEVICE)),  # head dim > 256
    "float64": _bad(q=torch.randn(1, 4, 8, 16, dtype=torch.float64, device=DEVICE)),
    "kv_shape": _bad(v=torch.randn(1, 2, 9, 16, device=DEVICE)),
    "ndim": _bad(q=torch.randn(4, 8, 16, device=DEVICE)),
    "key_valid": _bad(key_valid=torch.ones(1, 7, dtype=torch.bool, device=DEVICE)),
    "sinks": _bad(sinks=torch.zeros(2, device=DEVICE)),
    "spans": _bad(spans=torch.zeros(2, 2, dtype=torch.long, device=DEVICE)),
    "spans65": _bad(spans=torch.zeros(65, 3, dtype=torch.long, device=DEVICE)),
    "topk9": _bad(topk=9),
    "tile": _bad(tiles=((3, 2, 0, 4),)),
    "output_edit": _bad(edits=[HeadEdit("zero", 0)]),
    "edit_head": _bad(edits=[HeadEdit("uniform", 4)]),
    "two_streaming": _bad(edits=[HeadEdit("streaming", 0, sink=1, recent=2), HeadEdit("streaming", 0, sink=2, recent=2)]),
    "uniform_calibrate": _bad(edits=[HeadEdit("uniform", 1), HeadEdit("calibrate", 1, keys=torch.tensor([0]), beta=0.5)]),
    "nine_masks": _bad(edits=[HeadEdit("mask_keys", 0, keys=torch.tensor([i])) for i in range(9)]),
    "beta0": _bad(edits=[HeadEdit("calibrate", 0, keys=torch.tensor([0]), beta=0.0)]),
}
if DEVICE == "cpu":
    BAD["bf16_interpreter"] = _bad(q=torch.randn(1, 4, 8, 16).bfloat16(), k=torch.randn(1, 2, 8, 16).bfloat16(),
                                   v=torch.randn(1, 2, 8, 16).bfloat16())


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_raises(name):
    with pytest.raises(ValueError, match="attention_stats_triton"):
        attention_stats_triton(**BAD[name])


def test_triton_available():
    assert triton_available() is True


def _planted(P: int, N: int, a: float = 6.0):
    """One-hot keys (key j = a·e_j) and four query heads on one KV head, scale 1 (score a² = 36 on the target,
    0 elsewhere: the target's probability is 1 to fp32 precision): 0 previous token (row 0: its own key),
    1 induction on a period-P repeat (rows ≥ P attend to j*+1 = i−P+1; earlier rows uniform), 2 first token,
    3 uniform (zero query)."""
    D = 64
    assert N <= D
    q = torch.zeros(1, 4, N, D)
    k = a * torch.eye(N, D)[None, None]
    for i in range(N):
        q[0, 0, i, max(i - 1, 0)] = a
        if i >= P:
            q[0, 1, i, i - P + 1] = a
        q[0, 2, i, 0] = a
    return q, k, torch.randn(1, 1, N, 16, generator=torch.Generator().manual_seed(17))


@pytest.mark.parametrize("decode", [False, True])
def test_planted_heads_by_hand(decode):
    """Answers known without the reference: a previous-token head has dist_sum = dist_sq_sum = 1 and all of
    its mass on row key i−1; an induction head (period P) has distance P−1 and induction mass 1; a first-token
    head (i, i²); a uniform head (i/2, i(2i+1)/6) and 1/(i+1) on any visible row key. Batch 0 asks for the
    induction keys of the token sequence, batch 1 for the previous position. ``decode``: the last two rows
    only, keys split over programs."""
    P, N = 12, 30
    tokens = torch.arange(N) % P  # P distinct tokens, repeated
    q, k, v = _planted(P, N)
    q, k, v = (t.expand(2, -1, -1, -1).to(DEVICE) for t in (q, k, v))
    rows = torch.arange(N - 2, N) if decode else torch.arange(N)
    ind = semantics.induction_keys(tokens[None], rows)[0]
    assert torch.equal(ind, torch.where(rows >= P, rows - P + 1, -1))
    row_keys = torch.stack([ind, rows - 1])  # row 0's previous position is -1: nothing to measure
    kw = dict(block_m=16, block_n=16, splits=2) if decode else dict(block_m=16, block_n=16)
    res = _attention_stats(q[:, :, rows], k, v, scale=1.0, q_offset=int(rows[0]), distance_moments=True,
                           row_keys=row_keys.to(DEVICE), **kw)
    i = rows.double()
    close = lambda name, h, want: torch.testing.assert_close(  # noqa: E731
        res[name][:, h].cpu().double(), want.expand(2, -1), atol=1e-5, rtol=1e-6, equal_nan=True,
        msg=f"{name} head {h}")
    ones = (i >= 1).double()
    close("dist_sum", 0, ones)
    close("dist_sq_sum", 0, ones)
    late = i >= P
    close("dist_sum", 1, torch.where(late, P - 1.0, i / 2))
    close("dist_sq_sum", 1, torch.where(late, (P - 1.0) ** 2, i * (2 * i + 1) / 6))
    close("dist_sum", 2, i)
    close("dist_sq_sum", 2, i * i)
    close("dist_sum", 3, i / 2)
    close("dist_sq_sum", 3, i * (2 * i + 1) / 6)
    rkp = res["row_key_prob"].cpu().double()
    nan = torch.tensor(float("nan"), dtype=torch.float64)
    expect = {  # (batch, head): row_key_prob per row
        (0, 0): torch.where(late, 0.0, nan), (1, 0): torch.where(i >= 1, 1.0, nan),
        (0, 1): torch.where(late, 1.0, nan), (1, 1): torch.where(i >= 1, torch.where(late, 0.0, 1 / (i + 1)), nan),
        (0, 2): torch.where(late, 0.0, nan), (1, 2): torch.where(i == 1, 1.0, torch.where(i >= 1, 0.0, nan)),
        (0, 3): torch.where(late, 1 / (i + 1), nan), (1, 3): torch.where(i >= 1, 1 / (i + 1), nan),
    }
    for (b, h), want in expect.items():
        torch.testing.assert_close(rkp[b, h], want, atol=1e-6, rtol=0, equal_nan=True, msg=f"row_key_prob b{b} h{h}")


def test_induction_keys_and_row_key_prob_definitions():
    """semantics.induction_keys against a loop (padding never an occurrence); row_key_prob: 0 outside the cache
    or out of view, NaN for -1, and the same when the keys come in blocks."""
    g = torch.Generator().manual_seed(18)
    ids = torch.randint(0, 5, (3, 40), generator=g)
    valid = torch.ones(3, 40, dtype=torch.bool)
    valid[1, :7] = False
    want = torch.full((3, 40), -1)
    for b in range(3):
        for i in range(40):
            earlier = [j for j in range(i) if valid[b, j] and ids[b, j] == ids[b, i]]
            if valid[b, i] and earlier:
                want[b, i] = earlier[-1] + 1
    assert torch.equal(semantics.induction_keys(ids, valid=valid), want)
    assert torch.equal(semantics.induction_keys(ids, torch.tensor([5, 39]), valid=valid), want[:, [5, 39]])
    p = torch.rand(3, 2, 40, 40, generator=g, dtype=torch.float64).tril()
    key_pos = torch.arange(40) + 100
    rk = want + 100
    rk[want < 0] = -1
    rk[0, 3], rk[0, 4], rk[0, 5] = 99, 140, 100 + 30  # before / after the cache; a future key (p = 0 there)
    got = semantics.row_key_prob(p, rk, key_pos)
    assert torch.equal(torch.isnan(got), (rk < 0)[:, None].expand_as(got))
    assert (got[0, :, 3:6] == 0).all()
    ok = rk >= 100
    sel = torch.gather(p, 3, (rk - 100).clamp(0, 39)[:, None, :, None].expand(3, 2, 40, 1))[..., 0]
    assert torch.equal(got[ok[:, None].expand_as(got)], sel[ok[:, None].expand_as(sel)])
    blocks = sum(semantics.row_key_prob(p[..., j:j + 16], rk, key_pos[j:j + 16]) for j in range(0, 40, 16))
    torch.testing.assert_close(blocks, got, equal_nan=True, rtol=0, atol=0)
    q_pos = key_pos
    d1, d2 = semantics.distance_moments(p, q_pos, key_pos)
    parts = [semantics.distance_moments(p[..., j:j + 16], q_pos, key_pos[j:j + 16]) for j in range(0, 40, 16)]
    torch.testing.assert_close(sum(x for x, _ in parts), d1)
    torch.testing.assert_close(sum(x for _, x in parts), d2)


def test_capabilities_request_the_taxonomy_statistics():
    request = LayerRequest(record=True, distance_moments=True, row_keys=torch.zeros(1, 3, dtype=torch.long))
    need = capabilities.requested(request, structured_mask=True)
    assert "distance_moments" in need and "row_key_prob" in need and capabilities.triton_covers(need)
    assert capabilities.CAPABILITIES["distance_moments"].chunked and capabilities.CAPABILITIES["row_key_prob"].chunked
    off = capabilities.requested(LayerRequest(record=False, distance_moments=True), structured_mask=True)
    assert "distance_moments" not in off


def test_route_returns_the_taxonomy_statistics():
    """triton_path.run maps the request fields onto the kernel and returns exactly these keys, shapes, dtypes."""
    from workbench.attention import triton_path
    from workbench.attention.masks import lazy_mask

    B, Hq, Hkv, M, N = 2, 4, 2, 3, 20
    q, k, v = _inputs(B, Hq, Hkv, M, N, 16, 16, torch.float32, 19)
    pad = torch.ones(B, N, dtype=torch.long)
    pad[1, :4] = 0
    mask = lazy_mask(B, M, N, q_offset=N - M, attention_mask=pad.to(DEVICE), device=DEVICE)
    rk = torch.tensor([[-1, 3, 17], [2, 18, 25]])
    request = LayerRequest(record=True, distance_moments=True, row_keys=rk, edits=[HeadEdit("uniform", 1)])
    assert triton_path.covers(True, request, q, v, mask, None)
    q_pos = torch.arange(N - M, N, device=DEVICE)
    out, st = triton_path.run(q, k, v, 0.25, mask, None, None, request, q_pos)
    for name in ("dist_sum", "dist_sq_sum", "row_key_prob"):
        assert st[name].shape == (B, Hq, M) and st[name].dtype == torch.float32, name
    vis = standard_visibility(q_pos.cpu(), N, key_valid=pad.bool())
    ref = reference_attention(q.cpu(), k.cpu(), v.cpu(), scale=0.25, visible=vis, q_pos=q_pos.cpu(), edits=request.edits,
                              distance_moments=True, row_keys=rk)
    err = max_errors({n: st[n] for n in ("dist_sum", "dist_sq_sum", "row_key_prob")}, ref)
    assert max(err.values()) < 3e-5, err
    _, plain = triton_path.run(q, k, v, 0.25, mask, None, None, LayerRequest(record=True), q_pos)
    assert not {"dist_sum", "dist_sq_sum", "row_key_prob"} & set(plain)


def test_distance_moments_at_128k_distances():
    """Rows at absolute position ~131K over a small cache: distances ≈ 1.3e5 (d² ≈ 1.7e10), a sharp head
    and spread heads; the fp32 outputs keep float32 relative precision (no raw d² sums: centred merges)."""
    B, Hq, M, N, D = 1, 3, 2, 96, 16
    q, k, v = _inputs(B, Hq, 1, M, N, D, D, torch.float32, 20)
    k[0, 0, 50, 0] = 40.0  # head 0: all mass on key 50
    q[0, 0, :, :] = 0.0
    q[0, 0, :, 0] = 1.0
    q_offset = 131_000
    res = _attention_stats(q, k, v, scale=D**-0.5, q_offset=q_offset, distance_moments=True, block_m=16, block_n=32)
    q_pos = q_offset + torch.arange(M)
    ref = reference_attention(q.cpu(), k.cpu(), v.cpu(), scale=D**-0.5, visible=standard_visibility(q_pos, N),
                              q_pos=q_pos, distance_moments=True)
    for name in ("dist_sum", "dist_sq_sum"):
        rel = (res[name].cpu().double() - ref[name]).abs() / ref[name].abs()
        assert rel.max() < 1e-6, (name, float(rel.max()))
    assert ref["dist_sum"].min() > 1.3e5

"""The flash path of the chunked backend (online softmax over key tiles, compiled or torch tile step)
against the float64 full-matrix reference, and the dispatch between it and the general path."""
import functools

import pytest
import torch

from workbench.attention import chunked as C
from workbench.attention import flash as F
from workbench.attention import general as G
from workbench.attention import native as NS
from workbench.attention.masks import lazy_mask
from workbench.attention.request import HeadEdit, LayerRequest
from reference import untied
from workbench.kernels.reference import reference_attention, standard_visibility

CASES = [
    # B, Hq, Hkv, M, N, causal, window, padded, sinks
    (1, 4, 4, 37, 37, True, None, False, False),
    (2, 4, 2, 53, 53, True, 9, True, False),  # sliding window + left padding: skipped and partial tiles
    (2, 6, 1, 1, 71, True, None, True, True),  # MQA decode step over a cache
    (1, 4, 2, 19, 70, True, None, False, True),  # prefill continuation (M < N)
    (2, 4, 2, 40, 40, False, None, True, False),  # bidirectional
    (1, 3, 1, 45, 45, True, None, False, True),
]
STEPS = ["native", "torch"]


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles of 32 keys and blocks of 8 rows: many tiles, partial ones, a remainder tile of n % 16 ≠ 0."""
    monkeypatch.setattr(F, "FLASH_KEYS", 32)
    monkeypatch.setattr(F, "FLASH_ROWS", 8)


def _inputs(B, Hq, Hkv, M, N, padded, sinks, seed=0, dtype=torch.float64, spread=1.0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, M, 16, generator=g, dtype=torch.float64) * spread
    k = torch.randn(B, Hkv, N, 16, generator=g, dtype=torch.float64)
    v = torch.randn(B, Hkv, N, 16, generator=g, dtype=torch.float64)
    valid = None
    if padded:
        valid = torch.ones(B, N, dtype=torch.bool)
        valid[-1, : N // 3] = False  # left padding on the last sequence
    s = torch.randn(Hq, generator=g, dtype=torch.float64) * 3 if sinks else None
    cast = lambda t: None if t is None else t.to(dtype)
    return cast(q), cast(k), cast(v), valid, cast(s)


def _step(name):
    if name == "native" and NS.native_step(torch.float64) is None:
        pytest.skip("no C compiler here: only the torch tile step runs")
    return name == "native"


def _check(st, out, ref, B, M, N, vis, cols, atol_out=1e-10, atol_stat=1e-5):
    torch.testing.assert_close(out.double(), ref["out"], atol=atol_out, rtol=0)
    finite = torch.isfinite(ref["lse"])
    assert torch.equal(torch.isfinite(st["lse"]), finite)
    torch.testing.assert_close(st["lse"][finite].double(), ref["lse"][finite], atol=atol_stat, rtol=0)
    torch.testing.assert_close(st["entropy"].double(), ref["entropy"], atol=atol_stat, rtol=0)
    torch.testing.assert_close(st["topk_prob"].double(), ref["topk_prob"], atol=atol_stat / 10, rtol=0)
    top2 = ref["probs"].topk(min(2, N), dim=-1).values
    untied = (top2[..., 0] - top2[..., -1]).abs() > 1e-9 if N > 1 else torch.ones_like(top2[..., 0], dtype=torch.bool)
    untied |= ref["topk_idx"][..., 0] < 0
    assert torch.equal(st["topk_idx"][..., 0][untied], ref["topk_idx"][..., 0][untied])
    torch.testing.assert_close(st["col_prob"].double(), ref["col_prob"], atol=atol_stat / 10, rtol=0)
    assert torch.equal(st["col_visible"].expand(B, -1, -1), vis.expand(B, M, N)[..., cols])


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize("workers", [1, 2])
def test_flash_matches_reference(small_tiles, case, step, workers):
    B, Hq, Hkv, M, N, causal, window, padded, sinks = case
    q, k, v, valid, s = _inputs(B, Hq, Hkv, M, N, padded, sinks)
    q_pos = torch.arange(N - M, N)
    vis = standard_visibility(q_pos, N, causal=causal, window=window, key_valid=valid)
    cols = torch.tensor([0, 1, N - 1])
    ref = reference_attention(q, k, v, scale=0.25, visible=vis, q_pos=q_pos, sinks=s, key_columns=cols, topk=1)
    request = LayerRequest(record=True, key_columns=cols, topk=1)
    out, st = F.flash_attention(
        q, k, v, scale=0.25, rows_visible=lambda a, b: vis[:, None, a:b], q_pos=q_pos, sinks=s, request=request,
        workers=workers, native=_step(step),
    )  # fmt: skip
    _check(st, out, ref, B, M, N, vis, cols)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("path", ["flash-native", "flash-torch", "flash-2-workers", "general"])
def test_probability_statistics_match_reference(small_tiles, case, path):
    """Spans, tiles, top-3, key mass (padding query rows left out), distance moments and row-key
    probabilities (the flash path's second pass) on every path."""
    B, Hq, Hkv, M, N, causal, window, padded, sinks = case
    q, k, v, valid, s = _inputs(B, Hq, Hkv, M, N, padded, sinks, seed=2)
    q_pos = torch.arange(N - M, N)
    vis = standard_visibility(q_pos, N, causal=causal, window=window, key_valid=valid)
    cols = torch.tensor([0, N - 1])
    spans = torch.tensor([[0, 1, 2**30], [2, 40, 2**30], [0, 2**30, 3]])
    row_keys = torch.randint(-1, N, (B, M), generator=torch.Generator().manual_seed(1))
    query_valid = torch.ones(B, M, dtype=torch.bool)
    query_valid[0, -M // 4 :] = False  # right padding on the first sequence
    ref = reference_attention(
        q, k, v, scale=0.25, visible=vis, q_pos=q_pos, sinks=s, key_columns=cols, spans=spans, topk=3,
        distance_moments=True, row_keys=row_keys,
    )  # fmt: skip
    request = LayerRequest(
        record=True, key_columns=cols, spans=spans, topk=3, tiles=((N - M, N, 0, 5), (N - 3, N, max(0, N - 40), N - 1)),
        key_mass=True, query_valid=query_valid, distance_moments=True, row_keys=row_keys,
    )  # fmt: skip
    kw = dict(scale=0.25, rows_visible=lambda a, b: vis[:, None, a:b], q_pos=q_pos, sinks=s, request=request)
    if path == "general":
        out, st = G.general_attention(q, k, v, **kw)
    else:
        native = path == "flash-native" and _step("native")
        out, st = F.flash_attention(q, k, v, **kw, native=native, workers=2 if path == "flash-2-workers" else 1)
    torch.testing.assert_close(out, ref["out"], atol=1e-10, rtol=0)
    torch.testing.assert_close(st["entropy"].double(), ref["entropy"], atol=1e-5, rtol=0)
    torch.testing.assert_close(st["topk_prob"].double(), ref["topk_prob"], atol=1e-6, rtol=0)
    clear = untied(ref["topk_prob"])
    assert torch.equal(st["topk_idx"][clear], ref["topk_idx"][clear])
    torch.testing.assert_close(st["span_mass"].double(), ref["span_mass"], atol=1e-6, rtol=0)
    torch.testing.assert_close(st["col_prob"].double(), ref["col_prob"], atol=1e-6, rtol=0)
    for t, (q0, q1, k0, k1) in enumerate(request.tiles):
        rows = (q_pos >= q0) & (q_pos < q1)
        qp = torch.cat([x for x, _ in st[f"tile{t}"]])
        tile = torch.cat([x for _, x in st[f"tile{t}"]], dim=2)
        assert torch.equal(qp, q_pos[rows])
        torch.testing.assert_close(tile.double(), ref["probs"][:, :, rows][..., k0:k1], atol=1e-6, rtol=0)
    torch.testing.assert_close(st["key_mass"], (ref["probs"] * query_valid[:, None, :, None]).sum(2), atol=1e-10, rtol=0)
    assert torch.equal(st["key_count"], (vis.expand(B, M, N) & query_valid[..., None]).sum(1))
    for key in ("dist_sum", "dist_sq_sum", "row_key_prob"):
        torch.testing.assert_close(st[key].double(), ref[key], atol=1e-4, rtol=1e-6, equal_nan=True)


@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize("sign", [1, -1])
@pytest.mark.parametrize("sinks", [False, True])
def test_recentring_on_large_and_very_negative_scores(small_tiles, step, sign, sinks):
    """Scores of ±100 move the running centre (up, and down for rows without a sink) mid-row."""
    B, Hq, Hkv, M, N = 1, 4, 2, 40, 90
    q, k, v, _, s = _inputs(B, Hq, Hkv, M, N, False, sinks, seed=7, spread=20.0 if sign > 0 else 1.0)
    if sign < 0:  # queries and keys point apart: every score near −100, exp(score) underflows uncentred
        q[..., 0] += 20
        k[..., 0] -= 20
    if s is not None:
        s = s * 30
    q_pos = torch.arange(N - M, N)
    vis = standard_visibility(q_pos, N)
    cols = torch.tensor([0, 5])
    scores = (q[:, ::2] @ k.transpose(-1, -2)) * 0.25
    assert (scores.amax(-1).min() < -60) if sign < 0 else (scores.amax() > 60)
    ref = reference_attention(q, k, v, scale=0.25, visible=vis, q_pos=q_pos, sinks=s, key_columns=cols, topk=1)
    request = LayerRequest(record=True, key_columns=cols, topk=1)
    out, st = F.flash_attention(
        q, k, v, scale=0.25, rows_visible=lambda a, b: vis[:, None, a:b], q_pos=q_pos, sinks=s, request=request, native=_step(step)
    )
    _check(st, out, ref, B, M, N, vis, cols)


@pytest.mark.parametrize("step", STEPS)
def test_float32_flash_agrees_with_float64_reference(small_tiles, step):
    B, Hq, Hkv, M, N = 2, 6, 2, 50, 50
    q, k, v, valid, _ = _inputs(B, Hq, Hkv, M, N, True, False, seed=3, dtype=torch.float32, spread=2.0)
    q_pos = torch.arange(N)
    vis = standard_visibility(q_pos, N, key_valid=valid)
    cols = torch.tensor([0, 3])
    ref = reference_attention(q.double(), k.double(), v.double(), scale=0.25, visible=vis, q_pos=q_pos, key_columns=cols, topk=1)
    request = LayerRequest(record=True, key_columns=cols, topk=1)
    out, st = F.flash_attention(q, k, v, scale=0.25, rows_visible=lambda a, b: vis[:, None, a:b], q_pos=q_pos, request=request, native=_step(step))
    assert out.dtype == torch.float32
    _check(st, out, ref, B, M, N, vis, cols, atol_out=1e-5, atol_stat=1e-5)


def test_lazy_mask_memo_matches_a_fresh_evaluation(small_tiles):
    """Tiles are memoised per LazyMask (one per forward, shared by every layer): same results as unmemoised."""
    B, Hq, Hkv, M, N = 2, 4, 2, 30, 30
    q, k, v, _, _ = _inputs(B, Hq, Hkv, M, N, False, False, seed=4)
    pad = torch.ones(B, N, dtype=torch.long)
    pad[0, :7] = 0
    mask = lazy_mask(B, M, N, attention_mask=pad)
    request = LayerRequest(record=True, key_columns=torch.tensor([0, 8]), topk=1)
    run = lambda rows: F.flash_attention(q, k, v, scale=0.25, rows_visible=rows, q_pos=torch.arange(N), request=request)
    a = run(mask.rows)
    b = run(mask.rows)  # from the memo
    c = run(lambda i0, i1: mask.rows(i0, i1))  # not memoised
    assert F._BLOCK_MEMO.get(mask)
    for x in (b, c):
        torch.testing.assert_close(x[0], a[0], atol=0, rtol=0)
        for key in a[1]:
            torch.testing.assert_close(x[1][key], a[1][key], atol=0, rtol=0, equal_nan=True)


def test_dispatch_flash_or_general():
    """chunked_attention takes the flash path exactly for the requests it covers; both give the same answers."""
    cov = F.flash_covers
    assert cov(LayerRequest(record=True, key_columns=torch.tensor([0]), topk=1))
    assert cov(LayerRequest(edits=[HeadEdit("zero", 0)], record_outputs=True))
    assert cov(LayerRequest(record=True, topk=2, key_mass=True, spans=torch.tensor([[0, 2, 2**30]]), tiles=((0, 2, 0, 2),)))
    assert cov(LayerRequest(record=True, distance_moments=True, row_keys=torch.zeros(1, 2, dtype=torch.long)))
    for kind in ("uniform", "calibrate", "mask_keys", "streaming"):  # edits that change the probabilities
        assert not cov(LayerRequest(edits=[HeadEdit(kind, 0, keys=torch.tensor([0]))]))
    B, Hq, Hkv, M, N = 1, 4, 2, 25, 25
    q, k, v, _, s = _inputs(B, Hq, Hkv, M, N, False, True, seed=5)
    q_pos = torch.arange(N)
    vis = standard_visibility(q_pos, N)
    request = LayerRequest(record=True, key_columns=torch.tensor([0, 2]), topk=1, edits=[HeadEdit("zero", 1, positions=torch.tensor([3]))])
    kw = dict(scale=0.25, rows_visible=lambda a, b: vis[:, None, a:b], q_pos=q_pos, sinks=s, request=request)
    fo, fs = C.chunked_attention(q, k, v, **kw)
    go, gs = G.general_attention(q, k, v, **kw)
    torch.testing.assert_close(fo, go, atol=1e-12, rtol=0)
    assert fo[:, 1, 3].abs().sum() == 0
    for key in ("lse", "entropy", "topk_prob", "col_prob"):
        torch.testing.assert_close(fs[key], gs[key], atol=1e-6, rtol=0)
    assert torch.equal(fs["topk_idx"], gs["topk_idx"])


def test_differentiated_forward_takes_the_general_path():
    B, Hq, Hkv, M, N = 1, 2, 1, 6, 6
    q, k, v, _, _ = _inputs(B, Hq, Hkv, M, N, False, False, seed=6)
    q.requires_grad_(True)
    vis = standard_visibility(torch.arange(N), N)
    out, _ = C.chunked_attention(q, k, v, scale=0.25, rows_visible=lambda a, b: vis[:, None, a:b], q_pos=torch.arange(N), request=LayerRequest(record=True))
    out.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


def test_workers_under_inference_mode():
    """Worker threads inherit inference mode: writing into the caller's inference tensors works."""
    B, Hq, Hkv, M, N = 1, 4, 2, 40, 40
    q, k, v, _, _ = _inputs(B, Hq, Hkv, M, N, False, False, seed=8)
    vis = standard_visibility(torch.arange(N), N)
    request = LayerRequest(record=True, topk=1)
    run = functools.partial(F.flash_attention, q, k, v, scale=0.25, rows_visible=lambda a, b: vis[:, None, a:b], q_pos=torch.arange(N), request=request, block_rows=4)
    with torch.inference_mode():
        a = run(workers=2)
    b = run(workers=1)
    torch.testing.assert_close(a[0], b[0], atol=1e-12, rtol=0)
    torch.testing.assert_close(a[1]["entropy"], b[1]["entropy"], atol=1e-6, rtol=0)


def test_without_a_compiler_the_torch_step_is_used(monkeypatch, tmp_path):
    """No C compiler (or a failing one): native_step says so, and the flash path still answers exactly."""
    monkeypatch.setattr(NS, "_native", {})
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path))
    monkeypatch.setattr(NS.shutil, "which", lambda name: None)
    assert NS.native_step(torch.float32) is None
    monkeypatch.setattr(NS, "_native", {})
    monkeypatch.setattr(NS.shutil, "which", lambda name: "/bin/false")  # a "compiler" that always fails
    assert NS.native_step(torch.float32) is None
    B, Hq, Hkv, M, N = 1, 2, 1, 10, 10
    q, k, v, _, _ = _inputs(B, Hq, Hkv, M, N, False, False, seed=9)
    vis = standard_visibility(torch.arange(N), N)
    ref = reference_attention(q, k, v, scale=0.25, visible=vis)
    out, st = F.flash_attention(q, k, v, scale=0.25, rows_visible=lambda a, b: vis[:, None, a:b], q_pos=torch.arange(N), request=LayerRequest(record=True))
    torch.testing.assert_close(out, ref["out"], atol=1e-10, rtol=0)
    torch.testing.assert_close(st["entropy"].double(), ref["entropy"], atol=1e-5, rtol=0)


def test_a_cached_step_others_can_write_is_not_loaded(monkeypatch, tmp_path):
    """The compiled tile step runs in-process: a cached build that other users can write is refused."""
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path))
    monkeypatch.setattr(NS, "_native", {})
    if NS.native_step(torch.float32) is None:
        pytest.skip("no C compiler here")
    (built,) = (tmp_path / "native").glob("flash_step-*.so")
    built.chmod(0o777)
    monkeypatch.setattr(NS, "_native", {})
    assert NS.native_step(torch.float32) is None
    built.chmod(0o755)
    monkeypatch.setattr(NS, "_native", {})
    assert NS.native_step(torch.float32) is not None

"""The chunked torch path against the float64 full-matrix reference (kernels/reference.py)."""
import pytest
import torch

from reference import untied
from workbench.kernels.reference import BIG, reference_attention, standard_visibility
from workbench.attention.chunked import chunked_attention
from workbench.attention.request import HeadEdit, LayerRequest

CASES = [
    # B, Hq, Hkv, M, N, causal, window, padded, sinks
    (1, 4, 4, 37, 37, True, None, False, False),
    (2, 4, 2, 23, 23, True, 5, True, False),
    (2, 6, 1, 1, 31, True, None, True, True),  # MQA decode step over a cache
    (1, 4, 2, 9, 30, True, None, False, True),  # prefill continuation (M < N)
    (2, 4, 2, 17, 17, False, None, True, False),
]


def _inputs(B, Hq, Hkv, M, N, padded, sinks, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, M, 16, generator=g, dtype=torch.float64)
    k = torch.randn(B, Hkv, N, 16, generator=g, dtype=torch.float64)
    v = torch.randn(B, Hkv, N, 16, generator=g, dtype=torch.float64)
    valid = None
    if padded:
        valid = torch.ones(B, N, dtype=torch.bool)
        valid[-1, : N // 3] = False  # left padding on the last sequence
    s = torch.randn(Hq, generator=g, dtype=torch.float64) if sinks else None
    return q, k, v, valid, s


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("block_rows", [1, 4, None])
def test_chunked_matches_reference(case, block_rows):
    B, Hq, Hkv, M, N, causal, window, padded, sinks = case
    q, k, v, valid, s = _inputs(B, Hq, Hkv, M, N, padded, sinks)
    q_pos = torch.arange(N - M, N)
    vis = standard_visibility(q_pos, N, causal=causal, window=window, key_valid=valid)
    cols = torch.tensor([0, 1, N - 1])
    spans = torch.tensor([[0, 1, BIG], [2, 6, BIG], [0, BIG, 3]])
    ref = reference_attention(q, k, v, scale=0.25, visible=vis, q_pos=q_pos, sinks=s, key_columns=cols, spans=spans, topk=3)
    request = LayerRequest(record=True, key_columns=cols, spans=spans, topk=3, tiles=((N - M, N, 0, 5),))
    out, st = chunked_attention(
        q, k, v, scale=0.25, rows_visible=lambda a, b: vis[:, None, a:b], q_pos=q_pos, sinks=s, request=request, block_rows=block_rows
    )
    torch.testing.assert_close(out, ref["out"], atol=1e-10, rtol=0)
    finite = torch.isfinite(ref["lse"])
    assert torch.equal(torch.isfinite(st["lse"]), finite)
    torch.testing.assert_close(st["lse"][finite].double(), ref["lse"][finite], atol=1e-5, rtol=0)
    torch.testing.assert_close(st["entropy"].double(), ref["entropy"], atol=1e-5, rtol=0)
    torch.testing.assert_close(st["topk_prob"].double(), ref["topk_prob"], atol=1e-6, rtol=0)
    # indices: equal wherever probabilities are not tied
    clear = untied(ref["topk_prob"])
    assert torch.equal(st["topk_idx"][clear], ref["topk_idx"][clear])
    torch.testing.assert_close(st["col_prob"].double(), ref["col_prob"], atol=1e-6, rtol=0)
    assert torch.equal(st["col_visible"].expand(B, -1, -1), vis.expand(B, M, N)[..., cols])
    torch.testing.assert_close(st["span_mass"].double(), ref["span_mass"], atol=1e-6, rtol=0)
    qp, tile = st["tile0"][0] if len(st["tile0"]) == 1 else (None, torch.cat([t for _, t in st["tile0"]], dim=2))
    torch.testing.assert_close(tile.double(), ref["probs"][..., :5], atol=1e-6, rtol=0)


def _explicit(q, k, v, vis, edit_fn):
    """Output from an explicitly edited float64 attention matrix."""
    ref = reference_attention(q, k, v, scale=0.25, visible=vis)
    p = edit_fn(ref["probs"].clone())
    rep = q.shape[1] // k.shape[1]
    return p @ v.repeat_interleave(rep, 1), p


def test_interventions_match_explicit_matrix_edits():
    B, Hq, Hkv, M, N = 1, 4, 2, 20, 20
    q, k, v, _, _ = _inputs(B, Hq, Hkv, M, N, False, False, seed=3)
    q_pos = torch.arange(N)
    vis = standard_visibility(q_pos, N)

    def run(*edits):
        request = LayerRequest(record=True, key_columns=torch.tensor([0]), edits=list(edits))
        return chunked_attention(q, k, v, scale=0.25, rows_visible=lambda a, b: vis[:, None, a:b], q_pos=q_pos, request=request, block_rows=7)

    # uniform attention on head 1
    def uniform(p):
        u = vis.double()[0] / vis.double()[0].sum(-1, keepdim=True)
        p[:, 1] = u
        return p

    out, st = run(HeadEdit("uniform", 1))
    exp, p = _explicit(q, k, v, vis, uniform)
    torch.testing.assert_close(out, exp, atol=1e-10, rtol=0)
    torch.testing.assert_close(st["col_prob"][..., 0].double(), p[..., 0], atol=1e-6, rtol=0)  # stats see the edit

    # ACT calibration of keys {0, 3} on head 2, beta 0.4
    def calibrate(p):
        sink = torch.zeros(N, dtype=torch.bool)
        sink[[0, 3]] = True
        h = p[:, 2]
        s = h[..., sink].sum(-1, keepdim=True)
        h = torch.where(s < 1 - 1e-12, torch.where(sink, h * 0.4, h * (1 - 0.4 * s) / (1 - s)), h)  # sink-only rows unchanged
        p[:, 2] = h
        return p

    out, _ = run(HeadEdit("calibrate", 2, keys=torch.tensor([0, 3]), beta=0.4))
    exp, p = _explicit(q, k, v, vis, calibrate)
    torch.testing.assert_close(p.sum(-1), torch.ones_like(p.sum(-1)))  # rows still sum to one
    torch.testing.assert_close(out, exp, atol=1e-10, rtol=0)

    # span mask of keys 2..4 on head 0 (renormalised), streaming (sink 1 + recent 3) on head 3
    keep0 = torch.ones(N, dtype=torch.bool)
    keep0[2:5] = False
    j, i = torch.arange(N)[None], torch.arange(N)[:, None]
    keep3 = (j < 1) | (j > i - 3)

    def masks(p):
        for h, keep in ((0, keep0[None].expand(N, N)), (3, keep3)):
            ph = p[:, h] * keep
            p[:, h] = ph / ph.sum(-1, keepdim=True)
        return p

    out, _ = run(HeadEdit("mask_keys", 0, keys=torch.arange(2, 5)), HeadEdit("streaming", 3, sink=1, recent=3))
    exp, _ = _explicit(q, k, v, vis, masks)
    torch.testing.assert_close(out, exp, atol=1e-10, rtol=0)

    # zero and mean ablation on given query positions only
    base, _ = run()
    mean = torch.arange(16, dtype=torch.float64)
    out, _ = run(HeadEdit("zero", 1, positions=torch.tensor([5, 6])), HeadEdit("mean", 2, mean=mean))
    exp = base.clone()
    exp[:, 1, 5:7] = 0
    exp[:, 2] = mean
    torch.testing.assert_close(out, exp, atol=0, rtol=0)


def test_key_mass_is_the_column_sum():
    B, Hq, Hkv, M, N = 2, 4, 2, 19, 19
    q, k, v, valid, _ = _inputs(B, Hq, Hkv, M, N, True, False, seed=5)
    q_pos = torch.arange(N)
    vis = standard_visibility(q_pos, N, key_valid=valid)
    ref = reference_attention(q, k, v, scale=0.25, visible=vis)
    request = LayerRequest(record=True, key_mass=True)
    _, st = chunked_attention(q, k, v, scale=0.25, rows_visible=lambda a, b: vis[:, None, a:b], q_pos=q_pos, request=request, block_rows=5)
    torch.testing.assert_close(st["key_mass"], ref["probs"].sum(2), atol=1e-10, rtol=0)
    assert torch.equal(st["key_count"], vis.expand(B, M, N).sum(1))


def test_topk_breaks_ties_toward_the_lower_index():
    """semantics.topk (one definition for the reference and the edited chunked path) equals a full stable
    descending sort, on rows full of ties: uniform rows, equal values straddling the k-th place, hidden keys."""
    from workbench.kernels import semantics

    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        n, k = int(torch.randint(1, 40, (1,), generator=g)), int(torch.randint(1, 10, (1,), generator=g))
        p = torch.randint(0, 4, (2, 3, 5, n), generator=g).double() / 4
        vis = torch.rand(2, 1, 5, n, generator=g) > 0.3
        val, idx = torch.sort(p.masked_fill(~vis, -1.0), dim=-1, descending=True, stable=True)
        val, idx = val[..., :k], idx[..., :k]
        want_idx = torch.nn.functional.pad(torch.where(val >= 0, idx, -1), [0, max(0, k - n)], value=-1)
        want_prob = torch.nn.functional.pad(torch.where(val >= 0, val, 0.0), [0, max(0, k - n)], value=0.0)
        got_idx, got_prob = semantics.topk(p, vis, k)
        assert torch.equal(got_idx, want_idx) and torch.equal(got_prob, want_prob), (n, k)

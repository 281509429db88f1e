"""The backend's Triton path (interpreter on CPU) against its chunked torch path, through real tiny models:
every statistic (entropy, lse, top-3, key columns, spans, windows, key mass, tiles, output sums) and
every edit (uniform, calibrate, span mask, streaming, zero/mean), with padding, sliding windows, learned
sinks and decode steps over a KV cache."""
import os
from pathlib import Path
from contextlib import ExitStack

import pytest
import torch

import workbench as wb
from workbench.attention import backend, triton_path
from workbench.attention.request import HeadEdit, LayerRequest
from workbench.attention import head_output_means
from workbench.kernels import capabilities
from reference import untied

pytest.importorskip("triton")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no GPU and the Triton interpreter is not selected", allow_module_level=True)

ATOL = 2e-5  # fp32 statistics of the two paths (different summation orders)


def probe():
    return wb.AttentionStats(sink_keys=2, key_positions=[5], topk=3, key_mass=True, tiles=[(2, 9, 0, 6), (15, 40, 12, 20)],
                             spans={"bos": (0, 1), "mid": (3, 8), "local": wb.Window(4)})  # fmt: skip


def edits():
    """Every probability edit on different (layer, head)s, one limited to query positions, plus a zero ablation."""
    return [
        wb.HeadAblation([(1, 0)], mode="uniform"),
        wb.SinkCalibration([(1, 1), (0, 2)], sink_keys=[0, 4], beta=0.4),
        wb.SpanMask([(0, 1)], keys=[3, 4, 5], positions=list(range(10, 30))),
        wb.StreamingHeads([(1, 3), (0, 0)], sink=1, recent=4),
        wb.HeadAblation([(0, 3)], mode="zero", positions=[7, 8]),
    ]


@pytest.fixture
def paths(monkeypatch):
    """run(m, use_triton, ...) → (record, logits, cache); counts which path computed each layer call."""
    calls = {"triton": 0, "chunked": 0}
    real_run, real_chunked = triton_path.run, backend.chunked_attention

    def spy_run(*a, **k):
        out = real_run(*a, **k)
        calls["triton"] += out[0] is not None
        return out

    def spy_chunked(*a, **k):
        calls["chunked"] += 1
        return real_chunked(*a, **k)

    monkeypatch.setattr(triton_path, "run", spy_run)
    monkeypatch.setattr(backend, "chunked_attention", spy_chunked)

    def run(m, ids, mask, use_triton, *, probes=(), edit_list=(), cache=None):
        m.hf._workbench_state.use_triton = use_triton
        try:
            with ExitStack() as stack, torch.no_grad():
                cap = stack.enter_context(wb.capture(m, *probes)) if probes else None
                if edit_list:
                    stack.enter_context(wb.intervene(m, *edit_list))
                out = m.hf(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=cache is not None)
        finally:
            m.hf._workbench_state.use_triton = None
        return cap, out.logits

    run.calls = calls
    return run


def assert_same(a, b, rows, skip_entropy=()):
    """Every recorded statistic of two captures (a: chunked, b: Triton) on real query rows ``rows``
    [B, R]; ``skip_entropy``: (layer, head) pairs compared separately."""
    assert a.names() == b.names()
    r = rows[None, :, None, :]
    ent_a, ent_b = a.stack("attn.entropy").clone(), b.stack("attn.entropy").clone()
    for layer, h in skip_entropy:
        ent_a[layer, :, h] = ent_b[layer, :, h] = 0
    rowwise = [n for n in a.names() if n.split(".", 2)[2] in ("attn.lse", "attn.top1_prob", "attn.hook_z_norm") or ".attn.span." in n]
    for name, x, y in [("entropy", ent_a, ent_b)] + [(n, a[n][None], b[n][None]) for n in rowwise]:
        sel = r.expand_as(x)
        torch.testing.assert_close(x[sel], y[sel], atol=ATOL, rtol=0, msg=name)
    pa, pb = a.stack("attn.topk_prob"), b.stack("attn.topk_prob")
    assert pa.dtype == pb.dtype == torch.float32
    torch.testing.assert_close(pa[r[..., None].expand_as(pa)], pb[r[..., None].expand_as(pb)], atol=ATOL, rtol=0)
    ia, ib = a.stack("attn.topk"), b.stack("attn.topk")
    assert ia.dtype == ib.dtype == torch.long and ia.shape == ib.shape
    clear = untied(pa, 1e-5) & (pa > 0) & r[..., None]
    assert clear.float().mean() > 0.3
    assert torch.equal(ia[clear], ib[clear])
    assert torch.equal(a.stack("attn.key_count"), b.stack("attn.key_count"))
    torch.testing.assert_close(a.stack("attn.key_mass"), b.stack("attn.key_mass"), atol=1e-4, rtol=0)
    torch.testing.assert_close(a.stack("attn.alpha"), b.stack("attn.alpha"), atol=ATOL, rtol=0, equal_nan=True)
    q = a.q_pos.tolist()
    for name in [n for n in a.names() if ".attn.tile." in n]:  # a tile covering no captured row is absent in both
        assert torch.equal(a.positions(name), b.positions(name))
        ta, tb = a[name], b[name]
        at = [q.index(int(x)) for x in a.positions(name)]  # captured row of each tile row
        sel = rows[:, at][:, None, :, None].expand_as(ta)
        torch.testing.assert_close(ta[sel], tb[sel], atol=ATOL, rtol=0, msg=name)


def _batch(seed=4, T=18):
    ids = torch.randint(3, 250, (2, T), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    return ids, mask


@pytest.mark.parametrize("arch", ["llama", "gemma3", "gpt_oss"])
def test_statistics_and_edits_equal_the_torch_route(tiny, paths, arch):
    m = tiny(arch)
    ids, mask = _batch()
    a, la = paths(m, ids, mask, False, probes=[probe()], edit_list=edits())
    assert paths.calls["triton"] == 0
    b, lb = paths(m, ids, mask, True, probes=[probe()], edit_list=edits())
    assert paths.calls["triton"] == m.spec.n_layers and paths.calls["chunked"] == m.spec.n_layers  # no fallback
    real = mask.bool()
    torch.testing.assert_close(la[real], lb[real], atol=1e-4, rtol=0)
    # uniform (layer 1, head 0): with learned sinks the chunked path still counts the sink slot in the
    # entropy although the edited row gives it no mass; kernels/semantics.py defines the row as a
    # distribution over its keys: entropy log(#visible keys)
    skip = [(1, 0)] if m.spec.learned_sinks else []
    assert_same(a, b, real, skip_entropy=skip)
    n_vis = torch.cumsum(mask, 1).double()  # layer 1 is a full-attention layer in every tiny config
    ent = b["blocks.1.attn.entropy"][:, 0].double()
    torch.testing.assert_close(ent[real], n_vis.log()[real], atol=1e-5, rtol=0)
    first = (mask == 0).sum(1)  # uniform rows' top-3: the first visible positions (ties to the lower)
    top = b["blocks.1.attn.topk"][:, 0]
    for bi in range(2):
        for i in range(int(first[bi]), ids.shape[1]):
            want = [first[bi] + j if first[bi] + j <= i else -1 for j in range(3)]
            assert top[bi, i].tolist() == [int(w) for w in want]


def test_edits_change_the_logits(tiny, paths):
    """The edits above do something through the Triton path (so the comparisons can fail)."""
    m = tiny("llama")
    ids, mask = _batch(seed=5, T=12)
    _, plain = paths(m, ids, mask, True)
    for e in edits():
        _, edited = paths(m, ids, mask, True, edit_list=[e])
        assert (edited - plain).abs().max() > 1e-4, e
    assert paths.calls["chunked"] == 0


@pytest.mark.parametrize("arch", ["llama", "gemma3", "gpt_oss"])
def test_decode_step_over_a_cache(tiny, paths, arch):
    """One-row steps over a KV cache (sliding layers keep a shorter cache: kv_offset > 0)."""
    m = tiny(arch)
    ids = torch.randint(3, 250, (1, 18), generator=torch.Generator().manual_seed(6))
    step = torch.randint(3, 250, (1, 1), generator=torch.Generator().manual_seed(7))
    results = []
    for use_triton in (False, True):
        from transformers import DynamicCache

        cache = DynamicCache(config=m.hf.config)
        with torch.no_grad():
            m.hf(input_ids=ids, past_key_values=cache, use_cache=True)
        results.append(paths(m, step, None, use_triton, probes=[probe()], edit_list=edits(), cache=cache))
    (a, la), (b, lb) = results
    assert int(a.q_pos[0]) == 18 and a["blocks.0.attn.entropy"].shape[-1] == 1
    torch.testing.assert_close(la, lb, atol=1e-4, rtol=0)
    assert_same(a, b, torch.ones(1, 1, dtype=torch.bool), skip_entropy=[(1, 0)] if m.spec.learned_sinks else [])


def test_mean_ablation_references_and_outputs(tiny, paths):
    """record_outputs (head output sums for mean ablation) and the mean ablation itself, both paths."""
    m = tiny("llama")
    means = {}
    for use_triton in (False, True):
        m.hf._workbench_state.use_triton = use_triton
        m.__dict__.pop("_mean_cache", None)  # means are cached per model: compute them on each path
        try:
            means[use_triton] = head_output_means(m, ["abc def", "xyz"])
        finally:
            m.hf._workbench_state.use_triton = None
    for key in means[False]:
        torch.testing.assert_close(means[False][key], means[True][key], atol=1e-5, rtol=0)
    assert paths.calls["triton"] > 0
    ids, mask = _batch(seed=8)
    abl = [wb.HeadAblation([(0, 1), (1, 2)], mode="mean", means=means[True])]
    _, la = paths(m, ids, mask, False, edit_list=abl)
    _, lb = paths(m, ids, mask, True, edit_list=abl)
    torch.testing.assert_close(la[mask.bool()], lb[mask.bool()], atol=1e-4, rtol=0)


def test_requests_beyond_the_kernel_fall_back(tiny, paths):
    """top-k > 8 is the chunked path's alone: covers() says no, the backend falls back, results agree."""
    m = tiny("llama")
    ids = torch.randint(3, 250, (1, 12), generator=torch.Generator().manual_seed(9))
    a, _ = paths(m, ids, None, True, probes=[wb.AttentionStats(topk=9)])
    assert paths.calls["triton"] == 0 and paths.calls["chunked"] == m.spec.n_layers
    b, _ = paths(m, ids, None, True, probes=[wb.AttentionStats(topk=8)])
    assert paths.calls["triton"] == m.spec.n_layers
    torch.testing.assert_close(a.stack("attn.topk_prob")[..., :8], b.stack("attn.topk_prob"), atol=ATOL, rtol=0)


def test_capability_table_drives_covers():
    full = LayerRequest(record=True, key_columns=torch.tensor([0]), spans=torch.tensor([[0, 1, 5]]), topk=8, tiles=((0, 1, 0, 1),),
                     key_mass=True, record_outputs=True,
                     edits=[HeadEdit(kind, i, positions=torch.tensor([1])) for i, kind in enumerate(("uniform", "calibrate", "mask_keys", "streaming", "zero", "mean"))])  # fmt: skip
    assert capabilities.triton_covers(capabilities.requested(full, structured_mask=True))
    assert not capabilities.triton_covers(capabilities.requested(full, structured_mask=False))
    for bad in (LayerRequest(record=True, topk=9), LayerRequest(edits=[HeadEdit("uniform", 0), HeadEdit("calibrate", 0)]),
                LayerRequest(edits=[HeadEdit("mask_keys", 0)] * 9), LayerRequest(gated=lambda *a: None),
                LayerRequest(record=True, spans=torch.zeros(65, 3, dtype=torch.long))):  # fmt: skip
        assert not capabilities.triton_covers(capabilities.requested(bad, structured_mask=True)), bad
    table = capabilities.markdown()
    assert table.count("\n") == len(capabilities.CAPABILITIES) + 1
    for name in ("key_mass", "tiles", "uniform", "calibrate", "mask_keys", "streaming", "decode split"):
        assert f"| {name} |" in table
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert table in readme  # regenerate with kernels.capabilities.markdown() when a path's coverage changes

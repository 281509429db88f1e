"""Head-type statistics (AttentionStats(taxonomy=True)): equal to an explicit float64 matrix on every
tiny architecture, on both paths, and exact on planted heads."""
import os

import pytest
import torch

import workbench as wb
from handbuilt import INDUCTION_HEAD, PREV_HEAD, local_model, taxonomy_model
from reference import eager_attentions
from workbench.kernels.semantics import induction_keys
from workbench.models.testing import TINY_CONFIGS, byte_tokenizer

ARCHS = sorted(TINY_CONFIGS)
W = 4  # local window
STATS = ("self_mass", "prev_mass", "local_mass", "dist_mean", "dist_var", "induction_mass")


def reference(probs: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Every statistic from the explicit matrix ``[L, B, H, T, T]`` (float64)."""
    L, B, H, T, _ = probs.shape
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    d = (i - j).double()
    mean = (probs * d).sum(-1)
    rk = induction_keys(ids, valid=None if mask is None else mask.bool())  # [B, T]
    gathered = probs.gather(-1, rk.clamp_min(0)[None, :, None, :, None].expand(L, B, H, T, 1)).squeeze(-1)
    return {
        "self_mass": torch.diagonal(probs, dim1=-2, dim2=-1),
        "prev_mass": torch.nn.functional.pad(torch.diagonal(probs, offset=-1, dim1=-2, dim2=-1), (1, 0)),
        "local_mass": (probs * ((d >= 0) & (d < W))).sum(-1),
        "dist_mean": mean,
        "dist_var": (probs * d * d).sum(-1) - mean**2,
        "induction_mass": torch.where(rk[None, :, None, :] < 0, float("nan"), gathered),
    }


def _capture(m, ids, mask=None):
    with wb.capture(m, wb.AttentionStats(taxonomy=True, local_window=W, sink_keys=0)) as cap, torch.no_grad():
        m.hf(input_ids=ids, attention_mask=mask)
    return cap


@pytest.mark.parametrize("arch", ARCHS)
def test_equal_to_the_explicit_matrix(tiny, arch):
    m = tiny(arch)
    ids = torch.randint(3, 20, (2, 17), generator=torch.Generator().manual_seed(3))  # few tokens: many repeats
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    probs, _ = eager_attentions(m, ids, mask)
    ref = reference(probs, ids, mask)
    cap = _capture(m, ids, mask)
    rows = mask.bool()[None, :, None, :]
    for s in STATS:
        ours = cap.stack(f"attn.{s}").double()
        sel = rows.expand_as(ours)
        torch.testing.assert_close(ours[sel], ref[s][sel], atol=1e-5, rtol=1e-5, equal_nan=True, msg=s)
    assert torch.isfinite(cap.stack("attn.induction_mass")).any() and torch.isnan(cap.stack("attn.induction_mass")).any()


@pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1", reason="no Triton path")
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_triton_path_equals_the_torch_route(tiny, arch):
    pytest.importorskip("triton")
    m = tiny(arch)
    ids = torch.randint(3, 20, (1, 18), generator=torch.Generator().manual_seed(5))
    a = _capture(m, ids)
    m.hf._workbench_state.use_triton = True
    try:
        b = _capture(m, ids)
    finally:
        m.hf._workbench_state.use_triton = None
    for s in STATS:
        torch.testing.assert_close(a.stack(f"attn.{s}"), b.stack(f"attn.{s}"), atol=2e-5, rtol=1e-5, equal_nan=True, msg=s)


def test_decode_steps_extend_the_token_history(tiny):
    """Induction keys of generated tokens point back into the prompt: generate equals one forward."""
    m = tiny("llama")
    ids = torch.tensor([[257, 5, 6, 7, 5, 6]])
    with wb.capture(m, wb.AttentionStats(taxonomy=True, sink_keys=0)) as cap, torch.no_grad():
        out = m.hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False, pad_token_id=256)
    full = _capture(m, out[:, :-1])
    for s in STATS[-1:] + STATS[:2]:
        torch.testing.assert_close(cap.stack(f"attn.{s}"), full.stack(f"attn.{s}"), atol=1e-5, rtol=0, equal_nan=True, msg=s)


def test_planted_previous_token_and_induction_heads():
    m = wb.load(taxonomy_model(), tokenizer=byte_tokenizer(), source_label="hand-built")
    increasing = torch.arange(12)[None]
    cap = _capture(m, increasing)
    prev, mean, var = (cap[f"blocks.0.attn.{s}"][0, PREV_HEAD, 1:] for s in ("prev_mass", "dist_mean", "dist_var"))
    assert (prev > 1 - 1e-6).all() and torch.allclose(mean, torch.ones(11), atol=1e-5) and (var < 1e-4).all()
    repeated = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 1, 2, 3, 4, 5]])
    cap = _capture(m, repeated)
    ind = cap["blocks.0.attn.induction_mass"][0]  # [head, row]
    assert torch.isnan(ind[:, :7]).all()  # no earlier occurrence in the first copy
    assert (ind[INDUCTION_HEAD, 7:] > 1 - 1e-6).all()  # the token after the previous occurrence
    torch.testing.assert_close(cap["blocks.0.attn.dist_mean"][0, INDUCTION_HEAD, 7:], torch.full((5,), 5.0), atol=1e-5, rtol=0)
    assert (ind[2:, 7:] < 0.2).all()  # uniform heads: 1/(i+1)
    # uniform heads: closed forms over keys 0..i
    i = torch.arange(12).double()
    torch.testing.assert_close(cap["blocks.0.attn.dist_mean"][0, 2].double(), i / 2, atol=1e-5, rtol=0)
    torch.testing.assert_close(cap["blocks.0.attn.dist_var"][0, 2].double(), i * (i + 2) / 12, atol=1e-4, rtol=0)


def test_planted_local_head():
    m = wb.load(local_model(window=W), tokenizer=byte_tokenizer(), source_label="hand-built local")
    assert m.spec.sliding_windows == (W,)
    cap = _capture(m, torch.arange(12)[None])
    local, mean, var = (cap[f"blocks.0.attn.{s}"][0, :, W - 1 :] for s in ("local_mass", "dist_mean", "dist_var"))
    assert (local > 1 - 1e-6).all()
    torch.testing.assert_close(mean, torch.full_like(mean, (W - 1) / 2), atol=1e-5, rtol=0)
    torch.testing.assert_close(var, torch.full_like(var, (W * W - 1) / 12), atol=1e-5, rtol=0)


def test_scan_checks_rules_and_reports_with_custom_ones(tiny, tmp_path):
    from workbench import taxonomy

    m = tiny("llama")
    for bad, match in [({"x": ("attn.nope", 0.5)}, "statistic must be one of"), ({"x": 0.5}, "must be \\(statistic, threshold\\)"),
                       ({"x": ("attn.prev_mass", "high")}, "threshold must be a number"), ({}, "non-empty dict")]:  # fmt: skip
        with pytest.raises(wb.ProbeError, match=match):
            taxonomy.scan(m, lengths=[16], n_texts=0, rules=bad, progress=False)
    t = taxonomy.scan(m, lengths=[16], n_texts=0, rules={"copying": ("attn.self_mass", 0.5)}, progress=False)
    assert "copying" in t.summary() and list(t.heads().columns[:2]) == ["layer", "head"]
    assert t.provenance.extra["seed"] == 0  # the random repeated sequence is reproducible from the provenance
    back = taxonomy.TaxonomyResult.load(_store(tmp_path, t))
    assert back.cases["token_ids"].tolist() == t.cases["token_ids"].tolist() and len(back.cases["token_ids"][0]) == t.cases["tokens"][0]
    assert back.rules == t.rules and back.summary() == t.summary()


def _store(path, result):
    store = wb.ResultStore(path)
    result.save(store)
    return store


def test_retrieval_scores_of_other_weights_are_refused(tiny):
    from types import SimpleNamespace

    from workbench import taxonomy

    m = tiny("llama")
    t = taxonomy.scan(m, lengths=[16], n_texts=0, progress=False)
    shape = t.values.shape[2:]
    other = SimpleNamespace(scores=torch.zeros(shape), provenance=SimpleNamespace(weights_hash="blake2b:other"))
    with pytest.raises(wb.ProbeError, match="other weights"):
        t.with_retrieval(other)
    same = SimpleNamespace(scores=torch.zeros(shape), provenance=t.provenance)
    assert t.with_retrieval(same).retrieval is not None

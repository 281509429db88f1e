"""Compression valley: per-layer matrix entropies and first-token norms equal an independent float64
computation on HF's hidden states; a planted rank-one residual has zero entropy; the scan protocol."""
import math
import threading

import pytest
import torch

import workbench as wb
from reference import assert_round_trip
from handbuilt import content_model
from workbench import representation as R
from workbench.models.testing import byte_tokenizer

TEXT = "The residual stream of a transformer compresses in the middle layers. " * 3


def reference(x: torch.Tensor) -> dict:
    """The definition computed on the T×T Gram matrix with eigvalsh, in float64."""
    x = x.double()
    k = x @ x.T
    lam = torch.linalg.eigvalsh(k / torch.trace(k)).clamp_min(0)
    h1 = float(-(lam[lam > 0] * lam[lam > 0].log()).sum())
    h2 = float(-torch.log((lam**2).sum()))
    norms = x.norm(dim=-1)
    top = math.log(min(x.shape))
    return {"entropy_vn": h1, "entropy_renyi2": h2, "entropy_vn_norm": h1 / top, "entropy_renyi2_norm": h2 / top,
            "bos_norm": float(norms[0]), "other_norm": float(norms[1:].sort().values[(len(norms) - 2) // 2]),
            "bos_ratio": float(norms[0] / norms[1:].sort().values[(len(norms) - 2) // 2])}  # fmt: skip


def layer_outputs(m, ids):
    """Every decoder layer's output, independently: HF's hidden states (index l + 1 is layer l's output,
    except the last, which is after the final norm) and a forward hook on the last layer."""
    last = {}
    layer = m.hf.model.layers[-1]
    h = layer.register_forward_hook(lambda mod, inp, out: last.setdefault("x", out[0] if isinstance(out, tuple) else out))
    try:
        with torch.no_grad():
            out = m.hf(input_ids=ids, output_hidden_states=True)
    finally:
        h.remove()
    hs = [t[0] for t in out.hidden_states[1:-1]] + [last["x"][0]]
    return hs


@pytest.mark.parametrize("arch", ["llama", "qwen3_moe"])
def test_layers_equal_an_independent_computation(tiny, arch):
    m = tiny(arch)
    r = R.scan(m, T=48, texts=[TEXT, TEXT.upper()], progress=False)
    assert len(r.per_text) == 2 * m.spec.n_layers
    for t, text in enumerate([TEXT, TEXT.upper()]):
        ids = torch.tensor([m.tokenizer.encode(text)[:48]])
        outs = layer_outputs(m, ids)
        assert len(outs) == m.spec.n_layers
        for l, x in enumerate(outs):
            row = r.per_text[(r.per_text.text == t) & (r.per_text.layer == l)].iloc[0]
            for k, v in reference(x).items():
                assert row[k] == pytest.approx(v, rel=1e-6, abs=1e-9), (l, k)
    means = r.layers()
    assert means["entropy_vn"].tolist() == pytest.approx(r.per_text.groupby("layer")["entropy_vn"].mean().tolist())


def test_matrix_entropy_known_values():
    x = torch.randn(1, 7).repeat(10, 1) * torch.arange(1, 11)[:, None]  # rank one
    h1, h2 = R.matrix_entropy(x)
    assert abs(h1) < 1e-9 and abs(h2) < 1e-9
    h1, h2 = R.matrix_entropy(torch.eye(6, 9) * 3)  # six orthogonal rows of equal norm
    assert h1 == pytest.approx(math.log(6)) and h2 == pytest.approx(math.log(6))
    x = torch.randn(20, 5, dtype=torch.float64)
    assert R.matrix_entropy(x) == pytest.approx(R.matrix_entropy(x.T.contiguous()))  # XXᵀ and XᵀX share their spectrum


def test_planted_massive_first_token_gives_zero_entropy():
    # hand-built Llama: every token embeds as a constant feature; <s> also carries a feature of size 1e4 and
    # every attention and MLP weight is zero, so the residual is the embedding: one row dominates X
    m = wb.load(content_model(vocab=260, bos_token=257, bos_scale=1e4, copy=False), tokenizer=byte_tokenizer(), source_label="hand-built")
    r = R.scan(m, T=40, texts=[TEXT], progress=False)
    row = r.layers().iloc[0]
    assert row["entropy_vn"] < 1e-3 and row["entropy_renyi2"] < 1e-3
    assert row["bos_ratio"] > 1000 and row["other_norm"] == pytest.approx(1.0)
    v = r.valley()
    assert v["peak_ratio_layer"] == 0 and v["valley_layer"] == 0


def test_protocol_cancel_and_round_trip(tiny, tmp_path):
    m = tiny("llama")
    fields = dict(T=32, texts=[TEXT, TEXT[::-1], TEXT.upper()])
    seen = []
    full = R.scan(m, **fields, on_case=seen.append, progress=False)
    assert [c.index for c in seen] == [0, 1, 2] and full.complete
    stop = threading.Event()
    part = R.scan(m, **fields, on_case=lambda c: stop.set() if c.index == 1 else None, cancel=stop, progress=False)
    assert not part.complete and set(part.per_text["text"]) == {0, 1} and "cancel" in part.summary()
    empty = R.scan(m, **fields, cancel=lambda: True, progress=False)
    assert "nothing to report" in empty.summary() and len(empty.heads()) == m.spec.n_layers
    store = wb.ResultStore(tmp_path)
    for r in (full, part):
        back = assert_round_trip(r, store)
        assert [len(ids) for ids in back.provenance.extra["input_ids"]] == [32] * r.per_text["text"].nunique()
        assert list(r.heads()["layer"]) == list(range(m.spec.n_layers)) and r.grids()["bos_ratio"].shape == (m.spec.n_layers, 1)


@pytest.mark.parametrize("bad, match", [
    (dict(T=1), "T must be ≥ 2"),
    (dict(T=9000), "exceeds the model's 512 positions"),
    (dict(T=64, texts=["too short"]), "every text needs at least T = 64"),
    (dict(texts="a string"), "texts must be a non-empty list"),
])  # fmt: skip
def test_bad_config_fails_before_the_model_runs(tiny, bad, match):
    with pytest.raises(wb.ProbeError, match=match):
        R.scan(tiny("llama"), **bad, on_case=lambda c: pytest.fail("a case ran"), progress=False)


def test_smollm2_compression_valley_regression(smollm):
    """SmolLM2 (one text, T = 128): the first token's norm jumps at layer 11 and the entropy collapses there."""
    r = R.scan(smollm, T=128, texts=[wb.sinks.texts_for(128)[0]], progress=False)
    v = r.valley()
    assert v["peak_ratio_layer"] == 11 and v["peak_ratio"] > 100
    assert 11 <= v["valley_layer"] <= 20 and v["valley_entropy"] < 0.05
    layers = r.layers().set_index("layer")
    assert layers.loc[10, "entropy_vn_norm"] > 0.3 and v["corr_entropy_log_ratio"] < -0.8

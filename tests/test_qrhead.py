"""QRHead: masses equal an explicit eager-attention computation, a hand-built copy head scores highest,
agreement statistics, the scan protocol and bad input."""
import threading

import pandas as pd
import pytest
import torch

import workbench as wb
from reference import assert_round_trip, eager_attentions
from handbuilt import COPY_HEAD, SINK_HEAD, content_model
from workbench import qrhead
from workbench.models.testing import byte_tokenizer

FIELDS = dict(lengths=[400], depths=[10, 50, 90])


def eager_probs(m, ids):
    return eager_attentions(m, ids)[0][:, 0]  # [L, H, T, T]


@pytest.mark.parametrize("arch, depths", [("llama", [20, 80]), ("gemma3", [50])])  # gemma3: sliding-window layers
def test_masses_equal_the_explicit_matrix(tiny, arch, depths):
    m = tiny(arch)
    r = qrhead.scan(m, lengths=[300], depths=depths, progress=False)
    cases = qrhead.QRConfig(lengths=[300], depths=depths).cases(m)
    for i, c in enumerate(cases):
        s0, s1 = c.needle_span
        for ids, (q0, q1), got in ((c.ids, c.query, r.real[i]), (c.null_ids, c.null_query, r.null[i])):
            ref = eager_probs(m, ids)[:, :, q0:q1, s0:s1].sum(-1).mean(-1)
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
            torch.testing.assert_close(qrhead.gold_mass(m, ids, (q0, q1), c.needle_span), ref, atol=1e-5, rtol=0)  # one full pass
        assert m.tokenizer.decode(c.ids[0, c.query[0] : c.query[1]]).strip() == {n.id: n for n in wb.niah.needles()}[c.needle_id].question
        assert m.tokenizer.decode(c.null_ids[0, c.null_query[0] : c.null_query[1]]).strip() == "N/A"
        assert torch.equal(c.ids[0, : c.query[0]], c.null_ids[0, : c.null_query[0]])  # same document, same needle positions
    torch.testing.assert_close(r.scores, (r.real - r.null).mean(0).float())


def test_hand_built_copy_head_scores_highest():
    m = wb.load(content_model(), tokenizer=byte_tokenizer(), source_label="hand-built")
    # needle = tokens 1, 2, 3 at positions 4..6; the question repeats 2, 3; the null query 9, 10 (off-needle tokens)
    ids = [0, 5, 6, 7, 1, 2, 3, 8, 9, 10, 11, 2, 3, 4]
    null = ids[:11] + [9, 10, 4]
    case = qrhead.QRCase(14, 50.0, "hand", torch.tensor([ids]), torch.tensor([null]), (11, 13), (11, 13), (4, 7))
    out = qrhead.run_case(m, case)
    score = out["real"] - out["null"]
    # the copy head splits each query row between the needle's copy of the token and the row itself
    assert float(out["real"][0, COPY_HEAD]) == pytest.approx(0.5, abs=1e-4)
    assert float(out["null"][0, COPY_HEAD]) == pytest.approx(0.0, abs=1e-4)
    assert int(score[0].argmax()) == COPY_HEAD
    assert abs(float(score[0, SINK_HEAD])) < 1e-4  # all its mass stays on the first token
    assert score[0, 2] == 0 and score[0, 3] == 0  # uniform heads: same rows, same mass
    res = qrhead.QRResult(real=out["real"][None], null=out["null"][None], cases=pd.DataFrame(), null_query="hand", provenance=None)
    assert res.top_heads(1)[0][:2] == (0, COPY_HEAD)


def test_spearman_and_top_overlap():
    a = torch.tensor([[0.1, 0.5, 0.3], [0.9, 0.0, 0.2]])
    assert qrhead.spearman(a, a) == pytest.approx(1.0)
    assert qrhead.spearman(a, -a) == pytest.approx(-1.0)
    ties = torch.tensor([[0.0, 0.0, 1.0], [2.0, 0.0, 3.0]])
    # average ranks: ties at 0 share rank 2; Pearson of the ranks
    rx = torch.tensor([2.0, 5.0, 4.0, 6.0, 1.0, 3.0])
    ry = torch.tensor([2.0, 2.0, 4.0, 5.0, 2.0, 6.0])
    expected = torch.corrcoef(torch.stack([rx, ry]))[0, 1]
    assert qrhead.spearman(a, ties) == pytest.approx(float(expected))
    assert qrhead.top_overlap(a, ties, 2) == 0.5  # top-2: {(1,0), (0,1)} vs {(1,2), (1,0)}
    assert torch.isnan(torch.tensor(qrhead.spearman(a, torch.zeros_like(a))))


def test_agreement_with_wu_and_duo(tiny):
    m = tiny("llama")  # 4 query heads, 2 KV heads
    r = qrhead.scan(m, lengths=[300], depths=[50], progress=False)
    wu = r.scores.clone()
    gates = torch.rand(m.spec.n_layers, m.spec.n_kv_heads)
    df = r.agreement(wu, gates, k=4)
    assert df[["a", "b", "unit"]].values.tolist() == [["qrhead", "wu", "head"], ["qrhead", "duo", "kv_head"], ["wu", "duo", "kv_head"]]
    first = df.iloc[0]
    assert first["spearman"] == pytest.approx(1.0) and first["top_k_overlap"] == 1.0 and first["n"] == 8
    kv = r.scores.view(2, 2, 2).amax(-1)
    assert df.iloc[1]["spearman"] == pytest.approx(qrhead.spearman(kv, gates)) and df.iloc[1]["k"] == 2
    heads = r.agreement_heads(wu, gates)
    assert len(heads) == 8 and heads["qr_rank"].tolist() == sorted(heads["qr_rank"]) and {"duo_gate", "duo_kv_rank"} <= set(heads)
    with pytest.raises(wb.ProbeError, match="wu must be a RetrievalResult or scores"):
        r.agreement(torch.zeros(3, 3))
    with pytest.raises(wb.ProbeError, match="duo must be a DuoResult or gates"):
        r.agreement(wu, torch.zeros(2, 3))


def test_protocol_cancel_and_round_trip(tiny, tmp_path):
    m = tiny("llama")
    seen = []
    full = qrhead.scan(m, **FIELDS, on_case=seen.append, progress=False)
    assert [c.index for c in seen] == [0, 1, 2] and full.complete and full.real.shape == (3, 2, 4)
    stop = threading.Event()
    part = qrhead.scan(m, **FIELDS, on_case=lambda c: stop.set() if c.index == 1 else None, cancel=stop, progress=False)
    assert not part.complete and len(part.cases) == 2 and part.real.shape[0] == 2 and "cancel" in part.summary()
    empty = qrhead.scan(m, **FIELDS, cancel=lambda: True, progress=False)
    assert "nothing to report" in empty.summary()
    store = wb.ResultStore(tmp_path)
    for r in (full, part):
        back = assert_round_trip(r, store)
        # the exact inputs are kept (provenance): the real prompt and its null twin, token for token
        assert [len(t) for t in back.cases["token_ids"]] == list(back.cases["tokens"])
        assert [len(t) for t in back.cases["null_token_ids"]] == list(back.cases["null_tokens"])


@pytest.mark.parametrize("bad, match", [
    (dict(lengths=[20]), "too short"),
    (dict(lengths=[9000]), "exceeds the model's 512 positions"),
    (dict(lengths=400), "lengths must be a list of integers"),
    (dict(depths=[120]), "depth must lie in \\[0, 100\\]"),
    (dict(depths=["a"]), "depths must be numbers"),
    (dict(n_needles=0), "n_needles must be"),
    (dict(null_query=" "), "null_query must be a non-empty string"),
])  # fmt: skip
def test_bad_config_fails_before_the_model_runs(tiny, bad, match):
    m = tiny("llama")
    with pytest.raises(wb.ProbeError, match=match):
        qrhead.scan(m, **{**FIELDS, **bad}, on_case=lambda c: pytest.fail("a case ran"), progress=False)


def test_smollm2_qrhead_regression(smollm):
    """SmolLM2 (one 400-token NIAH prompt): the top QR heads sit in the middle-to-late layers where Wu's
    retrieval heads are (L17H3 among them)."""
    r = qrhead.scan(smollm, lengths=[400], depths=[50], progress=False)
    top = r.top_heads(5)
    assert (17, 3) in [(l, h) for l, h, _ in top], top
    assert sum(8 <= l <= 23 for l, _, _ in top) == 5 and top[0][2] > 0.3
    assert abs(float(r.scores.median())) < 0.02  # most heads: the question does not change their needle mass

"""Retrieval heads: Wu et al.'s score on a hand-built copy head, the NIAH harness, SmolLM2 regression, bad input."""
import pytest
import torch

import workbench as wb
from handbuilt import COPY_HEAD, content_model
from workbench import niah, retrieval
from workbench.models.testing import byte_tokenizer

NEEDLE_SPAN = (5, 8)
PROMPT = [0, 5, 6, 7, 8, 1, 2, 3, 9, 10, 11, 4, 3]  # the needle is tokens 1, 2, 3; the prompt ends on 3


@pytest.mark.parametrize("variant, expected", [("set", 1 / 3), ("per_step", 5 / 3)])
def test_copy_head_is_the_only_retrieval_head(variant, expected):
    m = wb.load(content_model(), tokenizer=byte_tokenizer(), source_label="hand-built")
    case = niah.NIAHCase(niah.needles()[0], len(PROMPT), 50.0, torch.tensor([PROMPT]), NEEDLE_SPAN)
    out = retrieval.run_case(m, case, variant=variant, max_new_tokens=6)
    assert out["token_ids"] == PROMPT
    scores = out["scores"]
    # the copy head attends to the needle's token 3 (position 7) at every step and the model emits 3:
    # one distinct copied position (set: 1/3) over five scored decode steps (per_step: 5/3)
    assert scores[0, COPY_HEAD] == pytest.approx(expected)
    others = torch.ones_like(scores, dtype=torch.bool)
    others[0, COPY_HEAD] = False
    assert (scores[others] == 0).all()


def test_score_steps_set_vs_per_step():
    top1 = torch.tensor([[[5, 5, 6, 9]]])  # one head, four decode steps
    prompt = torch.tensor([0, 0, 0, 0, 0, 11, 12, 13, 0, 0])
    generated = torch.tensor([99, 11, 11, 12, 13])  # step r produced generated[r + 1]
    assert float(retrieval._score_steps(top1, prompt, generated, (5, 8), "set")[0, 0]) == pytest.approx(2 / 3)
    assert float(retrieval._score_steps(top1, prompt, generated, (5, 8), "per_step")[0, 0]) == pytest.approx(3 / 3)
    wrong_token = torch.tensor([99, 12, 12, 11, 13])
    assert float(retrieval._score_steps(top1, prompt, wrong_token, (5, 8), "set")[0, 0]) == 0


def test_niah_case_structure(smollm):
    needle = niah.needles()[1]
    for depth in (0, 37.5, 100):
        case = niah.build_case(smollm, needle, 600, depth)
        assert case.input_ids.shape == (1, 600)
        s, e = case.needle_span
        assert smollm.tokenizer.decode(case.input_ids[0, s:e]).strip() == needle.needle
        before = smollm.tokenizer.decode(case.input_ids[0, s - 3 : s]).rstrip()
        assert before.endswith((".", ":")), before  # a sentence boundary (or the document start)
    deep = niah.build_case(smollm, needle, 600, 90).needle_span[0]
    shallow = niah.build_case(smollm, needle, 600, 10).needle_span[0]
    assert shallow < deep


def test_smollm2_retrieval_regression(smollm):
    r = retrieval.scan(smollm, lengths=[500], depths=[0, 50], progress=False)
    assert r.tests["counted"].all()
    top = r.top_heads(5)
    assert all(17 <= l <= 23 for l, _, _ in top), top  # NOTES: retrieval heads concentrate in layers 17–23
    assert 0.01 < r.sparsity()["above_0.1"] < 0.08
    assert r.provenance.definition.startswith("Wu2024 retrieval score (set)")


def test_ablation_check_labels_and_effect(smollm):
    r = retrieval.scan(smollm, lengths=[400], depths=[50], progress=False)
    ab = retrieval.ablation_check(smollm, r, k=12, mode="uniform", seeds=(0,), progress=False).runs
    assert ab["ablated"].tolist() == ["none", "top", "random"]
    assert set(ab["mode"]) == {"uniform"}
    top, none = ab.set_index("ablated").loc["top"], ab.set_index("ablated").loc["none"]
    assert top["mean_rouge1_recall"] < none["mean_rouge1_recall"]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(lengths=[20]), "too short"),
        (dict(depths=[-5]), "depth must lie in \\[0, 100\\]"),
        (dict(depths=[101]), "depth must lie in \\[0, 100\\]"),
        (dict(lengths=[9000]), "exceeds the model's 8192 positions.*never clipped"),
        (dict(lengths=[]), "no lengths given"),
        (dict(n_needles=0), "n_needles"),
        (dict(variant="max"), "variant must be one of"),
    ],
)
def test_bad_input(smollm, kwargs, match):
    with pytest.raises(wb.ProbeError, match=match):
        retrieval.scan(smollm, **{"lengths": [300], "depths": 1, **kwargs}, progress=False)


def test_haystack_ids_are_never_another_tokenizers():
    """The haystack cache is keyed by the tokenizer object: an entry left by a freed tokenizer whose id a new
    one reuses is not served (it would be another vocabulary's ids)."""
    tok = byte_tokenizer()
    niah._HAY_CACHE[id(tok)] = (lambda: None, [1, 2, 3])  # a dead tokenizer's entry under this id
    ids = niah._haystack_ids(tok)
    assert ids == list(tok.encode(niah.haystack(), add_special_tokens=False)) and ids is niah._haystack_ids(tok)


def test_ablation_provenance_names_the_model_that_ran_it():
    m = wb.load(content_model(), tokenizer=byte_tokenizer(), source_label="hand-built")
    case = niah.NIAHCase(niah.needles()[0], len(PROMPT), 50.0, torch.tensor([PROMPT]), NEEDLE_SPAN)
    row = retrieval.run_case(m, case, max_new_tokens=4)
    ranked = retrieval.RetrievalResult.from_rows(m, [row], edits=(wb.HeadAblation([(0, 2)], mode="zero"),))
    assert ranked.provenance.extra["ablation"]  # the scan ran under an edit ...
    ab = retrieval.ablation_check(m, ranked, k=1, seeds=(0,), lengths=[400], depths=[50], max_new_tokens=2, progress=False,
                                  cancel=lambda: True)  # fmt: skip
    assert "ablation" not in ab.provenance.extra and ab.provenance.extra["complete"] is False  # ... the check did not
    assert ab.provenance.weights_hash == m.provenance.weights_hash and ab.provenance.extra["ranked_by"].startswith("Wu2024")


@pytest.mark.parametrize(
    "lengths, max_new_tokens, match",
    [
        ([20], 32, r"context length 20 is too short for a needle-in-a-haystack test \(at least 64\)"),
        ([64, 500], 24, r"context length 500 \+ 24 new tokens exceeds the model's 512 positions; use lengths ≤ 488"),
    ],
)
def test_lengths_are_checked_against_the_spec_before_a_model_loads(lengths, max_new_tokens, match):
    """One rule, read from the ModelSpec a config tells (no weights): the CLI, the dashboard and the study
    planner call :meth:`RetrievalConfig.check`."""
    from workbench.models.loading import load_config
    from workbench.models.spec import config_spec

    spec = config_spec(load_config("tiny:llama"))
    assert spec.max_positions == 512
    cfg = retrieval.RetrievalConfig(lengths=lengths, max_new_tokens=max_new_tokens)
    with pytest.raises(wb.ProbeError, match=match):
        cfg.check(spec)
    retrieval.RetrievalConfig(lengths=[64, 488], max_new_tokens=24).check(spec)  # within the rule: nothing raised
    if lengths == [20]:  # positions unknown (a .gguf file before it loads): the minimum still holds
        with pytest.raises(wb.ProbeError, match="too short"):
            cfg.check(None)
    else:
        cfg.check(None)

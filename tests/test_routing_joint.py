"""Attention × routing: the per-token table's α, experts, magnitudes and kinds equal independent captures
(trained tiny-moe and tiny random MoEs), a planted massive activation is found, and the scan protocol."""
import threading

import pandas as pd
import pytest
import torch

import workbench as wb
from reference import assert_round_trip
from workbench import sinks
from workbench.routing import joint

TEXTS = ["def add(a, b):\n    return a + b\n" * 3, "The river runs past the old mill. " * 4, "2 + 2 = 4; 3 + 5 = 8; " * 4]


@pytest.fixture(scope="module")
def tiny_moe():
    return wb.load("tiny-moe")


def independent(m, text, max_tokens):
    """α, key counts, routing rows, max |x| and Sun et al.'s massive positions from separate captures."""
    ids = torch.tensor([m.tokenizer.encode(text)[:max_tokens]])
    with wb.capture(m, wb.AttentionStats(sink_keys=0, key_mass=True)) as ca:
        m.hf(input_ids=ids)
    with wb.capture(m, wb.Routing()) as cr:
        m.hf(input_ids=ids)
    with wb.capture(m, wb.Activations("blocks.*.hook_resid_post")) as cx:
        m.hf(input_ids=ids)
    x = cx.stack("hook_resid_post")[:, 0]  # [L, T, d]
    massive = []
    for layer in range(m.spec.n_layers):
        a = x[layer].abs()
        massive.append(((a > 100) & (a >= 1000 * a.median())).any(-1))
    return ids, sinks.alpha_all(ca), ca.stack("attn.key_count")[:, 0], wb.routing.rows(cr), x.abs().amax(-1), torch.stack(massive)


def check_against_independent(m, r, texts, max_tokens):
    t = r.tokens
    for i, text in enumerate(texts):
        ids, alpha, count, rr, max_abs, massive = independent(m, text, max_tokens)
        T = ids.shape[1]
        for li, layer in enumerate(rr.layers):
            rows = t[(t.text == i) & (t.layer == layer)].sort_values("position")
            assert rows["position"].tolist() == list(range(T)) and rows["token_id"].tolist() == ids[0].tolist()
            torch.testing.assert_close(torch.tensor(rows["alpha_mean"].to_numpy()), alpha[layer].mean(0), atol=1e-6, rtol=0)
            torch.testing.assert_close(torch.tensor(rows["alpha_max"].to_numpy()), alpha[layer].amax(0), atol=1e-6, rtol=0)
            assert rows["seen_by"].tolist() == count[layer].tolist()
            torch.testing.assert_close(torch.tensor(rows["max_abs"].to_numpy()), max_abs[layer].float(), atol=1e-5, rtol=1e-5)
            assert [e for e in rows["experts"]] == [e[e >= 0].tolist() for e in rr.experts[li]]
            assert rows["top1"].tolist() == rr.experts[li, :, 0].tolist()
            for got, want in zip(rows["weights"], rr.weights[li]):
                assert got == pytest.approx(want[~torch.isnan(want)].tolist(), abs=1e-5)  # SDPA vs the reducing path: float32 noise
            # the kinds follow the rules applied to the independent values
            hidden = (alpha[layer] > r.threshold).any(0) & (count[layer] >= r.min_queries)
            hidden[0] = False
            assert rows["hidden_sink"].tolist() == hidden.tolist()
            assert rows["massive"].tolist() == massive[layer].tolist()
            assert rows["first"].tolist() == [True] + [False] * (T - 1)


def test_tiny_moe_table_equals_independent_captures(tiny_moe):
    r = joint.scan(tiny_moe, texts=TEXTS, max_tokens=96, progress=False)
    check_against_independent(tiny_moe, r, TEXTS, 96)
    assert r.layers == (0, 1, 2, 3) and r.n_experts == 8
    ex = r.experts()
    k = 2
    for (layer, kind), g in ex.groupby(["layer", "kind"]):
        if g["kind_tokens"].iloc[0]:
            assert g["share"].sum() == pytest.approx(k), (layer, kind)  # top-2: shares sum to k over experts
    first = ex[(ex.kind == "first") & (ex.layer == 0)]
    assert first["kind_tokens"].iloc[0] == len(TEXTS)
    # the first token (<s>, the same input at position 0 in every text) takes one route per layer
    tokens = r.tokens[r.tokens["first"]]
    assert (tokens["token"] == "<s>").all() and (tokens.groupby("layer")["top1"].nunique() == 1).all()


@pytest.mark.parametrize("arch", ["olmoe", "deepseek_v3", "qwen2_moe"])
def test_tiny_random_moes_equal_independent_captures(tiny, arch):
    m = tiny(arch)
    texts = TEXTS[:2]
    r = joint.scan(m, texts=texts, max_tokens=40, progress=False)
    check_against_independent(m, r, texts, 40)


def test_planted_massive_activation_is_found(tiny):
    m = tiny("olmoe")

    def plant(x, name):
        x = x.clone()
        x[:, 5, 3] = 5e4
        return x

    r = joint.scan(m, texts=TEXTS[:1], max_tokens=30, edits=(wb.Hook("blocks.0.hook_resid_post", plant),), progress=False)
    t = r.tokens
    hit = t[t.massive]
    assert set(hit["position"]) == {5} and set(hit["layer"]) == set(r.layers)  # it stays in the residual stream
    assert (hit["kind"] == "massive").all() and (hit["max_abs"] > 1e4).all()
    assert "massive ×1" in r.summary()
    share = r.experts()
    massive = share[(share.kind == "massive") & (share.layer == r.layers[0])]
    assert massive["kind_tokens"].iloc[0] == 1 and massive["share"].sum() == pytest.approx(2)


def test_protocol_cancel_and_round_trip(tiny, tmp_path):
    m = tiny("olmoe")
    seen = []
    full = joint.scan(m, texts=TEXTS, max_tokens=24, on_case=seen.append, progress=False)
    assert [c.index for c in seen] == [0, 1, 2] and full.complete
    stop = threading.Event()
    part = joint.scan(m, texts=TEXTS, max_tokens=24, on_case=lambda c: stop.set() if c.index == 1 else None, cancel=stop, progress=False)
    assert not part.complete and set(part.tokens["text"]) == {0, 1} and "cancel" in part.summary()
    empty = joint.scan(m, texts=TEXTS, max_tokens=24, cancel=lambda: True, progress=False)
    assert "nothing to report" in empty.summary()
    store = wb.ResultStore(tmp_path)
    for r in (full, part):
        back = assert_round_trip(r, store)
        pd.testing.assert_frame_equal(back.experts(), r.experts(), check_dtype=False)
        assert r.grids()["share_first"].shape == (m.spec.n_layers, m.spec.routers[0].n_experts)


@pytest.mark.parametrize("bad, match", [
    (dict(texts="one string"), "texts must be a non-empty list"),
    (dict(max_tokens=1), "max_tokens must be ≥ 2"),
    (dict(threshold=0), "threshold must lie in \\(0, 1\\)"),
    (dict(min_queries=0), "min_queries must be ≥ 1"),
    (dict(max_tokens=600, texts=["x" * 700]), "max_tokens = 600 exceeds the model's 512 positions"),
    (dict(chat="yes"), "chat must be True or False"),
])  # fmt: skip
def test_bad_config_fails_before_the_model_runs(tiny, bad, match):
    with pytest.raises(wb.ProbeError, match=match):
        joint.scan(tiny("olmoe"), **{"texts": TEXTS, **bad}, on_case=lambda c: pytest.fail("a case ran"), progress=False)


def test_dense_model_is_refused(tiny):
    with pytest.raises(wb.ProbeError, match="has no MoE layers"):
        joint.scan(tiny("llama"), texts=TEXTS, progress=False)



@pytest.mark.parametrize("chat", [False, True])
def test_long_texts_are_cut_before_the_length_check(tiny, chat):
    """Both scans take a text's first max_tokens tokens, as a chat turn or not: a text longer than the model's
    positions is fine (one shared helper, routing.scan.first_tokens)."""
    m = tiny("olmoe")
    long = "x" * 700  # 700 byte tokens > the tiny model's 512 positions
    r = wb.routing.scan(m, texts=[long], max_tokens=64, chat=chat, progress=False)
    assert r.rows.token_ids.numel() == 64
    j = joint.scan(m, texts=[long], max_tokens=64, chat=chat, progress=False)
    assert len(j.tokens) == 64 * len(m.spec.routers)

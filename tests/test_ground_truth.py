"""Hand-built models whose answers are known: a sink head and a copy head must be found, and nothing else."""
import pytest
import torch

import workbench as wb
from handbuilt import BOS_DIM, CONST_DIM, COPY_HEAD, HD, HID, SINK_HEAD, USABLE, blank_model

VOCAB, T, POS0 = 12, 16, 16  # inputs_embeds carry token one-hots (dims 0..11) and position one-hots (16..31)


def hand_built_model():
    """Sink head 0 and a copy head 1 that attends to the previous occurrence of the current token (not itself)."""
    model = blank_model(VOCAB)
    with torch.no_grad():
        attn = model.model.layers[0].self_attn
        wq, wk = attn.q_proj.weight, attn.k_proj.weight  # [heads*HD, HID]
        # sink head: every query carries the constant feature, only position 0 carries the BOS feature
        wq[SINK_HEAD * HD + USABLE[0], CONST_DIM] = 2.0
        wk[SINK_HEAD * HD + USABLE[0], BOS_DIM] = 1.0
        # copy head: +A for the same token, −2A for the same position → previous occurrence wins, itself loses
        base = COPY_HEAD * HD
        for t in range(VOCAB):
            wq[base + USABLE[t], t] = 2.0
            wk[base + USABLE[t], t] = 1.0
        for pos in range(T):
            wq[base + USABLE[VOCAB + pos], POS0 + pos] = -4.0
            wk[base + USABLE[VOCAB + pos], POS0 + pos] = 1.0
    return model


def embed(tokens):
    x = torch.zeros(1, len(tokens), HID)
    for i, t in enumerate(tokens):
        x[0, i, t] = 1.0
        x[0, i, POS0 + i] = 1.0
        x[0, i, CONST_DIM] = 1.0
    x[0, 0, BOS_DIM] = 1.0
    return x


TOKENS = [0, 3, 7, 1, 5, 9, 3, 11, 2, 7, 4, 1, 8, 9, 6, 5]  # 3, 7, 1, 9, 5 repeat once; token 0 never does


def previous_occurrence():
    prev = {}
    for i, t in enumerate(TOKENS):
        prev[i] = max((j for j in range(i) if TOKENS[j] == t), default=None)
    return prev


@pytest.mark.parametrize("path", ["torch", "triton"])
def test_detectors_find_exactly_the_built_heads(path):
    if path == "triton":
        pytest.importorskip("triton")
    m = wb.load(hand_built_model(), source_label="hand-built")
    m.hf._workbench_state.use_triton = path == "triton"
    with wb.capture(m, wb.AttentionStats(sink_keys=1)) as cap, torch.no_grad():
        m.hf(inputs_embeds=embed(TOKENS))
    alpha0 = wb.sinks.alpha(cap)[0, :, 0]  # [head]
    sink_heads = {h for h in range(4) if alpha0[h] > 0.3}
    assert sink_heads == {SINK_HEAD}, alpha0
    assert alpha0[SINK_HEAD] > 0.99
    prev = previous_occurrence()
    rows = [i for i, j in prev.items() if j is not None]
    top1 = cap["blocks.0.attn.top1"][0]  # [head, row]
    copy_rate = {h: sum(int(top1[h, i]) == prev[i] for i in rows) / len(rows) for h in range(4)}
    assert {h for h, r in copy_rate.items() if r > 0.9} == {COPY_HEAD}, copy_rate
    assert copy_rate[COPY_HEAD] == 1.0
    assert (cap["blocks.0.attn.top1_prob"][0, COPY_HEAD, rows] > 0.99).all()
    # uniform heads: α_0 = mean over rows of 1/(i+1), entropy = log(i+1)
    expected = sum(1 / (i + 1) for i in range(T)) / T
    torch.testing.assert_close(alpha0[2:], torch.full((2,), expected), atol=1e-5, rtol=0)
    torch.testing.assert_close(cap["blocks.0.attn.entropy"][0, 2], torch.log(torch.arange(1, T + 1).float()), atol=1e-5, rtol=0)


def test_ablating_the_sink_head_with_uniform_mode_spreads_its_mass():
    m = wb.load(hand_built_model(), source_label="hand-built")
    with wb.intervene(m, wb.HeadAblation([(0, SINK_HEAD)], mode="uniform")):
        with wb.capture(m, wb.AttentionStats(sink_keys=1)) as cap, torch.no_grad():
            m.hf(inputs_embeds=embed(TOKENS))
    expected = sum(1 / (i + 1) for i in range(T)) / T
    assert abs(float(wb.sinks.alpha(cap)[0, SINK_HEAD, 0]) - expected) < 1e-5


SMOLLM_TEXT = (
    "The lighthouse keeper climbed the spiral stairs every evening at dusk. He trimmed the wick, polished the "
    "great lens, and wrote the weather in a leather book. Ships passed far out on the grey water, and none of "
    "them knew his name, but all of them trusted his light."
)


def test_smollm2_sink_regression(smollm):
    """Fixed input, fixed weights: first-token sinks concentrate in the upper layers."""
    with wb.capture(smollm, wb.AttentionStats(sink_keys=1)) as cap:
        smollm.forward_text(SMOLLM_TEXT)
    a0 = wb.sinks.alpha(cap)[..., 0]  # [layer, head]
    upper, lower = (a0[12:] > 0.3).float().mean(), (a0[:6] > 0.3).float().mean()
    assert upper > 0.8 and upper > lower, (upper, lower)
    rate = wb.sinks.sink_rate(wb.sinks.alpha(cap), eps=0.3)
    # pinned values (fp32, CPU); a change here means the backend or the loader changed numbers
    assert abs(rate - PINNED_SINK_RATE) < 0.5
    assert abs(float(a0.mean()) - PINNED_MEAN_ALPHA0) < 1e-3


PINNED_SINK_RATE = 74.8148  # % of 270 heads with α_0 > 0.3 on this 56-token text (no BOS: SmolLM2 adds none)
PINNED_MEAN_ALPHA0 = 0.46430

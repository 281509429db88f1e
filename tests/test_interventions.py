"""Interventions through a whole model, checked against the same edit made outside the backend; bad input."""
import pytest
import torch

import workbench as wb


def _o_proj_edit(m, layer, head, fn):
    """Edit one head's slice of o_proj's input (the per-head attention output) with a forward pre-hook."""
    attn = m.hf.get_submodule(m.spec.attention_paths[layer])
    hd = m.spec.head_dim

    def hook(mod, args):
        x = args[0].clone()
        x[..., head * hd : (head + 1) * hd] = fn(x[..., head * hd : (head + 1) * hd])
        return (x,)

    return attn.o_proj.register_forward_pre_hook(hook)


@pytest.mark.parametrize("mode", ["zero", "mean"])
def test_output_ablation_equals_editing_o_proj_input(tiny, mode):
    m = tiny("llama")
    ids = torch.randint(3, 250, (1, 12), generator=torch.Generator().manual_seed(0))
    ref_texts = ["some reference text", "and another one"]
    means = wb.head_output_means(m, ref_texts) if mode == "mean" else None
    with wb.intervene(m, wb.HeadAblation([(1, 2)], mode=mode, reference=ref_texts if mode == "mean" else None)), torch.no_grad():
        ours = m.hf(ids).logits
    repl = (lambda x: torch.zeros_like(x)) if mode == "zero" else (lambda x: means[(1, 2)].expand_as(x))
    handle = _o_proj_edit(m, 1, 2, repl)
    try:
        with torch.no_grad():
            theirs = m.hf(ids).logits
    finally:
        handle.remove()
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    with torch.no_grad():
        assert not torch.allclose(m.hf(ids).logits, ours)  # the block ended: the model is back to normal


def test_kv_unit_expands_to_the_query_group(tiny):
    m = tiny("llama")  # 4 query heads, 2 KV heads
    ids = torch.randint(3, 250, (1, 9))
    with wb.intervene(m, wb.HeadAblation([(0, 1)], unit="kv")), torch.no_grad():
        a = m.hf(ids).logits
    with wb.intervene(m, wb.HeadAblation([(0, 2), (0, 3)])), torch.no_grad():
        b = m.hf(ids).logits
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_calibration_moves_mass_off_the_sink_and_rows_still_sum_to_one(smollm):
    text = "The committee met on Tuesday. It approved the budget and adjourned before noon."
    heads = [(20, h) for h in range(smollm.spec.n_heads)]
    probe = wb.AttentionStats(sink_keys=1, spans={"sink": (0, 1), "all": (0, 10_000)}, layers=[20])
    with wb.capture(smollm, probe) as before:
        smollm.forward_text(text)
    with wb.intervene(smollm, wb.SinkCalibration(heads, sink_keys=[0], beta=0.4)):
        with wb.capture(smollm, probe) as after:
            smollm.forward_text(text)
    a0, a1 = wb.sinks.alpha(before)[20, :, 0], wb.sinks.alpha(after)[20, :, 0]
    # every row except the first (which sees only the sink) keeps β of its sink mass
    col0, col1 = before["blocks.20.attn.span.sink"][0, :, 1:], after["blocks.20.attn.span.sink"][0, :, 1:]
    torch.testing.assert_close(col1, 0.4 * col0, atol=1e-5, rtol=0)
    total = after["blocks.20.attn.span.all"]
    torch.testing.assert_close(total, torch.ones_like(total), atol=1e-5, rtol=0)
    assert (a1 < a0).all()


def test_streaming_and_span_mask_change_the_output(tiny):
    m = tiny("qwen2")
    ids = torch.randint(3, 250, (1, 40))
    with torch.no_grad():
        base = m.hf(ids).logits
    for edit in (wb.StreamingHeads([(0, 0)], sink=2, recent=4), wb.SpanMask([(1, 3)], keys=range(5, 20))):
        with wb.intervene(m, edit), torch.no_grad():
            changed = m.hf(ids).logits
        assert not torch.allclose(base, changed)
        assert torch.allclose(base[:, :5], changed[:, :5], atol=1e-6)  # rows before the edit's reach are untouched


# --- bad input: clear errors before any forward pass -----------------------------------------------


@pytest.fixture
def counted(tiny):
    m = tiny("llama")
    calls = []
    h = m.hf.register_forward_pre_hook(lambda *a: calls.append(1))
    yield m, calls
    h.remove()


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: wb.AttentionStats(layers=[7]), "layer 7 does not exist"),
        (lambda: wb.AttentionStats(topk=0), "topk"),
        (lambda: wb.AttentionStats(sink_keys=2.5), "sink_keys must be an int"),
        (lambda: wb.AttentionStats(spans={"a b": (0, 1)}), "identifiers"),
        (lambda: wb.AttentionStats(key_positions=[-1]), "≥ 0"),
        (lambda: wb.AttentionStats(spans={"x": (5, 2)}), "start < end"),
        (lambda: wb.AttentionStats(spans={"w": wb.Window(0)}), "width"),
        (lambda: wb.AttentionStats(key_positions=5), "key_positions must be a list"),
        (lambda: wb.AttentionStats(key_positions=[torch.tensor(2.7)]), "key_positions must be an integer"),  # not key 2
        (lambda: wb.AttentionStats(tiles=[(0, 2.5, 0, 3)]), "a tile is"),
    ],
)
def test_bad_probe(counted, make, match):
    m, calls = counted
    with pytest.raises(wb.ProbeError, match=match):
        with wb.capture(m, make()):
            m.forward_text("never runs")
    assert not calls


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: wb.HeadAblation([(0, 9)]), "head 9 does not exist in layer 0 \\(query heads 0..3; 2 KV heads"),
        (lambda: wb.HeadAblation([(5, 0)]), "layer 5 does not exist"),
        (lambda: wb.HeadAblation([(0, 3)], unit="kv"), "KV head 3 does not exist.*query head index — pass unit='query'"),
        (lambda: wb.HeadAblation([(0, 1)], mode="random"), "mode must be one of"),
        (lambda: wb.HeadAblation([(0, 1)], mode="mean"), "needs reference texts"),
        (lambda: wb.HeadAblation([]), "no heads"),
        (lambda: wb.HeadAblation([(0, 1.7)]), "head must be an integer, got 1.7"),
        (lambda: wb.HeadAblation([(0.0, 1)]), "layer must be an integer"),
        (lambda: wb.HeadAblation(["L1H2x"]), "'L1H2x' is not a head; write \\(layer, head\\) or 'L17H3'"),
        (lambda: wb.HeadAblation("L1H2"), "a list of \\(layer, head\\) pairs"),
        (lambda: wb.HeadAblation([(0, True)]), "must be an integer"),
        (lambda: wb.SinkCalibration([(0, 1)], sink_keys=[0], beta=0.0), "beta must lie in \\(0, 1\\]"),
        (lambda: wb.SinkCalibration([(0, 1)], sink_keys=[0], beta=1.5), "beta must lie in \\(0, 1\\]"),
        (lambda: wb.SinkCalibration([(0, 1)], sink_keys=[]), "sink_keys\\): give at least one key position"),
        (lambda: wb.StreamingHeads([(0, 1)], recent=0), "recent ≥ 1"),
        (lambda: wb.HeadAblation([(0, 1)], mode="mean", means={(0, 1): torch.zeros(3)}), "must be a tensor of shape \\(16,\\), got shape \\(3,\\)"),
        (lambda: wb.HeadAblation([(0, 1)], mode="mean", means={(0, 1): "zeros"}), "must be a tensor of shape"),
        (lambda: wb.HeadAblation([(0, 1)], reference=["some text"]), "apply only to mode='mean'"),
    ],
)
def test_bad_intervention(counted, make, match):
    m, calls = counted
    with pytest.raises(wb.ProbeError, match=match):
        with wb.intervene(m, make()):
            m.forward_text("never runs")
    assert not calls


def test_key_position_beyond_sequence_fails_before_any_layer(tiny):
    m = tiny("llama")
    layers_run = []
    h = m.hf.get_submodule(m.spec.attention_paths[0]).register_forward_pre_hook(lambda *a: layers_run.append(1))
    try:
        with pytest.raises(wb.ProbeError, match="key position 50 requested but the sequence has only 6 real tokens"):
            with wb.capture(m, wb.AttentionStats(key_positions=[50])):
                m.forward_text("hello")
    finally:
        h.remove()
    assert not layers_run


def test_sink_rate_epsilon_and_empty_capture(tiny):
    m = tiny("llama")
    with wb.capture(m, wb.AttentionStats()) as cap:
        pass
    with pytest.raises(wb.ProbeError, match="nothing was captured"):
        wb.sinks.alpha(cap)
    with wb.capture(m, wb.AttentionStats()) as cap:
        m.forward_text("hello")
    for eps in (0.0, 1.0, -0.1):
        with pytest.raises(wb.ProbeError, match="ε must lie in"):
            wb.sinks.sink_rate(wb.sinks.alpha(cap), eps=eps)
    with pytest.raises(wb.ProbeError, match="key 4 was not tracked"):
        wb.sinks.sink_rate(wb.sinks.alpha(cap), k=4)


def test_sink_keys_beyond_a_short_input_are_unseen_not_errors(tiny):
    m = tiny("llama")
    with wb.capture(m, wb.AttentionStats(sink_keys=8)) as cap:
        m.forward_text("hi")  # BOS + 2 bytes: keys 3..7 do not exist yet
    a = wb.sinks.alpha(cap)
    assert torch.isfinite(a[..., :3]).all() and torch.isnan(a[..., 3:]).all()


def test_head_names_are_heads(tiny):
    m = tiny("llama")
    ids = torch.randint(3, 250, (1, 9))
    with wb.intervene(m, wb.HeadAblation(["L1H2", "l0h3"])), torch.no_grad():
        a = m.hf(ids).logits
    with wb.intervene(m, wb.HeadAblation([(1, 2), (0, 3)])), torch.no_grad():
        b = m.hf(ids).logits
    assert torch.equal(a, b)


def test_mean_ablation_means_taken_inside_an_edit_are_not_reused_outside(tiny):
    """head_output_means caches per reference set; means computed while another edit is active describe the
    edited model and must not leak into a later call without it."""
    from workbench.attention import head_output_means

    m = tiny("llama")
    texts = ["mean reference one", "and another"]
    m.__dict__.pop("_mean_cache", None)
    layer0 = [(0, h) for h in range(m.spec.n_heads)]
    with wb.intervene(m, wb.HeadAblation(layer0, mode="zero")):
        inside = head_output_means(m, texts, layers=[1])
    outside = head_output_means(m, texts, layers=[1])
    m.__dict__.pop("_mean_cache", None)
    fresh = head_output_means(m, texts, layers=[1])
    assert not torch.allclose(inside[(1, 0)], outside[(1, 0)])
    torch.testing.assert_close(outside[(1, 0)], fresh[(1, 0)])
    # a list of the right length is a mean too
    with wb.intervene(m, wb.HeadAblation([(1, 0)], mode="mean", means={(1, 0): fresh[(1, 0)].tolist()})), torch.no_grad():
        m.forward_text("runs")

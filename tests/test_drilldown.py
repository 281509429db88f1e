"""Cheap drill-down and the pattern view: every row and pattern equals HF eager attention, without a
forward pass per click (issue 15)."""
import base64
import threading

import pytest
import torch

import workbench as wb
from workbench.base.errors import ProbeError
from workbench.views.widgets import Drilldown, PatternView, prompt_effect, token_labels
from workbench.measure.drilldown import DrilldownCache, qk_elements

TEXT = "Sinks soak up attention; retrieval heads copy. Sinks soak up attention; retrieval heads copy!"


def eager(m, ids):
    """HF eager attention probabilities, every layer ``[layer][head, T, T]`` (GPT-OSS: its sink column dropped)."""
    m.hf.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = m.hf(input_ids=ids, output_attentions=True)
    finally:
        m.hf.set_attn_implementation("workbench")
    return [a[0].double() for a in out.attentions]


@pytest.mark.parametrize("arch", ["llama", "gemma3", "gpt_oss", "qwen2"])  # GQA; sliding window; learned sinks
def test_rows_and_patterns_equal_eager(tiny, arch):
    m = tiny(arch)
    d = Drilldown(m, m.encode(TEXT))
    assert d.prime() == list(range(m.spec.n_layers)) and d.forward_passes == 1
    ref = eager(m, d.ids)
    T = d.T
    for layer in range(m.spec.n_layers):
        rows = d.rows(layer, range(T))
        for q, r in rows.items():
            assert r.shape == (m.spec.n_heads, q + 1)
            torch.testing.assert_close(r.double(), ref[layer][:, q, : q + 1], atol=1e-5, rtol=0)
        for head in range(m.spec.n_heads):
            torch.testing.assert_close(d.pattern(layer, head).double(), ref[layer][head], atol=1e-5, rtol=0)
    assert d.forward_passes == 1  # every row above came from the cached queries and keys


def test_smollm_rows_equal_eager(smollm):
    ids = smollm.encode("The capital of France is Paris. The capital of Germany is Berlin. The capital of France is")
    d = Drilldown(smollm, ids)
    d.prime()
    ref = eager(smollm, ids)
    T = d.T
    for layer in (0, 14, 29):
        for q, r in d.rows(layer, [0, T // 2, T - 1]).items():
            torch.testing.assert_close(r.double(), ref[layer][:, q, : q + 1], atol=1e-5, rtol=0)


def test_memory_bound_and_layers_fetched_on_demand(tiny):
    m = tiny("gemma3")
    ids = m.encode(TEXT)
    one = qk_elements(m.spec, ids.shape[1])
    d = Drilldown(m, ids, max_elements=one)  # room for one layer only
    assert d.prime() == [0] and d.elements == one
    ref = eager(m, ids)
    r = d.rows(1, [40])[40]  # layer 1 is not held: one forward pass cut after it, then layer 0 is dropped
    torch.testing.assert_close(r.double(), ref[1][:, 40, :41], atol=1e-5, rtol=0)
    assert d.layers == [1] and d.forward_passes == 2 and d.elements == one
    with pytest.raises(ProbeError, match="max_elements"):
        Drilldown(m, ids, max_elements=one - 1)


def test_take_reuses_the_prompts_own_run(tiny):
    """The dashboard's prompt run adds the probes to its own capture: the drill-down then costs nothing."""
    m = tiny("llama")
    ids = m.encode(TEXT)
    d = Drilldown(m, ids)
    with wb.capture(m, wb.AttentionStats(sink_keys=4)) as stats, d.recording(pattern=True) as cap, torch.no_grad():
        m.hf(input_ids=ids)
    assert d.take(cap) == [0, 1] and d.forward_passes == 0
    assert stats["blocks.1.attn.entropy"].shape == (1, 4, d.T)  # the caller's own statistics are untouched
    torch.testing.assert_close(d.pattern(1, 2), cap["blocks.1.attn.tile.0"][0, 2], atol=1e-6, rtol=0)
    view = PatternView(m, ids, capture=cap, drilldown=d, layer=1, head=2)
    assert d.forward_passes == 0 and view.mode == "pattern"


def test_cancel_stops_a_fetch(tiny):
    m = tiny("llama")
    d = Drilldown(m, m.encode(TEXT))
    stop = threading.Event()
    stop.set()
    with pytest.raises(ProbeError, match="stopped"):
        d.prime(cancel=stop)
    assert d.layers == []
    d.prime()
    assert d.layers == [0, 1]


def test_cache_is_bounded_and_shared(tiny):
    m = tiny("llama")
    a, b = m.encode(TEXT), m.encode("another prompt entirely, longer than the first one by a few words " * 2)
    per = qk_elements(m.spec, a.shape[1], 2)
    cache = DrilldownCache(max_elements=per + qk_elements(m.spec, b.shape[1], 2) - 1)
    d1, new = cache.get("m", m, a)
    assert new
    d1.prime()
    assert cache.get("m", m, a) == (d1, False)  # the same prompt: the same drill-down (every session shares it)
    d2, _ = cache.get("m", m, b)
    d2.prime()
    cache.trim()
    assert len(cache) == 1 and cache.get("m", m, b)[0] is d2


# --- the pattern view -------------------------------------------------------------------------------------


def test_pattern_view_thumbnails_and_enlarged_head_equal_eager(tiny):
    m = tiny("gemma3")
    view = PatternView(m, TEXT[:40], layer=1, head=2)  # 41 tokens: one thumbnail pixel per cell
    T = view.ids.shape[1]
    ref = eager(m, view.ids)
    assert view.mode == "pattern" and view.thumb_size == T
    raw = torch.frombuffer(bytearray(base64.b64decode(view.thumbs)), dtype=torch.uint8)
    assert raw.numel() == m.spec.n_layers * m.spec.n_heads * view.thumb_size**2  # one thumbnail per head
    for layer in range(m.spec.n_layers):
        for head in range(m.spec.n_heads):
            want = (ref[layer][head].sqrt() * 255).round()
            assert (view.thumbnail(layer, head).double() - want).abs().max() <= 1
    big = torch.frombuffer(bytearray(base64.b64decode(view.pattern["data"])), dtype=torch.float32).view(T, T)
    assert (view.pattern["layer"], view.pattern["head"]) == (1, 2)
    torch.testing.assert_close(big.double(), ref[1][2], atol=1e-5, rtol=0)
    view.selected = [0, 3]  # a click on a thumbnail enlarges that head
    big = torch.frombuffer(bytearray(base64.b64decode(view.pattern["data"])), dtype=torch.float32).view(T, T)
    torch.testing.assert_close(big.double(), ref[0][3], atol=1e-5, rtol=0)
    assert view.rows[0]["layer"] == 0 and view.rows[0]["head"] == 3


def test_long_prompts_get_the_row_view(tiny):
    m = tiny("llama")
    view = PatternView(m, TEXT, max_pattern_tokens=16, layer=1, head=0)
    assert view.mode == "rows" and view.thumbs == "" and view.pattern == {}
    T = view.ids.shape[1]
    assert view.rows[0]["query"] == T - 1 and len(view.rows[0]["weights"]) == T
    with pytest.raises(ProbeError, match="drawn as rows"):
        view.thumbnail(0, 0)


def test_thumbnails_of_long_prompts_keep_thin_lines(tiny):
    from workbench.views.widgets.pattern_view import thumbnails

    p = torch.zeros(1, 200, 200)
    p[0, torch.arange(1, 200), torch.arange(199)] = 1.0  # a previous-token head: one thin diagonal
    thumbs, size = thumbnails([p], size=64)
    assert size == 50 and thumbs.shape == (1, 50, 50)
    assert (thumbs[0].diagonal() == 255).all()  # the maximum over each 4×4 block keeps the line


# --- tokens and effects -------------------------------------------------------------------------------------


def test_byte_tokens_read_as_bytes(tiny):
    m = tiny("llama")  # one token per UTF-8 byte: "ß" is two tokens that decode to "�" alone
    ids = m.encode("Straße")
    labels, notes = token_labels(m.tokenizer, ids)
    assert labels == ["<s>", "S", "t", "r", "a", "\\xc3", "\\x9f", "e"]
    assert "'ß'" in notes[5] and "1 of 2" in notes[5] and "2 of 2" in notes[6] and notes[1] == ""
    view = PatternView(m, "Straße")
    assert "\ufffd" not in "".join(view.tokens) and view.token_notes["5"] == notes[5]


def test_prompt_effect_counts_only_the_users_tokens(smollm_or_tiny):
    m, chat = smollm_or_tiny
    text = "The lighthouse keeper climbed the stairs."
    edit = wb.HeadAblation([(1, 2)] if m.spec.n_layers == 2 else [(20, 3)], mode="zero")
    pe = prompt_effect(m, text, [edit], chat=chat, max_new_tokens=3)
    ids = m.encode(text, chat=chat)
    plain = m.tokenizer.encode(text, add_special_tokens=False)
    s, e = pe.user
    assert ids[0, s:e].tolist() == plain and pe.n_template == ids.shape[1] - len(plain)
    delta = pe.token_delta()
    counted = range(max(s, 1), e)  # the user's tokens that something before them predicts
    assert [i for i, d in enumerate(delta) if d is not None] == list(counted)
    want = torch.tensor([d for d in delta if d is not None], dtype=torch.double).mean()
    assert pe.delta_loss == pytest.approx(float(want), abs=1e-5)
    assert pe.edits == [f"head-ablation:zero L{edit.heads[0][0]}H{edit.heads[0][1]}"]
    assert all(op in "=+-" for op, _ in pe.diff())


@pytest.fixture(params=["tiny", "smollm"])
def smollm_or_tiny(request, tiny):
    if request.param == "tiny":
        return tiny("llama"), False  # BOS is the only template token
    return request.getfixturevalue("smollm"), True  # ~30 chat-template tokens around the text


def test_a_fetch_waiting_for_the_model_does_not_block_the_models_holder(tiny):
    """A click's fetch (a worker without the model lock) waits for the model; the thread that holds the model
    (a re-run building this prompt's view) then needs another layer of the same prompt: it must not deadlock."""
    import time
    from contextlib import contextmanager

    m = tiny("llama")
    model_lock = threading.RLock()

    @contextmanager
    def using():
        with model_lock:
            yield

    d = Drilldown(m, m.encode(TEXT), using=using)
    held, done = threading.Event(), threading.Event()

    def holder():
        with model_lock:
            held.set()
            time.sleep(0.3)  # the click's fetch starts meanwhile and waits for the model
            d.ensure(1)
            done.set()

    threading.Thread(target=holder, daemon=True).start()
    held.wait(10)
    click = threading.Thread(target=lambda: d.ensure(0), daemon=True)
    click.start()
    assert done.wait(30), "the model's holder deadlocked on the prompt's fetch lock"
    click.join(30)
    assert d.layers == [0, 1] and d.forward_passes == 2

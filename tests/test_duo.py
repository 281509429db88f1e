"""DuoAttention gates: the gated mix, training on a hand-built model whose answer is known, the sweep."""
import random

import pytest
import torch

import workbench as wb
from handbuilt import HD, USABLE, content_model
from workbench import duo
from workbench.models.testing import byte_tokenizer


def wide_readers():
    """Hand-built model where heads 2 and 3 (uniform attention) write the mean token of everything they
    see: streaming changes their output. Heads 0 (sink) and 1 (self-copy on distinct tokens) only ever
    look at keys a streaming head keeps."""
    model = content_model()
    attn = model.model.layers[0].self_attn
    with torch.no_grad():
        for head in (2, 3):
            for t in range(12):
                attn.v_proj.weight[head * HD + USABLE[t], t] = 1.0
                attn.o_proj.weight[40 + t + 12 * (head - 2), head * HD + USABLE[t]] = 30.0
    return wb.load(model, tokenizer=byte_tokenizer(), source_label="hand-built")


def samples(rng: random.Random):
    ids = [0] + rng.sample(range(1, 12), 11) + [rng.randrange(1, 12) for _ in range(20)]
    # distinct tokens where the answer is read, so the copy head attends to itself
    tail = rng.sample(range(1, 12), 8)
    return torch.tensor([ids[:24] + tail]), 24


def test_gates_keep_wide_heads_and_drop_local_ones():
    m = wide_readers()
    r = duo.scan(m, steps=60, sink=1, recent=3, lr=0.1, length=64, samples=samples, progress=False)
    a = r.gates[0]  # [kv head]
    assert a[2] > 0.5 and a[3] > 0.5, a
    assert a[0] < 0.1 and a[1] < 0.1, a
    assert r.losses[-1] < r.losses[0]
    assert r.retrieval_kv_heads() == [(0, 2), (0, 3)]


def test_gate_one_is_full_attention_gate_zero_is_streaming(tiny):
    m = tiny("llama")
    ids = torch.randint(3, 250, (1, 30))
    spec = m.spec
    with torch.no_grad():
        full = m.hf(ids).logits
        with wb.intervene(m, duo.GatedMix(torch.ones(spec.n_layers, spec.n_kv_heads), sink=2, recent=5)):
            gated_full = m.hf(ids).logits
        with wb.intervene(m, duo.GatedMix(torch.zeros(spec.n_layers, spec.n_kv_heads), sink=2, recent=5)):
            gated_stream = m.hf(ids).logits
        heads = [(l, h) for l in range(spec.n_layers) for h in range(spec.n_kv_heads)]
        with wb.intervene(m, wb.StreamingHeads(heads, sink=2, recent=5, unit="kv")):
            streaming = m.hf(ids).logits
    torch.testing.assert_close(gated_full, full, atol=1e-5, rtol=0)
    torch.testing.assert_close(gated_stream, streaming, atol=1e-5, rtol=0)


def test_agreement_table():
    r = duo.DuoResult(gates=torch.tensor([[0.9, 0.1], [0.2, 0.7]]), losses=[], sink=1, recent=2, provenance=None)
    wu = torch.tensor([[0.5, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.05]])  # 2 query heads per KV head
    t = r.agreement(wu, group=2)
    assert t["duo_retrieval"].tolist() == [True, False, False, True]
    assert t["wu_retrieval"].tolist() == [True, False, False, False]
    assert t["agree"].tolist() == [True, True, True, False]


def test_bad_input(tiny):
    with pytest.raises(wb.ProbeError, match="learned attention sinks"):
        duo.scan(tiny("gpt_oss"), steps=1)
    with pytest.raises(wb.ProbeError, match="steps must be ≥ 1"):
        duo.scan(tiny("llama"), steps=0)
    with pytest.raises(wb.ProbeError, match="exceeds the model's 512 positions"):
        duo.scan(tiny("llama"), length=4096)
    with pytest.raises(wb.ProbeError, match="sweep fractions must lie in"):
        duo.scan(tiny("llama"), sweep=[1.5])


def test_agreement_refuses_a_wrong_group():
    """A group size that does not match the scores' shape is refused, not silently mis-joined."""
    r = duo.DuoResult(gates=torch.tensor([[0.9, 0.1], [0.2, 0.7]]), losses=[], sink=1, recent=2, provenance=None)
    wu = torch.zeros(2, 4)
    with pytest.raises(wb.ProbeError, match="KV heads × group 1"):
        r.agreement(wu, group=1)
    with pytest.raises(wb.ProbeError, match="group must be ≥ 1"):
        r.agreement(wu, group=0)


def test_scan_leaves_the_model_trainable_and_reports_no_gates_when_cancelled():
    m = wide_readers()
    assert all(p.requires_grad for p in m.hf.parameters())
    r = duo.scan(m, steps=2, sink=1, recent=3, length=64, samples=samples, progress=False)
    assert len(r.losses) == 2 and all(p.requires_grad for p in m.hf.parameters())  # gates trained, the model given back
    none = duo.scan(m, steps=2, sink=1, recent=3, length=64, samples=samples, progress=False, cancel=lambda: True)
    assert not none.complete and torch.isnan(none.gates).all() and none.retrieval_kv_heads() == []

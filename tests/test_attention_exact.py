"""Every statistic equals the one computed from HF eager attention probabilities; logits equal SDPA's."""
import pytest
import torch

import workbench as wb
from reference import eager_attentions
from workbench.models.testing import TINY_CONFIGS

ARCHS = sorted(TINY_CONFIGS)


def sdpa_logits(m, ids, mask=None):
    impl = "eager" if m.spec.model_type == "gpt_oss" else "sdpa"  # GPT-OSS has no SDPA path (learned sinks)
    m.hf.set_attn_implementation(impl)
    try:
        with torch.no_grad():
            return m.hf(input_ids=ids, attention_mask=mask).logits
    finally:
        m.hf.set_attn_implementation("workbench")


def check_against_eager(m, ids, mask=None, atol=1e-5):
    T = ids.shape[1]
    probs, _ = eager_attentions(m, ids, mask)  # [L, B, H, T, T]
    with wb.capture(m, wb.AttentionStats(sink_keys=T, topk=1, key_mass=True)) as cap:
        with torch.no_grad():
            logits = m.hf(input_ids=ids, attention_mask=mask).logits
    rows = torch.ones(ids.shape, dtype=torch.bool) if mask is None else mask.bool()  # padded query rows are undefined
    ent = -(probs * torch.log(probs.clamp_min(1e-300))).sum(-1)
    rsel = rows[None, :, None, :].expand_as(ent)
    if not m.spec.learned_sinks:  # with sinks the entropy includes the sink slot, absent from eager's output
        torch.testing.assert_close(cap.stack("attn.entropy").double()[rsel], ent[rsel], atol=atol * 10, rtol=0)
    top_p, top_i = probs.max(-1)
    torch.testing.assert_close(cap.stack("attn.top1_prob").double()[rsel], top_p[rsel], atol=atol, rtol=0)
    second = probs.topk(2, dim=-1).values[..., 1]
    clear = rsel & ((top_p - second) > 1e-4)
    assert torch.equal(cap.stack("attn.top1")[clear], top_i[clear])
    # Gu's α_k for every key, per sequence from its first real token: eager column mean over the real
    # query rows that see the key (padding rows are not counted), then the batch mean
    first = rows.int().argmax(1)
    per_seq = []
    for b in range(ids.shape[0]):
        real = probs[:, b, :, first[b]:, first[b]:] * rows[b, first[b]:][None, None, :, None]
        seen = (real > 0).sum(2).double()  # [L, H, K]
        a = real.sum(2) / seen
        per_seq.append(torch.nn.functional.pad(a, (0, T - a.shape[-1]), value=float("nan")))
    alpha_ref = torch.stack(per_seq, 1).nanmean(1)  # [L, H, T]
    torch.testing.assert_close(wb.sinks.alpha_all(cap).double(), alpha_ref, atol=atol, rtol=0, equal_nan=True)
    torch.testing.assert_close(wb.sinks.alpha(cap).double(), alpha_ref, atol=atol, rtol=0, equal_nan=True)
    ref_logits = sdpa_logits(m, ids, mask)
    lr = rows[:, :, None].expand_as(logits)
    torch.testing.assert_close(logits[lr], ref_logits[lr], atol=1e-4, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_architectures_match_eager(tiny, arch):
    m = tiny(arch)
    ids = torch.randint(3, 250, (1, 19), generator=torch.Generator().manual_seed(1))
    check_against_eager(m, ids)


@pytest.mark.parametrize("arch", ["llama", "gemma3", "gpt_oss"])
def test_padded_batch_matches_eager(tiny, arch):
    m = tiny(arch)
    ids = torch.randint(3, 250, (2, 13), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    check_against_eager(m, ids, mask)


def test_smollm2_matches_eager(smollm):
    ids = smollm.encode("Attention sinks appear on the first token. Retrieval heads copy from the context.")
    check_against_eager(smollm, ids)


def test_decode_steps_are_captured(tiny):
    """generate() decode steps come as one query row each; each equals a full forward's last row."""
    m = tiny("llama")
    ids = m.encode("abc")
    with wb.capture(m, wb.AttentionStats(sink_keys=2)) as cap, torch.no_grad():
        out = m.hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False, pad_token_id=256)
    prompt_len = ids.shape[1]
    assert cap.q_pos.tolist() == list(range(prompt_len + 4)) and cap.n_calls == 5  # the 5th token needs no forward
    assert torch.equal(cap.token_ids, out[:, : prompt_len + 4])
    full_ids = out[:, : prompt_len + 4]
    with wb.capture(m, wb.AttentionStats(sink_keys=2)) as full:
        m.hf(full_ids)
    for s in ("attn.alpha", "attn.entropy", "attn.top1_prob", "attn.hook_z_norm"):
        torch.testing.assert_close(cap.stack(s), full.stack(s), atol=1e-5, rtol=0, msg=s)


def test_idle_backend_is_sdpa(tiny):
    m = tiny("qwen2")
    ids = torch.randint(3, 250, (1, 11))
    with torch.no_grad():
        ours = m.hf(ids).logits
    assert torch.equal(ours, sdpa_logits(m, ids))

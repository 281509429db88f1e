"""Hand-built one-layer Llama models whose attention is known in advance (no training, no randomness).

Head dims (0, 16) are the only ones RoPE rotates with ``rope_theta = 1e300``; features avoid them.
Head 0: sink head (every query matches the BOS feature of position 0). Head 1: copy head (a query
matches keys of the same token; the value carries the token, so the model emits the attended token).
Heads 2, 3: all-zero queries, i.e. exactly uniform attention over visible keys.
"""
import torch
from transformers import LlamaConfig, LlamaForCausalLM

HID, HD = 128, 32
USABLE = [d for d in range(HD) if d not in (0, HD // 2)]
BOS_DIM, CONST_DIM = 126, 127
SINK_HEAD, COPY_HEAD = 0, 1


def blank_model(vocab: int, **config) -> LlamaForCausalLM:
    """A one-layer, four-head Llama with every weight zero (norms one) and RoPE confined to dims (0, 16)."""
    cfg = LlamaConfig(
        hidden_size=HID, intermediate_size=8, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4,
        head_dim=HD, vocab_size=vocab, max_position_embeddings=512, rms_norm_eps=1e-9,
        rope_parameters={"rope_type": "default", "rope_theta": 1e300}, tie_word_embeddings=False, **config,
    )  # fmt: skip
    cfg.architectures = ["LlamaForCausalLM"]
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for n in (model.model.norm, model.model.layers[0].input_layernorm, model.model.layers[0].post_attention_layernorm):
            n.weight.fill_(1.0)
    return model


def content_model(vocab: int = 12, *, bos_token: int = 0, bos_scale: float = 1.0, copy: bool = True) -> LlamaForCausalLM:
    """Token t embeds as one-hot(t) (if ``copy``) + a constant feature; ``bos_token`` also carries the BOS
    feature scaled by ``bos_scale`` (a planted massive activation when large)."""
    if copy and vocab > len(USABLE):
        raise ValueError("the copy head needs one head dim per token")
    model = blank_model(vocab, bos_token_id=bos_token, eos_token_id=None, pad_token_id=None)
    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        emb[:, CONST_DIM] = 1.0
        emb[bos_token, BOS_DIM] = bos_scale
        attn = model.model.layers[0].self_attn
        attn.q_proj.weight[SINK_HEAD * HD + USABLE[0], CONST_DIM] = 2.0
        attn.k_proj.weight[SINK_HEAD * HD + USABLE[0], BOS_DIM] = 1.0  # RMSNorm makes the scale irrelevant
        if copy:
            for t in range(vocab):
                emb[t, t] = 1.0
                attn.q_proj.weight[COPY_HEAD * HD + USABLE[t], t] = 2.0
                attn.k_proj.weight[COPY_HEAD * HD + USABLE[t], t] = 1.0
                attn.v_proj.weight[COPY_HEAD * HD + USABLE[t], t] = 1.0
                attn.o_proj.weight[t, COPY_HEAD * HD + USABLE[t]] = 10.0
                model.lm_head.weight[t, t] = 1.0
    return model


PREV_HEAD, INDUCTION_HEAD = 0, 1


def taxonomy_model(vocab: int = 12) -> LlamaForCausalLM:
    """Token t embeds as one-hot(t) + a constant. Head 0 (``PREV_HEAD``): a query of token t matches keys of
    token t − 1 — on an increasing sequence 0, 1, 2, … it attends to the previous position. Head 1
    (``INDUCTION_HEAD``): a query of token t matches keys of token t + 1 — on 0, 1..5, 6, 1..5 every row of the
    second copy attends to the token after its previous occurrence (j* + 1). Heads 2, 3: uniform."""
    model = blank_model(vocab, bos_token_id=0, eos_token_id=None, pad_token_id=None)
    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        emb[:, CONST_DIM] = 1.0
        attn = model.model.layers[0].self_attn
        for t in range(vocab):
            emb[t, t] = 1.0
            attn.k_proj.weight[PREV_HEAD * HD + USABLE[t], t] = 1.0
            attn.k_proj.weight[INDUCTION_HEAD * HD + USABLE[t], t] = 1.0
            if t > 0:
                attn.q_proj.weight[PREV_HEAD * HD + USABLE[t - 1], t] = 2.0
            if t + 1 < vocab:
                attn.q_proj.weight[INDUCTION_HEAD * HD + USABLE[t + 1], t] = 2.0
    return model


def local_model(window: int = 4, vocab: int = 12):
    """A one-layer Mistral with a sliding window of ``window`` keys and all-zero queries: every head is
    exactly uniform over the last ``window`` keys (a planted local head)."""
    from transformers import MistralConfig, MistralForCausalLM

    cfg = MistralConfig(
        hidden_size=HID, intermediate_size=8, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4,
        head_dim=HD, vocab_size=vocab, max_position_embeddings=512, rms_norm_eps=1e-9, sliding_window=window,
        rope_parameters={"rope_type": "default", "rope_theta": 1e300}, tie_word_embeddings=False,
        bos_token_id=0, eos_token_id=None, pad_token_id=None,
    )  # fmt: skip
    cfg.architectures = ["MistralForCausalLM"]
    model = MistralForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for n in (model.model.norm, model.model.layers[0].input_layernorm, model.model.layers[0].post_attention_layernorm):
            n.weight.fill_(1.0)
        model.model.embed_tokens.weight[:, CONST_DIM] = 1.0
    return model

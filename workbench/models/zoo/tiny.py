"""Tiny random-initialised models of real architectures (the ``tiny:<arch>`` model source).

Random weights mean nothing; these exist to exercise code paths (shapes, GQA, sliding windows,
routers) in milliseconds: ``workbench.load("tiny:olmoe")`` or :func:`workbench.models.testing.tiny_model`.
"""
from __future__ import annotations

from typing import Any

import torch

from ...base.errors import UnsupportedModelError

_COMMON: dict[str, Any] = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=260,
    max_position_embeddings=512,
    tie_word_embeddings=False,
    bos_token_id=257,
    eos_token_id=258,
    pad_token_id=256,
)
_MOE: dict[str, Any] = dict(num_experts_per_tok=2)

#: name -> (transformers model_type, overrides of the common tiny config)
TINY_CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("llama", {}),
    "qwen2": ("qwen2", {}),
    "gemma3": ("gemma3_text", dict(sliding_window=8, layer_types=["sliding_attention", "full_attention"])),
    "mixtral": ("mixtral", dict(_MOE, num_local_experts=4)),
    "qwen2_moe": (
        "qwen2_moe",
        dict(_MOE, num_experts=4, moe_intermediate_size=32, shared_expert_intermediate_size=48, norm_topk_prob=False),
    ),
    "qwen3_moe": ("qwen3_moe", dict(_MOE, num_experts=4, moe_intermediate_size=32, norm_topk_prob=True)),
    "olmoe": ("olmoe", dict(_MOE, num_experts=4, norm_topk_prob=False)),
    "deepseek_v3": (
        "deepseek_v3",
        dict(
            _MOE,
            num_key_value_heads=4,
            n_routed_experts=8,
            n_shared_experts=1,
            moe_intermediate_size=32,
            n_group=2,
            topk_group=1,
            first_k_dense_replace=0,
            kv_lora_rank=16,
            q_lora_rank=32,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=16,
            head_dim=8,
            norm_topk_prob=True,
        ),
    ),
    "gpt_oss": (
        "gpt_oss",
        dict(_MOE, num_local_experts=4, sliding_window=8, layer_types=["sliding_attention", "full_attention"]),
    ),
    "granitemoe": ("granitemoe", dict(_MOE, num_local_experts=4)),
    "phimoe": ("phimoe", dict(_MOE, num_local_experts=4, router_jitter_noise=0.0, input_jitter_noise=0.0)),
}


def tiny_config(name: str):
    """The ``transformers`` config of tiny architecture ``name`` (see :data:`TINY_CONFIGS`)."""
    from transformers import AutoConfig

    if name not in TINY_CONFIGS:
        raise UnsupportedModelError(f"no tiny config named {name!r}; choose one of {sorted(TINY_CONFIGS)}")
    model_type, overrides = TINY_CONFIGS[name]
    cfg = AutoConfig.for_model(model_type, **{**_COMMON, **overrides})
    cfg.architectures = [_causal_lm_class_name(cfg)]
    return cfg


def _causal_lm_class_name(cfg) -> str:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM._model_mapping[type(cfg)].__name__


def tiny_hf_model(name: str, *, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A random-initialised ``transformers`` causal LM of architecture ``name`` in eval mode."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(name), dtype=dtype)
    return model.eval()


def byte_tokenizer():
    """A real ``transformers`` fast tokenizer with one token per UTF-8 byte (ids 0..255) and
    ``<pad>``=256, ``<s>``=257 (prepended), ``</s>``=258 — offline, deterministic, any text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet(), key=lambda c: _BYTE_OF[c])
    vocab = {c: i for i, c in enumerate(alphabet)} | {"<pad>": 256, "<s>": 257, "</s>": 258}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 257)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>", name_or_path="workbench-bytes"
    )


def _byte_of() -> dict[str, int]:
    """GPT-2's printable stand-ins for bytes (what ByteLevel emits), inverted."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {c: b for b, c in bytes_to_unicode().items()}


_BYTE_OF = _byte_of()

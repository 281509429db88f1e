"""Architecture knowledge as data: where each concept lives in a ``transformers`` model.

One row per ``config.model_type``. Adding an architecture means adding a row here, never a branch
elsewhere. Paths are relative to the decoder layer (``layers_path[i]``).
"""
from __future__ import annotations

from dataclasses import dataclass

#: Router scoring rules, named once; ``workbench.routing`` implements each exactly.
#: - ``softmax_topk``: softmax over all experts, then top-k (optionally renormalised: ``norm_topk_prob``)
#: - ``topk_softmax``: top-k on raw logits, softmax over the k chosen
#: - ``sigmoid_grouped``: DeepSeek-V3: sigmoid scores + ``e_score_correction_bias`` for choice,
#:   group-limited top-k (``n_group``/``topk_group``), weights from unbiased scores × scaling factor
#: - ``sparsemixer``: PhiMoE's SparseMixer (masked softmax per chosen expert, jitter ε)
ROUTER_RULES = ("softmax_topk", "topk_softmax", "sigmoid_grouped", "sparsemixer")


@dataclass(frozen=True)
class Architecture:
    """Where attention and MoE pieces live for one family of models."""

    layers_path: str = "model.layers"
    attention: str = "self_attn"
    out_proj: str = "o_proj"  # relative to the attention module: its input is TransformerLens' hook_z
    mlp: str = "mlp"  # the MLP (or MoE block) of a decoder layer
    mlp_down: str = "down_proj"  # relative to the MLP: its input is hook_post (dense MLPs only)
    moe_block: str | None = None
    router: str | None = None  # relative to the MoE block
    router_rule: str | None = None
    norm_topk_prob: bool | None = None  # None: read config.norm_topk_prob
    shared_experts: str | None = None  # relative to the MoE block
    experts: str | None = None  # the batched experts module, relative to the MoE block
    experts_index_arg: str = "top_k_index"  # its keyword for the chosen expert indices (2nd positional)


_DENSE = Architecture()
_SOFTMAX_MOE = Architecture(moe_block="mlp", router="gate", router_rule="softmax_topk", experts="experts")

ARCHITECTURES: dict[str, Architecture] = {
    "llama": _DENSE,
    "mistral": _DENSE,
    "qwen2": _DENSE,
    "qwen3": _DENSE,
    "gemma2": _DENSE,
    "gemma3_text": _DENSE,
    "phi3": _DENSE,
    "olmo2": _DENSE,
    "granite": _DENSE,
    "smollm3": _DENSE,
    "mixtral": Architecture(
        moe_block="mlp", router="gate", router_rule="softmax_topk", norm_topk_prob=True, experts="experts"
    ),
    "qwen2_moe": Architecture(
        moe_block="mlp", router="gate", router_rule="softmax_topk", shared_experts="shared_expert", experts="experts"
    ),
    "qwen3_moe": _SOFTMAX_MOE,
    "olmoe": _SOFTMAX_MOE,
    "deepseek_v3": Architecture(
        moe_block="mlp", router="gate", router_rule="sigmoid_grouped", shared_experts="shared_experts", experts="experts"
    ),
    "gpt_oss": Architecture(
        moe_block="mlp", router="router", router_rule="topk_softmax", experts="experts", experts_index_arg="router_indices"
    ),
    "granitemoe": Architecture(
        mlp="block_sparse_moe", moe_block="block_sparse_moe", router="router", router_rule="topk_softmax", experts="experts"
    ),
    "phimoe": Architecture(moe_block="mlp", router="router", router_rule="sparsemixer", experts="experts"),
}


def architecture_for(model_type: str) -> Architecture | None:
    """The row for ``model_type``, or None when the architecture is not described."""
    return ARCHITECTURES.get(model_type)

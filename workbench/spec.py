"""``ModelSpec``: what workbench needs to know about a model, discovered from its config and modules."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from .architectures import Architecture, architecture_for
from .errors import UnsupportedModelError


@dataclass(frozen=True)
class RouterSpec:
    """One MoE layer: where its router is and how it scores experts."""

    layer: int
    block_path: str
    router_path: str
    n_experts: int
    top_k: int
    rule: str
    norm_topk_prob: bool
    n_group: int | None = None
    topk_group: int | None = None
    routed_scaling_factor: float | None = None
    has_correction_bias: bool = False
    shared_experts_path: str | None = None
    experts_path: str | None = None  # the module that runs the chosen experts (verifies what actually ran)
    experts_index_arg: str = "top_k_index"


@dataclass(frozen=True)
class BosPolicy:
    """How the tokenizer starts a sequence; it changes where first-token sinks appear."""

    bos_token: str | None
    bos_token_id: int | None
    adds_bos: bool
    has_chat_template: bool

    def describe(self) -> str:
        if self.adds_bos:
            return f"tokenizer prepends {self.bos_token!r} (id {self.bos_token_id})"
        return "tokenizer adds no BOS" + (f"; chat template starts turns with special tokens" if self.has_chat_template else "")


@dataclass(frozen=True)
class ModelSpec:
    """Shape and layout of a model, discovered per architecture (never hard-coded per checkpoint)."""

    model_type: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    max_positions: int | None
    attention_paths: tuple[str, ...]
    sliding_windows: tuple[int | None, ...]  # per layer; None = full attention
    learned_sinks: bool
    routers: tuple[RouterSpec, ...] = ()
    bos: BosPolicy | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def group_size(self) -> int:
        """Query heads per KV head (GQA group); 1 for MHA."""
        return self.n_heads // self.n_kv_heads

    @property
    def is_moe(self) -> bool:
        return bool(self.routers)

    @property
    def moe_layers(self) -> tuple[int, ...]:
        return tuple(r.layer for r in self.routers)

    def kv_head_of(self, head: int) -> int:
        return head // self.group_size

    def check_head(self, layer: int, head: int, *, what: str = "head") -> None:
        """Raise a clear error when (layer, head) is not a query head of this model."""
        from .errors import ProbeError

        if not 0 <= layer < self.n_layers:
            raise ProbeError(f"{what}: layer {layer} does not exist (model has layers 0..{self.n_layers - 1})")
        if not 0 <= head < self.n_heads:
            raise ProbeError(
                f"{what}: head {head} does not exist in layer {layer} "
                f"(query heads 0..{self.n_heads - 1}; {self.n_kv_heads} KV heads, {self.group_size} query heads each)"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        """A few human lines: what a user wants to know before probing."""
        sw = [w for w in self.sliding_windows if w]
        lines = [
            f"{self.model_type}: {self.n_layers} layers × {self.n_heads} query heads "
            f"({self.n_kv_heads} KV heads, group {self.group_size}), head_dim {self.head_dim}, hidden {self.hidden_size}",
            f"max positions {self.max_positions}, vocab {self.vocab_size}",
        ]
        if sw:
            full = [i for i, w in enumerate(self.sliding_windows) if not w]
            lines.append(f"sliding window {sorted(set(sw))} on {len(sw)} layers; full attention on layers {full}")
        if self.learned_sinks:
            lines.append("learned attention-sink logits per head")
        if self.routers:
            r = self.routers[0]
            lines.append(
                f"MoE on {len(self.routers)} layers: {r.n_experts} experts, top-{r.top_k}, rule {r.rule}"
                f"{', norm_topk_prob' if r.norm_topk_prob else ''}{', shared experts' if r.shared_experts_path else ''}"
            )
        if self.bos:
            lines.append(f"BOS policy: {self.bos.describe()}")
        return "\n".join(lines)


def _get(module: torch.nn.Module, path: str) -> torch.nn.Module | None:
    try:
        return module.get_submodule(path)
    except AttributeError:
        return None


def _text_config(config):
    get = getattr(config, "get_text_config", None)
    return get() if get else config


def discover_spec(model: torch.nn.Module, tokenizer=None) -> ModelSpec:
    """Build the ModelSpec of a ``transformers`` causal LM from its config and module tree."""
    cfg = _text_config(model.config)
    model_type = cfg.model_type
    arch = architecture_for(model_type)
    generic = arch is None
    arch = arch or Architecture()
    layers = _get(model, arch.layers_path)
    if layers is None or not isinstance(layers, torch.nn.ModuleList):
        raise UnsupportedModelError(
            f"architecture {model_type!r}: no decoder layer list at {arch.layers_path!r}; "
            "add a row to workbench/architectures.py describing where its layers live"
        )
    missing = [n for n in ("num_hidden_layers", "num_attention_heads", "hidden_size") if getattr(cfg, n, None) is None]
    if missing:
        raise UnsupportedModelError(f"architecture {model_type!r}: config lacks {', '.join(missing)}")
    n_layers = len(layers)
    attn_paths = tuple(f"{arch.layers_path}.{i}.{arch.attention}" for i in range(n_layers))
    absent = [p for p in attn_paths if _get(model, p) is None]
    if absent:
        raise UnsupportedModelError(
            f"architecture {model_type!r}: no attention module at {absent[0]!r}"
            + ("; it is not described in workbench/architectures.py" if generic else "")
        )
    n_heads = cfg.num_attention_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
    if model_type == "deepseek_v3":  # MLA: queries/keys are nope + rope parts
        head_dim = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
    attn0 = _get(model, attn_paths[0])
    learned_sinks = isinstance(getattr(attn0, "sinks", None), torch.nn.Parameter)
    return ModelSpec(
        model_type=model_type,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv,
        head_dim=head_dim,
        hidden_size=cfg.hidden_size,
        vocab_size=cfg.vocab_size,
        max_positions=getattr(cfg, "max_position_embeddings", None),
        attention_paths=attn_paths,
        sliding_windows=_sliding_windows(cfg, n_layers),
        learned_sinks=learned_sinks,
        routers=_routers(model, cfg, arch, n_layers),
        bos=bos_policy(tokenizer) if tokenizer is not None else None,
    )


def _sliding_windows(cfg, n_layers: int) -> tuple[int | None, ...]:
    window = getattr(cfg, "sliding_window", None) or None
    types = getattr(cfg, "layer_types", None)
    if types is not None:
        return tuple(window if t == "sliding_attention" else None for t in list(types)[:n_layers])
    return tuple(window for _ in range(n_layers))


def _routers(model, cfg, arch: Architecture, n_layers: int) -> tuple[RouterSpec, ...]:
    if arch.moe_block is None:
        return ()
    out = []
    for i in range(n_layers):
        block_path = f"{arch.layers_path}.{i}.{arch.moe_block}"
        router_path = f"{block_path}.{arch.router}"
        router = _get(model, router_path)
        if router is None:  # dense layer inside an MoE model (first_k_dense_replace, mlp_only_layers)
            continue
        n_experts = getattr(router, "num_experts", None) or router.weight.shape[0]
        norm = arch.norm_topk_prob if arch.norm_topk_prob is not None else bool(getattr(cfg, "norm_topk_prob", False))
        shared = f"{block_path}.{arch.shared_experts}" if arch.shared_experts and _get(model, f"{block_path}.{arch.shared_experts}") is not None else None
        experts = f"{block_path}.{arch.experts}" if arch.experts and _get(model, f"{block_path}.{arch.experts}") is not None else None
        out.append(
            RouterSpec(
                layer=i,
                block_path=block_path,
                router_path=router_path,
                n_experts=int(n_experts),
                top_k=int(getattr(router, "top_k", cfg.num_experts_per_tok)),
                rule=arch.router_rule,
                norm_topk_prob=norm,
                n_group=getattr(router, "num_group", None),
                topk_group=getattr(router, "topk_group", None),
                routed_scaling_factor=getattr(router, "routed_scaling_factor", None),
                has_correction_bias=hasattr(router, "e_score_correction_bias"),
                shared_experts_path=shared,
                experts_path=experts,
                experts_index_arg=arch.experts_index_arg,
            )
        )
    return tuple(out)


def bos_policy(tokenizer) -> BosPolicy:
    """Observe (not assume) whether the tokenizer prepends BOS to plain text."""
    bos_id = getattr(tokenizer, "bos_token_id", None)
    ids = tokenizer.encode("hello", add_special_tokens=True)
    return BosPolicy(
        bos_token=getattr(tokenizer, "bos_token", None),
        bos_token_id=bos_id,
        adds_bos=bos_id is not None and len(ids) > 0 and ids[0] == bos_id,
        has_chat_template=bool(getattr(tokenizer, "chat_template", None)),
    )

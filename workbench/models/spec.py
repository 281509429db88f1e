"""``ModelSpec``: what workbench needs to know about a model, discovered from its config and modules."""
from __future__ import annotations

import operator
import re
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from .architectures import Architecture, architecture_for
from ..base.errors import ProbeError, UnsupportedModelError


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
        return "tokenizer adds no BOS" + ("; chat template starts turns with special tokens" if self.has_chat_template else "")


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
    base_path: str = "model"  # the decoder stack (embeddings + layers + final norm)
    layer_paths: tuple[str, ...] = ()  # decoder layers: their input/output is the residual stream
    mlp_paths: tuple[str | None, ...] = ()
    out_proj_paths: tuple[str | None, ...] = ()  # attention output projections (input = hook_z)
    mlp_down_paths: tuple[str | None, ...] = ()  # dense MLP down projections (input = mlp.hook_post)
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
        self.heads([(layer, head)], what=what)

    def layers(self, items, *, what: str = "layers") -> tuple[int, ...]:
        """Validated layer indices (ints, each an existing layer, duplicates dropped, order kept)."""
        from ..base.errors import ProbeError

        if isinstance(items, (str, bytes)) or not hasattr(items, "__iter__"):
            raise ProbeError(f"{what}: layers must be a list of layer indices, got {items!r}")
        out = []
        for x in items:
            layer = _index(x, f"{what}: layer")
            if not 0 <= layer < self.n_layers:
                raise ProbeError(f"{what}: layer {layer} does not exist (model has layers 0..{self.n_layers - 1})")
            if layer not in out:
                out.append(layer)
        if not out:
            raise ProbeError(f"{what}: no layers given")
        return tuple(out)

    def heads(self, items, *, what: str = "heads", unit: str = "query") -> list[tuple[int, int]]:
        """Validated ``(layer, head)`` pairs from pairs of ints or names like ``"L17H3"`` (duplicates dropped).
        ``unit="kv"``: the pairs name KV heads (checked against the KV head count)."""
        from ..base.errors import ProbeError

        if unit not in ("query", "kv"):
            raise ProbeError(f"{what}: unit must be 'query' or 'kv', got {unit!r}")
        if isinstance(items, (str, bytes)) or not hasattr(items, "__iter__"):
            raise ProbeError(f"{what}: heads must be a list of (layer, head) pairs or names like 'L17H3', got {items!r}")
        n = self.n_heads if unit == "query" else self.n_kv_heads
        out: list[tuple[int, int]] = []
        for it in items:
            layer, head = _head_pair(it, what)
            if not 0 <= layer < self.n_layers:
                raise ProbeError(f"{what}: layer {layer} does not exist (model has layers 0..{self.n_layers - 1})")
            if not 0 <= head < n:
                extra = f"; {head} is a query head index — pass unit='query'" if unit == "kv" and head < self.n_heads else ""
                raise ProbeError(
                    f"{what}: {'KV ' if unit == 'kv' else ''}head {head} does not exist in layer {layer} "
                    f"({'KV heads' if unit == 'kv' else 'query heads'} 0..{n - 1}; {self.n_kv_heads} KV heads, "
                    f"{self.group_size} query heads each){extra}"
                )
            if (layer, head) not in out:
                out.append((layer, head))
        if not out:
            raise ProbeError(f"{what}: no heads given")
        return out

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


def _index(x, what: str) -> int:
    """An integer index, refusing floats (1.7 is not head 1) and bools."""
    if isinstance(x, bool) or (isinstance(x, torch.Tensor) and (x.dim() or x.dtype.is_floating_point)):
        raise ProbeError(f"{what} must be an integer, got {x!r}")
    try:
        return operator.index(x)
    except TypeError:
        raise ProbeError(f"{what} must be an integer, got {x!r}") from None


_UNIT_NAME = re.compile(r"\s*[Ll](\d+)\s*([HhEe])(\d+)\s*")


def parse_unit_name(text: str, units: str = "HE") -> tuple[int, int] | None:
    """``"L17H3"`` → ``(17, 3)`` (layer, head), ``"L1E3"`` → ``(1, 3)`` (layer, expert): the one parser of the
    names users type (``spec.heads``, the dashboard, the widgets). ``units``: the letters allowed, ``"H"``,
    ``"E"`` or both. ``None`` when ``text`` is not such a name (callers say what they expected)."""
    m = _UNIT_NAME.fullmatch(text)
    if m is None or m.group(2).upper() not in units:
        return None
    return int(m.group(1)), int(m.group(3))


def head_name(layer: int, head: int) -> str:
    return f"L{layer}H{head}"


def expert_name(layer: int, expert: int) -> str:
    return f"L{layer}E{expert}"


def _head_pair(it, what: str) -> tuple[int, int]:
    if isinstance(it, str):
        pair = parse_unit_name(it, "H")
        if pair is None:
            raise ProbeError(f"{what}: {it!r} is not a head; write (layer, head) or 'L17H3'")
        return pair
    try:
        layer, head = it
    except (TypeError, ValueError):
        raise ProbeError(f"{what}: {it!r} is not a head; write (layer, head) or 'L17H3'") from None
    return _index(layer, f"{what}: layer"), _index(head, f"{what}: head")


def _get(module: torch.nn.Module, path: str) -> torch.nn.Module | None:
    try:
        return module.get_submodule(path)
    except AttributeError:
        return None


def _text_config(config):
    get = getattr(config, "get_text_config", None)
    return get() if get else config


def config_spec(config) -> ModelSpec:
    """The ModelSpec a config alone tells (shape and context, no module paths or routers): what the checks made
    before a model loads read (``RetrievalConfig.check``, the CLI, the study planner)."""
    cfg = _text_config(config)
    n_layers, n_heads = int(cfg.num_hidden_layers), int(cfg.num_attention_heads)
    positions = getattr(cfg, "max_position_embeddings", None)
    return ModelSpec(
        model_type=cfg.model_type,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=getattr(cfg, "num_key_value_heads", None) or n_heads,
        head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads,
        hidden_size=cfg.hidden_size,
        vocab_size=cfg.vocab_size,
        max_positions=int(positions) if positions else None,
        attention_paths=(),
        sliding_windows=_sliding_windows(cfg, n_layers),
        learned_sinks=False,
        extras={"from_config": True},
    )


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
            "add a row to workbench/models/architectures.py describing where its layers live"
        )
    missing = [n for n in ("num_hidden_layers", "num_attention_heads", "hidden_size") if getattr(cfg, n, None) is None]
    if missing:
        raise UnsupportedModelError(f"architecture {model_type!r}: config lacks {', '.join(missing)}")
    n_layers = len(layers)
    layer_paths = tuple(f"{arch.layers_path}.{i}" for i in range(n_layers))
    attn_paths = tuple(f"{p}.{arch.attention}" for p in layer_paths)
    absent = [p for p in attn_paths if _get(model, p) is None]
    if absent:
        raise UnsupportedModelError(
            f"architecture {model_type!r}: no attention module at {absent[0]!r}"
            + ("; it is not described in workbench/models/architectures.py" if generic else "")
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
        base_path=arch.layers_path.rpartition(".")[0],
        layer_paths=layer_paths,
        mlp_paths=_existing(model, [f"{p}.{arch.mlp}" for p in layer_paths]),
        out_proj_paths=_existing(model, [f"{p}.{arch.out_proj}" for p in attn_paths]),
        mlp_down_paths=_existing(model, [f"{p}.{arch.mlp}.{arch.mlp_down}" for p in layer_paths]),
    )


def _existing(model, paths) -> tuple[str | None, ...]:
    """Each path where a module lives there, else None (e.g. no down projection in an MoE block)."""
    return tuple(p if _get(model, p) is not None else None for p in paths)


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

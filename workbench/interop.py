"""Interop with TransformerLens 4.x (``TransformerBridge``) and nnsight 0.8 (``LanguageModel``).

- **TransformerLens.** ``wb.load(bridge)`` runs the bridge's own weights (shared, not copied) through a
  plain ``transformers`` module tree, because the bridge recomputes attention eagerly (N×N). Hooks the
  user attaches to the bridge keep working on the points both libraries share —
  ``blocks.{l}.hook_resid_pre``, ``hook_resid_post``, ``hook_attn_out``, ``hook_mlp_out``,
  ``attn.hook_z``, ``mlp.hook_post`` — whenever workbench runs the model, before or after ``wb.load``,
  permanent or inside ``bridge.hooks()``. Hooks on points workbench never materialises (``hook_pattern``,
  ``hook_attn_scores``, ``hook_q/k/v``, norms, embeddings, ``hook_resid_mid``) do not run: ``wb.load``
  warns when such hooks are attached. Use ``attn.tile.<i>`` / ``AttentionStats`` for attention patterns.
- **nnsight.** ``workbench`` is a registered ``attn_implementation`` as soon as workbench is imported, so
  ``LanguageModel(path, attn_implementation="workbench", dispatch=True)`` loads through it, and
  ``wb.load(lm)`` wraps the same module: ``with wb.capture(m, ...) as cap: with lm.trace(text): ...``
  records workbench statistics of the traced forward while nnsight's interventions run.
"""
from __future__ import annotations

import copy
import warnings

import torch

from .errors import UnsupportedModelError
from .hooks import TENSOR_SITES, Bound


def is_bridge(obj) -> bool:
    return type(obj).__name__ == "TransformerBridge"


def is_nnsight(obj) -> bool:
    return type(obj).__module__.split(".")[0] == "nnsight" and hasattr(obj, "_module")


def unwrap_module(module: torch.nn.Module):
    """An HF model as-is, or a plain HF model sharing the weights of a TransformerLens bridge."""
    if is_bridge(module):
        return _unbridge(module), getattr(module, "tokenizer", None)
    if type(module).__name__ == "HookedTransformer":
        raise UnsupportedModelError(
            "HookedTransformer re-implements the model with its own weights layout; load the same checkpoint with "
            "workbench.load(hub_id_or_dir) or wrap it with TransformerLens' TransformerBridge and pass the bridge"
        )
    if not hasattr(module, "config") or not hasattr(module, "generate"):
        raise UnsupportedModelError(
            f"{type(module).__name__} is not a transformers causal LM (no .config/.generate); "
            "pass an AutoModelForCausalLM instance, a TransformerBridge, an nnsight LanguageModel, a path or a hub id"
        )
    return module, None


def from_nnsight(lm):
    """The ``transformers`` module an nnsight ``LanguageModel`` wraps (dispatched: real weights), and its tokenizer."""
    hf = lm._module
    if any(p.is_meta for p in hf.parameters()):
        dispatch = getattr(lm, "dispatch", None)
        if dispatch is None:
            raise UnsupportedModelError("nnsight model has no weights yet; create it with dispatch=True")
        dispatch()
        hf = lm._module
    return unwrap_module(hf)[0], getattr(lm, "tokenizer", None)


def _unbridge(bridge) -> torch.nn.Module:
    """TransformerBridge swaps HF modules for components that recompute attention eagerly (N×N). Rebuild
    the plain HF module tree on the meta device and give it the bridge's own weight tensors (no copy),
    so our backend runs the same weights without the bridge's eager attention."""
    from transformers import AutoModelForCausalLM

    wrapped = getattr(bridge, "original_model", None)
    if wrapped is None:
        raise UnsupportedModelError("TransformerBridge without original_model; pass the transformers model instead")
    with torch.device("meta"):
        # a copy of the config: switching our model's attention backend must not switch the bridge's
        plain = AutoModelForCausalLM.from_config(copy.deepcopy(wrapped.config), dtype=next(wrapped.parameters()).dtype)
    wanted = plain.state_dict()
    weights = {}
    for name, tensor in wrapped.state_dict(keep_vars=True).items():
        key = name.replace("._original_component", "").replace("_original_component.", "")
        if key in wanted:
            weights[key] = tensor
    missing = sorted(set(wanted) - set(weights))
    if missing:
        raise UnsupportedModelError(f"could not map TransformerBridge weights back to {type(plain).__name__}: {missing[:5]}")
    plain.load_state_dict(weights, assign=True, strict=True)
    plain_buffers = dict(plain.named_buffers())
    for name, buf in wrapped.named_buffers():  # non-persistent buffers (rotary tables) are not in state_dict
        key = name.replace("._original_component", "").replace("_original_component.", "")
        if key in plain_buffers and plain_buffers[key].is_meta:
            parent, _, leaf = key.rpartition(".")
            plain.get_submodule(parent)._buffers[leaf] = buf
    return plain.eval()


class _BridgeHooks(Bound):
    """The hooks attached to a bridge's HookPoints, run at the same points of the workbench model: the
    HookPoint module is called on the value (identity plus its hooks), so add/remove on the bridge
    takes effect immediately."""

    is_edit = True
    label = "transformerlens-bridge-hooks"

    def __init__(self, bridge, spec):
        self.points = {}
        for layer in range(spec.n_layers):
            for site, suffix in TENSOR_SITES.items():
                hp = bridge.hook_dict.get(f"blocks.{layer}.{suffix}")
                path = _site_path(spec, site, layer)
                if hp is not None and path is not None:
                    self.points[(site, layer)] = hp
        self.sites = frozenset(self.points)

    def edit(self, site, layer, value, call):
        hp = self.points[(site, layer)]
        if not hp._forward_hooks:
            return None
        x = value.flatten(-2) if site == "z" else value  # the bridge's hook_z converts its flat input itself
        out = hp(x)
        return None if out is x else out.reshape(value.shape)


def _site_path(spec, site: str, layer: int):
    return {"z": spec.out_proj_paths, "mlp_post": spec.mlp_down_paths, "mlp_out": spec.mlp_paths}.get(site, spec.layer_paths)[layer]


def keep_bridge_hooks(model, bridge) -> None:
    """Run ``bridge``'s HookPoint hooks whenever workbench runs ``model`` (see the module docstring)."""
    from .hooks import HookManager

    mgr = HookManager.of(model)
    item = _BridgeHooks(bridge, model.spec)
    mgr.permanent.append(item)
    mgr.acquire(item.sites | {("call", None)})
    model.extras["bridge"] = bridge
    shared = {id(hp) for hp in item.points.values()}  # a HookPoint is listed under its aliases too
    ignored = sorted(n for n, hp in bridge.hook_dict.items() if hp._forward_hooks and id(hp) not in shared)
    if ignored:
        warnings.warn(
            f"hooks attached to the bridge at {', '.join(ignored[:6])}{' …' if len(ignored) > 6 else ''} do not run in "
            "workbench (it never builds attention patterns, q/k/v or norm activations); hooks on hook_resid_pre/post, "
            "hook_attn_out, hook_mlp_out, attn.hook_z and mlp.hook_post do",
            stacklevel=3,
        )

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

import warnings

from .hooks import TENSOR_SITES, Bound
from ..models.model import ON_LOAD
from ..models.sources import is_bridge


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


def _on_load(model, source) -> None:
    if is_bridge(source):
        from ..attention import install

        install(model)  # the bridge's hooks need the model's hook manager
        keep_bridge_hooks(model, source)


ON_LOAD.append(_on_load)

"""The MoE router site of the hook core: per router call, the active edits' constraints are combined
and, if any apply (or a user :class:`~workbench.Hook` replaced ``mlp.router.logits``), the router's
returned ``(weights, indices)`` are replaced by :func:`~workbench.routing.rules.route` on the (edited)
logits; then probes see the final decision. The experts module's input tells what actually ran.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core import names as N
from ..core.hooks import SITE_INSTALLERS, _checked_replacement
from ..base.errors import ProbeError
from ..models.spec import RouterSpec
from .rules import RuleInputs, route, rule_inputs


@dataclass(frozen=True)
class Constraints:
    """What the active edits ask of one MoE layer."""

    k: int
    allowed: torch.Tensor  # [E] bool, False = deactivated
    forced: torch.Tensor  # [E] bool, True = always chosen
    labels: tuple[str, ...] = ()

    @property
    def active(self) -> bool:
        return bool(self.labels)

    def route(self, logits: torch.Tensor, rs: RouterSpec, inputs: RuleInputs):
        return route(logits, rs, inputs, k=self.k, allowed=self.allowed, forced=self.forced)


@dataclass(frozen=True)
class RouterOutput:
    """One router call as the probes see it: logits ``[N, E]`` (after any edit), the experts and weights
    the model used ``[N, k]``, the constraints that shaped them and the rule's inputs."""

    logits: torch.Tensor
    weights: torch.Tensor
    indices: torch.Tensor
    constraints: Constraints
    inputs: RuleInputs


def unconstrained(rs: RouterSpec) -> Constraints:
    e = rs.n_experts
    return Constraints(rs.top_k, torch.ones(e, dtype=torch.bool), torch.zeros(e, dtype=torch.bool))


def combine(rs: RouterSpec, edits) -> Constraints:
    """Fold the edits' per-layer requests into one :class:`Constraints`; refuse impossible mixes."""
    c = unconstrained(rs)
    k, allowed, forced, labels, k_from = c.k, c.allowed.clone(), c.forced.clone(), [], None
    for edit in edits:
        req = edit.routing(rs.layer)
        if req is None:
            continue
        labels.append(edit.label)
        if req.get("k") is not None:
            if k_from is not None and req["k"] != k:
                raise ProbeError(f"layer {rs.layer}: two TopK edits ask for k={k} and k={req['k']}; use one")
            k, k_from = int(req["k"]), edit
        for e in req.get("mask", ()):
            allowed[e] = False
        for e in req.get("force", ()):
            forced[e] = True
    where = f"{N.name(rs.layer, 'mlp.router')} ({' + '.join(labels)})"
    both = (forced & ~allowed).nonzero().flatten().tolist()
    if both:
        raise ProbeError(f"{where}: experts {both} are both deactivated and forced")
    if int(forced.sum()) > k:
        raise ProbeError(f"{where}: {int(forced.sum())} forced experts do not fit in top-{k}")
    if int(allowed.sum()) < k:
        raise ProbeError(f"{where}: only {int(allowed.sum())} of {rs.n_experts} experts remain active but each token needs {k}")
    if rs.rule == "sigmoid_grouped" and rs.n_group:
        size = rs.n_experts // rs.n_group
        groups = set((forced.nonzero().flatten() // size).tolist())
        if len(groups) > (rs.topk_group or rs.n_group):
            raise ProbeError(f"{where}: forced experts span {len(groups)} groups but only {rs.topk_group} groups are kept")
        if k > (rs.topk_group or rs.n_group) * size:
            raise ProbeError(f"{where}: k={k} exceeds the {rs.topk_group} kept groups × {size} experts")
    return Constraints(k, allowed, forced, tuple(labels))


def _router_spec(mgr, layer: int) -> RouterSpec:
    return next(rs for rs in mgr.spec.routers if rs.layer == layer)


def install_router_site(mgr, site: str, layer: int) -> list:
    """Torch hooks for the ``router`` (output) or ``experts`` (input indices) site of one MoE layer."""
    rs = _router_spec(mgr, layer)
    hf = mgr.model.hf
    if site == "router":
        router = hf.get_submodule(rs.router_path)
        return [router.register_forward_hook(_router_hook(mgr, rs, router))]
    if rs.experts_path is None:
        return []
    experts = hf.get_submodule(rs.experts_path)
    return [experts.register_forward_pre_hook(_experts_hook(mgr, rs), with_kwargs=True)]


def _router_hook(mgr, rs: RouterSpec, router: torch.nn.Module):
    def hook(module, args, output):
        items = mgr._items("router", rs.layer)
        if not items:
            return None
        logits, weights, indices = output[0], output[1], output[2]
        edits = [it for _, it in items if it.is_edit]
        new_logits = logits
        for it in edits:
            if hasattr(it, "edit_logits"):
                r = it.edit_logits(rs.layer, new_logits)
                if r is not None:
                    new_logits = _checked_replacement(r, new_logits, N.name(rs.layer, "mlp.router.logits"), it)
        c = combine(rs, [it for it in edits if it.routing(rs.layer) is not None])
        inputs = rule_inputs(router)
        if c.active or new_logits is not logits:
            d = c.route(new_logits, rs, inputs)
            weights, indices = d.weights.to(weights.dtype), d.indices.to(indices.dtype)
            output = (new_logits, weights, indices, *output[3:])
        out = RouterOutput(new_logits, weights, indices, c, inputs)
        for s, it in items:
            if not it.is_edit and s is not None and s.call is not None and s.call.recording:
                it.routed(rs, s.call, out)
        return output

    return hook


def _experts_hook(mgr, rs: RouterSpec):
    def hook(module, args, kwargs):
        idx = args[1] if len(args) > 1 else kwargs.get(rs.experts_index_arg)
        if idx is None:
            return None
        for s, it in mgr._items("experts", rs.layer):
            if not it.is_edit and s is not None and s.call is not None and s.call.recording:
                it.experts_ran(rs, s.call, idx)
        return None

    return hook


SITE_INSTALLERS["router"] = SITE_INSTALLERS["experts"] = install_router_site

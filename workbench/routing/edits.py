"""Routing interventions: deactivate experts, force experts, change k. Each validates against the
model's routers in ``bind`` (before any forward pass) and acts by re-routing the router's own logits
with the architecture's rule (:mod:`workbench.routing.rules`), so the experts that run are exactly
what the edited rule chooses. They compose with each other and with attention edits in
:func:`workbench.intervene`."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

from ..base.errors import ProbeError
from ..core.hooks import Bound, Edit
from .hooks import combine
from .probe import moe_router, require_moe

Expert = tuple[int, int]  # (layer, expert)


def _experts(model, experts: Iterable[Expert], what: str) -> dict[int, list[int]]:
    """Validated ``{layer: [expert, ...]}`` from (layer, expert) pairs."""
    require_moe(model, what)
    from ..models.spec import _index

    if isinstance(experts, (str, bytes)) or not hasattr(experts, "__iter__"):
        raise ProbeError(f"{what}: experts must be a list of (layer, expert) pairs, got {experts!r}")
    pairs = []
    for p in experts:
        try:
            layer, e = p
        except (TypeError, ValueError):
            raise ProbeError(f"{what}: experts must be (layer, expert) pairs, got {p!r}") from None
        pairs.append((_index(layer, f"{what}: layer"), _index(e, f"{what}: expert")))
    if not pairs:
        raise ProbeError(f"{what}: no experts given; pass (layer, expert) pairs")
    out: dict[int, list[int]] = {}
    for layer, e in pairs:
        rs = moe_router(model, layer, what)
        if not 0 <= e < rs.n_experts:
            raise ProbeError(f"{what}: expert {e} is out of range in layer {layer} (experts 0..{rs.n_experts - 1})")
        if e not in out.setdefault(layer, []):
            out[layer].append(e)
    return out


class BoundRoutingEdit(Bound):
    """A routing edit bound to a model: per MoE layer, what it asks of the routing."""

    is_edit = True

    def __init__(self, model, label: str, requests: dict[int, dict]):
        self.model, self.label, self.requests = model, label, requests
        self.sites = frozenset(("router", l) for l in requests)

    def routing(self, layer):
        return self.requests.get(layer)

    def begin(self, session) -> None:
        """Refuse, before the block runs, a combination with the other active edits that cannot route."""
        from ..core.hooks import HookManager

        active = [it for s in HookManager.of(self.model).sessions() for it in s.edits] + session.edits
        for rs in self.model.spec.routers:
            if rs.layer in self.requests:
                combine(rs, [it for it in active if hasattr(it, "routing") and it.routing(rs.layer) is not None])


@dataclass(frozen=True)
class ExpertMask(Edit):
    """Deactivate experts: their router logits become −inf before top-k (they leave the softmax of
    ``softmax_topk`` routers, so the remaining probabilities renormalise; DeepSeek's biased choice
    score is −inf too). ``experts``: (layer, expert) pairs, e.g. from
    :func:`workbench.routing.behaviour_experts`."""

    experts: Sequence[Expert]

    label = "expert-mask"

    def bind(self, model) -> BoundRoutingEdit:
        by_layer = _experts(model, self.experts, "ExpertMask")
        for layer, es in by_layer.items():
            rs = moe_router(model, layer, "ExpertMask")
            if rs.n_experts - len(es) < rs.top_k:
                raise ProbeError(
                    f"ExpertMask: deactivating {len(es)} of {rs.n_experts} experts in layer {layer} leaves fewer "
                    f"than the top-{rs.top_k} each token needs"
                )
        return BoundRoutingEdit(model, self.label, {l: {"mask": es} for l, es in by_layer.items()})


@dataclass(frozen=True)
class ExpertForce(Edit):
    """Force experts into every token's top-k; the remaining slots go to the rule's best other experts.
    Weights are what the rule gives the chosen set (e.g. their softmax probabilities, renormalised
    when ``norm_topk_prob``)."""

    experts: Sequence[Expert]

    label = "expert-force"

    def bind(self, model) -> BoundRoutingEdit:
        by_layer = _experts(model, self.experts, "ExpertForce")
        for layer, es in by_layer.items():
            rs = moe_router(model, layer, "ExpertForce")
            if len(es) > rs.top_k:
                raise ProbeError(
                    f"ExpertForce: forcing {len(es)} experts in layer {layer} but tokens use only top-{rs.top_k}; "
                    "raise k with TopK alongside, or force fewer"
                )
        return BoundRoutingEdit(model, self.label, {l: {"force": es} for l, es in by_layer.items()})


@dataclass(frozen=True)
class TopK(Edit):
    """Route each token to ``k`` experts instead of the model's top-k: one int for every MoE layer or
    ``{layer: k}``. Weights follow the rule for the new k (e.g. renormalised over k experts)."""

    k: int | Mapping[int, int]

    @property
    def label(self) -> str:
        return f"top-k:{self.k if isinstance(self.k, int) else dict(self.k)}"

    def bind(self, model) -> BoundRoutingEdit:
        routers = require_moe(model, "TopK")
        if isinstance(self.k, Mapping):
            if not self.k:
                raise ProbeError("TopK: empty {layer: k} mapping")
            wanted = dict(self.k)  # keys checked (integers, MoE layers) by moe_router below
        else:
            wanted = {rs.layer: self.k for rs in routers}
        ks: dict[int, int] = {}
        for layer, k in wanted.items():
            rs = moe_router(model, layer, "TopK")
            if rs.layer in ks:
                raise ProbeError(f"TopK: layer {rs.layer} is given twice")
            if isinstance(k, bool) or not isinstance(k, int):
                raise ProbeError(f"TopK: k must be an int, got {k!r} for layer {layer}")
            if k < 1:
                raise ProbeError(f"TopK: k = {k} in layer {layer} would route tokens to no expert; k must be ≥ 1")
            if k > rs.n_experts:
                raise ProbeError(f"TopK: k = {k} exceeds the {rs.n_experts} experts of layer {layer}")
            if rs.rule == "sigmoid_grouped" and rs.n_group and k > (rs.topk_group or rs.n_group) * (rs.n_experts // rs.n_group):
                raise ProbeError(
                    f"TopK: k = {k} exceeds the experts in the {rs.topk_group} groups layer {layer} keeps "
                    f"({rs.n_experts // rs.n_group} each)"
                )
            ks[rs.layer] = k
        return BoundRoutingEdit(model, self.label, {l: {"k": k} for l, k in ks.items()})

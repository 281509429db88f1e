"""Routing interventions: deactivate experts, force experts, change k. Each validates against the
model's routers in ``bind`` (before any forward pass) and acts by re-routing the router's own logits
with the architecture's rule (:mod:`workbench.routing.rules`), so the experts that run are exactly
what the edited rule chooses. They compose with each other and with attention edits in
:func:`workbench.intervene`."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

from ..errors import ProbeError
from .hooks import RouterHooks
from .probe import moe_router, require_moe

Expert = tuple[int, int]  # (layer, expert)


def _experts(model, experts: Iterable[Expert], what: str) -> dict[int, list[int]]:
    """Validated ``{layer: [expert, ...]}`` from (layer, expert) pairs."""
    require_moe(model, what)
    pairs = []
    for p in experts:
        try:
            layer, e = (int(x) for x in p)
        except (TypeError, ValueError):
            raise ProbeError(f"{what}: experts must be (layer, expert) pairs, got {p!r}") from None
        pairs.append((layer, e))
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


class _RoutingEdit:
    """Base: a bound routing edit joins the model's router hooks while the ``intervene`` block runs."""

    label = "routing-edit"

    def request(self, layer: int) -> dict | None:
        raise NotImplementedError

    def attach(self, model) -> None:
        self._model = model
        RouterHooks.of(model).add_edit(self)  # validates the combination with other active edits

    def detach(self) -> None:
        RouterHooks.of(self._model).remove(self)


@dataclass
class ExpertMask(_RoutingEdit):
    """Deactivate experts: their router logits become −inf before top-k (they leave the softmax of
    ``softmax_topk`` routers, so the remaining probabilities renormalise; DeepSeek's biased choice
    score is −inf too). ``experts``: (layer, expert) pairs, e.g. from
    :func:`workbench.routing.behaviour_experts`."""

    experts: Sequence[Expert]

    label = "expert-mask"

    def bind(self, model) -> "ExpertMask":
        self._by_layer = _experts(model, self.experts, "ExpertMask")
        for layer, es in self._by_layer.items():
            rs = moe_router(model, layer, "ExpertMask")
            if rs.n_experts - len(es) < rs.top_k:
                raise ProbeError(
                    f"ExpertMask: deactivating {len(es)} of {rs.n_experts} experts in layer {layer} leaves fewer "
                    f"than the top-{rs.top_k} each token needs"
                )
        return self

    def request(self, layer):
        return {"mask": self._by_layer[layer]} if layer in self._by_layer else None


@dataclass
class ExpertForce(_RoutingEdit):
    """Force experts into every token's top-k; the remaining slots go to the rule's best other experts.
    Weights are what the rule gives the chosen set (e.g. their softmax probabilities, renormalised
    when ``norm_topk_prob``)."""

    experts: Sequence[Expert]

    label = "expert-force"

    def bind(self, model) -> "ExpertForce":
        self._by_layer = _experts(model, self.experts, "ExpertForce")
        for layer, es in self._by_layer.items():
            rs = moe_router(model, layer, "ExpertForce")
            if len(es) > rs.top_k:
                raise ProbeError(
                    f"ExpertForce: forcing {len(es)} experts in layer {layer} but tokens use only top-{rs.top_k}; "
                    "raise k with TopK alongside, or force fewer"
                )
        return self

    def request(self, layer):
        return {"force": self._by_layer[layer]} if layer in self._by_layer else None


@dataclass
class TopK(_RoutingEdit):
    """Route each token to ``k`` experts instead of the model's top-k: one int for every MoE layer or
    ``{layer: k}``. Weights follow the rule for the new k (e.g. renormalised over k experts)."""

    k: int | Mapping[int, int]

    @property
    def label(self) -> str:
        return f"top-k:{self.k if isinstance(self.k, int) else dict(self.k)}"

    def bind(self, model) -> "TopK":
        routers = require_moe(model, "TopK")
        if isinstance(self.k, Mapping):
            if not self.k:
                raise ProbeError("TopK: empty {layer: k} mapping")
            wanted = {int(l): v for l, v in self.k.items()}
        else:
            wanted = {rs.layer: self.k for rs in routers}
        self._k: dict[int, int] = {}
        for layer, k in wanted.items():
            rs = moe_router(model, layer, "TopK")
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
            self._k[layer] = k
        return self

    def request(self, layer):
        return {"k": self._k[layer]} if layer in self._k else None

"""One set of torch hooks per model, shared by every routing probe and edit that is active.

Hook names (the vocabulary users see in records and errors): ``blocks.{l}.moe.router`` (the router's
output: logits, weights, indices) and ``blocks.{l}.moe.experts`` (the indices the experts received).

Per router call: the edits' constraints are combined and, if any apply, the router's returned
``(weights, indices)`` are replaced by :func:`~workbench.routing.rules.route` on the unchanged
logits; then recorders see the final output. A pre-hook on the model keeps the token ids and
positions of the current forward call (prefill or decode step) so recorders can label rows.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ProbeError
from ..spec import RouterSpec
from .rules import RuleInputs, route, rule_inputs

_ATTR = "_workbench_router_hooks"


def hook_name(layer: int, part: str = "router") -> str:
    """The stable name of a routing hook point, e.g. ``blocks.3.moe.router``."""
    return f"blocks.{layer}.moe.{part}"


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


def unconstrained(rs: RouterSpec) -> Constraints:
    e = rs.n_experts
    return Constraints(rs.top_k, torch.ones(e, dtype=torch.bool), torch.zeros(e, dtype=torch.bool))


def combine(rs: RouterSpec, edits) -> Constraints:
    """Fold the edits' per-layer requests into one :class:`Constraints`; refuse impossible mixes."""
    c = unconstrained(rs)
    k, allowed, forced, labels, k_from = c.k, c.allowed.clone(), c.forced.clone(), [], None
    for edit in edits:
        req = edit.request(rs.layer)
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
    where = f"{hook_name(rs.layer)} ({' + '.join(labels)})"
    both = (forced & ~allowed).nonzero().flatten().tolist()
    if both:
        raise ProbeError(f"{where}: experts {both} are both deactivated and forced")
    if int(forced.sum()) > k:
        raise ProbeError(f"{where}: {int(forced.sum())} forced experts do not fit in top-{k}")
    if int(allowed.sum()) < k:
        raise ProbeError(
            f"{where}: only {int(allowed.sum())} of {rs.n_experts} experts remain active but each token needs {k}"
        )
    if rs.rule == "sigmoid_grouped" and rs.n_group:
        size = rs.n_experts // rs.n_group
        groups = set((forced.nonzero().flatten() // size).tolist())
        if len(groups) > (rs.topk_group or rs.n_group):
            raise ProbeError(f"{where}: forced experts span {len(groups)} groups but only {rs.topk_group} groups are kept")
        if k > (rs.topk_group or rs.n_group) * size:
            raise ProbeError(f"{where}: k={k} exceeds the {rs.topk_group} kept groups × {size} experts")
    return Constraints(k, allowed, forced, tuple(labels))


class RouterHooks:
    """The hooks of one model; created on first use, removed when the last client leaves."""

    def __init__(self, model):
        self.model = model
        self.edits: list = []
        self.recorders: list = []
        self.constraints: dict[int, Constraints] = {}
        self.call = -1
        self.ids: torch.Tensor | None = None
        self.positions: torch.Tensor | None = None
        self._handles: list = []

    @staticmethod
    def of(model) -> "RouterHooks":
        hooks = model.hf.__dict__.get(_ATTR)
        if hooks is None:
            hooks = RouterHooks(model)
            model.hf.__dict__[_ATTR] = hooks
        return hooks

    # --- clients ---------------------------------------------------------------------------------
    def add_edit(self, edit) -> None:
        new = {rs.layer: combine(rs, [*self.edits, edit]) for rs in self.model.spec.routers}  # raises before changing
        self.edits.append(edit)
        self.constraints = new
        self._ensure_installed()

    def add_recorder(self, rec) -> None:
        self.recorders.append(rec)
        self._ensure_installed()

    def remove(self, client) -> None:
        if client in self.edits:
            self.edits.remove(client)
            self.constraints = {rs.layer: combine(rs, self.edits) for rs in self.model.spec.routers}
        if client in self.recorders:
            self.recorders.remove(client)
        if not self.edits and not self.recorders:
            for h in self._handles:
                h.remove()
            self._handles = []

    # --- torch hooks -------------------------------------------------------------------------------
    def _ensure_installed(self) -> None:
        if self._handles:
            return
        hf = self.model.hf
        self._handles.append(hf.register_forward_pre_hook(self._on_model, with_kwargs=True))
        for rs in self.model.spec.routers:
            router = hf.get_submodule(rs.router_path)
            self._handles.append(router.register_forward_hook(self._router_hook(rs, router)))
            if rs.experts_path is not None:
                experts = hf.get_submodule(rs.experts_path)
                self._handles.append(experts.register_forward_pre_hook(self._experts_hook(rs), with_kwargs=True))

    def _on_model(self, module, args, kwargs) -> None:
        self.call += 1
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:  # inputs_embeds: no token ids to label rows with
            emb = kwargs.get("inputs_embeds")
            shape = emb.shape[:2] if emb is not None else None
            ids = torch.full(shape, -1, dtype=torch.long) if shape is not None else None
        if ids is None:
            self.ids = self.positions = None
            return
        ids = ids if ids.dim() == 2 else ids[None]
        pos = kwargs.get("position_ids")
        if pos is None:
            cache = kwargs.get("past_key_values")
            past = cache.get_seq_length() if cache is not None and hasattr(cache, "get_seq_length") else 0
            pos = past + torch.arange(ids.shape[1], device=ids.device)
        self.ids = ids.detach().cpu()
        self.positions = pos.detach().cpu().expand(ids.shape).clone()

    def _router_hook(self, rs: RouterSpec, router: torch.nn.Module):
        def hook(module, args, output):
            logits, weights, indices = output[0], output[1], output[2]
            c = self.constraints.get(rs.layer)
            inputs = rule_inputs(router) if (c is not None and c.active) or self.recorders else None
            if c is not None and c.active:
                d = c.route(logits, rs, inputs)
                weights, indices = d.weights.to(weights.dtype), d.indices.to(indices.dtype)
                output = (logits, weights, indices, *output[3:])
            for rec in self.recorders:
                rec.on_router(rs, self.call, logits, weights, indices, c, inputs)
            return output

        return hook

    def _experts_hook(self, rs: RouterSpec):
        def hook(module, args, kwargs):
            idx = args[1] if len(args) > 1 else kwargs.get(rs.experts_index_arg)
            if idx is not None:
                for rec in self.recorders:
                    rec.on_experts(rs, self.call, idx)

        return hook

"""``Routing``: the probe that records every MoE layer's routing, and its record."""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from functools import cached_property
from typing import Sequence

import torch

from ..display import Figures
from ..errors import ProbeError
from ..spec import RouterSpec
from .hooks import Constraints, RouterHooks, hook_name, unconstrained
from .rules import Decision, RuleInputs


def require_moe(model, what: str) -> tuple[RouterSpec, ...]:
    """The model's routers, or a clear error when it has none."""
    spec = model.spec
    if not spec.is_moe:
        raise ProbeError(
            f"{what}: model has no MoE layers (model type {spec.model_type!r} is dense: no router in any of its "
            f"{spec.n_layers} layers); load a mixture-of-experts model, e.g. workbench.load('tiny-moe')"
        )
    if any(rs.rule == "sparsemixer" for rs in spec.routers) and model.hf.training:
        raise ProbeError(f"{what}: {spec.model_type} routes stochastically in training mode; call model.hf.eval() first")
    return spec.routers


def moe_router(model, layer: int, what: str) -> RouterSpec:
    """The RouterSpec of ``layer``, or a clear error naming the MoE layers."""
    routers = {rs.layer: rs for rs in require_moe(model, what)}
    if layer not in routers:
        kind = "does not exist" if not 0 <= layer < model.spec.n_layers else "is a dense layer (no router)"
        raise ProbeError(f"{what}: layer {layer} {kind}; MoE layers: {sorted(routers)}")
    return routers[layer]


@dataclass
class Routing:
    """Record the routing of every MoE layer (or ``layers``) per token, in forward and generate.

    Per layer and token: router logits, the experts and weights the model used (rank order), the
    rule's scores and the routing margin (k-th minus (k+1)-th score). Decisions are recomputed with
    the architecture's rule and checked against what the router returned and the experts received:
    see :meth:`RoutingRecord.check`.
    """

    layers: Sequence[int] | None = None

    def bind(self, model) -> "RoutingRecord":
        routers = require_moe(model, "Routing")
        if self.layers is not None:
            wanted = [int(x) for x in self.layers]
            if not wanted:
                raise ProbeError("Routing: layers is empty; pass None for every MoE layer")
            routers = tuple(moe_router(model, l, "Routing") for l in sorted(set(wanted)))
        return RoutingRecord(model=model, routers=routers)


@dataclass
class _Call:
    """One forward call (a prefill or one decode step)."""

    ids: torch.Tensor | None
    positions: torch.Tensor | None
    layers: dict = field(default_factory=dict)  # layer -> dict(logits, weights, indices, ran, c, inputs)


@dataclass(eq=False)
class RoutingRecord(Figures):
    """What a :class:`Routing` capture recorded. Rows are tokens: every captured forward call's
    ``[batch, seq]`` tokens flattened, calls in order (prefill rows, then one row per decode step
    and sequence). Arrays are ``[layer, row, ...]`` over :attr:`layers` (the MoE layers)."""

    model: object
    routers: tuple[RouterSpec, ...]
    calls: list = field(default_factory=list)
    edit_labels: set = field(default_factory=set)
    _version: int = 0
    _cache: dict = field(default_factory=dict)
    _call_index: dict = field(default_factory=dict)  # hooks' forward-call counter -> index into calls

    # --- capture protocol (hooks side) ----------------------------------------------------------------
    def attach(self, model) -> None:
        RouterHooks.of(model).add_recorder(self)

    def detach(self) -> None:
        RouterHooks.of(self.model).remove(self)
        self._finish()

    def _current(self, call: int, layer: int) -> _Call:
        i = self._call_index.get(call)
        if i is None or layer in self.calls[i].layers:  # a new forward call (or a router run on its own)
            hooks = RouterHooks.of(self.model)
            fresh = i is None
            self.calls.append(_Call(hooks.ids if fresh else None, hooks.positions if fresh else None))
            i = self._call_index[call] = len(self.calls) - 1
        return self.calls[i]

    def on_router(self, rs, call, logits, weights, indices, c: Constraints | None, inputs: RuleInputs) -> None:
        if rs not in self.routers:
            return
        entry = self._current(call, rs.layer)
        entry.layers[rs.layer] = dict(
            logits=logits.detach().float().cpu(), weights=weights.detach().float().cpu(),
            indices=indices.detach().cpu().long(), ran=None, c=c if c is not None and c.active else None, inputs=inputs,
        )  # fmt: skip
        if c is not None and c.active:
            self.edit_labels.update(c.labels)
        self._version += 1

    def on_experts(self, rs, call, indices) -> None:
        if rs not in self.routers:
            return
        for c in reversed(self.calls):  # the latest call that ran this layer's router
            entry = c.layers.get(rs.layer)
            if entry is not None:
                if entry["ran"] is None:
                    entry["ran"] = indices.detach().cpu().long()
                    self._version += 1
                return

    def _finish(self) -> None:
        if not self.calls:
            return
        try:
            table = self.check()
        except ProbeError:  # e.g. the block raised mid-forward: leave the user's exception in charge
            return
        bad = table[(table.router_mismatch > 0) | (table.ran_mismatch > 0)]
        if len(bad):
            warnings.warn(
                "routing recomputation disagrees with the model on "
                + ", ".join(f"{hook_name(r.layer)}: {r.router_mismatch} router / {r.ran_mismatch} experts rows" for r in bad.itertuples())
                + "; margins of those rows are NaN. Report the architecture: its rule in workbench/architectures.py may be wrong",
                stacklevel=3,
            )

    # --- assembled arrays -------------------------------------------------------------------------------
    def _arrays(self) -> dict:
        if self._cache.get("version") == self._version:
            return self._cache
        if not self.calls:
            raise ProbeError("nothing was captured: run the model inside the `with workbench.capture(..., Routing())` block")
        layers = [rs.layer for rs in self.routers]
        calls = [c for c in self.calls if all(l in c.layers for l in layers)]
        if not calls:
            raise ProbeError("no forward call ran every recorded MoE layer")
        kmax = max(c.layers[l]["indices"].shape[1] for c in calls for l in layers)
        emax = max(rs.n_experts for rs in self.routers)
        out: dict = {k: [] for k in ("logits", "experts", "weights", "scores", "margin", "ran", "router_bad", "ran_bad", "werr")}
        meta: dict = {k: [] for k in ("token_ids", "positions", "batch", "call")}
        for ci, c in enumerate(calls):
            n = c.layers[layers[0]]["indices"].shape[0]
            ok = c.ids is not None and c.ids.numel() == n
            meta["token_ids"].append(c.ids.flatten() if ok else torch.full((n,), -1))
            meta["positions"].append(c.positions.flatten() if ok else torch.full((n,), -1))
            meta["batch"].append(torch.arange(c.ids.shape[0]).repeat_interleave(c.ids.shape[1]) if ok else torch.zeros(n, dtype=torch.long))
            meta["call"].append(torch.full((n,), ci))
        for rs in self.routers:
            per = {k: [] for k in out}
            for c in calls:
                e = c.layers[rs.layer]
                per_call = _assemble(rs, e, kmax, emax)
                for k in out:
                    per[k].append(per_call[k])
            for k in out:
                out[k].append(torch.cat(per[k]))
        arrays = {k: torch.stack(v) for k, v in out.items()} | {k: torch.cat(v) for k, v in meta.items()}
        self._cache = arrays | {"version": self._version}
        return self._cache

    @property
    def layers(self) -> tuple[int, ...]:
        """The MoE layers recorded (indices into the model's decoder layers)."""
        return tuple(rs.layer for rs in self.routers)

    @property
    def n_experts(self) -> int:
        return max(rs.n_experts for rs in self.routers)

    @property
    def token_ids(self) -> torch.Tensor:
        """Token id of each row ``[R]`` (−1 when the forward call had no ``input_ids``)."""
        return self._arrays()["token_ids"]

    @property
    def positions(self) -> torch.Tensor:
        """Absolute position of each row ``[R]`` (decode steps continue the prompt's positions)."""
        return self._arrays()["positions"]

    @property
    def batch(self) -> torch.Tensor:
        """Sequence index of each row within its forward call ``[R]``."""
        return self._arrays()["batch"]

    @property
    def call(self) -> torch.Tensor:
        """Forward call of each row ``[R]`` (0 = first prefill, then decode steps / later forwards)."""
        return self._arrays()["call"]

    @property
    def logits(self) -> torch.Tensor:
        """Router logits ``[layer, row, expert]`` as the router computed them."""
        return self._arrays()["logits"]

    @property
    def experts(self) -> torch.Tensor:
        """The experts each token was routed to ``[layer, row, k]``, best-ranked first (−1 pads when k varies)."""
        return self._arrays()["experts"]

    @property
    def weights(self) -> torch.Tensor:
        """Mixing weights of :attr:`experts` ``[layer, row, k]`` as the router returned them (NaN pads)."""
        return self._arrays()["weights"]

    @property
    def scores(self) -> torch.Tensor:
        """What the rule ranks experts by ``[layer, row, expert]``: softmax probabilities
        (``softmax_topk``), logits (``topk_softmax``, ``sparsemixer``), sigmoid + correction bias inside
        the kept groups (``sigmoid_grouped``); −inf excluded, +inf forced by an edit."""
        return self._arrays()["scores"]

    @property
    def margin(self) -> torch.Tensor:
        """Routing margin ``[layer, row]``: k-th minus (k+1)-th rule score (small = flips under noise;
        inf = no competitor; NaN where the recomputation disagreed with the model)."""
        return self._arrays()["margin"]

    @property
    def ran(self) -> torch.Tensor:
        """Experts the experts module actually received ``[layer, row, k]`` (−1 where not observed)."""
        return self._arrays()["ran"]

    def check(self):
        """Per layer: rows where the recomputed top-k differs from what the router returned
        (``router_mismatch``) and from what the experts module received (``ran_mismatch``, −1 when
        the experts were not observed), and the largest weight difference (``max_weight_err``)."""
        import pandas as pd

        a = self._arrays()
        return pd.DataFrame(
            {
                "layer": list(self.layers),
                "hook": [hook_name(l) for l in self.layers],
                "rows": [a["router_bad"].shape[1]] * len(self.layers),
                "router_mismatch": a["router_bad"].sum(1).tolist(),
                "ran_mismatch": [
                    int((bad == 1).sum()) if (bad >= 0).all() else -1 for bad in a["ran_bad"]
                ],
                "max_weight_err": a["werr"].amax(1).tolist() if a["werr"].numel() else [0.0] * len(self.layers),
            }
        )

    @property
    def verified(self) -> bool:
        """True when every recorded decision equals the rule's recomputation and what the experts ran."""
        df = self.check()
        return bool((df.router_mismatch == 0).all() and (df.ran_mismatch == 0).all())

    def select(self, rows) -> "RoutingRows":
        """Some rows (bool mask or indices over ``[R]``) as a :class:`RoutingRows` the analyses accept,
        e.g. ``rec.select(rec.call == 0)`` or one prompt set out of a shared capture."""
        return RoutingRows.of(self, rows)

    @cached_property
    def shared_experts(self) -> dict[int, str]:
        """Layer → path of its always-on shared expert(s) (Qwen2-MoE, DeepSeek-V3), where present."""
        return {rs.layer: rs.shared_experts_path for rs in self.routers if rs.shared_experts_path}

    @property
    def provenance(self):
        """The model's provenance with this capture's token ids and the routing definition."""
        rules = sorted({rs.rule for rs in self.routers})
        return self.model.provenance.with_run(
            token_ids=self.token_ids.tolist(),
            definition=f"routing: rule {'/'.join(rules)}; margin = k-th minus (k+1)-th rule score",
            edits=sorted(self.edit_labels),
            moe_layers=list(self.layers),
        )

    def _figures(self) -> dict:
        from .. import report
        from .analyses import expert_load

        title = f"expert load per layer ({len(self.token_ids)} tokens)"
        return {"load": lambda: report.layer_expert_grid(expert_load(self), self.layers, title)}

    def to_frame(self):
        """Long pandas table: one row per (layer, token row, rank) with token id, position, expert,
        weight and the token's margin."""
        import pandas as pd

        a = self._arrays()
        L, R, K = a["experts"].shape
        grid = torch.cartesian_prod(torch.arange(L), torch.arange(R), torch.arange(K))
        li, ri, ki = grid.unbind(1)
        df = pd.DataFrame(
            {
                "layer": torch.tensor(self.layers)[li].numpy(),
                "row": ri.numpy(),
                "rank": ki.numpy(),
                "call": a["call"][ri].numpy(),
                "batch": a["batch"][ri].numpy(),
                "position": a["positions"][ri].numpy(),
                "token_id": a["token_ids"][ri].numpy(),
                "expert": a["experts"].flatten().numpy(),
                "weight": a["weights"].flatten().numpy(),
                "margin": a["margin"][li, ri].numpy(),
            }
        )
        return df[df.expert >= 0].reset_index(drop=True)


_ROW_FIELDS = ("token_ids", "positions", "batch", "call")
_LAYER_FIELDS = ("logits", "experts", "weights", "scores", "margin", "ran")


@dataclass(frozen=True)
class RoutingRows:
    """A subset of a :class:`RoutingRecord`'s rows with the same arrays (``[layer, row, ...]``)."""

    layers: tuple[int, ...]
    n_experts: int
    token_ids: torch.Tensor
    positions: torch.Tensor
    batch: torch.Tensor
    call: torch.Tensor
    logits: torch.Tensor
    experts: torch.Tensor
    weights: torch.Tensor
    scores: torch.Tensor
    margin: torch.Tensor
    ran: torch.Tensor

    @staticmethod
    def of(rec, rows) -> "RoutingRows":
        idx = torch.as_tensor(rows)
        if idx.dtype == torch.bool:
            if idx.shape != rec.token_ids.shape:
                raise ProbeError(f"row mask has shape {tuple(idx.shape)}; the record has {rec.token_ids.numel()} rows")
            idx = idx.nonzero().flatten()
        if idx.numel() == 0:
            raise ProbeError("select: no rows chosen")
        if int(idx.max()) >= rec.token_ids.numel() or int(idx.min()) < 0:
            raise ProbeError(f"select: row indices must lie in 0..{rec.token_ids.numel() - 1}")
        fields = {f: getattr(rec, f)[idx] for f in _ROW_FIELDS} | {f: getattr(rec, f)[:, idx] for f in _LAYER_FIELDS}
        return RoutingRows(layers=tuple(rec.layers), n_experts=rec.n_experts, **fields)

    def select(self, rows) -> "RoutingRows":
        """A further subset of these rows."""
        return RoutingRows.of(self, rows)


def _assemble(rs: RouterSpec, e: dict, kmax: int, emax: int) -> dict:
    """One (call, layer): recompute with the rule, order the model's decision by rank, compare."""
    c = e["c"] or unconstrained(rs)
    d: Decision = c.route(e["logits"], rs, e["inputs"])
    idx, w = e["indices"], e["weights"]
    n, k = idx.shape
    # rank order = the rule's scores, descending (DeepSeek returns its top-k unsorted)
    order = torch.sort(d.scores.gather(1, idx), dim=1, descending=True, stable=True).indices
    idx, w = idx.gather(1, order), w.gather(1, order)
    same_set = (idx.sort(1).values == d.indices.sort(1).values).all(1) if d.indices.shape == idx.shape else torch.zeros(n, dtype=torch.bool)
    werr = torch.zeros(n)
    if same_set.any():  # compare weights expert by expert
        ours = d.weights.gather(1, torch.argsort(d.indices, 1))
        theirs = w.gather(1, torch.argsort(idx, 1))
        werr = torch.where(same_set, (ours - theirs).abs().amax(1), werr)
    ran = e["ran"]
    if ran is not None and ran.shape == idx.shape:
        ran_bad = (ran.sort(1).values != idx.sort(1).values).any(1).long()
        ran = ran.gather(1, order)
    else:
        ran_bad = torch.full((n,), -1 if ran is None else 1, dtype=torch.long)
        ran = torch.full_like(idx, -1)
    margin = torch.where(same_set, d.margin, torch.nan)
    pad = kmax - k
    return dict(
        logits=_pad_last(e["logits"], emax - e["logits"].shape[1], torch.nan),
        experts=_pad_last(idx, pad, -1),
        weights=_pad_last(w, pad, torch.nan),
        scores=_pad_last(d.scores, emax - d.scores.shape[1], torch.nan),
        margin=margin,
        ran=_pad_last(ran, pad, -1),
        router_bad=(~same_set).long(),
        ran_bad=ran_bad,
        werr=werr,
    )


def _pad_last(t: torch.Tensor, n: int, value) -> torch.Tensor:
    if n <= 0:
        return t
    return torch.cat([t, torch.full((*t.shape[:-1], n), value, dtype=t.dtype)], dim=-1)

"""``Routing``: the probe that records every MoE layer's routing under ``blocks.{l}.mlp.router.*``, and
:class:`RoutingRows`, the flat per-token view the analyses take (``workbench.routing.rows(cap)``)."""
from __future__ import annotations

import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Sequence

import torch

from ..core import names as N
from ..base.errors import ProbeError
from ..core.capture import capture, intervene
from ..core.hooks import DEFAULT_PROBES, Bound, Call, Probe
from ..models.spec import RouterSpec
from .hooks import RouterOutput, unconstrained

_PARTS = ("logits", "experts", "weights", "scores", "margin", "ran", "agrees")
WEIGHT_TOL = 1e-5  # the rule's weights vs the router's, in float32


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
    from ..models.spec import _index

    layer = _index(layer, f"{what}: layer")
    if layer not in routers:
        kind = "does not exist" if not 0 <= layer < model.spec.n_layers else "is a dense layer (no router)"
        raise ProbeError(f"{what}: layer {layer} {kind}; MoE layers: {sorted(routers)}")
    return routers[layer]


@dataclass(frozen=True)
class Routing(Probe):
    """Record the routing of every MoE layer (or ``layers``) per token, in forward and generate.

    Per layer and token (``[batch, row, ...]``): router ``logits``, the ``experts`` and ``weights`` the
    model used (rank order), the rule's ``scores``, the routing ``margin`` (k-th minus (k+1)-th score),
    the experts the experts module actually received (``ran``) and whether the architecture's rule,
    recomputed from the logits, ``agrees`` with the router. A disagreement warns when the block ends."""

    layers: Sequence[int] | None = None

    def bind(self, model) -> "BoundRouting":
        routers = require_moe(model, "Routing")
        if self.layers is not None:
            if isinstance(self.layers, (str, bytes)) or not hasattr(self.layers, "__iter__"):
                raise ProbeError(f"Routing: layers must be a list of MoE layer indices, got {self.layers!r}")
            from ..models.spec import _index

            wanted = [_index(x, "Routing: layer") for x in self.layers]
            if not wanted:
                raise ProbeError("Routing: layers is empty; pass None for every MoE layer")
            routers = tuple(moe_router(model, l, "Routing") for l in sorted(set(wanted)))
        return BoundRouting(model, routers)


class BoundRouting(Bound):
    def __init__(self, model, routers: tuple[RouterSpec, ...]):
        self.model, self.routers = model, routers
        self.by_layer = {rs.layer: rs for rs in routers}
        self.sites = frozenset((site, rs.layer) for rs in routers for site in ("router", "experts"))
        self._order: dict[tuple[int, int], tuple] = {}  # (call, layer) -> (rank order, indices) until the experts run
        self.mismatch: dict[int, list[int]] = {rs.layer: [0, 0] for rs in routers}  # router / experts disagreements

    def names(self) -> list[str]:
        return [N.name(rs.layer, f"mlp.router.{p}") for rs in self.routers for p in _PARTS]

    def narrow(self, keep):
        routers = tuple(rs for rs in self.routers if any(keep(N.name(rs.layer, f"mlp.router.{p}")) for p in _PARTS))
        return BoundRouting(self.model, routers) if routers else None

    def routed(self, rs: RouterSpec, call: Call, out: RouterOutput) -> None:
        c = out.constraints if out.constraints.active else unconstrained(rs)
        logits = out.logits.detach().float().cpu()
        d = c.route(logits, rs, out.inputs)
        idx, w = out.indices.detach().cpu().long(), out.weights.detach().float().cpu()
        n, k = idx.shape
        # rank order = the rule's scores, descending (DeepSeek returns its top-k unsorted)
        order = torch.sort(d.scores.gather(1, idx), dim=1, descending=True, stable=True).indices
        idx, w = idx.gather(1, order), w.gather(1, order)
        same = (idx.sort(1).values == d.indices.sort(1).values).all(1) if d.indices.shape == idx.shape else torch.zeros(n, dtype=torch.bool)
        if same.any():
            ours = d.weights.gather(1, torch.argsort(d.indices, 1))
            theirs = w.gather(1, torch.argsort(idx, 1))
            same &= (ours - theirs).abs().amax(1) <= WEIGHT_TOL
        self.mismatch[rs.layer][0] += int((~same).sum())
        self._order[(call.index, rs.layer)] = (order, idx)
        B, M = call.batch, call.q_pos.numel()
        shape = lambda t: t.reshape(B, M, *t.shape[1:])  # noqa: E731
        emit = lambda part, t: self.emit(N.name(rs.layer, f"mlp.router.{part}"), shape(t), call)  # noqa: E731
        emit("logits", logits)
        emit("experts", idx)
        emit("weights", w)
        emit("scores", d.scores)
        emit("margin", torch.where(same, d.margin, torch.nan))
        emit("agrees", same)
        if rs.experts_path is None:
            emit("ran", torch.full_like(idx, -1))

    def experts_ran(self, rs: RouterSpec, call: Call, indices: torch.Tensor) -> None:
        pending = self._order.pop((call.index, rs.layer), None)
        if pending is None:
            return
        order, idx = pending
        ran = indices.detach().cpu().long()
        if ran.shape != idx.shape:
            self.mismatch[rs.layer][1] += idx.shape[0]
            ran = torch.full_like(idx, -1)
        else:
            self.mismatch[rs.layer][1] += int((ran.sort(1).values != idx.sort(1).values).any(1).sum())
            ran = ran.gather(1, order)
        self.emit(N.name(rs.layer, "mlp.router.ran"), ran.reshape(call.batch, call.q_pos.numel(), -1), call)

    def end(self) -> None:
        bad = {l: m for l, m in self.mismatch.items() if any(m)}
        if bad:
            warnings.warn(
                "routing recomputation disagrees with the model on "
                + ", ".join(f"{N.name(l, 'mlp.router')}: {r} router / {e} experts rows" for l, (r, e) in bad.items())
                + "; margins of those rows are NaN. Report the architecture: its rule in workbench/models/architectures.py may be wrong",
                stacklevel=4,
            )


# --- the per-token view the analyses take ------------------------------------------------------------------


@dataclass(frozen=True)
class RoutingRows:
    """Routing per token as flat rows: ``[layer, row, ...]`` over the recorded MoE :attr:`layers`, rows =
    every recorded real (non-padding) token, sequence by sequence in call order. Build it with
    :func:`rows` (``workbench.routing.rows(cap)``); ``select`` takes subsets for the analyses."""

    layers: tuple[int, ...]
    n_experts: int
    token_ids: torch.Tensor  # [R]
    positions: torch.Tensor  # [R] position from the sequence's first real token
    batch: torch.Tensor  # [R]
    call: torch.Tensor  # [R] forward call (0 = first prompt pass, then decode steps)
    logits: torch.Tensor  # [L, R, E]
    experts: torch.Tensor  # [L, R, k]
    weights: torch.Tensor
    scores: torch.Tensor
    margin: torch.Tensor  # [L, R]
    ran: torch.Tensor  # [L, R, k]
    agrees: torch.Tensor  # [L, R]

    def select(self, rows) -> "RoutingRows":
        """A subset (bool mask or indices over ``[R]``), e.g. ``rows.select(rows.call == 0)``."""
        idx = torch.as_tensor(rows)
        if idx.dtype == torch.bool:
            if idx.shape != self.token_ids.shape:
                raise ProbeError(f"row mask has shape {tuple(idx.shape)}; there are {self.token_ids.numel()} rows")
            idx = idx.nonzero().flatten()
        if idx.numel() == 0:
            raise ProbeError("select: no rows chosen")
        if int(idx.max()) >= self.token_ids.numel() or int(idx.min()) < 0:
            raise ProbeError(f"select: row indices must lie in 0..{self.token_ids.numel() - 1}")
        per_row = {f: getattr(self, f)[idx] for f in ("token_ids", "positions", "batch", "call")}
        per_layer = {f: getattr(self, f)[:, idx] for f in ("logits", "experts", "weights", "scores", "margin", "ran", "agrees")}
        return RoutingRows(self.layers, self.n_experts, **per_row, **per_layer)

    def to_frame(self):
        """Long pandas table: one row per (layer, token row, rank) with token id, position, expert, weight
        and the token's margin."""
        import pandas as pd

        L, R, K = self.experts.shape
        li, ri, ki = torch.cartesian_prod(torch.arange(L), torch.arange(R), torch.arange(K)).unbind(1)
        df = pd.DataFrame({
            "layer": torch.tensor(self.layers)[li].numpy(), "row": ri.numpy(), "rank": ki.numpy(),
            "call": self.call[ri].numpy(), "batch": self.batch[ri].numpy(), "position": self.positions[ri].numpy(),
            "token_id": self.token_ids[ri].numpy(), "expert": self.experts.flatten().numpy(),
            "weight": self.weights.flatten().numpy(), "margin": self.margin[li, ri].numpy(),
        })  # fmt: skip
        return df[df.expert >= 0].reset_index(drop=True)

    def check(self):
        """Per layer: rows where the rule's recomputation differs from the router (``router_mismatch``) and
        where the experts module received other experts (``ran_mismatch``; −1 when not observed)."""
        import pandas as pd

        ran_bad = [int((r.sort(-1).values != e.sort(-1).values).any(-1).sum()) if (r >= 0).all() else -1
                   for r, e in zip(self.ran, self.experts)]  # fmt: skip
        return pd.DataFrame({"layer": list(self.layers), "hook": [N.name(l, "mlp.router") for l in self.layers],
                             "rows": [self.token_ids.numel()] * len(self.layers),
                             "router_mismatch": (~self.agrees).sum(1).tolist(), "ran_mismatch": ran_bad})  # fmt: skip

    @property
    def verified(self) -> bool:
        """Every decision equals the rule's recomputation and what the experts module received."""
        df = self.check()
        return bool((df.router_mismatch == 0).all() and (df.ran_mismatch == 0).all())


def rows(cap) -> RoutingRows:
    """The routing a capture recorded as :class:`RoutingRows` (what every analysis takes)."""
    if isinstance(cap, RoutingRows):
        return cap
    from ..core.capture import Capture

    if not isinstance(cap, Capture):
        raise ProbeError(f"routing analyses take a capture with Routing() or RoutingRows, got {type(cap).__name__}")
    layers = cap.layers("mlp.router.experts")
    if not layers:
        raise ProbeError("this capture holds no routing: capture with workbench.Routing()")

    if any(N.name(layers[0], f"mlp.router.{p}") not in cap for p in _PARTS):
        raise ProbeError("this capture kept only some routing names; capture Routing() without a names_filter for analyses")
    calls = cap._calls
    per = {p: [cap.per_call(N.name(l, f"mlp.router.{p}")) for l in layers] for p in _PARTS}
    if any(len(v) != len(calls) for vs in per.values() for v in vs):
        raise ProbeError("some forward calls did not run every recorded MoE layer; capture whole forward passes")
    width = max(v.shape[-1] for vs in per["experts"] for v in vs)

    def flat(part: str) -> torch.Tensor:  # [L, R, ...]: calls in order, each call's (sequence, token) rows
        out = []
        for vs in per[part]:
            ts = [v.reshape(-1, *v.shape[2:]) for v in vs]
            if part in ("experts", "weights", "ran"):  # k may change between calls (TopK edits)
                fill = torch.nan if ts[0].dtype.is_floating_point else -1
                ts = [torch.nn.functional.pad(t, (0, width - t.shape[-1]), value=fill) for t in ts]
            out.append(torch.cat(ts))
        return torch.stack(out)

    meta = lambda f: torch.cat([f(c).reshape(-1) for c in calls])  # noqa: E731
    out = RoutingRows(
        layers=tuple(layers), n_experts=max(rs.n_experts for rs in cap.model.spec.routers if rs.layer in layers),
        token_ids=meta(lambda c: c.token_ids),
        positions=meta(lambda c: c.q_pos[None, :] - c.first_real[:, None]),
        batch=meta(lambda c: torch.arange(c.batch)[:, None].expand(c.batch, c.q_pos.numel())),
        call=meta(lambda c: torch.full((c.batch, c.q_pos.numel()), c.index)),
        **{p: flat(p) for p in _PARTS},
    )  # fmt: skip
    real = meta(lambda c: c.real)  # padding tokens are routed too, but they are not text: leave them out of every analysis
    return out if bool(real.all()) else out.select(real)


DEFAULT_PROBES["routing"] = lambda model, names: Routing(layers=sorted({N.split(n)[0] for n in names})).bind(model)


def routing_rows(model, ids: torch.Tensor, edits: Sequence = ()) -> "RoutingRows":
    """The :class:`RoutingRows` of one forward pass over ``ids`` (``[1, T]``), under ``edits`` (the routing view
    and the dashboard's routing tab show them)."""
    with intervene(model, *edits) if edits else nullcontext(), capture(model, Routing()) as cap, torch.no_grad():
        model.hf(input_ids=ids, use_cache=False)
    return rows(cap)


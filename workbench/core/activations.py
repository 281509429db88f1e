"""``Activations``: the probe that records module tensors — the residual stream, attention and MLP
outputs, per-head outputs (``attn.hook_z``), MLP hidden activations — in full for short inputs, or as
declared reductions (``.norm``, ``.max_abs``, ``.topk`` / ``.topk_dims``) at any length."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from . import names as N
from ..base.errors import ProbeError
from .hooks import DEFAULT_PROBES, SITE_OF, Bound, Call, Probe


@dataclass(frozen=True)
class Activations(Probe):
    """Record module tensors by name: ``Activations("blocks.*.hook_resid_post")`` keeps every layer's
    residual output ``[batch, row, d_model]``; ``Activations("blocks.*.hook_resid_post.norm")`` keeps its
    L2 norm per token ``[batch, row]`` (also ``.max_abs``, and ``.topk`` / ``.topk_dims``: the ``k`` entries
    of largest |x|). ``names``: a name, glob, list or callable (see :mod:`workbench.names`). Full tensors
    count against the capture's ``max_elements`` before each forward call runs."""

    names: Any = "blocks.*.hook_resid_post"
    k: int = 8

    def bind(self, model) -> "BoundActivations":
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ProbeError(f"Activations: k must be a positive int, got {self.k!r}")
        known = [n for n in N.available(model.spec) if N.point(N.split(n)[1]).family == "activation"]
        N.check_filter(self.names, known)
        keep = N.matcher(self.names)
        targets = [n for n in known if keep(n)]
        if not targets:
            raise ProbeError(f"Activations: {self.names!r} selects no module tensor of this model (names like blocks.3.hook_resid_post)")
        return BoundActivations(model, targets, self.k)


def _base(suffix: str) -> tuple[str, str | None]:
    """``"hook_resid_post.norm"`` → ``("hook_resid_post", "norm")``."""
    base, _, red = suffix.rpartition(".")
    if red in N.REDUCTIONS and base in N.REDUCIBLE:
        return base, red
    return suffix, None


class BoundActivations(Bound):
    def __init__(self, model, targets: list[str], k: int):
        self.model, self.k = model, k
        self.targets = targets
        self.want: dict[tuple[str, int], list[tuple[str, str | None]]] = {}
        for n in targets:
            layer, suffix = N.split(n)
            base, red = _base(suffix)
            self.want.setdefault((SITE_OF[base], layer), []).append((n, red))
        self.sites = frozenset(self.want)
        self._widths = {site: _width(model, *site) for site in self.want}

    def names(self) -> list[str]:
        return list(self.targets)

    def narrow(self, keep):
        targets = [n for n in self.targets if keep(n)]
        return BoundActivations(self.model, targets, self.k) if targets else None

    def begin_call(self, call: Call) -> None:
        rows = call.batch * call.q_pos.numel()
        for site, wants in self.want.items():
            full = [n for n, red in wants if red is None]
            if full:
                self.session_capture._charge(rows * self._widths[site] * len(full), ", ".join(full))

    def begin(self, session) -> None:
        self.session_capture = session.capture

    def observe(self, site: str, layer: int, value: torch.Tensor, call: Call) -> None:
        x = value.detach()
        for name, red in self.want[(site, layer)]:
            if red is None:
                self.emit(name, x.to("cpu", copy=True), call)
            elif red == "norm":
                self.emit(name, x.float().norm(dim=-1).cpu(), call)
            elif red == "max_abs":
                self.emit(name, x.abs().amax(dim=-1).float().cpu(), call)
            else:
                k = min(self.k, x.shape[-1])
                dims = x.abs().topk(k, dim=-1).indices
                self.emit(name, (x.gather(-1, dims).float() if red == "topk" else dims).cpu(), call)


def _width(model, site: str, layer: int) -> int:
    """Elements per token of a site's tensor."""
    spec = model.spec
    if site == "z":
        return model.hf.get_submodule(spec.out_proj_paths[layer]).in_features
    if site == "mlp_post":
        return model.hf.get_submodule(spec.mlp_down_paths[layer]).in_features
    return spec.hidden_size


DEFAULT_PROBES["activation"] = lambda model, names: Activations(names=list(names)).bind(model)

"""Attention interventions, applied inside the backend. Each validates against the ModelSpec before
any forward pass and labels itself (``label``) so results say which edit produced them."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import torch

from ..errors import ProbeError
from .plan import HeadEdit, LayerPlan

Head = tuple[int, int]
ABLATION_MODES = ("zero", "mean", "uniform")


def _query_heads(spec, heads: Iterable[Head], unit: str, what: str) -> list[Head]:
    """Validated (layer, query head) pairs; ``unit="kv"`` expands each KV head to its query-head group."""
    heads = [tuple(int(x) for x in h) for h in heads]
    if not heads:
        raise ProbeError(f"{what}: no heads given")
    if unit not in ("query", "kv"):
        raise ProbeError(f"{what}: unit must be 'query' or 'kv', got {unit!r}")
    out: list[Head] = []
    for layer, h in heads:
        if unit == "kv":
            if not 0 <= h < spec.n_kv_heads:
                raise ProbeError(
                    f"{what}: KV head {h} does not exist (layer {layer} has KV heads 0..{spec.n_kv_heads - 1})"
                    + (f"; {h} is a query head index — pass unit='query'" if h < spec.n_heads else "")
                )
            spec.check_head(layer, 0, what=what)
            out += [(layer, h * spec.group_size + g) for g in range(spec.group_size)]
        else:
            spec.check_head(layer, h, what=what)
            out.append((layer, h))
    return out


def _key_positions(keys, what: str) -> torch.Tensor:
    """Non-empty, non-negative key positions, or a clear error naming the edit."""
    t = _positions(keys)
    if t is None or not t.numel():
        raise ProbeError(f"{what}: give at least one key position")
    return t


def _positions(positions) -> torch.Tensor | None:
    if positions is None:
        return None
    t = torch.as_tensor(list(positions), dtype=torch.long)
    if (t < 0).any():
        raise ProbeError("positions must be ≥ 0")
    return t


class _Edit:
    """Base: an edit is a planner the backend asks per layer."""

    heads: list[Head]

    def bind(self, model) -> "_Edit":
        raise NotImplementedError

    def _head_edits(self, layer: int) -> list[HeadEdit]:
        raise NotImplementedError

    def plan(self, layer: int, n_queries: int) -> LayerPlan | None:
        edits = self._head_edits(layer)
        return LayerPlan(edits=edits) if edits else None

    def receive(self, layer, stats, q_pos) -> None:  # edits record nothing
        pass


@dataclass
class HeadAblation(_Edit):
    """Ablate query heads. ``mode``: ``zero`` (head output zeroed), ``mean`` (output replaced by its
    mean over a reference set: pass ``reference`` texts or precomputed ``means``), ``uniform``
    (uniform attention over visible keys — Wu et al.'s "masking"). ``unit="kv"`` names KV heads.
    ``positions`` limits the ablation to those query positions."""

    heads: Sequence[Head]
    mode: str = "zero"
    positions: Sequence[int] | None = None
    unit: str = "query"
    reference: Sequence[str] | None = None
    means: Mapping[Head, torch.Tensor] | None = None
    _bound: list = field(default_factory=list, repr=False)

    @property
    def label(self) -> str:
        return f"head-ablation:{self.mode}"

    def bind(self, model) -> "HeadAblation":
        if self.mode not in ABLATION_MODES:
            raise ProbeError(f"HeadAblation: mode must be one of {ABLATION_MODES}, got {self.mode!r}")
        self._bound = _query_heads(model.spec, self.heads, self.unit, "HeadAblation")
        self._pos = _positions(self.positions)
        if self.mode == "mean":
            if self.means is None:
                if not self.reference:
                    raise ProbeError("HeadAblation(mode='mean') needs reference texts or precomputed means")
                from ..capture import head_output_means

                self.means = head_output_means(model, self.reference, layers={l for l, _ in self._bound})
            missing = [h for h in self._bound if h not in self.means]
            if missing:
                raise ProbeError(f"HeadAblation(mode='mean'): no mean for heads {missing}")
        return self

    def _head_edits(self, layer):
        return [
            HeadEdit(kind=self.mode, head=h, positions=self._pos, mean=None if self.means is None else self.means.get((l, h)))
            for l, h in self._bound
            if l == layer
        ]


@dataclass
class SinkCalibration(_Edit):
    """ACT calibration (Yu et al. 2024): attention on ``sink_keys`` scaled by ``beta`` ∈ (0, 1]; the
    removed mass goes to the other keys of each row in proportion to their attention."""

    heads: Sequence[Head]
    sink_keys: Sequence[int]
    beta: float = 0.4
    positions: Sequence[int] | None = None
    unit: str = "query"

    label = "sink-calibration"

    def bind(self, model) -> "SinkCalibration":
        if not 0 < self.beta <= 1:
            raise ProbeError(f"SinkCalibration: beta must lie in (0, 1], got {self.beta}")
        self._keys = _key_positions(self.sink_keys, "SinkCalibration (sink_keys)")
        self._bound = _query_heads(model.spec, self.heads, self.unit, "SinkCalibration")
        self._pos = _positions(self.positions)
        return self

    def _head_edits(self, layer):
        return [HeadEdit("calibrate", h, self._pos, keys=self._keys, beta=self.beta) for l, h in self._bound if l == layer]


@dataclass
class SpanMask(_Edit):
    """Remove key positions from heads' view (the rest renormalise)."""

    heads: Sequence[Head]
    keys: Sequence[int]
    positions: Sequence[int] | None = None
    unit: str = "query"

    label = "span-mask"

    def bind(self, model) -> "SpanMask":
        self._keys = _key_positions(self.keys, "SpanMask")
        self._bound = _query_heads(model.spec, self.heads, self.unit, "SpanMask")
        self._pos = _positions(self.positions)
        return self

    def _head_edits(self, layer):
        return [HeadEdit("mask_keys", h, self._pos, keys=self._keys) for l, h in self._bound if l == layer]


@dataclass
class StreamingHeads(_Edit):
    """DuoAttention streaming emulation: heads see only the first ``sink`` and the last ``recent`` keys."""

    heads: Sequence[Head]
    sink: int = 64
    recent: int = 256
    unit: str = "query"

    label = "streaming"

    def bind(self, model) -> "StreamingHeads":
        if self.sink < 0 or self.recent < 1:
            raise ProbeError(f"StreamingHeads: need sink ≥ 0 and recent ≥ 1 (got {self.sink}, {self.recent})")
        self._bound = _query_heads(model.spec, self.heads, self.unit, "StreamingHeads")
        return self

    def _head_edits(self, layer):
        return [HeadEdit("streaming", h, sink=self.sink, recent=self.recent) for l, h in self._bound if l == layer]

"""Attention interventions, applied inside the backend. Each is an immutable spec: ``bind(model)``
validates it against the ModelSpec before any forward pass and returns a new bound edit (a spec
reused on a second model is bound afresh — a mean ablation computes that model's means). ``label``
names the edit in results."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from ..base.errors import ProbeError
from ..core.hooks import Bound, Edit
from .request import HeadEdit, LayerRequest

Head = tuple[int, int]
ABLATION_MODES = ("zero", "mean", "uniform")


def _query_heads(spec, heads, unit: str, what: str) -> list[Head]:
    """Validated (layer, query head) pairs; ``unit="kv"`` expands each KV head to its query-head group."""
    pairs = spec.heads(heads, what=what, unit=unit)
    if unit == "kv":
        return [(l, h * spec.group_size + g) for l, h in pairs for g in range(spec.group_size)]
    return pairs


def _positions(positions, what: str) -> torch.Tensor | None:
    if positions is None:
        return None
    from ..models.spec import _index

    t = torch.as_tensor([_index(p, f"{what}: position") for p in positions], dtype=torch.long)
    if (t < 0).any():
        raise ProbeError(f"{what}: positions must be ≥ 0")
    return t


def _key_positions(keys, what: str) -> torch.Tensor:
    """Non-empty, non-negative key positions, or a clear error naming the edit."""
    t = _positions(list(keys) if keys is not None else None, what)
    if t is None or not t.numel():
        raise ProbeError(f"{what}: give at least one key position")
    return t


class BoundHeadEdits(Bound):
    """Any attention edit bound to a model: per layer, the :class:`HeadEdit` list the backend applies."""

    is_edit = True

    def __init__(self, label: str, edits: list[tuple[int, HeadEdit]]):
        self.label = label
        self.by_layer: dict[int, list[HeadEdit]] = {}
        for layer, e in edits:
            self.by_layer.setdefault(layer, []).append(e)
        self.sites = frozenset(("attn", l) for l in self.by_layer)

    def attention(self, layer, call):
        edits = self.by_layer.get(layer)
        return LayerRequest(edits=list(edits)) if edits else None


@dataclass(frozen=True)
class HeadAblation(Edit):
    """Ablate query heads. ``mode``: ``zero`` (head output zeroed), ``mean`` (output replaced by its
    mean over a reference set: pass ``reference`` texts, or precomputed ``means`` {(layer, head): [Dv]}),
    ``uniform`` (uniform attention over visible keys — Wu et al.'s "masking"). Heads are (layer, head)
    pairs or names like ``"L17H3"``; ``unit="kv"`` names KV heads. ``positions`` limits the ablation to
    those query positions."""

    heads: Sequence[Head]
    mode: str = "zero"
    positions: Sequence[int] | None = None
    unit: str = "query"
    reference: Sequence[str] | None = None
    means: Mapping[Head, torch.Tensor] | None = None

    @property
    def label(self) -> str:
        return f"head-ablation:{self.mode}"

    def bind(self, model) -> BoundHeadEdits:
        if self.mode not in ABLATION_MODES:
            raise ProbeError(f"HeadAblation: mode must be one of {ABLATION_MODES}, got {self.mode!r}")
        if self.mode != "mean" and (self.reference is not None or self.means is not None):
            raise ProbeError(f"HeadAblation: reference and means apply only to mode='mean' (mode is {self.mode!r})")
        heads = _query_heads(model.spec, self.heads, self.unit, "HeadAblation")
        pos = _positions(self.positions, "HeadAblation")
        means = None
        if self.mode == "mean":
            if self.means is not None:
                if not isinstance(self.means, Mapping):
                    raise ProbeError("HeadAblation(mode='mean'): means must be a mapping {(layer, head): tensor [Dv]}")
                means = dict(self.means)
            elif self.reference is not None:
                if isinstance(self.reference, str):
                    raise ProbeError("HeadAblation(mode='mean'): reference must be a list of texts, not one string")
                means = head_output_means(model, self.reference, layers={l for l, _ in heads})
            else:
                raise ProbeError("HeadAblation(mode='mean') needs reference texts or precomputed means")
            missing = [h for h in heads if h not in means]
            if missing:
                raise ProbeError(f"HeadAblation(mode='mean'): no mean for heads {missing}")
            means = {(l, h): _mean_vector(model, l, h, means[(l, h)]) for l, h in heads}
        return BoundHeadEdits(self.label, [
            (l, HeadEdit(kind=self.mode, head=h, positions=pos, mean=None if means is None else means[(l, h)]))
            for l, h in heads
        ])  # fmt: skip


@dataclass(frozen=True)
class SinkCalibration(Edit):
    """ACT calibration (Yu et al. 2024): attention on ``sink_keys`` scaled by ``beta`` ∈ (0, 1]; the
    removed mass goes to the other keys of each row in proportion to their attention."""

    heads: Sequence[Head]
    sink_keys: Sequence[int]
    beta: float = 0.4
    positions: Sequence[int] | None = None
    unit: str = "query"

    label = "sink-calibration"

    def bind(self, model) -> BoundHeadEdits:
        if isinstance(self.beta, bool) or not isinstance(self.beta, (int, float)) or not 0 < self.beta <= 1:
            raise ProbeError(f"SinkCalibration: beta must lie in (0, 1], got {self.beta!r}")
        keys = _key_positions(self.sink_keys, "SinkCalibration (sink_keys)")
        heads = _query_heads(model.spec, self.heads, self.unit, "SinkCalibration")
        pos = _positions(self.positions, "SinkCalibration")
        return BoundHeadEdits(self.label, [(l, HeadEdit("calibrate", h, pos, keys=keys, beta=float(self.beta))) for l, h in heads])


@dataclass(frozen=True)
class SpanMask(Edit):
    """Remove key positions from heads' view (the rest renormalise)."""

    heads: Sequence[Head]
    keys: Sequence[int]
    positions: Sequence[int] | None = None
    unit: str = "query"

    label = "span-mask"

    def bind(self, model) -> BoundHeadEdits:
        keys = _key_positions(self.keys, "SpanMask")
        heads = _query_heads(model.spec, self.heads, self.unit, "SpanMask")
        pos = _positions(self.positions, "SpanMask")
        return BoundHeadEdits(self.label, [(l, HeadEdit("mask_keys", h, pos, keys=keys)) for l, h in heads])


@dataclass(frozen=True)
class StreamingHeads(Edit):
    """DuoAttention streaming emulation: heads see only the first ``sink`` and the last ``recent`` keys."""

    heads: Sequence[Head]
    sink: int = 64
    recent: int = 256
    unit: str = "query"

    label = "streaming"

    def bind(self, model) -> BoundHeadEdits:
        from ..models.spec import _index

        sink, recent = _index(self.sink, "StreamingHeads: sink"), _index(self.recent, "StreamingHeads: recent")
        if sink < 0 or recent < 1:
            raise ProbeError(f"StreamingHeads: need sink ≥ 0 and recent ≥ 1 (got {sink}, {recent})")
        heads = _query_heads(model.spec, self.heads, self.unit, "StreamingHeads")
        return BoundHeadEdits(self.label, [(l, HeadEdit("streaming", h, sink=sink, recent=recent)) for l, h in heads])


def _mean_vector(model, layer: int, head: int, mean) -> torch.Tensor:
    """A head's replacement output: a float tensor of the head's value size ``[Dv]``, or a clear error."""
    path = model.spec.out_proj_paths[layer] if model.spec.out_proj_paths else None
    dv = model.hf.get_submodule(path).in_features // model.spec.n_heads if path else model.spec.head_dim
    t = torch.as_tensor(mean) if isinstance(mean, (torch.Tensor, list, tuple)) else None
    if t is None or not (t.dtype.is_floating_point or t.dtype in (torch.int32, torch.int64)) or tuple(t.shape) != (dv,):
        got = f"shape {tuple(t.shape)}" if t is not None else type(mean).__name__
        raise ProbeError(f"HeadAblation(mode='mean'): the mean of head ({layer}, {head}) must be a tensor of shape ({dv},), got {got}")
    return t.detach().float()


# --- mean ablation references ------------------------------------------------------------------------------


class _BoundOutputMeans(Bound):
    """Sums each head's attention output over the reference tokens (the backend's ``record_outputs``)."""

    def __init__(self, layers):
        self.sites = frozenset(("attn", l) for l in layers)
        self.sums: dict[int, torch.Tensor] = {}
        self.counts: dict[int, int] = {}

    def attention(self, layer, call):
        return LayerRequest(record_outputs=True)

    def attention_done(self, layer, stats, call):
        self.sums[layer] = self.sums.get(layer, 0) + stats["output_sum"].cpu()
        self.counts[layer] = self.counts.get(layer, 0) + int(stats["output_count"])


def _reference_items(texts) -> tuple:
    """A mean-ablation reference as a hashable tuple (the cache key): each item a text, or a sequence of token
    ids (a list, tuple or 1-D tensor; studies pass the task's tokenised texts) as a tuple of ints."""
    if isinstance(texts, str) or isinstance(texts, torch.Tensor) and texts.dim() < 2 or not texts:
        raise ProbeError("reference must be a non-empty list of texts or of token-id lists (one per text)")
    items = []
    for t in texts:
        if isinstance(t, str):
            items.append(t)
            continue
        if isinstance(t, torch.Tensor):
            t = t.flatten().tolist() if t.dim() <= 2 and (t.dim() < 2 or t.shape[0] == 1) else None
        elif isinstance(t, (int, float)) and not isinstance(t, bool):
            raise ProbeError("reference: a flat list of token ids is one text; pass a list of texts or of id lists: [ids]")
        if not isinstance(t, (list, tuple)) or not t or not all(isinstance(i, int) and not isinstance(i, bool) for i in t):
            raise ProbeError(f"reference items must be texts or non-empty lists of integer token ids, got {type(t).__name__}")
        items.append(tuple(t))
    return tuple(items)


@torch.no_grad()
def head_output_means(model, texts, layers=None) -> dict[Head, torch.Tensor]:
    """Mean attention output of every head over the tokens of ``texts`` (``mode="mean"`` ablation); each
    item a text or a list of token ids.
    Cached per model and reference set: binding the same reference twice does not rerun it."""
    from ..core.hooks import HookManager, attached

    items = _reference_items(texts)
    layers = tuple(sorted(range(model.spec.n_layers) if layers is None else model.spec.layers(layers, what="head_output_means")))
    # means taken under an active edit (inside intervene) describe the edited model: never cache or reuse them there
    edited = any(s.edits for s in HookManager.of(model).sessions())
    cache = {} if edited else model.__dict__.setdefault("_mean_cache", {})
    key = (items, layers)
    if key not in cache:
        bound = _BoundOutputMeans(layers)
        with attached(model, [bound]):
            for t in items:
                model.forward_text(list(t) if isinstance(t, tuple) else t)
        cache[key] = {(l, h): (bound.sums[l][h] / bound.counts[l]).float() for l in bound.sums for h in range(model.spec.n_heads)}
    return cache[key]

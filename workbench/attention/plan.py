"""What the backend must compute and change in one layer: the meeting point of probes and edits."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

BIG = 2**30  # "unlimited" window in span triples (start, end, window)


@dataclass
class HeadEdit:
    """One edit on one query head; ``positions`` limits it to those absolute query positions."""

    kind: str  # zero | mean | uniform | calibrate | mask_keys | streaming
    head: int
    positions: torch.Tensor | None = None
    mean: torch.Tensor | None = None  # mean: replacement output [Dv]
    keys: torch.Tensor | None = None  # calibrate: sink keys; mask_keys: removed keys
    beta: float = 1.0
    sink: int = 0  # streaming: first `sink` keys stay visible
    recent: int = 0  # streaming: and the last `recent` keys


@dataclass
class LayerPlan:
    """Statistics requested and edits active for one layer during one forward call."""

    record: bool = False
    key_columns: torch.Tensor | None = None  # [NK] absolute key positions
    spans: torch.Tensor | None = None  # [NS, 3] (start, end, window)
    topk: int = 1
    tiles: tuple[tuple[int, int, int, int], ...] = ()
    key_mass: bool = False  # attention each key receives, summed over rows (α_k for every key)
    record_outputs: bool = False  # sum of per-head outputs (for mean ablation references)
    edits: list[HeadEdit] = field(default_factory=list)
    # an edit that computes the whole layer differentiably (DuoAttention gate training):
    # called as gated(q, k, v, scale, dense_mask, q_pos, key_pos) -> out [B, Hq, M, Dv]
    gated: object | None = None

    @property
    def active(self) -> bool:
        return self.record or self.record_outputs or bool(self.edits) or self.gated is not None

    def edits_of(self, *kinds: str) -> list[HeadEdit]:
        return [e for e in self.edits if e.kind in kinds]

    @property
    def changes_probabilities(self) -> bool:
        return bool(self.edits_of("uniform", "calibrate", "mask_keys", "streaming"))

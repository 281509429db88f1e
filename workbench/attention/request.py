"""What the backend must compute and change in one layer: the meeting point of probes and edits."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..base.errors import ProbeError
from ..kernels.semantics import Edit as HeadEdit  # the one per-head edit type, defined beside its semantics


@dataclass
class LayerRequest:
    """Statistics requested and edits active for one layer during one forward call."""

    record: bool = False
    key_columns: torch.Tensor | None = None  # [NK] absolute key positions
    spans: torch.Tensor | None = None  # [NS, 3] (start, end, window)
    topk: int = 1
    tiles: tuple[tuple[int, int, int, int], ...] = ()
    key_mass: bool = False  # attention each key receives, summed over rows (α_k for every key)
    record_outputs: bool = False  # sum of per-head outputs (for mean ablation references)
    z_norm: bool = False  # L2 norm of each head's output per row (computed from the output, any path)
    keep_qk: bool = False  # hand the layer's (post-RoPE) queries and new keys to the recorder (drill-down)
    query_valid: torch.Tensor | None = None  # [B, M] False for padding query rows: left out of key_mass / key_count
    distance_moments: bool = False  # dist_sum / dist_sq_sum [B, Hq, M]: Σ p·(q_pos − key_pos), Σ p·(…)²
    row_keys: torch.Tensor | None = None  # [B, M] absolute key per row (-1: none) -> row_key_prob [B, Hq, M]
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


def _union(parts: list[list], key=lambda x: x) -> tuple[list, list[list[int]]]:
    """Ordered union of ``parts`` and, per part, the index of each of its items in the union."""
    merged, where, index = [], {}, []
    for items in parts:
        idx = []
        for it in items:
            k = key(it)
            if k not in where:
                where[k] = len(merged)
                merged.append(it)
            idx.append(where[k])
        index.append(idx)
    return merged, index


def merge(fragments: list[LayerRequest]) -> tuple[LayerRequest, list]:
    """One request that computes what every fragment asks (union of key columns, spans and tiles, the
    largest top-k) and applies every fragment's edits; plus, per fragment, a function that cuts the
    computed statistics down to exactly what that fragment asked for, in its own order."""
    if len(fragments) == 1:
        return fragments[0], [lambda st: st]
    merged = LayerRequest()
    recorders = [f for f in fragments if f.record]
    cols, col_idx = _union([f.key_columns.tolist() if f.key_columns is not None else [] for f in recorders])
    spans, span_idx = _union([f.spans.tolist() if f.spans is not None else [] for f in recorders], key=tuple)
    tiles, tile_idx = _union([list(f.tiles) for f in recorders])
    gated = [f.gated for f in fragments if f.gated is not None]
    if len(gated) > 1:
        raise ProbeError("two gated (DuoAttention) mixes on one layer; open one GatedMix at a time")
    merged.record = bool(recorders)
    merged.key_columns = torch.tensor(cols, dtype=torch.long) if cols else None
    merged.spans = torch.tensor(spans, dtype=torch.long) if spans else None
    merged.tiles = tuple(tiles)
    merged.topk = max([f.topk for f in recorders], default=1)
    merged.key_mass = any(f.key_mass for f in recorders)
    merged.record_outputs = any(f.record_outputs for f in fragments)
    merged.z_norm = any(f.z_norm for f in fragments)
    merged.keep_qk = any(f.keep_qk for f in fragments)
    merged.query_valid = next((f.query_valid for f in recorders if f.query_valid is not None), None)
    merged.distance_moments = any(f.distance_moments for f in recorders)
    keys = [f.row_keys for f in recorders if f.row_keys is not None]
    merged.row_keys = keys[0] if keys else None  # one definition per call (induction keys from the token ids)
    merged.edits = [e for f in fragments for e in f.edits]
    merged.gated = gated[0] if gated else None
    views, r = [], 0
    for f in fragments:
        if not f.record:
            views.append(lambda st: st)
            continue
        views.append(_view(f, col_idx[r], span_idx[r], tile_idx[r]))
        r += 1
    return merged, views


def _view(f: LayerRequest, cols: list[int], spans: list[int], tiles: list[int]):
    def view(st: dict) -> dict:
        out = {k: v for k, v in st.items() if not k.startswith("tile")}
        out["topk_idx"], out["topk_prob"] = st["topk_idx"][..., : f.topk], st["topk_prob"][..., : f.topk]
        if "col_prob" in st:
            if cols:
                out["col_prob"], out["col_visible"] = st["col_prob"][..., cols], st["col_visible"][..., cols]
            else:
                del out["col_prob"], out["col_visible"]
        if "span_mass" in st:
            if spans:
                out["span_mass"] = st["span_mass"][..., spans]
            else:
                del out["span_mass"]
        for mine, t in enumerate(tiles):
            out[f"tile{mine}"] = st[f"tile{t}"]
        if not f.key_mass:
            out.pop("key_mass", None), out.pop("key_count", None)
        if not f.distance_moments:
            out.pop("dist_sum", None), out.pop("dist_sq_sum", None)
        if f.row_keys is None:
            out.pop("row_key_prob", None)
        return out

    return view

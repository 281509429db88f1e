"""``AttentionStats``: the probe that asks the attention backend for per-head reductions.

It emits, per recorded layer, the names ``blocks.{l}.attn.*`` (see :mod:`workbench.names`): row
statistics ``[batch, head, row]`` (entropy, lse, top1, top1_prob, span masses, hook_z_norm), top-k,
Gu's α for tracked keys, key mass for every key and exact tiles.

Key positions (``sink_keys``, ``key_positions``, the keys of ``key_mass``) count from each sequence's
first real token: with left padding, α₀ is the attention on the first real token, not on the pad.
Padding rows (query tokens that are padding) are not counted in α, key mass or key counts. Row
indices (``top1``, tiles, ``q_pos``) are cache positions, i.e. indices into the input ids.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch

from ..core import names as N
from ..base.errors import ProbeError
from ..core.hooks import DEFAULT_PROBES, Bound, Call, Probe
from ..kernels.semantics import BIG
from ..models.spec import _index
from .request import LayerRequest

#: the head-type statistics (AttentionStats(taxonomy=True)), names under blocks.{l}.attn.
TAXONOMY = ("self_mass", "prev_mass", "local_mass", "dist_mean", "dist_var", "induction_mass")


@dataclass(frozen=True)
class Window:
    """A span relative to each query: the last ``width`` keys up to and including the query (MoA-style)."""

    width: int


@dataclass(frozen=True)
class AttentionStats(Probe):
    """Per-(layer, query head) reductions computed inside the attention kernel.

    - ``sink_keys``: track the first k keys (Gu's α_k → ``attn.alpha``);
    - ``key_positions``: further key positions to track the same way;
    - ``topk``: per-row top-k key indices and probabilities (``attn.topk``, k > 1; ``attn.top1`` always);
    - ``spans``: name → ``(start, end)`` key range or :class:`Window` — mass per row (``attn.span.<name>``);
    - ``tiles``: exact ``(q_start, q_end, k_start, k_end)`` windows of the attention matrix (``attn.tile.<i>``);
    - ``layers``: which layers to record (default all);
    - ``key_mass``: attention every key receives, summed over rows (``attn.key_mass``, ``attn.key_count``);
    - ``taxonomy``: head-type statistics per row (``attn.self_mass``, ``prev_mass``, ``local_mass`` within
      ``local_window`` keys, ``dist_mean``, ``dist_var``, ``induction_mass``), exactly, at any length;
    - ``qk``: also keep the layer's post-RoPE queries and keys (``attn.hook_q``, ``attn.hook_k``; full tensors,
      counted against the capture's budget) — any attention row can then be recomputed without a forward pass.
    """

    sink_keys: int = 4
    key_positions: Sequence[int] = ()
    topk: int = 1
    spans: Mapping[str, tuple[int, int] | Window] = field(default_factory=dict)
    tiles: Sequence[tuple[int, int, int, int]] = ()
    layers: Sequence[int] | None = None
    key_mass: bool = False
    taxonomy: bool = False
    local_window: int = 8
    qk: bool = False

    def bind(self, model) -> "BoundAttention":
        spec = model.spec
        for what, v, lo in (("sink_keys", self.sink_keys, 0), ("topk", self.topk, 1)):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ProbeError(f"AttentionStats: {what} must be an int ≥ {lo}, got {v!r}")
        layers = tuple(range(spec.n_layers)) if self.layers is None else spec.layers(self.layers, what="AttentionStats")
        if isinstance(self.key_positions, (str, bytes)) or not hasattr(self.key_positions, "__iter__"):
            raise ProbeError(f"AttentionStats: key_positions must be a list of key positions, got {self.key_positions!r}")
        keys = list(range(self.sink_keys)) + [_int(p, "key_positions") for p in self.key_positions]
        if any(p < 0 for p in keys):
            raise ProbeError(f"AttentionStats: key positions must be ≥ 0, got {sorted(p for p in keys if p < 0)}")
        spans, span_names = [], []
        for name, sp in dict(self.spans).items():
            if not isinstance(name, str) or not name.isidentifier():
                raise ProbeError(f"AttentionStats: span names must be identifiers (they become attn.span.<name>), got {name!r}")
            if isinstance(sp, Window):
                width = _int(sp.width, f"span {name!r} window")
                if width < 1:
                    raise ProbeError(f"AttentionStats: span {name!r} window width must be ≥ 1")
                spans.append((0, BIG, width))
            else:
                try:
                    a, b = (_int(x, f"span {name!r}") for x in sp)
                except (TypeError, ValueError):
                    raise ProbeError(f"AttentionStats: span {name!r} must be (start, end) or Window(w), got {sp!r}") from None
                if not 0 <= a < b:
                    raise ProbeError(f"AttentionStats: span {name!r} = {sp} must satisfy 0 ≤ start < end")
                spans.append((a, b, BIG))
            span_names.append(name)
        tiles = []
        for t in self.tiles:
            try:
                q0, q1, k0, k1 = (_int(x, "tile") for x in t)
            except (TypeError, ValueError):
                raise ProbeError(f"AttentionStats: a tile is (q_start, q_end, k_start, k_end), got {t!r}") from None
            if not (0 <= q0 < q1 and 0 <= k0 < k1) or (q1 - q0) * (k1 - k0) > 1 << 20:
                raise ProbeError(f"AttentionStats: tile {tuple(t)} must be non-empty ranges of at most 2^20 cells")
            tiles.append((q0, q1, k0, k1))
        return BoundAttention(model, layers, tuple(keys), len(self.key_positions), tuple(span_names),
                              torch.tensor(spans, dtype=torch.long) if spans else None, self.topk, tuple(tiles), self.key_mass,
                              bool(self.qk), _int(self.local_window, "local_window") if self.taxonomy else None)  # fmt: skip


def _int(x, what: str) -> int:
    """:func:`workbench.models.spec._index` (refuses floats, float tensors and bools) with this probe's name."""
    return _index(x, f"AttentionStats: {what}")


class BoundAttention(Bound):
    """An ``AttentionStats`` bound to one model."""

    def __init__(self, model, layers, keys, n_explicit, span_names, spans, topk, tiles, key_mass, qk=False, local_window=None):
        self.model, self.layers, self.keys, self.n_explicit = model, tuple(layers), keys, n_explicit
        self.span_names, self.spans, self.topk, self.tiles, self.key_mass, self.qk = span_names, spans, topk, tiles, key_mass, qk
        self.local_window = local_window  # None: no head-type statistics
        if local_window is not None:
            if local_window < 1:
                raise ProbeError(f"AttentionStats: local_window must be ≥ 1, got {local_window}")
            own = torch.tensor([(0, BIG, 1), (0, BIG, 2), (0, BIG, local_window)], dtype=torch.long)  # self, +previous, local
            self._request_spans = own if spans is None else torch.cat([spans, own])
        else:
            self._request_spans = spans
        self._history = None
        self.sites = frozenset(("attn", l) for l in self.layers)
        self._layer_set = frozenset(self.layers)

    def _suffixes(self) -> list[str]:
        out = ["attn.entropy", "attn.lse", "attn.top1", "attn.top1_prob", "attn.hook_z_norm"]
        out += ["attn.topk", "attn.topk_prob"] if self.topk > 1 else []
        out += ["attn.alpha"] if self.keys else []
        out += ["attn.key_mass", "attn.key_count"] if self.key_mass else []
        out += [f"attn.span.{s}" for s in self.span_names] + [f"attn.tile.{i}" for i in range(len(self.tiles))]
        out += ["attn.hook_q", "attn.hook_k"] if self.qk else []
        out += [f"attn.{s}" for s in TAXONOMY] if self.local_window is not None else []
        return out

    def names(self) -> list[str]:
        return [N.name(l, s) for l in self.layers for s in self._suffixes()]

    def narrow(self, keep):
        layers = [l for l in self.layers if any(keep(N.name(l, s)) for s in self._suffixes())]
        if not layers:
            return None
        return BoundAttention(self.model, layers, self.keys, self.n_explicit, self.span_names, self.spans, self.topk, self.tiles,
                              self.key_mass, self.qk, self.local_window)  # fmt: skip

    def begin(self, session) -> None:
        self._capture = session.capture

    def begin_call(self, call: Call) -> None:
        if self.qk and self._capture is not None:
            spec = self.model.spec
            per_row = (spec.n_heads + spec.n_kv_heads) * spec.head_dim
            self._capture._charge(call.batch * call.q_pos.numel() * per_row * len(self.layers), "attn.hook_q/hook_k")
        length = int(call.q_pos[-1]) + 1 if call.q_pos.numel() else 0
        explicit = self.keys[len(self.keys) - self.n_explicit :]
        if explicit and max(explicit) >= length - int(call.first_real.max()):
            raise ProbeError(f"key position {max(explicit)} requested but the sequence has only "
                             f"{length - int(call.first_real.max())} real tokens")  # fmt: skip
        # tracked keys count from each sequence's first real token: one union of cache columns per call
        if self.keys:
            cols = call.first_real[:, None] + torch.tensor(self.keys)[None, :]  # [B, K]
            union, index = torch.unique(cols, return_inverse=True)
            self._cols, self._index = union, index
        # padding rows after a real token (right padding) see real keys: key mass must leave them out;
        # left-padding rows see nothing and need no mask
        real = call.real
        self._query_valid = real if bool((~real & (real.cumsum(1) > 0)).any()) else None
        if self.local_window is not None:
            self._row_keys = self._induction_keys(call)

    def skipped_call(self, call: Call) -> None:
        if self.local_window is not None:  # a decode step's induction key may point into the unrecorded prompt
            self._induction_keys(call)

    def _induction_keys(self, call: Call) -> torch.Tensor:
        """Each row's j*+1 (docs/definitions.md) from every token seen so far in this sequence (decode steps extend it)."""
        from ..kernels.semantics import induction_keys

        ids, real = call.token_ids, call.real
        start = int(call.q_pos[0]) if call.q_pos.numel() else 0
        if self._history is not None and self._history[0].shape[1] == start and self._history[0].shape[0] == ids.shape[0]:
            ids, real = torch.cat([self._history[0], ids], 1), torch.cat([self._history[1], real], 1)
        elif start:  # the earlier tokens were not seen (a forward on a prefilled cache): no history to match
            ids = torch.cat([torch.full((ids.shape[0], start), -1), ids], 1)
            real = torch.cat([torch.zeros(ids.shape[0], start, dtype=torch.bool), real], 1)
        self._history = (ids, real)
        valid = real & (ids >= 0)  # embeddings without ids match nothing
        return induction_keys(ids, q_pos=call.q_pos, valid=valid)

    def attention(self, layer: int, call: Call) -> LayerRequest | None:
        if layer not in self._layer_set:
            return None
        tax = self.local_window is not None
        return LayerRequest(record=True, key_columns=self._cols if self.keys else None, spans=self._request_spans, topk=self.topk,
                         tiles=self.tiles, key_mass=self.key_mass, z_norm=True, query_valid=self._query_valid, keep_qk=self.qk,
                         distance_moments=tax, row_keys=self._row_keys if tax else None)  # fmt: skip

    def attention_done(self, layer: int, st: dict, call: Call) -> None:
        emit = lambda suffix, value, pos=None: self.emit(N.name(layer, suffix), value, call, pos)  # noqa: E731
        real = call.real  # [B, M]
        emit("attn.entropy", st["entropy"].cpu())
        emit("attn.lse", st["lse"].cpu())
        emit("attn.top1", st["topk_idx"][..., 0].cpu())
        emit("attn.top1_prob", st["topk_prob"][..., 0].cpu())
        emit("attn.hook_z_norm", st["z_norm"].cpu())
        if self.topk > 1:
            emit("attn.topk", st["topk_idx"].cpu())
            emit("attn.topk_prob", st["topk_prob"].cpu())
        if self.keys:
            B, H, M, _ = st["col_prob"].shape
            idx = self._index.to(st["col_prob"].device)
            prob = st["col_prob"].gather(-1, idx[:, None, None, :].expand(B, H, M, -1))
            seen = st["col_visible"].gather(-1, idx[:, None, :].expand(B, M, -1)) & real.to(idx.device)[..., None]
            num = (prob.double() * seen[:, None].double()).sum(2).cpu()  # [B, H, K]
            emit("attn.alpha", (num, seen.sum(1).cpu()))
        for i, s in enumerate(self.span_names):
            emit(f"attn.span.{s}", st["span_mass"][..., i].cpu())
        for i in range(len(self.tiles)):
            parts = st[f"tile{i}"]
            if parts:
                emit(f"attn.tile.{i}", torch.cat([t for _, t in parts], dim=2).cpu(), torch.cat([q for q, _ in parts]).cpu())
        if self.local_window is not None:
            n = len(self.span_names)
            own, prev_and_own, local = (st["span_mass"][..., n + i] for i in range(3))
            emit("attn.self_mass", own.cpu())
            emit("attn.prev_mass", (prev_and_own - own).clamp_min(0).cpu())
            emit("attn.local_mass", local.cpu())
            mean = st["dist_sum"]
            emit("attn.dist_mean", mean.cpu())
            emit("attn.dist_var", (st["dist_sq_sum"].double() - mean.double() ** 2).clamp_min(0).float().cpu())
            emit("attn.induction_mass", st["row_key_prob"].cpu())
        if self.qk:  # [batch, row, head, d_head], as TransformerLens lays them out
            emit("attn.hook_q", st["q"].transpose(1, 2).to("cpu", copy=True))
            emit("attn.hook_k", st["k_new"].transpose(1, 2).to("cpu", copy=True))
        if self.key_mass:
            emit("attn.key_mass", _from_first_real(st["key_mass"].cpu(), call.first_real, st["kv_offset"]))
            emit("attn.key_count", _from_first_real(st["key_count"].cpu(), call.first_real, st["kv_offset"]))


def _from_first_real(t: torch.Tensor, first_real: torch.Tensor, kv_offset: int) -> torch.Tensor:
    """Place each sequence's cached keys (cache index ``j`` is position ``kv_offset + j``: a sliding-window
    layer keeps only its recent keys) on an axis where index 0 is the sequence's first real token."""
    if not kv_offset and not bool(first_real.any()):
        return t
    n = t.shape[-1]
    out = t.new_zeros(*t.shape[:-1], kv_offset + n)
    for b, f in enumerate(first_real.tolist()):
        start = kv_offset - f
        if start >= 0:
            out[b, ..., start : start + n] = t[b]
        else:
            out[b, ..., : n + start] = t[b, ..., -start:]
    return out


def _default(model, names: list[str]) -> BoundAttention:
    layers = sorted({N.split(n)[0] for n in names})
    suffixes = {N.split(n)[1] for n in names}
    key_mass = bool(suffixes & {"attn.key_mass", "attn.key_count"})
    return AttentionStats(layers=layers, key_mass=key_mass, taxonomy=bool(suffixes & {f"attn.{t}" for t in TAXONOMY})).bind(model)


DEFAULT_PROBES["attention"] = _default

"""``AttentionStats``: the probe that asks the backend for per-head reductions, and its result."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch

from ..errors import ProbeError
from .plan import BIG, LayerPlan


@dataclass(frozen=True)
class Window:
    """A span relative to each query: the last ``width`` keys up to and including the query (MoA-style)."""

    width: int


@dataclass
class AttentionStats:
    """Per-(layer, query head) reductions computed inside the attention kernel.

    - ``sink_keys``: attention probability of every row on the first k keys (column mass, Gu's α_k);
    - ``key_positions``: further absolute key positions to track the same way;
    - ``topk``: per-row top-k key indices and probabilities (always with entropy and log-sum-exp);
    - ``spans``: name → ``(start, end)`` absolute key range or :class:`Window` — mass per row;
    - ``tiles``: exact ``(q_start, q_end, k_start, k_end)`` windows of the attention matrix;
    - ``layers``: which layers to record (default all);
    - ``key_mass``: attention every key receives, summed over rows (:meth:`AttentionRecord.alpha_all`);
    - ``rows``: ``"all"`` or ``"decode"`` (only forward calls with one query row: generation steps;
      the prompt then runs on the fast SDPA path).
    """

    sink_keys: int = 4
    key_positions: Sequence[int] = ()
    topk: int = 1
    spans: Mapping[str, tuple[int, int] | Window] = field(default_factory=dict)
    tiles: Sequence[tuple[int, int, int, int]] = ()
    layers: Sequence[int] | None = None
    key_mass: bool = False
    rows: str = "all"

    def bind(self, model) -> "AttentionRecord":
        spec = model.spec
        if self.sink_keys < 0 or self.topk < 1:
            raise ProbeError(f"AttentionStats: sink_keys must be ≥ 0 and topk ≥ 1 (got {self.sink_keys}, {self.topk})")
        layers = tuple(range(spec.n_layers)) if self.layers is None else tuple(int(x) for x in self.layers)
        for layer in layers:
            spec.check_head(layer, 0, what="AttentionStats")
        keys = list(range(self.sink_keys)) + [int(p) for p in self.key_positions]
        if any(p < 0 for p in keys):
            raise ProbeError(f"AttentionStats: key positions must be ≥ 0, got {sorted(p for p in keys if p < 0)}")
        spans = []
        for name, sp in self.spans.items():
            if isinstance(sp, Window):
                if sp.width < 1:
                    raise ProbeError(f"AttentionStats: span {name!r} window width must be ≥ 1")
                spans.append((0, BIG, sp.width))
            else:
                a, b = sp
                if not 0 <= a < b:
                    raise ProbeError(f"AttentionStats: span {name!r} = {sp} must satisfy 0 ≤ start < end")
                spans.append((int(a), int(b), BIG))
        for t in self.tiles:
            q0, q1, k0, k1 = t
            if not (0 <= q0 < q1 and 0 <= k0 < k1) or (q1 - q0) * (k1 - k0) > 1 << 20:
                raise ProbeError(f"AttentionStats: tile {t} must be non-empty ranges of at most 2^20 cells")
        if self.rows not in ("all", "decode"):
            raise ProbeError(f"AttentionStats: rows must be 'all' or 'decode', got {self.rows!r}")
        return AttentionRecord(
            model=model,
            key_mass=self.key_mass,
            decode_only=self.rows == "decode",
            layers=layers,
            key_columns=torch.tensor(keys, dtype=torch.long),
            explicit_keys=torch.tensor([int(p) for p in self.key_positions], dtype=torch.long),
            span_names=tuple(self.spans),
            spans=torch.tensor(spans, dtype=torch.long) if spans else None,
            topk=self.topk,
            tiles=tuple(tuple(int(x) for x in t) for t in self.tiles),
        )


@dataclass(eq=False)
class AttentionRecord:
    """What a capture recorded. Row statistics are ``[layer, batch, head, row]`` over all captured
    forward calls (prefill rows, then one row per decode step); ``q_pos`` gives each row's position."""

    model: object
    layers: tuple[int, ...]
    key_columns: torch.Tensor
    explicit_keys: torch.Tensor  # key_positions the user named: must exist (sink_keys beyond T are just unseen)
    span_names: tuple[str, ...]
    spans: torch.Tensor | None
    topk: int
    tiles: tuple[tuple[int, int, int, int], ...]
    key_mass: bool = False
    decode_only: bool = False
    steps: list = field(default_factory=list)  # per forward call: (q_pos, {layer: stats})
    _pending: dict = field(default_factory=dict)

    # --- planner protocol (backend side) ---------------------------------------------------------
    def plan(self, layer: int, n_queries: int) -> LayerPlan | None:
        if layer not in self.layers or (self.decode_only and n_queries != 1):
            return None
        return LayerPlan(record=True, key_columns=self.key_columns if self.key_columns.numel() else None,
                         spans=self.spans, topk=self.topk, tiles=self.tiles, key_mass=self.key_mass)  # fmt: skip

    def receive(self, layer: int, stats: dict, q_pos: torch.Tensor) -> None:
        if layer in self._pending:  # a new forward call began
            self._flush()
        self._pending[layer] = (q_pos.cpu(), {k: (v if isinstance(v, list) else v.detach().cpu()) for k, v in stats.items()})
        if len(self._pending) == len(self.layers):
            self._flush()

    def _flush(self) -> None:
        if self._pending:
            q_pos = next(iter(self._pending.values()))[0]
            self.steps.append((q_pos, {l: s for l, (_, s) in self._pending.items()}))
            self._pending = {}

    # --- user side ---------------------------------------------------------------------------------
    def _steps(self):
        self._flush()
        if not self.steps:
            raise ProbeError("nothing was captured: run the model inside the `with workbench.capture(...)` block")
        return self.steps

    @property
    def q_pos(self) -> torch.Tensor:
        """Absolute position of each captured query row ``[R]``."""
        return torch.cat([qp for qp, _ in self._steps()])

    def stat(self, name: str) -> torch.Tensor:
        """A row statistic stacked as ``[layer, batch, head, row, ...]`` (``lse``, ``entropy``,
        ``topk_idx``, ``topk_prob``, ``col_prob``, ``span_mass``)."""
        steps = self._steps()
        if name not in steps[0][1][self.layers[0]]:
            raise ProbeError(f"statistic {name!r} was not recorded; available: {sorted(steps[0][1][self.layers[0]])}")
        return torch.stack([torch.cat([st[l][name] for _, st in steps], dim=2) for l in self.layers])

    @property
    def entropy(self) -> torch.Tensor:
        return self.stat("entropy")

    @property
    def lse(self) -> torch.Tensor:
        return self.stat("lse")

    @property
    def top1(self) -> torch.Tensor:
        """Top-1 key position per row ``[layer, batch, head, row]`` (-1: the row saw no key)."""
        return self.stat("topk_idx")[..., 0]

    @property
    def top1_prob(self) -> torch.Tensor:
        return self.stat("topk_prob")[..., 0]

    def span_mass(self, name: str) -> torch.Tensor:
        """Attention mass on span ``name`` per row ``[layer, batch, head, row]``."""
        if name not in self.span_names:
            raise ProbeError(f"no span named {name!r}; spans: {list(self.span_names)}")
        return self.stat("span_mass")[..., self.span_names.index(name)]

    def alpha(self) -> torch.Tensor:
        """Gu et al.'s key importance α_k ``[layer, head, key]`` for ``key_columns``: per sequence the
        mean attention key k receives from the queries that can see it, then averaged over the batch.
        NaN where no captured query could see the key."""
        col = self.stat("col_prob").double()  # [L, B, H, R, K]
        # visibility is per layer: sliding-window layers see fewer keys than global ones
        vis = torch.stack([torch.cat([st[l]["col_visible"] for _, st in self._steps()], dim=1) for l in self.layers])
        count = vis.sum(2).double()  # [L, B, K]
        per_seq = col.sum(3) / count[:, :, None, :]  # [L, B, H, K]
        return per_seq.nanmean(1).float()

    def sink_rate(self, eps: float = 0.3, key: int = 0) -> float:
        """Gu et al.'s Sink_k^ε: percentage of (layer, head) whose α_k exceeds ε."""
        if not 0 < eps < 1:
            raise ProbeError(f"ε must lie in (0, 1), got {eps}")
        cols = self.key_columns.tolist()
        if key not in cols:
            raise ProbeError(f"key {key} was not tracked; tracked key positions: {cols}")
        a = self.alpha()[..., cols.index(key)]
        return float((a > eps).double().mean() * 100)

    def alpha_all(self) -> torch.Tensor:
        """α_k for every key position ``[layer, head, key]`` (needs ``key_mass=True``): the mean attention
        key k receives from the queries that can see it, per sequence, averaged over the batch."""
        steps = self._steps()
        if "key_mass" not in steps[0][1][self.layers[0]]:
            raise ProbeError("alpha_all needs AttentionStats(key_mass=True)")
        n = max(st[self.layers[0]]["key_mass"].shape[-1] for _, st in steps)
        pad = lambda t: torch.nn.functional.pad(t, (0, n - t.shape[-1]))
        count = torch.stack([sum(pad(st[l]["key_count"]) for _, st in steps) for l in self.layers]).double()  # [L, B, N]
        mass = torch.stack([sum(pad(st[l]["key_mass"]) for _, st in steps) for l in self.layers])  # [L, B, H, N]
        return (mass / count[:, :, None, :]).nanmean(1).float()

    def tile(self, index: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact attention window ``index``: (query positions ``[r]``, probabilities ``[layer, batch, head, r, keys]``)."""
        if not 0 <= index < len(self.tiles):
            raise ProbeError(f"tile {index} was not requested ({len(self.tiles)} tiles)")
        parts = {l: [t for _, st in self._steps() for t in st[l][f"tile{index}"]] for l in self.layers}
        if not parts[self.layers[0]]:
            raise ProbeError(f"tile {self.tiles[index]} covers no captured query row")
        q = torch.cat([qp for qp, _ in parts[self.layers[0]]])
        return q, torch.stack([torch.cat([t for _, t in parts[l]], dim=2) for l in self.layers])

    def to_frame(self):
        """Long pandas table: one row per (layer, batch, head, query row) with the row statistics."""
        import pandas as pd

        L, B, H, R = self.entropy.shape
        idx = torch.cartesian_prod(torch.tensor(self.layers), torch.arange(B), torch.arange(H), torch.arange(R))
        df = pd.DataFrame(idx.numpy(), columns=["layer", "batch", "head", "row"])
        df["q_pos"] = self.q_pos[df["row"].to_numpy()].numpy()
        df["entropy"] = self.entropy.flatten().numpy()
        df["lse"] = self.lse.flatten().numpy()
        df["top1"] = self.top1.flatten().numpy()
        df["top1_prob"] = self.top1_prob.flatten().numpy()
        return df

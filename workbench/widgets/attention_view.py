"""``AttentionView``: the attention rows of chosen query tokens, drawn on the tokens of the text."""
from __future__ import annotations

from typing import Sequence

import torch
import traitlets

from ..errors import ProbeError
from ._base import WorkbenchWidget, esm
from .rows import attention_rows


class AttentionView(WorkbenchWidget):
    """Attention of query tokens over ``text`` for one (``layer``, ``head``), one colour per token.

    The tokens travel to the browser once; each chosen query's row is fetched exactly and lazily
    (:func:`attention_rows`) and cached per (layer, query), so long inputs (8K tokens) never build an
    N×N matrix. ``prefetch=True`` fetches a new query's rows in every layer in one forward pass, so
    that switching heads and layers afterwards (clicking through a HeadGrid) costs nothing;
    ``prefetch=False`` runs only the layers up to the one shown. Click a token in the view to make it
    the query (shift-click adds it). ``queries`` defaults to the last token.

    ``max_queries`` caps how many query rows one request may ask for (each costs a forward pass up to
    its position and ``layers × heads × position`` floats); the cache of fetched rows is bounded by
    ``cache_floats`` (oldest rows dropped first)."""

    _esm = esm("attention_view")
    tokens = traitlets.List(traitlets.Unicode()).tag(sync=True)
    n_layers = traitlets.Int(0).tag(sync=True)
    n_heads = traitlets.Int(0).tag(sync=True)
    layer = traitlets.Int(0).tag(sync=True)
    head = traitlets.Int(0).tag(sync=True)
    queries = traitlets.List(traitlets.Int()).tag(sync=True)
    rows = traitlets.List(traitlets.Dict()).tag(sync=True)  # [{"query": q, "weights": [q + 1 floats]}]
    _inputs = ("layer", "head", "queries")  # what the view sets; tokens and rows are output

    def __init__(self, model, text, *, layer: int = 0, head: int = 0, queries: Sequence[int] | None = None,
                 prefetch: bool = True, max_queries: int = 32, cache_floats: int = 32_000_000, **kwargs):  # fmt: skip
        self.model, self.prefetch = model, prefetch
        if max_queries < 1:
            raise ProbeError(f"AttentionView: max_queries must be ≥ 1, got {max_queries}")
        self.max_queries, self.cache_floats = int(max_queries), int(cache_floats)
        self.ids = model.encode(text)
        self._cache: dict[tuple[int, int], torch.Tensor] = {}
        T = self.ids.shape[-1]
        model.spec.check_head(layer, head, what="AttentionView")
        super().__init__(
            tokens=model.tokens(self.ids[0]), n_layers=model.spec.n_layers, n_heads=model.spec.n_heads,
            layer=layer, head=head, queries=list(queries) if queries is not None else [T - 1], **kwargs,
        )  # fmt: skip
        self._refresh()

    def input_limit(self, name: str) -> int | None:
        return self.max_queries if name == "queries" else None

    @traitlets.validate("layer")
    def _valid_layer(self, proposal):
        self.model.spec.check_head(proposal["value"], 0, what="AttentionView")
        return proposal["value"]

    @traitlets.validate("head")
    def _valid_head(self, proposal):
        self.model.spec.check_head(self.layer, proposal["value"], what="AttentionView")
        return proposal["value"]

    @traitlets.validate("queries")
    def _valid_queries(self, proposal):
        value, T = proposal["value"], self.ids.shape[-1]
        if len(value) > self.max_queries:
            raise ProbeError(f"AttentionView: at most {self.max_queries} queries at once, got {len(value)}")
        q = [int(x) for x in value]
        if not q or any(not 0 <= x < T for x in q):
            raise ProbeError(f"AttentionView: queries must be token positions in 0..{T - 1}, got {q}")
        return sorted(set(q))

    @traitlets.observe("layer", "head", "queries")
    def _changed(self, change):
        with self._action(f"fetching layer {self.layer} rows"):
            self._refresh()

    def show(self, layer: int, head: int) -> None:
        """Point the view at another head (one update, one fetch)."""
        with self.hold_trait_notifications():
            self.layer, self.head = int(layer), int(head)

    def row(self, query: int, layer: int | None = None, head: int | None = None) -> torch.Tensor:
        """Exact attention probabilities of ``query`` over keys ``0..query`` (``[query + 1]``)."""
        layer = self.layer if layer is None else int(layer)
        head = self.head if head is None else int(head)
        self.model.spec.check_head(layer, head, what="AttentionView")
        return self._rows(layer, [query])[query][head]

    def _rows(self, layer: int, queries: Sequence[int]) -> dict[int, torch.Tensor]:
        missing = [q for q in queries if (layer, q) not in self._cache]
        if missing:
            layers = range(self.model.spec.n_layers) if self.prefetch else [layer]
            fetched = attention_rows(self.model, self.ids, layers, missing)
            self._evict(sum(t.numel() for t in fetched.values()), keep={(layer, q) for q in queries})
            self._cache.update(fetched)
        return {q: self._cache[(layer, q)] for q in queries}

    def _evict(self, incoming: int, keep: set) -> None:
        """Drop the oldest cached rows (not those in ``keep``) until ``incoming`` more floats fit under ``cache_floats``."""
        total = sum(t.numel() for t in self._cache.values()) + incoming
        for key in [k for k in self._cache if k not in keep]:
            if total <= self.cache_floats:
                break
            total -= self._cache.pop(key).numel()

    def _refresh(self) -> None:
        rows = self._rows(self.layer, self.queries)
        self.rows = [{"query": q, "weights": r[self.head].tolist()} for q, r in rows.items()]

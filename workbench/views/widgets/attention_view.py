"""``AttentionView``: the attention rows of chosen query tokens, drawn on the tokens of the text."""
from __future__ import annotations

from typing import Sequence

import torch
import traitlets

from ...base.errors import ProbeError
from ._base import WorkbenchWidget, esm, optional_pair
from ...measure.drilldown import Drilldown, top_of
from ...models.tokens import token_labels


class AttentionView(WorkbenchWidget):
    """Attention of query tokens over ``text`` for one head (``selected = [layer, head]``), one colour per token.

    The tokens travel to the browser once. The prompt runs once (the "first run"): its post-RoPE queries
    and keys are kept per layer (:class:`~workbench.measure.drilldown.Drilldown`), so choosing another
    query token, head or layer costs one layer's attention rows — no forward pass, milliseconds even at
    8K tokens — and stays exact (equal to HF eager attention). Click a token in the view to make it the
    query (shift-click adds it); ``queries`` defaults to the last token. Each row comes with its
    ``top_k`` most attended keys; on long texts the view jumps to the query and draws a heat strip of
    where the row's mass lands in the whole text beside the scrollbar.

    ``drilldown``: a Drilldown of this prompt to share (a host's cache: the dashboard keeps one per prompt
    for all sessions); ``max_queries`` caps how many query rows one request may ask for."""

    _esm = esm("attention_rows", "attention_view")
    tokens = traitlets.List(traitlets.Unicode()).tag(sync=True)
    token_notes = traitlets.Dict().tag(sync=True)  # position -> hover note (byte tokens)
    n_layers = traitlets.Int(0).tag(sync=True)
    n_heads = traitlets.Int(0).tag(sync=True)
    selected = traitlets.List(traitlets.Int()).tag(sync=True)  # [layer, head]: the head shown
    queries = traitlets.List(traitlets.Int()).tag(sync=True)
    rows = traitlets.List(traitlets.Dict()).tag(sync=True)  # [{layer, head, query, weights: [q + 1], top: [[key, p]]}]
    top_k = traitlets.Int(8).tag(sync=True)
    _inputs = ("selected", "queries")  # what the view sets; tokens and rows are output

    def __init__(self, model, text, *, layer: int = 0, head: int = 0, queries: Sequence[int] | None = None,
                 chat: bool = False, drilldown: Drilldown | None = None, max_queries: int = 32, top_k: int = 8,
                 **kwargs):  # fmt: skip
        self.model = model
        if max_queries < 1:
            raise ProbeError(f"{type(self).__name__}: max_queries must be ≥ 1, got {max_queries}")
        self.max_queries = int(max_queries)
        self.drill = drilldown if drilldown is not None else Drilldown(model, model.encode(text, chat=chat))
        if drilldown is not None and drilldown.model is not model:
            raise ProbeError(f"{type(self).__name__}: the drilldown belongs to another model")
        self.ids = self.drill.ids
        T = self.ids.shape[-1]
        model.spec.check_head(layer, head, what=type(self).__name__)
        labels, notes = token_labels(model.tokenizer, self.ids[0])
        self._setup(kwargs)
        super().__init__(
            tokens=labels, token_notes={str(i): n for i, n in enumerate(notes) if n}, n_layers=model.spec.n_layers,
            n_heads=model.spec.n_heads, selected=[int(layer), int(head)], top_k=int(top_k),
            queries=list(queries) if queries is not None else [T - 1], **kwargs,
        )  # fmt: skip
        if not self.rows:  # (setting the traits above computed them already, unless nothing changed)
            self.rows = self._payload(self.layer, self.head, self.queries)

    def _setup(self, kwargs) -> None:
        """Subclasses prepare what they need before the traits exist."""

    # --- the selected head ----------------------------------------------------------------------------
    @property
    def layer(self) -> int:
        return self.selected[0]

    @layer.setter
    def layer(self, value: int) -> None:
        self.selected = [int(value), self.head]

    @property
    def head(self) -> int:
        return self.selected[1]

    @head.setter
    def head(self, value: int) -> None:
        self.selected = [self.layer, int(value)]

    def show(self, layer: int, head: int) -> None:
        """Point the view at another head (one update, one computation)."""
        self.selected = [int(layer), int(head)]

    def input_limit(self, name: str) -> int | None:
        return {"queries": self.max_queries, "selected": 2}.get(name)

    @traitlets.validate("selected")
    def _valid_selected(self, proposal):
        pair = optional_pair(proposal["value"], lambda p: self.model.spec.check_head(p[0], p[1], what=type(self).__name__))
        if not pair:
            raise ProbeError(f"{type(self).__name__}: select a [layer, head]")
        return pair

    @traitlets.validate("queries")
    def _valid_queries(self, proposal):
        value, T = proposal["value"], self.ids.shape[-1]
        if not isinstance(value, (list, tuple)) or len(value) > self.max_queries:
            n = len(value) if isinstance(value, (list, tuple)) else type(value).__name__
            raise ProbeError(f"{type(self).__name__}: at most {self.max_queries} queries at once, got {n}")
        if any(isinstance(x, bool) or not isinstance(x, int) for x in value):
            raise ProbeError(f"{type(self).__name__}: queries must be token positions (integers)")
        q = [int(x) for x in value]
        if not q or any(not 0 <= x < T for x in q):
            raise ProbeError(f"{type(self).__name__}: queries must be token positions in 0..{T - 1}, got {q[:8]}")
        return sorted(set(q))

    @traitlets.observe("selected", "queries")
    def _changed(self, change):
        layer, head, queries = self.layer, self.head, list(self.queries)
        self._compute(f"layer {layer} rows", lambda: self._payload(layer, head, queries, cancel=self.stop_event),
                      lambda rows: setattr(self, "rows", rows))  # fmt: skip

    # --- rows -----------------------------------------------------------------------------------------------
    def row(self, query: int, layer: int | None = None, head: int | None = None) -> torch.Tensor:
        """Exact attention probabilities of ``query`` over keys ``0..query`` (``[query + 1]``)."""
        layer = self.layer if layer is None else int(layer)
        head = self.head if head is None else int(head)
        return self.drill.row(layer, head, query)

    def top_keys(self, query: int, k: int | None = None, layer: int | None = None, head: int | None = None):
        """The keys ``query`` attends to most in the shown head: ``[(position, probability), ...]``, best first."""
        return top_of(self.row(query, layer, head), self.top_k if k is None else k)

    def _payload(self, layer: int, head: int, queries: Sequence[int], cancel=None) -> list[dict]:
        if not self.drill.layers:
            self.drill.prime(cancel=cancel)  # the first run of this prompt: every layer that fits, one pass
        rows = self.drill.rows(layer, queries, heads=[head], cancel=cancel)
        return [{"layer": layer, "head": head, "query": q, "weights": r[0].tolist(),
                 "top": [[k, p] for k, p in top_of(r[0], self.top_k)]} for q, r in rows.items()]  # fmt: skip

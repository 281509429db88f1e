"""Cheap drill-down: exact attention rows of one prompt from its cached post-RoPE queries and keys.

A click on a query token used to run a forward pass (seconds to minutes on long prompts). Here the
prompt's first run keeps, per layer, the queries and keys the attention backend saw
(``AttentionStats(qk=True)`` → ``attn.hook_q`` / ``attn.hook_k``); any row of any head is then

    p_i = softmax(q_i · K[:i+1]ᵀ · scale)   over the keys row i can see

with the layer's own visibility (causal, sliding window: :func:`workbench.kernels.semantics.visibility`),
learned sink logits (GPT-OSS: an extra softmax slot that takes mass and has no key), GQA (query head h
reads KV head ``h // group``) and the attention module's ``scaling``. That costs one layer's rows —
microseconds to milliseconds, no forward pass — and equals HF eager attention (tests pin it to 1e-5).

Memory: ``T × (heads + kv_heads) × head_dim`` numbers per layer (SmolLM2 at 8K tokens: 6.3 M, 25 MB in
fp32). A :class:`Drilldown` keeps as many layers as ``max_elements`` allows (least recently used
dropped first); a layer it does not hold is fetched by one forward pass cut right after that layer.
"""
from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from contextlib import nullcontext
from typing import Callable, Sequence

import numpy as np
import torch

from ..base.errors import ProbeError
from ..core.capture import cancel_hook

#: numbers one prompt's cache may hold by default (1 GiB of fp32: SmolLM2 at 8K tokens needs 189 M)
DEFAULT_MAX_ELEMENTS = 1 << 28


class _Stop(Exception):
    """Raised after the last wanted layer ran: later layers cannot change its attention."""


def qk_elements(spec, T: int, n_layers: int = 1) -> int:
    """Numbers the queries and keys of ``n_layers`` layers of a ``T``-token prompt take."""
    return T * (spec.n_heads + spec.n_kv_heads) * spec.head_dim * n_layers


def layers_within(spec, T: int, max_elements: int) -> list[int]:
    """The layers whose queries and keys fit ``max_elements`` (all layers when they fit; else the first ones)."""
    per = qk_elements(spec, T)
    n = min(spec.n_layers, max_elements // per) if per else spec.n_layers
    return list(range(n))


def NAMES(name: str) -> bool:  # noqa: N802 — a names_filter
    """What a drill-down keeps from a capture (its own, nested capture block: :meth:`Drilldown.recording`):
    ``attn.hook_q``, ``attn.hook_k`` and whole-prompt tiles."""
    return name.endswith((".attn.hook_q", ".attn.hook_k")) or ".attn.tile." in name


def qk_probes(model, T: int, max_elements: int = DEFAULT_MAX_ELEMENTS, *, qk: bool = True, pattern: bool = False) -> list:
    """Probes for a prompt's first run so that :meth:`Drilldown.take` can keep its queries and keys (every layer
    that fits ``max_elements``); ``pattern=True`` adds the exact ``[T, T]`` tile of every layer (``attn.tile.0``;
    short prompts only: ``T × T × heads`` numbers per layer). Record them in a capture of their own (filtered
    to :data:`NAMES`), nested in the caller's: two AttentionStats in one block would both emit the row statistics."""
    from ..attention import AttentionStats

    out = []
    layers = layers_within(model.spec, T, max_elements) if qk else []
    if layers:
        out.append(AttentionStats(sink_keys=0, topk=1, layers=layers, qk=True))
    if pattern:
        out.append(AttentionStats(sink_keys=0, topk=1, tiles=[(0, T, 0, T)]))
    return out


class Drilldown:
    """Exact attention rows of one prompt (``ids`` ``[1, T]``) on ``model``, from cached queries and keys.

    - :meth:`prime` runs the prompt once (cut after the last layer it keeps) and keeps every layer that fits
      ``max_elements``; :meth:`take` keeps them from a capture the caller already made instead (the
      dashboard's prompt run), so priming costs nothing extra;
    - :meth:`rows` ``(layer, queries)`` → ``{query: [head, query + 1]}`` probabilities; :meth:`pattern` the
      whole ``[T, T]`` pattern of one head (short prompts); :meth:`top_keys`;
    - ``using``: a context manager factory held while the model runs (the dashboard's per-model lock);
      rows from cached layers never take it.

    Thread-safe: sessions of a server share one Drilldown per prompt. ``forward_passes`` counts model runs."""

    def __init__(self, model, ids, *, max_elements: int = DEFAULT_MAX_ELEMENTS, using: Callable | None = None):
        ids = model.encode(ids) if not isinstance(ids, torch.Tensor) else ids
        if ids.dim() == 1:
            ids = ids[None]
        if ids.dim() != 2 or ids.shape[0] != 1 or ids.shape[1] < 1:
            raise ProbeError(f"Drilldown: token ids must have shape [1, T], got {list(ids.shape)}")
        self.model, self.ids, self.T = model, ids.detach().cpu(), int(ids.shape[1])
        self.max_elements = int(max_elements)
        if qk_elements(model.spec, self.T) > self.max_elements:
            raise ProbeError(f"Drilldown: one layer of a {self.T}-token prompt needs {qk_elements(model.spec, self.T):,} numbers; "
                             f"max_elements is {self.max_elements:,}")  # fmt: skip
        self._using = using or nullcontext
        self.on_grow: Callable[["Drilldown"], None] | None = None  # set by a DrilldownCache: its global budget
        self._qk: OrderedDict[int, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self._lock = threading.RLock()
        self._fetch_lock = threading.Lock()  # one forward pass at a time per prompt
        self.forward_passes = 0
        spec = model.spec
        self._group = spec.group_size
        self._scale, self._sinks = [], []
        for layer in range(spec.n_layers):
            mod = model.hf.get_submodule(spec.attention_paths[layer])
            scale = getattr(mod, "scaling", None)
            self._scale.append(float(scale) if scale is not None else spec.head_dim ** -0.5)
            sinks = getattr(mod, "sinks", None) if spec.learned_sinks else None
            self._sinks.append(None if sinks is None else sinks.detach().double().cpu())

    # --- filling the cache ----------------------------------------------------------------------------
    @property
    def layers(self) -> list[int]:
        """Layers held now."""
        with self._lock:
            return sorted(self._qk)

    @property
    def elements(self) -> int:
        with self._lock:
            return sum(q.numel() + k.numel() for q, k in self._qk.values())

    def recording(self, *, pattern: bool = False, qk: bool | None = None):
        """A capture block to open (nested) around the caller's own run of this prompt; then :meth:`take` it.
        ``qk`` (default: when nothing is held yet) keeps queries and keys; ``pattern`` the whole-prompt tiles."""
        from ..core.capture import capture

        qk = not self._qk if qk is None else qk
        probes = qk_probes(self.model, self.T, self.max_elements, qk=qk, pattern=pattern)
        if not probes:
            return nullcontext(None)
        budget = max(qk_elements(self.model.spec, self.T, self.model.spec.n_layers) * 2, 1 << 28)
        return capture(self.model, *probes, names_filter=NAMES, max_elements=budget)

    def take(self, cap) -> list[int]:
        """Keep the queries and keys of this prompt from capture ``cap`` (opened with :meth:`recording`); returns the layers."""
        got = []
        if cap is None or not any(n.endswith("attn.hook_q") for n in cap.names()):
            return got
        for layer in cap.layers("attn.hook_q"):
            q, k = cap[f"blocks.{layer}.attn.hook_q"], cap[f"blocks.{layer}.attn.hook_k"]
            if q.shape[1] != self.T or k.shape[1] != self.T:
                raise ProbeError(f"Drilldown: the capture holds {q.shape[1]} rows, the prompt has {self.T} tokens")
            self._put(layer, q[0], k[0])
            got.append(layer)
        return got

    def _put(self, layer: int, q: torch.Tensor, k: torch.Tensor) -> None:
        with self._lock:
            self._qk.pop(layer, None)
            need = q.numel() + k.numel()
            while self._qk and self.elements + need > self.max_elements:
                self._qk.popitem(last=False)  # least recently used first
            self._qk[layer] = (q, k)
        if self.on_grow is not None:  # outside our lock: the cache takes its own, then other prompts' locks
            self.on_grow(self)

    def release(self) -> None:
        """Drop every held layer (a later row fetches its layer again): a cache over its budget frees memory even
        when a page still holds this drill-down."""
        with self._lock:
            self._qk.clear()

    def prime(self, *, cancel=None) -> list[int]:
        """Run the prompt once and keep every layer that fits (cut after the last kept layer)."""
        layers = layers_within(self.model.spec, self.T, self.max_elements)
        missing = [l for l in layers if l not in self._qk]
        if missing:
            self._fetch(missing, cancel=cancel)
        return self.layers

    def _fetch(self, layers: Sequence[int], *, cancel=None) -> None:
        from ..attention import AttentionStats
        from ..core.capture import capture, intervene
        from ..core.hooks import Hook

        # the model's lock first, then this prompt's: a thread that already holds the model (a run building
        # this prompt's view) must never wait for a fetch that is itself waiting for the model
        with self._using(), self._fetch_lock:
            with self._lock:
                layers = sorted(set(layers) - set(self._qk))  # another thread may have fetched them meanwhile
            if not layers:
                return
            probe = AttentionStats(sink_keys=0, topk=1, layers=layers, qk=True)
            stop = Hook(f"blocks.{layers[-1]}.hook_attn_out", _stop)  # an edit hook: nothing is kept
            with torch.no_grad(), intervene(self.model, stop, cancel_hook(cancel)), capture(self.model, probe, names_filter=NAMES) as cap:
                self.forward_passes += 1
                try:
                    self.model.hf(input_ids=self.ids.to(self.model.device), use_cache=False)
                except _Stop:
                    pass
        self.take(cap)

    def ensure(self, layer: int, *, cancel=None) -> None:
        """Make sure ``layer`` is held (one forward pass cut after it when not)."""
        self.model.spec.check_head(layer, 0, what="Drilldown")
        with self._lock:
            if layer in self._qk:
                self._qk.move_to_end(layer)
                return
        self._fetch([layer], cancel=cancel)

    # --- rows -------------------------------------------------------------------------------------------
    def _layer(self, layer: int, cancel=None) -> tuple[torch.Tensor, torch.Tensor]:
        self.ensure(layer, cancel=cancel)
        with self._lock:
            return self._qk[layer]

    def _check_queries(self, queries) -> list[int]:
        qs = sorted({int(q) for q in queries})
        if not qs or qs[0] < 0 or qs[-1] >= self.T:
            raise ProbeError(f"query positions must lie in 0..{self.T - 1}, got {list(queries)[:8]}")
        return qs

    def rows(self, layer: int, queries: Sequence[int], *, heads: Sequence[int] | None = None,
             cancel=None) -> dict[int, torch.Tensor]:  # fmt: skip
        """``{query: probabilities [head, query + 1]}`` over keys ``0..query`` (0 where a key is not visible);
        ``heads``: only these query heads (in that order)."""
        from ..kernels import semantics

        qs = self._check_queries(queries)
        q_all, k_all = self._layer(layer, cancel)
        spec = self.model.spec
        heads = list(range(spec.n_heads)) if heads is None else [int(h) for h in heads]
        for h in heads:
            spec.check_head(layer, h, what="Drilldown")
        groups: dict[int, list[int]] = {}  # KV head -> positions in `heads` of the query heads reading it (GQA)
        for i, h in enumerate(heads):
            groups.setdefault(h // self._group, []).append(i)
        window, scale, sinks = spec.sliding_windows[layer], self._scale[layer], self._sinks[layer]
        # numpy, one thread: a row is a few small products, and torch's intra-op threads cost more than they
        # save on such sizes when the machine is busy (15 ms against 0.7 ms for a 1K row under load)
        qn, kn = q_all.numpy(), k_all.numpy()
        sink = None if sinks is None else sinks.numpy()[heads]
        out = {}
        for q in qs:
            start = 0 if window is None else max(0, q - window + 1)  # keys before the window are not visible
            vis = semantics.visibility(torch.tensor([q]), torch.arange(start, q + 1), causal=True, window=window)[0].numpy()
            s = np.empty((len(heads), q + 1 - start), dtype=np.float64)
            for kv, idx in groups.items():
                K = kn[start : q + 1, kv].astype(np.float64)  # [n, D]
                Q = qn[q, [heads[i] for i in idx]].astype(np.float64)  # [g, D]
                s[idx] = (Q @ K.T) * scale
            s[:, ~vis] = -np.inf
            top = s.max(-1, keepdims=True)
            if sink is not None:
                top = np.maximum(top, sink[:, None])
            e = np.exp(s - top)
            den = e.sum(-1, keepdims=True) + (np.exp(sink[:, None] - top) if sink is not None else 0.0)
            row = torch.zeros(len(heads), q + 1, dtype=torch.float32)
            row[:, start:] = torch.from_numpy((e / den).astype(np.float32))
            out[q] = row
        return out

    def row(self, layer: int, head: int, query: int) -> torch.Tensor:
        """One row ``[query + 1]``."""
        self.model.spec.check_head(layer, head, what="Drilldown")
        return self.rows(layer, [query], heads=[head])[int(query)][0]

    def pattern(self, layer: int, head: int, *, max_tokens: int = 2048) -> torch.Tensor:
        """The whole ``[T, T]`` attention pattern of one head (rows = queries; 0 above the diagonal)."""
        from ..kernels import semantics

        self.model.spec.check_head(layer, head, what="Drilldown")
        if self.T > max_tokens:
            raise ProbeError(f"Drilldown: a whole pattern is drawn for prompts of at most {max_tokens} tokens, this one has {self.T}")
        q_all, k_all = self._layer(layer)
        pos = torch.arange(self.T)
        s = q_all[:, head].double() @ k_all[:, head // self._group].double().T * self._scale[layer]
        vis = semantics.visibility(pos, pos, causal=True, window=self.model.spec.sliding_windows[layer])
        s = s.masked_fill(~vis, float("-inf"))
        sinks = self._sinks[layer]
        p, _, _ = semantics.sink_softmax(s, None if sinks is None else sinks[head])
        return p.float()

    def top_keys(self, layer: int, head: int, query: int, k: int = 10) -> list[tuple[int, float]]:
        """The ``k`` keys ``query`` attends to most, as ``(position, probability)``, best first."""
        return top_of(self.row(layer, head, query), k)


def top_of(weights: torch.Tensor, k: int) -> list[tuple[int, float]]:
    """``(index, value)`` of the ``k`` largest entries, best first (ties: the lower index first)."""
    v = weights.detach().double().flatten()
    order = torch.sort(v, descending=True, stable=True).indices[: max(0, int(k))]
    return [(int(i), float(v[i])) for i in order]


def _stop(value, name):
    raise _Stop


class DrilldownCache:
    """Drilldowns of recent prompts, bounded by the total numbers they hold (least recently used dropped).
    Keyed by ``(model key, token ids)``: every session of a server asking for one prompt shares one.

    The bound is global: it counts every drill-down this cache made that is still alive — also one dropped from
    the cache that a page still shows — and a dropped one is released (its layers freed; a later click fetches
    the layer again and counts again), so open pages cannot hold more than ``max_elements`` between them."""

    def __init__(self, max_elements: int = DEFAULT_MAX_ELEMENTS, max_prompts: int = 8):
        self.max_elements, self.max_prompts = int(max_elements), int(max_prompts)
        self._items: OrderedDict[tuple, Drilldown] = OrderedDict()
        self._live: weakref.WeakSet[Drilldown] = weakref.WeakSet()  # made here and not yet freed
        self._lock = threading.RLock()

    def get(self, key, model, ids, *, using: Callable | None = None) -> tuple[Drilldown, bool]:
        """The prompt's Drilldown and whether it is new (then the caller fills it: ``take`` or ``prime``)."""
        ids = ids.detach().cpu()
        full = (key, tuple(ids.flatten().tolist()))
        with self._lock:
            if full in self._items:
                self._items.move_to_end(full)
                return self._items[full], False
            d = Drilldown(model, ids, max_elements=self.max_elements, using=using)
            d.on_grow = self._grown
            self._items[full] = d
            self._live.add(d)
            self._trim(keep=full)
            return d, True

    def _grown(self, d: Drilldown) -> None:
        """A drill-down took a layer: trim others until every live one fits the budget again."""
        with self._lock:
            keep = next((k for k, v in self._items.items() if v is d), None)
            self._trim(keep=keep, grown=d)

    def _trim(self, keep, grown: Drilldown | None = None) -> None:
        while len(self._items) > self.max_prompts:
            self._items.popitem(last=False)[1].release()
        if self.elements() <= self.max_elements:
            return
        for d in list(self._live):  # dropped from the cache but still shown by a page: freed first
            if d is not grown and d not in self._items.values():
                d.release()
        while self.elements() > self.max_elements and len(self._items) > 1:
            oldest = next(k for k in self._items if k != keep)
            self._items.pop(oldest).release()

    def elements(self) -> int:
        """Numbers held by every live drill-down this cache made (what ``max_elements`` bounds)."""
        return sum(d.elements for d in list(self._live))

    def trim(self) -> None:
        with self._lock:
            if self._items:
                self._trim(keep=next(reversed(self._items)))

    def __len__(self) -> int:
        return len(self._items)

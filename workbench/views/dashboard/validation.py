"""What a browser may ask for: the dashboard's caps and the checks of every request, built on the
library's own validators (``ModelSpec.heads`` for heads, routing edits' ``bind`` for experts, the scan
config dataclasses ``RetrievalConfig`` / ``SinkConfig`` / ``TaxonomyConfig`` / ``RoutingConfig`` for scans) plus the caps.

Everything a page sends is data (text, numbers, head and expert names, names from fixed lists). Lists and
strings are refused by size in O(1) before anything looks at their items."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ...base.errors import Cancelled, ProbeError, WorkbenchError
from ...measure.niah import MIN_LENGTH
from ...models.spec import expert_name, head_name, parse_unit_name

Head = tuple[int, int]


class DashboardError(WorkbenchError):
    """A request the dashboard refuses (over a cap, outside the runs directory, unknown name)."""


def is_cancel(err: BaseException) -> bool:
    """The page's Cancel stopped this computation (the dashboard's or a drill-down's cancellation)."""
    return isinstance(err, Cancelled) or bool(getattr(err, "stopped", False))


@dataclass(frozen=True)
class Caps:
    """Limits on what one request may ask for. ``max_prompt_tokens=None``: the model's context."""

    max_prompt_chars: int = 60_000
    max_prompt_tokens: int | None = None
    max_new_tokens: int = 64
    max_scan_tests: int = 24
    max_scan_length: int = 4000
    max_depths: int = 10
    max_needles: int = 3
    max_ablation_k: int = 64
    max_seeds: int = 3
    max_sink_T: int = 512
    max_sink_texts: int = 16
    max_taxonomy_length: int = 2048  # tokens per case of the Heads tab's taxonomy scan
    max_taxonomy_cases: int = 12
    max_routing_chars: int = 4000
    max_view_queries: int = 32  # query rows one view request may ask for
    max_sink_keys: int = 16  # key positions the prompt lab's calibration may scale
    max_pattern_tokens: int = 512  # prompts up to this length get every head's whole pattern
    max_drilldown_elements: int = 1 << 28  # queries + keys the server keeps for drill-downs (all prompts, fp32: 1 GiB)
    max_drilldown_prompts: int = 8  # prompts whose drill-downs are kept

    def prompt_tokens(self, model) -> int:
        ctx = model.spec.max_positions or 8192
        return min(ctx, self.max_prompt_tokens) if self.max_prompt_tokens else ctx


MAX_NAME_CHARS = 32  # a head or expert name from the page ("L12H3"); longer strings are refused unparsed


def _capped(items, limit: int, what: str) -> list:
    if isinstance(items, (str, bytes)) or not hasattr(items, "__len__"):
        raise DashboardError(f"{what} must be a list, got {type(items).__name__}")
    if len(items) > limit:
        raise DashboardError(f"at most {limit} {what} at once (the model has {limit}), got {len(items)}")
    for it in items:
        if isinstance(it, str) and len(it) > MAX_NAME_CHARS:
            raise DashboardError(f"not a head: {it[:MAX_NAME_CHARS]!r}… (write L3H2)" if what == "heads" else
                                 f"not an expert: {it[:MAX_NAME_CHARS]!r}… (write L1E3)")  # fmt: skip
    return list(items)


def parse_heads(items, spec) -> tuple[Head, ...]:
    """``["L3H2", (4, 1), [5, 0]]`` → ``((3, 2), (4, 1), (5, 0))`` through :meth:`ModelSpec.heads` (the library's
    one head validator; duplicates dropped); at most as many items as the model has heads. Empty: ``()``."""
    items = _capped(items or (), spec.n_layers * spec.n_heads, "heads")
    if not items:
        return ()
    try:
        return tuple(spec.heads(items, what="heads"))
    except ProbeError as e:
        raise DashboardError(str(e)) from None


def parse_experts(items, model) -> tuple[tuple[int, int], ...]:
    """``["L1E3", (2, 0)]`` → ``((1, 3), (2, 0))``, validated by the routing edits themselves (``ExpertMask.bind``
    on ``model``; given only a ``ModelSpec``, against its routers)."""
    from ...routing import ExpertMask

    spec = getattr(model, "spec", model)
    if not spec.is_moe:
        raise DashboardError(f"{getattr(model, 'source', spec.model_type)} is not an MoE model")
    items = _capped(items or (), sum(r.n_experts for r in spec.routers), "experts")
    pairs: list[tuple[int, int]] = []
    for it in items:
        if isinstance(it, str):
            p = parse_unit_name(it, "E")
            if p is None:
                raise DashboardError(f"not an expert: {it!r} (write L1E3)")
        else:
            try:
                a, b = it
                p = (int(a), int(b))
            except (TypeError, ValueError):
                raise DashboardError(f"not an expert: {it!r} (write L1E3)") from None
        if p not in pairs:
            pairs.append(p)
    if pairs and spec is not model:
        try:
            ExpertMask(pairs).bind(model)
        except ProbeError as e:
            raise DashboardError(str(e).replace("ExpertMask: ", "")) from None
    elif pairs:
        experts = {r.layer: r.n_experts for r in spec.routers}
        for l, e in pairs:
            if l not in experts or not 0 <= e < experts[l]:
                raise DashboardError(f"expert L{l}E{e} does not exist")
    return tuple(pairs)


#: an input box takes this many times its limit, so that an oversize paste reaches the server whole and is
#: refused with its real size (a box that stopped at the limit would cut it silently); beyond that the box
#: stops and the message says "at least"
BOX_FACTOR = 4


def box_chars(limit: int) -> int:
    """``max_length`` of an input box whose text the server checks against ``limit`` (:func:`check_text`)."""
    return BOX_FACTOR * int(limit)


def check_text(text, *, limit: int, what: str = "prompt") -> str:
    """``text`` when it is non-blank and at most ``limit`` characters, checked whole; the refusal names the
    limit and the size (``at least`` when the text filled its box, :func:`box_chars`: the box may have cut it)."""
    if not isinstance(text, str) or not text.strip():
        raise DashboardError("type a prompt first" if what == "prompt" else f"type a {what} first")
    if len(text) > limit:
        size = f"at least {len(text):,} characters (the box stops there)" if len(text) >= box_chars(limit) else f"{len(text):,} characters"
        raise DashboardError(f"{what} has {size}; the limit is {limit:,} characters: shorten it (nothing was cut)")
    return text


def check_prompt(model, text, caps: Caps, *, chat: bool) -> torch.Tensor:
    """The prompt's token ids, within the caps (characters, then tokens)."""
    check_text(text, limit=caps.max_prompt_chars)
    try:
        ids = model.encode(text, chat=chat)
    except ProbeError as e:
        raise DashboardError(str(e)) from None
    limit = caps.prompt_tokens(model)
    if ids.shape[-1] > limit:
        raise DashboardError(f"prompt has {ids.shape[-1]:,} tokens; the limit is {limit:,} tokens ({len(text):,} characters "
                             "checked whole): shorten it (nothing was cut)")
    if ids.shape[-1] < 2:
        raise DashboardError("the prompt needs at least two tokens (the loss is over next-token predictions)")
    return ids


def new_tokens(n, caps: Caps, lo: int = 0) -> int:
    try:
        n = int(n)
    except (TypeError, ValueError):
        raise DashboardError(f"new tokens must be a whole number, got {n!r}") from None
    if not lo <= n <= caps.max_new_tokens:
        raise DashboardError(f"new tokens must lie in {lo}..{caps.max_new_tokens}, got {n}")
    return n


def sink_keys(text: str, caps: Caps, n_positions: int) -> tuple[int, ...]:
    """``"0, 3"`` → ``(0, 3)``: key positions for ACT calibration (at most ``max_sink_keys``)."""
    cap = caps.max_sink_keys
    if not isinstance(text, str) or len(text) > 8 * cap:
        raise DashboardError(f"sink keys: at most {cap} comma-separated positions")
    try:
        keys = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise DashboardError(f"sink keys must be comma-separated integers, got {text[:40]!r}") from None
    if len(keys) > cap:
        raise DashboardError(f"sink keys: at most {cap} positions, got {len(keys)}")
    if any(not 0 <= k < n_positions for k in keys):
        raise DashboardError(f"sink keys must be token positions in 0..{n_positions - 1}")
    return keys or (0,)


def retrieval_config(caps: Caps, lengths: Sequence[int], depths: int, n_needles: int = 1, max_new_tokens: int = 24,
                     variant: str = "set", spec=None):  # fmt: skip
    """A :class:`workbench.retrieval.RetrievalConfig` within the caps; the library validates the fields and the
    lengths (:meth:`RetrievalConfig.check` against ``spec``, the model's ``ModelSpec`` when given)."""
    from ...measure.retrieval import RetrievalConfig

    try:
        lengths = sorted({int(x) for x in lengths})
    except (TypeError, ValueError):
        raise DashboardError("context lengths must be whole numbers") from None
    if not lengths:
        raise DashboardError("choose at least one context length")
    if max(lengths) > caps.max_scan_length:  # the browser's cap; the shortest length is the library's rule
        raise DashboardError(f"context lengths must lie in {MIN_LENGTH}..{caps.max_scan_length}")
    if not 1 <= int(depths) <= caps.max_depths:
        raise DashboardError(f"depths must lie in 1..{caps.max_depths}")
    if not 1 <= int(n_needles) <= caps.max_needles:
        raise DashboardError(f"needles must lie in 1..{caps.max_needles}")
    if not 2 <= int(max_new_tokens) <= caps.max_new_tokens:
        raise DashboardError(f"new tokens must lie in 2..{caps.max_new_tokens}")
    n = len(lengths) * int(depths) * int(n_needles)
    if n > caps.max_scan_tests:
        raise DashboardError(f"{n} NIAH tests asked for; the limit is {caps.max_scan_tests} (fewer lengths or depths)")
    try:
        cfg = RetrievalConfig(lengths=lengths, depths=int(depths), n_needles=int(n_needles), variant=variant,
                              max_new_tokens=int(max_new_tokens))  # fmt: skip
        cfg.check(spec)
        return cfg
    except ProbeError as e:
        raise DashboardError(str(e)) from None


def sink_config(caps: Caps, T: int, eps: float, texts: Sequence[str] | None):
    """A :class:`workbench.sinks.SinkConfig` within the caps (``texts`` None: the shipped prose)."""
    from ...measure import sinks

    if not 2 <= int(T) <= caps.max_sink_T:
        raise DashboardError(f"T must lie in 2..{caps.max_sink_T}")
    if texts is not None:
        texts = [t for t in texts if isinstance(t, str) and t.strip()] or None
        if texts and (len(texts) > caps.max_sink_texts or sum(map(len, texts)) > caps.max_prompt_chars):
            raise DashboardError(f"{len(texts)} texts of {sum(map(len, texts)):,} characters in all; the limit is "
                                 f"{caps.max_sink_texts} texts and {caps.max_prompt_chars:,} characters (nothing was cut)")
    try:
        return sinks.SinkConfig(T=int(T), eps=float(eps), texts=texts if texts is not None else sinks.texts_for(int(T)))
    except ProbeError as e:
        raise DashboardError(str(e)) from None


def taxonomy_config(caps: Caps, lengths: Sequence[int], n_texts: int, local_window: int = 8, repeated: bool = True):
    """A :class:`workbench.taxonomy.TaxonomyConfig` within the caps (lengths, number of cases)."""
    from ...measure.taxonomy import TaxonomyConfig

    try:
        lengths = sorted({int(x) for x in lengths})
        n_texts, local_window = int(n_texts), int(local_window)
    except (TypeError, ValueError):
        raise DashboardError("lengths, texts and the window must be whole numbers") from None
    if not lengths:
        raise DashboardError("choose at least one length")
    if min(lengths) < 16 or max(lengths) > caps.max_taxonomy_length:
        raise DashboardError(f"lengths must lie in 16..{caps.max_taxonomy_length}")
    if not 0 <= n_texts <= caps.max_taxonomy_cases:
        raise DashboardError(f"texts per length must lie in 0..{caps.max_taxonomy_cases}")
    n = len(lengths) * (n_texts + bool(repeated))
    if n > caps.max_taxonomy_cases:
        raise DashboardError(f"{n} cases asked for; the limit is {caps.max_taxonomy_cases} (fewer lengths or texts)")
    try:
        return TaxonomyConfig(lengths=lengths, n_texts=n_texts, local_window=local_window, repeated=bool(repeated))
    except ProbeError as e:
        raise DashboardError(str(e)) from None


def routing_text(caps: Caps, text) -> str:
    """A text for the Routing tab, checked like a :class:`workbench.routing.RoutingConfig` text, within the cap."""
    from ...routing import RoutingConfig

    if not isinstance(text, str) or not text.strip():
        raise DashboardError("type a text to route")
    check_text(text, limit=caps.max_routing_chars, what="text")
    try:
        RoutingConfig(texts=[text])
    except ProbeError as e:
        raise DashboardError(str(e)) from None
    return text


@dataclass(frozen=True)
class HeadEdits:
    """Attention edits asked for in the prompt lab: ablated heads (``mode``) and ACT-calibrated heads."""

    ablate: tuple[Head, ...] = ()
    mode: str = "zero"
    calibrate: tuple[Head, ...] = ()
    sink_keys: tuple[int, ...] = (0,)
    beta: float = 0.4

    def __bool__(self) -> bool:
        return bool(self.ablate or self.calibrate)

    def build(self, reference: str | None = None) -> list:
        """The library edits. ``mode="mean"`` replaces a head's output by its mean over ``reference``
        (the prompt itself in the prompt lab)."""
        from ...attention import HeadAblation, SinkCalibration

        out = []
        if self.ablate:
            ref = [reference] if self.mode == "mean" and reference else None
            out.append(HeadAblation(list(self.ablate), mode=self.mode, reference=ref))
        if self.calibrate:
            out.append(SinkCalibration(list(self.calibrate), sink_keys=list(self.sink_keys), beta=self.beta))
        return out

    def describe(self) -> str:
        parts = []
        if self.ablate:
            parts.append(f"ablate ({self.mode}) " + ", ".join(head_name(l, h) for l, h in self.ablate))
        if self.calibrate:
            parts.append(f"ACT β={self.beta:g} on keys {list(self.sink_keys)} at " + ", ".join(head_name(l, h) for l, h in self.calibrate))
        return "; ".join(parts) or "no edits"

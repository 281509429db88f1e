"""``capture`` and ``intervene``: open a session of probes or edits on a model; :class:`Capture` holds
what was recorded, by hook name (:mod:`workbench.names`).

One model object serves any number of captures: blocks nest (each records what it asked for, edits
compose in opening order), and each thread (or asyncio task) sees only its own blocks — a forward
pass in another thread is neither recorded nor edited by this one. A block is bound to the context
that opened it: a forward pass run in a thread you start inside the block is not seen (run it with
``contextvars.copy_context().run`` to carry the block over).
"""
from __future__ import annotations

import functools
import threading
from contextlib import contextmanager
from typing import Callable, Iterator

import torch

from . import names as N
from ..base.errors import Cancelled, ProbeError
from .hooks import DEFAULT_PROBES, Bound, Edit, Hook, HookManager, Probe, attached, label_of

#: full (unreduced) module tensors one capture may keep, in elements (≈ 1 GiB of float32)
MAX_ELEMENTS = 1 << 28


class Capture:
    """What one ``with workbench.capture(...)`` block recorded.

    - ``cap["blocks.17.attn.top1"]``: one point's values, forward calls concatenated along the token axis
      (``[batch, head, row]`` here; shapes in :data:`workbench.names.POINTS`);
    - ``cap.stack("attn.top1")``: ``[layer, ...]`` indexed by the model's real layer numbers (layers not
      captured are NaN / −1 / False);
    - ``cap.names()``: what was captured; ``cap.q_pos`` / ``cap.token_ids``: the rows' cache positions and ids.
    """

    def __init__(self, model, kept: frozenset, max_elements: int = MAX_ELEMENTS):
        self.model = model
        self._kept = kept
        self._calls: list = []
        self._edits: set[str] = set()  # labels of the edits active while calls were recorded
        self._data: dict[str, list] = {}  # name -> [(call index, value, positions)]
        self._values: dict[str, list] = {}  # user hook results: name -> [value per call]
        self._max_elements = self._budget = max_elements
        self._cache: dict[str, object] = {}

    # --- filled by the session ----------------------------------------------------------------------
    def _wants(self, name: str) -> bool:
        return name in self._kept

    def _put(self, name: str, value, call, positions=None) -> None:
        if name in self._kept:
            self._data.setdefault(name, []).append((call.index, value, call.q_pos if positions is None else positions))
            self._cache.pop(name, None)

    def _keep_value(self, name: str, value, call) -> None:
        if isinstance(value, torch.Tensor):
            value = value.detach()
        self._values.setdefault(name, []).append(value)

    def _charge(self, elements: int, what: str) -> None:
        """Account for full tensors before a forward call keeps them; refuse beyond the budget."""
        self._budget -= elements
        if self._budget < 0:
            raise ProbeError(
                f"keeping full {what} for this forward call exceeds the capture's budget of {self._max_elements:,} elements; "
                "ask for a reduction instead (names ending .norm, .max_abs, .topk), fewer layers, a shorter input, "
                "or raise capture(..., max_elements=...)"
            )

    # --- reading ------------------------------------------------------------------------------------------
    def names(self) -> list[str]:
        """Every name this capture holds, in layer order."""
        return sorted(set(self._data) | set(self._values), key=N.sort_key)

    def __contains__(self, name: str) -> bool:
        try:
            return N.canonical(name) in self._data or name in self._values
        except ProbeError:
            return False

    def __getitem__(self, name: str):
        if name in self._values:
            vals = self._values[name]
            return vals[0] if len(vals) == 1 else list(vals)
        full = N.canonical(name)
        if full not in self._data:
            if full in self._kept:
                raise ProbeError(f"{full} was asked for but nothing was recorded: run the model inside the `with` block")
            raise N.unknown(name, self.names() or N.available(self.model.spec), what="captured name")
        if full not in self._cache:
            try:
                self._cache[full] = _combine(full, self._data[full])
            except RuntimeError as e:  # e.g. forward calls with different batch sizes
                raise ProbeError(f"{full}: the forward calls do not concatenate ({e}); read cap.per_call({full!r})") from None
        return self._cache[full]

    def per_call(self, name: str) -> list:
        """``name``'s value in each recorded forward call, uncombined (e.g. calls with different batch sizes)."""
        full = N.canonical(name)
        if full not in self._data:
            raise N.unknown(name, self.names(), what="captured name")
        return [v for _, v, _ in self._data[full]]

    def values(self, name: str) -> list:
        """A user hook's kept values, one per forward call (always a list)."""
        if name not in self._values:
            raise N.unknown(name, list(self._values), what="hook value")
        return list(self._values[name])

    def positions(self, name: str) -> torch.Tensor:
        """Cache position of each row of ``name`` ``[row]`` (a tile keeps only its own rows)."""
        full = N.canonical(name)
        if full not in self._data:
            raise N.unknown(name, self.names(), what="captured name")
        return torch.cat([pos for _, _, pos in self._data[full]])

    def stack(self, suffix: str) -> torch.Tensor:
        """``suffix`` (e.g. ``"attn.entropy"``) for every layer ``[n_layers, ...]``; index = real layer number."""
        suffix = N.ALIASES.get(suffix, suffix)
        self._require_calls()
        per = {}
        for n in self._data:
            layer, s = N.split(n)
            if s == suffix:
                per[layer] = self[n]
        if not per:
            known = sorted({N.split(n)[1] for n in self._data})
            raise N.unknown(suffix, known, what="captured suffix")
        first = next(iter(per.values()))
        shapes = {tuple(t.shape) for t in per.values()}
        if len(shapes) > 1:
            raise ProbeError(f"{suffix} has different shapes across layers ({sorted(shapes)}); read cap[name] per layer")
        fill = torch.nan if first.dtype.is_floating_point else (False if first.dtype == torch.bool else -1)
        out = torch.full((self.model.spec.n_layers, *first.shape), fill, dtype=first.dtype)
        for layer, t in per.items():
            out[layer] = t
        return out

    def layers(self, suffix: str) -> list[int]:
        """The layers that hold ``suffix``."""
        suffix = N.ALIASES.get(suffix, suffix)
        return sorted({N.split(n)[0] for n in self._data if N.split(n)[1] == suffix})

    @property
    def q_pos(self) -> torch.Tensor:
        """Cache position of every recorded row ``[row]`` (the token axis of row-wise names)."""
        self._require_calls()
        return torch.cat([c.q_pos for c in self._calls])

    @property
    def token_ids(self) -> torch.Tensor:
        """Token id of every recorded row ``[batch, row]`` (−1 where the model got embeddings)."""
        return self._rows_of(lambda c: c.token_ids)

    @property
    def real(self) -> torch.Tensor:
        """``[batch, row]``: True where the row is a real token, False where it is padding."""
        return self._rows_of(lambda c: c.real)

    def _rows_of(self, f) -> torch.Tensor:
        self._require_calls()
        if len({c.batch for c in self._calls}) > 1:
            raise ProbeError("the recorded forward calls have different batch sizes; read each call's values with cap.per_call(name)")
        return torch.cat([f(c) for c in self._calls], dim=1)

    @property
    def n_calls(self) -> int:
        """Forward calls recorded (a prompt pass plus one per decode step for ``generate``)."""
        return len(self._calls)

    def _require_calls(self) -> None:
        if not self._calls:
            raise ProbeError("nothing was captured: run the model inside the `with workbench.capture(...)` block")

    @property
    def provenance(self):
        """The model's provenance with this capture's token ids (first sequence) and the edits that were active."""
        ids = self._rows_of(lambda c: c.token_ids)[0].tolist() if self._calls else None
        return self.model.provenance.with_run(token_ids=ids, edits=sorted(self._edits))

    def __repr__(self) -> str:
        groups: dict[str, list[int]] = {}
        for n in self.names():
            try:
                layer, s = N.split(n)
            except ProbeError:
                layer, s = -1, n
            groups.setdefault(s, []).append(layer)
        parts = [f"{s} ({_layers(ls)})" for s, ls in list(groups.items())[:8]]
        more = f", … {len(groups) - 8} more kinds" if len(groups) > 8 else ""
        rows = sum(c.q_pos.numel() for c in self._calls)
        return (f"<workbench.Capture {self.model.source}: {len(self._calls)} call(s), {rows} row(s), "
                f"{len(self.names())} names: {', '.join(parts)}{more}>")  # fmt: skip


def _layers(ls: list[int]) -> str:
    ls = sorted(set(ls))
    if len(ls) > 2 and ls == list(range(ls[0], ls[-1] + 1)):
        return f"layers {ls[0]}–{ls[-1]}"
    return "layer" + ("s " if len(ls) > 1 else " ") + ", ".join(map(str, ls))


def _combine(full: str, parts: list):
    """Join the per-call values of one name by the rule its point declares."""
    p = N.point(N.split(full)[1])
    vals = [v for _, v, _ in parts]
    if p.combine.startswith("rows:"):
        width = max(v.shape[-1] for v in vals) if vals[0].dim() > int(p.combine[5:]) + 1 else None
        if width is not None and any(v.shape[-1] != width for v in vals):  # k changed between calls (TopK edits)
            fill = torch.nan if vals[0].dtype.is_floating_point else -1
            vals = [torch.nn.functional.pad(v, (0, width - v.shape[-1]), value=fill) for v in vals]
        return torch.cat(vals, dim=int(p.combine[5:]))
    if p.combine == "sum":
        width = max(v.shape[-1] for v in vals)
        return sum(torch.nn.functional.pad(v, (0, width - v.shape[-1])) for v in vals)
    # ratio: Σ numerators / Σ denominators (α over every captured row, not a mean of per-call means)
    num = sum(n for n, _ in vals)
    den = sum(d for _, d in vals).to(num.dtype)
    return (num / den.unsqueeze(-2)).float()


# --- the context managers ---------------------------------------------------------------------------------


def _default_probes(model, wanted: list[str]) -> list[Bound]:
    """Probes that emit ``wanted`` names with default settings (for ``names_filter``-only captures and hooks)."""
    fam: dict[str, list[str]] = {}
    for n in wanted:
        fam.setdefault(N.point(N.split(n)[1]).family, []).append(n)
    return [DEFAULT_PROBES[f](model, names) for f, names in fam.items()]


class _Block:
    """A ``capture``/``intervene`` block, entered at most once: a second ``with`` on the same object (again, or
    from another thread) would run a finished generator (a bare ``AttributeError``) or share its hooks."""

    def __init__(self, cm, what: str):
        self._cm, self._what = cm, what
        self._lock = threading.Lock()
        self._entered = False

    def __enter__(self):
        with self._lock:
            if self._entered:
                raise ProbeError(f"this workbench.{self._what}(...) block was already entered (it may be used in one `with`, "
                                 f"in one thread); call workbench.{self._what}(...) again for another block")  # fmt: skip
            self._entered = True
        return self._cm.__enter__()

    def __exit__(self, *exc):
        return self._cm.__exit__(*exc)


def _once(what: str) -> Callable:
    """Like ``contextlib.contextmanager``, but the block refuses a second entry (:class:`_Block`)."""

    def wrap(gen_fn):
        cm = contextmanager(gen_fn)

        @functools.wraps(gen_fn)
        def make(*args, **kwargs) -> _Block:
            return _Block(cm(*args, **kwargs), what)

        return make

    return wrap


@_once("capture")
def capture(model, *probes, names_filter=None, rows: str = "all", max_elements: int = MAX_ELEMENTS) -> Iterator[Capture]:
    """Record what ``probes`` ask for while the block runs the model (forward or generate).

    ``probes``: ``AttentionStats``, ``Activations``, ``Routing`` and :class:`~workbench.Hook` (whose return
    values are kept). ``names_filter`` (a name, glob, list or callable) keeps only matching names; with no
    probes it picks them: ``capture(m, names_filter="blocks.*.attn.entropy")``. ``rows="decode"`` records
    only forward calls with one query row (generation steps). Every name, argument and layer is checked
    before the block runs.

    >>> with wb.capture(m, wb.AttentionStats(sink_keys=4)) as cap:
    ...     m.forward_text("The quick brown fox")
    >>> cap["blocks.17.attn.top1"].shape        # [batch, head, row]
    """
    HookManager.of(model)  # a clear error for a model that is not a workbench Model
    if rows not in ("all", "decode"):
        raise ProbeError(f"rows must be 'all' or 'decode', got {rows!r}")
    if isinstance(max_elements, bool) or not isinstance(max_elements, int) or max_elements < 0:
        raise ProbeError(f"max_elements must be a whole number ≥ 0, got {max_elements!r}")
    for p in probes:
        if not isinstance(p, Probe):
            hint = "; edits go to workbench.intervene" if isinstance(p, Edit) else ""
            raise ProbeError(f"capture takes probes (AttentionStats, Activations, Routing, Hook), got {type(p).__name__}{hint}")
    if not probes and names_filter is None:
        raise ProbeError("capture needs at least one probe (e.g. workbench.AttentionStats()) or a names_filter")
    hooks = [p.bind(model) for p in probes if isinstance(p, Hook)]
    bound = [p.bind(model) for p in probes if not isinstance(p, Hook)]
    keep = N.matcher(names_filter)
    if not bound and names_filter is not None:
        known = N.available(model.spec)
        N.check_filter(names_filter, known)
        bound = _default_probes(model, [n for n in known if keep(n)])
    elif names_filter is not None:
        N.check_filter(names_filter, [n for b in bound for n in b.names()])
    kept = frozenset(n for b in bound for n in b.names() if keep(n))
    if names_filter is not None and not kept and not hooks:  # `[]` or a function true for no name: nothing recorded
        raise ProbeError(f"names_filter {names_filter!r} keeps none of the names these probes emit, so the capture would "
                         "record nothing; list them with workbench.names.available(model.spec) or cap.names()")  # fmt: skip
    hooked = {t for h in hooks for t in h.targets}
    clash = sorted(n for h in hooks if h.key is None for n in h.targets if n in kept)
    if clash:
        raise ProbeError(f"{clash[0]} is kept by a probe and by a Hook without a key; give the Hook key='...' to keep both")
    missing = sorted(hooked - {n for b in bound for n in b.names()}, key=N.sort_key)
    bound += _default_probes(model, missing) if missing else []
    bound = [nb for b in bound if (nb := b.narrow(lambda n: n in kept or n in hooked)) is not None]
    cap = Capture(model, kept, max_elements)
    with attached(model, bound, cap, rows, hooks):
        yield cap


@_once("intervene")
def intervene(model, *edits) -> Iterator[None]:
    """Apply ``edits`` inside the block: attention edits (``HeadAblation``, ``SinkCalibration``, ``SpanMask``,
    ``StreamingHeads``), routing edits (``ExpertMask``, ``ExpertForce``, ``TopK``) and :class:`~workbench.Hook`
    functions that return replacement tensors compose freely (in the order given; nested blocks apply
    outer edits first). Every edit is validated, and their combination checked, before the block runs."""
    HookManager.of(model)
    if not edits:
        raise ProbeError("intervene needs at least one edit, e.g. workbench.HeadAblation([(12, 3)])")
    for e in edits:
        if not isinstance(e, Edit):
            hint = "; probes go to workbench.capture" if isinstance(e, Probe) else ""
            raise ProbeError(f"intervene takes edits (HeadAblation, ExpertMask, Hook, ...), got {type(e).__name__}{hint}")
    bound = [e.bind(model).as_edit() if isinstance(e, Hook) else e.bind(model) for e in edits]
    with attached(model, bound):
        yield None


def edit_labels(edits) -> list[str]:
    """How results name the edits that produced them (e.g. ``head-ablation:uniform``)."""
    return [label_of(e) for e in edits]


__all__ = ["Capture", "cancel_hook", "capture", "edit_labels", "intervene"]


def cancel_hook(cancel) -> Hook:
    """A :class:`workbench.Hook` (use it inside :func:`workbench.intervene`: nothing is kept) that stops a
    forward pass at the next layer once ``cancel`` (an Event, or ``None``: never) is set, raising
    :class:`~workbench.base.errors.Cancelled`."""

    def check(value, name):
        if cancel is not None and cancel.is_set():
            raise Cancelled("stopped")

    return Hook("blocks.*.hook_resid_pre", check)

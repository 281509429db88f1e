"""The hook core: one protocol for every probe and edit, one set of torch hooks per model.

- A :class:`Probe` (what to record) or :class:`Edit` (what to change) is an immutable spec. ``bind(model)``
  validates it against the model and returns a new :class:`Bound` object; the spec is never mutated, so one
  spec serves many models.
- A bound object names the *sites* it needs — ``("attn", layer)`` (the reducing attention backend),
  ``("resid_pre" | "resid_post" | "attn_out" | "mlp_out" | "z" | "mlp_post", layer)`` (module tensors),
  ``("router" | "experts", layer)`` (MoE) — and implements the matching callbacks of :class:`Bound`.
- :class:`Session` is one ``capture``/``intervene`` block. Sessions live in a :class:`~contextvars.ContextVar`:
  a forward pass sees only the sessions opened in its own thread (or asyncio task). Two threads can capture
  on one model at once and each records only its own forward calls; nested blocks in one thread compose.
- :class:`HookManager` (one per model) installs torch hooks on the modules a site needs while any session
  needs them (reference counted, any thread) and dispatches each event to the current context's sessions:
  edits first, in the order the blocks were opened, then probes see the edited value.
- Values are *emitted* under their hook names (:mod:`workbench.names`); a capture keeps what its
  ``names_filter`` selects, and a user :class:`Hook` in a capture keeps what its function returns instead.
"""
from __future__ import annotations

import threading
from collections import Counter
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Callable

import torch

from . import names as N
from ..base.errors import ProbeError

_SESSIONS: ContextVar[tuple["Session", ...]] = ContextVar("workbench_sessions", default=())
#: sites whose value is one tensor, and the hook name it is emitted under
TENSOR_SITES = {
    "resid_pre": "hook_resid_pre", "resid_post": "hook_resid_post", "attn_out": "hook_attn_out",
    "mlp_out": "hook_mlp_out", "z": "attn.hook_z", "mlp_post": "mlp.hook_post",
}  # fmt: skip
SITE_OF = {v: k for k, v in TENSOR_SITES.items()}
#: installers of sites other modules own (the MoE router and experts: workbench.routing.hooks)
SITE_INSTALLERS: dict[str, Callable] = {}
#: family (workbench.names Point.family) → factory(model, names) of the probe that emits those names with
#: default settings (filled by the probe modules: attention stats, activations, routing)
DEFAULT_PROBES: dict[str, Callable] = {}


class HookName(str):
    """The name passed to hook functions: a ``str`` that also has ``.name``, so TransformerLens-style
    functions ``fn(tensor, hook)`` that read ``hook.name`` work unchanged."""

    @property
    def name(self) -> str:
        return str(self)


@dataclass
class Call:
    """One forward call of the model (a prompt pass or one decode step) as a session sees it."""

    index: int
    token_ids: torch.Tensor  # [B, M] (−1 where the call had embeddings instead of ids)
    q_pos: torch.Tensor  # [M] cache index of each query row
    first_real: torch.Tensor  # [B] cache index of each sequence's first real (non-padding) token
    real: torch.Tensor  # [B, M] the query row is a real token (False: padding)
    recording: bool  # probes record this call (``capture(rows="decode")`` skips prompt passes)

    @property
    def batch(self) -> int:
        return self.token_ids.shape[0]


class Bound:
    """A probe or an edit bound to one model. Subclasses set :attr:`sites` and override the callbacks
    of the sites they use; every callback receives the current :class:`Call`."""

    is_edit: bool = False
    label: str = ""
    sites: frozenset = frozenset()  # {(site, layer)}
    emit: Callable[[str, Any, Call, torch.Tensor | None], None] | None = None  # set by the session (probes)

    def names(self) -> list[str]:
        """Full names this probe emits (a capture keeps those its filter selects)."""
        return []

    def narrow(self, keep: Callable[[str], bool]) -> "Bound | None":
        """This probe restricted to the names ``keep`` selects (None: nothing left to record)."""
        return self if any(keep(n) for n in self.names()) or not self.names() else None

    def begin(self, session: "Session") -> None:
        """Called when the block opens (after every item is bound): cross-item checks."""

    def begin_call(self, call: Call) -> None:
        """A forward call starts (before any layer runs): reject it here if it cannot be served."""

    def skipped_call(self, call: Call) -> None:
        """A forward call this probe does not record (the prompt pass of ``capture(rows="decode")``) starts:
        keep whatever later calls need from it (e.g. the token history of induction keys)."""

    def attention(self, layer: int, call: Call):
        """What this item needs from the attention backend in ``layer``: a ``LayerRequest`` or None."""
        return None

    def attention_done(self, layer: int, stats: dict, call: Call) -> None:
        """The statistics the backend computed for this item's request (probes)."""

    def edit(self, site: str, layer: int, value: torch.Tensor, call: Call) -> torch.Tensor | None:
        """A replacement for a module tensor (edits), or None to leave it."""
        return None

    def observe(self, site: str, layer: int, value: torch.Tensor, call: Call) -> None:
        """A module tensor after every edit (probes)."""

    def routing(self, layer: int) -> dict | None:
        """Constraints on one MoE layer's routing: ``{"mask": [...], "force": [...], "k": int}`` (edits)."""
        return None

    def routed(self, rs, call: Call, out) -> None:
        """The routing decision of one MoE layer (probes); ``out`` is a ``routing.hooks.RouterOutput``."""

    def experts_ran(self, rs, call: Call, indices: torch.Tensor) -> None:
        """The expert indices the experts module actually received (probes)."""

    def end(self) -> None:
        """The block closes."""


class Probe:
    """Base of the specs that record (``AttentionStats``, ``Activations``, ``Routing``, :class:`Hook`)."""

    def bind(self, model) -> Bound:
        raise NotImplementedError


class Edit:
    """Base of the specs that change the computation (``HeadAblation``, ``ExpertMask``, :class:`Hook`, ...)."""

    def bind(self, model) -> Bound:
        raise NotImplementedError


# --- user hooks -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Hook(Probe, Edit):
    """A user hook function on named hook points, with TransformerLens' contract ``fn(tensor, name)``.

    ``names``: one name (``"blocks.3.hook_resid_post"``), a glob (``"blocks.*.attn.entropy"``), a list
    or a callable ``name -> bool``. ``fn`` gets the value of each forward call and the point's name
    (a ``str`` with ``.name``, so ``hook.name`` works too). It returns:

    - inside :func:`workbench.capture`: ``None`` (keep nothing) or a value to keep — the capture keeps
      it under the point's name (``key``: under ``name.key``), one value per forward call;
    - inside :func:`workbench.intervene`: ``None`` (leave the value) or a replacement tensor of the same
      shape (an edit). Editable points: module tensors (``hook_resid_pre/post``, ``hook_attn_out``,
      ``hook_mlp_out``, ``attn.hook_z``, ``mlp.hook_post``) and ``mlp.router.logits`` (the experts are then
      re-chosen by the architecture's routing rule). Attention statistics are read-only.
    """

    names: Any
    fn: Callable
    key: str | None = None

    @property
    def label(self) -> str:
        return _hook_label(self.fn)

    def bind(self, model) -> "BoundHook":
        if not callable(self.fn):
            raise ProbeError(f"Hook: fn must be callable, got {type(self.fn).__name__}")
        if self.key is not None and (not isinstance(self.key, str) or not self.key.isidentifier()):
            raise ProbeError(f"Hook: key must be a short identifier, got {self.key!r}")
        known = N.available(model.spec)
        N.check_filter(self.names, known)
        keep = N.matcher(self.names)
        targets = [n for n in known if keep(n)]
        if not targets:
            raise ProbeError(f"Hook: {self.names!r} selects no hook point of this model")
        return BoundHook(model, tuple(targets), self.fn, self.key)


def _hook_label(fn) -> str:
    return f"hook:{getattr(fn, '__name__', 'fn')}"


class BoundHook(Bound):
    """A :class:`Hook` on one model. As a probe it transforms what the capture keeps (see
    :meth:`Session.emit`); as an edit it replaces module tensors or router logits."""

    def __init__(self, model, targets: tuple[str, ...], fn, key):
        self.model, self.targets, self.fn, self.key = model, targets, fn, key
        self.label = _hook_label(fn)

    def as_edit(self) -> "BoundHook":
        bad = [n for n in self.targets if not N.point(N.split(n)[1]).editable]
        if bad:
            raise ProbeError(
                f"Hook: {bad[0]} is read-only (attention statistics, routing decisions and reductions are computed, "
                "not edited); inside intervene hook an editable point: hook_resid_pre/post, hook_attn_out, hook_mlp_out, "
                "attn.hook_z, mlp.hook_post or mlp.router.logits"
            )
        edit = BoundHook(self.model, self.targets, self.fn, self.key)
        edit.is_edit = True
        edit.sites = frozenset(_site_of(n) for n in self.targets)
        edit._by_site = {_site_of(n): HookName(n) for n in self.targets}
        return edit

    def kept_name(self, target: str) -> str:
        return target if self.key is None else f"{target}.{self.key}"

    def names(self) -> list[str]:
        return [self.kept_name(n) for n in self.targets]

    def edit(self, site, layer, value, call):
        name = self._by_site.get((site, layer))
        return None if name is None else self.fn(value, name)

    def edit_logits(self, layer: int, logits: torch.Tensor) -> torch.Tensor | None:
        name = self._by_site.get(("router", layer))
        return None if name is None else self.fn(logits, name)


def _site_of(full: str) -> tuple[str, int]:
    layer, suffix = N.split(full)
    if suffix == "mlp.router.logits":
        return ("router", layer)
    return (SITE_OF[suffix], layer)


# --- sessions ---------------------------------------------------------------------------------------------


class Session:
    """One open ``capture``/``intervene`` block on one model, in one context (thread / task)."""

    def __init__(self, manager: "HookManager", items: list[Bound], capture=None, rows: str = "all",
                 hooks: list[BoundHook] = ()):  # fmt: skip
        self.manager, self.items, self.capture, self.rows = manager, items, capture, rows
        self.edits = [it for it in items if it.is_edit]
        self.probes = [it for it in items if not it.is_edit]
        self.user_hooks: dict[str, list[BoundHook]] = {}
        for h in hooks:
            for t in h.targets:
                self.user_hooks.setdefault(t, []).append(h)
        self.n_calls = 0
        self.call: Call | None = None
        self.sites = frozenset().union(*(it.sites for it in items)) if items else frozenset()
        for it in self.probes:
            it.emit = self.emit

    def begin_call(self, token_ids: torch.Tensor, q_pos: torch.Tensor, first_real: torch.Tensor, real: torch.Tensor) -> None:
        recording = self.rows == "all" or q_pos.numel() == 1
        self.call = Call(self.n_calls, token_ids, q_pos, first_real, real, recording)
        self.n_calls += 1
        if recording and self.capture is not None:
            self.capture._calls.append(self.call)
            self.capture._edits.update(label_of(e) for s in self.manager.sessions() for e in s.edits)
        for it in self.items:
            if recording or it.is_edit:
                it.begin_call(self.call)
            else:
                it.skipped_call(self.call)

    def emit(self, name: str, value, call: Call, positions: torch.Tensor | None = None) -> None:
        """A probe produced ``value`` for hook point ``name`` in ``call``: user hooks transform it, the
        capture keeps it if its filter selects it."""
        if self.capture is None:
            return
        hooks = self.user_hooks.get(name)
        if hooks:
            for h in hooks:
                out = h.fn(value, HookName(name))
                _no_meta(out, name, h)
                if out is not None:
                    self.capture._keep_value(h.kept_name(name), out, call)
            if not self.capture._wants(name):
                return
        self.capture._put(name, value, call, positions)


@contextmanager
def attached(model, items: list[Bound], capture=None, rows: str = "all", hooks=()):
    """Make bound ``items`` active on ``model`` in this context for the duration of the block (what
    :func:`workbench.capture` and :func:`workbench.intervene` do after validating their arguments)."""
    mgr = HookManager.of(model)
    session = Session(mgr, list(items), capture, rows, list(hooks))
    for it in session.items:
        it.begin(session)
    token = mgr.open(session)
    try:
        yield session
    finally:
        mgr.close(session, token)
        for it in session.items:
            it.end()


# --- the per-model manager --------------------------------------------------------------------------------


class HookManager:
    """The torch hooks of one model and the dispatch of their events to the active sessions.
    ``use_triton``: None = the Triton kernel on CUDA when it covers a request; True = also on CPU
    (interpreter, tests); False = never."""

    def __init__(self, model):
        self.model = model
        self.use_triton: bool | None = None
        self.permanent: list[Bound] = []  # active in every context (a TransformerLens bridge's own hooks)
        self._lock = threading.Lock()
        self._refs: Counter = Counter()
        self._handles: dict[tuple, list] = {}

    @property
    def spec(self):
        return self.model.spec

    @staticmethod
    def of(model) -> "HookManager":
        mgr = getattr(model.hf, "_workbench_state", None)
        if not isinstance(mgr, HookManager):
            raise ProbeError("this model does not run through the workbench backend; load it with workbench.load()")
        return mgr

    # --- sessions ----------------------------------------------------------------------------------
    def sessions(self) -> list[Session]:
        return [s for s in _SESSIONS.get() if s.manager is self]

    def open(self, session: Session):
        """Install what ``session`` needs and make it active in this context; returns a token for :meth:`close`."""
        self.acquire(session.sites | {("call", None)})
        return _SESSIONS.set(_SESSIONS.get() + (session,))

    def close(self, session: Session, token) -> None:
        _SESSIONS.reset(token)
        self.release(session.sites | {("call", None)})

    def acquire(self, sites) -> None:
        with self._lock:
            for s in sites:
                if s[0] == "attn":
                    continue  # the backend asks the sessions itself: nothing to install
                if self._refs[s] == 0:
                    self._handles[s] = self._install(*s)
                self._refs[s] += 1

    def release(self, sites) -> None:
        with self._lock:
            for s in sites:
                if s[0] == "attn":
                    continue
                self._refs[s] -= 1
                if self._refs[s] == 0:
                    for h in self._handles.pop(s):
                        h.remove()
                    del self._refs[s]

    def _items(self, site: str, layer: int):
        """(session, item) pairs at a site, edits and probes alike: permanent items (session None), then the
        sessions of this context in opening order."""
        out = [(None, it) for it in self.permanent if (site, layer) in it.sites]
        for s in self.sessions():
            if (site, layer) in s.sites:
                out += [(s, it) for it in s.items if (site, layer) in it.sites]
        return out

    # --- torch hooks ----------------------------------------------------------------------------------
    def _install(self, site: str, layer: int | None) -> list:
        hf, spec = self.model.hf, self.spec
        if site == "call":
            base = hf.get_submodule(spec.base_path) if spec.base_path else hf
            return [base.register_forward_pre_hook(self._on_call, with_kwargs=True)]
        if site == "resid_pre":
            return [hf.get_submodule(spec.layer_paths[layer]).register_forward_pre_hook(self._pre_hook(site, layer), with_kwargs=True)]
        if site == "resid_post":
            return [hf.get_submodule(spec.layer_paths[layer]).register_forward_hook(self._post_hook(site, layer))]
        if site == "attn_out":
            return [hf.get_submodule(spec.attention_paths[layer]).register_forward_hook(self._post_hook(site, layer))]
        if site == "mlp_out":
            return [hf.get_submodule(spec.mlp_paths[layer]).register_forward_hook(self._post_hook(site, layer))]
        if site == "z":
            return [hf.get_submodule(spec.out_proj_paths[layer]).register_forward_pre_hook(self._pre_hook(site, layer), with_kwargs=True)]
        if site == "mlp_post":
            return [hf.get_submodule(spec.mlp_down_paths[layer]).register_forward_pre_hook(self._pre_hook(site, layer), with_kwargs=True)]
        if site in SITE_INSTALLERS:
            return SITE_INSTALLERS[site](self, site, layer)
        raise ProbeError(f"unknown hook site {site!r}")

    def _on_call(self, module, args, kwargs) -> None:
        sessions = self.sessions()
        if not sessions:
            return
        ids = kwargs.get("input_ids", args[0] if args else None)
        emb = kwargs.get("inputs_embeds")
        if ids is None:
            shape = tuple(emb.shape[:2]) if emb is not None else (1, 0)
            ids = torch.full(shape, -1, dtype=torch.long)
        ids = ids if ids.dim() == 2 else ids[None]
        B, M = ids.shape
        cache = kwargs.get("cache", kwargs.get("past_key_values"))  # transformers ≥ 5.2x calls it `cache`
        mask = kwargs.get("attention_mask")
        if cache is not None and hasattr(cache, "get_seq_length"):
            past = int(cache.get_seq_length())
        elif isinstance(mask, torch.Tensor) and mask.dim() == 2:
            past = max(0, mask.shape[1] - M)
        else:
            past = 0
        q_pos = torch.arange(M) + past
        first, real = torch.zeros(B, dtype=torch.long), torch.ones(B, M, dtype=torch.bool)
        if isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape[0] == B:
            valid = mask.detach().cpu() != 0
            first = torch.where(valid.any(1), valid.int().argmax(1), 0).long()
            if valid.shape[1] >= past + M:
                real = valid[:, past : past + M]
        ids = ids.detach().cpu()
        for s in sessions:
            s.begin_call(ids, q_pos, first, real)

    def _dispatch(self, site: str, layer: int, value: torch.Tensor) -> torch.Tensor:
        """Edits in order (each sees the previous one's result), then probes observe the final value."""
        items = self._items(site, layer)
        for s, it in items:
            if it.is_edit:
                new = it.edit(site, layer, value, s.call if s else None)
                if new is not None:
                    value = _checked_replacement(new, value, N.name(layer, TENSOR_SITES[site]), it)
        for s, it in items:
            if not it.is_edit and s is not None and s.call is not None and s.call.recording:
                it.observe(site, layer, value, s.call)
        return value

    def _pre_hook(self, site: str, layer: int):
        def hook(module, args, kwargs):
            if not self._items(site, layer):
                return None
            if args:
                x = args[0]
            else:
                key = "hidden_states" if "hidden_states" in kwargs else next(iter(kwargs))
                x = kwargs[key]
            view = _as_heads(x, self.spec.n_heads) if site == "z" else x
            new = self._dispatch(site, layer, view)
            if new is view:
                return None
            new = new.reshape(x.shape) if site == "z" else new
            if args:
                return (new, *args[1:]), kwargs
            return args, {**kwargs, key: new}

        return hook

    def _post_hook(self, site: str, layer: int):
        def hook(module, args, output):
            if not self._items(site, layer):
                return None
            x = output[0] if isinstance(output, tuple) else output
            new = self._dispatch(site, layer, x)
            if new is x:
                return None
            return (new, *output[1:]) if isinstance(output, tuple) else new

        return hook

    # --- the attention backend asks ----------------------------------------------------------------------
    def attention_request(self, layer: int):
        """The merged LayerRequest for ``layer`` in this context and, per recording item, a callback that
        receives its own view of the statistics; (None, []) when nothing needs the layer."""
        from ..attention.request import merge

        frags, owners = [], []
        for s, it in self._items("attn", layer):
            if s is not None and s.call is None:
                continue
            if not it.is_edit and s is not None and not s.call.recording:
                continue
            lp = it.attention(layer, s.call if s else None)
            if lp is not None and (lp.active or lp.z_norm or lp.keep_qk):
                frags.append(lp)
                owners.append((s, it))
        if not frags:
            return None, []
        request, views = merge(frags)
        receivers = [
            (lambda st, it=it, s=s, v=v: it.attention_done(layer, v(st), s.call if s else None))
            for (s, it), v, f in zip(owners, views, frags)
            if f.record or f.record_outputs or f.z_norm or f.keep_qk
        ]
        return request, receivers


def label_of(item) -> str:
    """How results and provenance name an edit (spec or bound), e.g. ``head-ablation:uniform``."""
    return getattr(item, "label", None) or type(item).__name__


def _as_heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """``[B, M, H·Dv]`` → ``[B, M, H, Dv]`` (TransformerLens' hook_z layout)."""
    return x.view(*x.shape[:-1], n_heads, x.shape[-1] // n_heads)


def _no_meta(value, name: str, item) -> None:
    """A meta tensor has a shape but no data: kept or used as a replacement it fails later with a bare
    ``NotImplementedError`` far from the hook that returned it."""
    if isinstance(value, torch.Tensor) and value.is_meta:
        raise ProbeError(f"{label_of(item)} on {name}: returned a tensor on the 'meta' device (a shape without data); "
                         "return a real tensor (e.g. torch.zeros_like(value)) or None")  # fmt: skip


def _checked_replacement(new, old: torch.Tensor, name: str, item) -> torch.Tensor:
    if not isinstance(new, torch.Tensor):
        raise ProbeError(f"{label_of(item)} on {name}: an edit must return a tensor or None, got {type(new).__name__}")
    _no_meta(new, name, item)
    if new.shape != old.shape:
        raise ProbeError(
            f"{label_of(item)} on {name}: returned shape {tuple(new.shape)}, expected {tuple(old.shape)} "
            "(inside workbench.capture a hook may return any reduction; inside intervene it replaces the value)"
        )
    return new.to(dtype=old.dtype, device=old.device)

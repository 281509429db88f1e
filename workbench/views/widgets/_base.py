"""The base of every workbench widget: an anywidget whose front-end is an ESM file shipped in ``static/``."""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Callable

import anywidget
import traitlets

from ...base.errors import ProbeError, WorkbenchError

STATIC = Path(__file__).parent / "static"
MAX_INPUT_CHARS = 200  # a string input from the page (metric names, modes) is short


def esm(*names: str) -> str:
    """The ESM source of a view: the shared helpers (``_common.js``) followed by ``{name}.js`` for each name
    (parts first, the file with ``export default`` last). One string, not imports: anywidget and Panel load a
    module from text, where relative imports fail."""
    return "\n".join((STATIC / f"{n}.js").read_text() for n in ("_common", *names))


#: ``runner(label, work, finish)``: how a widget runs a model computation. ``work()`` computes (it may take
#: seconds and touches the model); ``finish(result, error)`` (error None, or the exception ``work`` raised)
#: sets traits. Hosts that must not block (the dashboard's event loop) run ``work`` in a worker thread under
#: their model lock and call ``finish`` on their own loop.
Runner = Callable[[str, Callable[[], object], Callable[[object], None]], None]


class WorkbenchWidget(anywidget.AnyWidget):
    """Shared traits: ``status`` (what is running) and ``error`` (the last failure, shown in the view).

    Callbacks run from the browser have nowhere to raise to, so computations started there go through
    :meth:`_compute`, which puts a :class:`WorkbenchError` into ``error`` instead.

    The page may set only the traits a subclass lists in ``_inputs`` (clicks and selections); every
    other synced trait (tokens, scores, rows, ...) is output, and a value for it from the browser is
    refused, in Jupyter (:meth:`set_state`) and in Panel (:func:`workbench.views.widgets.panel.to_panel`).
    Each input is validated and capped in size by the subclass's trait validators."""

    status = traitlets.Unicode("").tag(sync=True)
    error = traitlets.Unicode("").tag(sync=True)
    cancel = traitlets.Int(0).tag(sync=True)  # the view increments it to stop a running computation
    _inputs: tuple[str, ...] = ()
    #: set by a host: how computations run (None: here and now, in the caller's thread — notebooks)
    runner: Runner | None = None
    @classmethod
    def accepts_from_page(cls, name: str) -> bool:
        """Whether the front-end may set trait ``name``."""
        return name in cls._inputs or name == "cancel"

    def input_limit(self, name: str) -> int | None:
        """The most items input ``name`` may hold (lists), checked before any item is looked at."""
        return None

    def check_from_page(self, name: str, value) -> None:
        """Refuse a value from the page for ``name`` that is not an input, or too long (a :class:`ProbeError`
        naming the limit), in O(1): before traitlets validates the items one by one."""
        if not self.accepts_from_page(name):
            raise ProbeError(f"{type(self).__name__}: `{name}` is shown by the view, not set from the page; ignored")
        limit = self.input_limit(name)
        if limit is not None and isinstance(value, (list, tuple)) and len(value) > limit:
            raise ProbeError(f"{type(self).__name__}: at most {limit} {name} at once, got {len(value)}")
        if isinstance(value, str) and len(value) > MAX_INPUT_CHARS:
            raise ProbeError(f"{type(self).__name__}: {name}: at most {MAX_INPUT_CHARS} characters, got {len(value)}")

    def set_state(self, sync_data):
        """State from the front-end (the Jupyter host): only this widget's inputs, within their limits."""
        own = set(type(self).class_trait_names(sync=True)) - set(anywidget.AnyWidget.class_trait_names(sync=True))
        taken = {}
        for k, v in sync_data.items():
            if k in own:
                try:
                    self.check_from_page(k, v)
                except ProbeError as e:
                    self.error = str(e)
                    continue
            taken[k] = v
        return super().set_state(taken)

    @property
    def stop_event(self) -> threading.Event:
        """Set when the view's cancel button is pressed; computations check it between layers / steps."""
        if getattr(self, "_stop_event", None) is None:
            self._stop_event = threading.Event()
        return self._stop_event

    @traitlets.observe("cancel")
    def _cancel_requested(self, change):
        if self.status:
            self.stop_event.set()

    def _compute(self, label: str, work: Callable[[], object], apply: Callable[[object], None]) -> None:
        """Run a model computation: ``work()`` then ``apply(result)``, with ``status`` shown meanwhile (the view
        draws a spinner and a cancel button) and failures put into ``error``. Through :attr:`runner` when a host
        set one (never on its event loop); here and now otherwise. A host may queue a request behind a running
        one: ``status`` stays up (and cancel works) until the latest request finished."""
        self.stop_event.clear()
        self.error, self.status = "", label
        self._latest = job = getattr(self, "_latest", 0) + 1

        def done(result, err=None):
            if job == self._latest:  # an earlier request finishing does not hide the newer one's spinner
                self.status = ""
            if err is not None:
                self.error = "stopped" if getattr(err, "stopped", False) else str(err)
                return
            try:
                apply(result)
            except WorkbenchError as e:
                self.error = str(e)

        if self.runner is None:
            try:
                result = work()
            except WorkbenchError as e:
                done(None, e)
                return
            except BaseException:
                self.status = ""
                raise
            done(result)
        else:
            self.runner(label, work, done)


def capped(value, limit: int, what: str) -> list:
    """``value`` as a list, refused (before anything looks at its items) when it has more than ``limit``."""
    if not isinstance(value, (list, tuple)):
        raise ProbeError(f"{what} must be a list, got {type(value).__name__}")
    if len(value) > limit:
        raise ProbeError(f"{what}: at most {limit} at once, got {len(value)}")
    return list(value)


def _int(x) -> int:
    if isinstance(x, bool) or not isinstance(x, int):
        raise ProbeError(f"expected an integer index, got {x!r}"[:200])
    return x


def optional_pair(value, check) -> list[int]:
    """``[a, b]`` as ints passed to ``check``, or ``[]`` (nothing selected)."""
    pair = [_int(x) for x in capped(value, 2, "a selection")]
    if pair:
        check(pair)
    return pair


def unique_pairs(value, check, limit: int) -> list[list[int]]:
    """``[[a, b], ...]`` as ints, each passed to ``check``, duplicates dropped (order kept); at most
    ``limit`` items (the number of distinct cells there are)."""
    out: list[list[int]] = []
    seen: set[tuple[int, int]] = set()
    for p in capped(value, limit, "the list"):
        p = [_int(x) for x in capped(p, 2, "a [layer, index] pair")]
        check(p)
        if tuple(p) not in seen:
            seen.add(tuple(p))
            out.append(p)
    return out


def nested(t) -> list:
    """A tensor as nested lists of floats with NaN as ``None`` (JSON has no NaN)."""
    import math

    def clean(x):
        return [clean(y) for y in x] if isinstance(x, list) else (None if math.isnan(x) else float(x))

    return clean(t.detach().float().cpu().tolist())

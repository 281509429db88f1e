"""The base of every workbench widget: an anywidget whose front-end is an ESM file shipped in ``static/``."""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import anywidget
import traitlets

from ..errors import ProbeError, WorkbenchError

STATIC = Path(__file__).parent / "static"
MAX_INPUT_CHARS = 200  # a string input from the page (metric names, modes) is short


def esm(name: str) -> str:
    """The ESM source of view ``name``: the shared helpers (``_common.js``) followed by ``{name}.js``.
    One string, not imports: anywidget and Panel load a module from text, where relative imports fail."""
    return (STATIC / "_common.js").read_text() + "\n" + (STATIC / f"{name}.js").read_text()


class WorkbenchWidget(anywidget.AnyWidget):
    """Shared traits: ``status`` (what is running) and ``error`` (the last failure, shown in the view).

    Callbacks run from the browser have nowhere to raise to, so actions started there go through
    :meth:`_action`, which puts a :class:`WorkbenchError` into ``error`` instead.

    The page may set only the traits a subclass lists in ``_inputs`` (clicks and selections); every
    other synced trait (tokens, scores, rows, ...) is output, and a value for it from the browser is
    refused, in Jupyter (:meth:`set_state`) and in Panel (:func:`workbench.widgets.panel.to_panel`).
    Each input is validated and capped in size by the subclass's trait validators."""

    status = traitlets.Unicode("").tag(sync=True)
    error = traitlets.Unicode("").tag(sync=True)
    _inputs: tuple[str, ...] = ()

    @classmethod
    def accepts_from_page(cls, name: str) -> bool:
        """Whether the front-end may set trait ``name``."""
        return name in cls._inputs

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

    @contextmanager
    def _action(self, what: str) -> Iterator[None]:
        self.error, self.status = "", what
        try:
            yield
        except WorkbenchError as e:
            self.error = str(e)
        finally:
            self.status = ""


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

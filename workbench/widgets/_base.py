"""The base of every workbench widget: an anywidget whose front-end is an ESM file shipped in ``static/``."""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import anywidget
import traitlets

from ..errors import WorkbenchError

STATIC = Path(__file__).parent / "static"


def esm(name: str) -> str:
    """The ESM source of view ``name``: the shared helpers (``_common.js``) followed by ``{name}.js``.
    One string, not imports: anywidget and Panel load a module from text, where relative imports fail."""
    return (STATIC / "_common.js").read_text() + "\n" + (STATIC / f"{name}.js").read_text()


class WorkbenchWidget(anywidget.AnyWidget):
    """Shared traits: ``status`` (what is running) and ``error`` (the last failure, shown in the view).

    Callbacks run from the browser have nowhere to raise to, so actions started there go through
    :meth:`_action`, which puts a :class:`WorkbenchError` into ``error`` instead."""

    status = traitlets.Unicode("").tag(sync=True)
    error = traitlets.Unicode("").tag(sync=True)

    @contextmanager
    def _action(self, what: str) -> Iterator[None]:
        self.error, self.status = "", what
        try:
            yield
        except WorkbenchError as e:
            self.error = str(e)
        finally:
            self.status = ""


def optional_pair(value, check) -> list[int]:
    """``[a, b]`` as ints passed to ``check``, or ``[]`` (nothing selected)."""
    pair = [int(x) for x in value]
    if pair:
        check(pair)
    return pair


def unique_pairs(value, check) -> list[list[int]]:
    """``[[a, b], ...]`` as ints, each passed to ``check``, duplicates dropped (order kept)."""
    out: list[list[int]] = []
    for p in value:
        p = [int(x) for x in p]
        check(p)
        if p not in out:
            out.append(p)
    return out


def nested(t) -> list:
    """A tensor as nested lists of floats with NaN as ``None`` (JSON has no NaN)."""
    import math

    def clean(x):
        return [clean(y) for y in x] if isinstance(x, list) else (None if math.isnan(x) else float(x))

    return clean(t.detach().float().cpu().tolist())

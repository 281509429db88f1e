"""One shape for every scan: a list of cases run one by one, each reported as it finishes, stoppable
between cases with the finished ones kept.

Every scan (``retrieval.scan``, ``sinks.scan``, ``duo.scan``, ``routing.scan``) is
``scan(model, config=None, *, edits=(), on_case=None, cancel=None, progress=True, **config_fields)``:

- ``config``: the scan's frozen config dataclass (or its fields as keywords); validated completely before
  the model runs;
- ``edits``: interventions active while every case runs;
- ``on_case``: called with a :class:`CaseDone` after each case (progress bars, dashboards, logs);
- ``cancel``: a ``threading.Event`` (or any object with ``is_set()``, or a callable returning bool), checked
  between cases: the result then holds the finished cases and says it is incomplete.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

from tqdm.auto import tqdm

from ..base.errors import ProbeError


@dataclass(frozen=True)
class CaseDone:
    """One finished case: its position, the case itself and what it produced."""

    index: int
    total: int
    case: Any
    output: Any


def cancelled(cancel) -> bool:
    """Whether ``cancel`` (None, an Event-like object or a callable) asks to stop."""
    if cancel is None:
        return False
    if hasattr(cancel, "is_set"):
        return bool(cancel.is_set())
    if callable(cancel):
        return bool(cancel())
    raise ProbeError(f"cancel must be a threading.Event, an object with is_set() or a callable, got {type(cancel).__name__}")


def run_cases(cases: Sequence, run: Callable[[Any], Any], *, on_case=None, cancel=None, progress: bool = True,
              desc: str = "scan", unit: str = "case") -> tuple[list, bool]:  # fmt: skip
    """Run ``run(case)`` for each case in order: ``(outputs of the finished cases, complete)``."""
    if on_case is not None and not callable(on_case):
        raise ProbeError(f"on_case must be callable, got {type(on_case).__name__}")
    cancelled(cancel)  # a bad cancel object fails before any case runs
    outputs = []
    for i, case in enumerate(tqdm(cases, desc=desc, unit=unit, disable=not progress)):
        if cancelled(cancel):
            return outputs, False
        out = run(case)
        outputs.append(out)
        if on_case is not None:
            on_case(CaseDone(i, len(cases), case, out))
    return outputs, True


def config_of(cls, config, fields: dict):
    """The scan's config: ``config`` itself, or ``cls(**fields)`` — never both."""
    if config is None:
        return cls(**fields)
    if fields:
        raise ProbeError(f"pass either a {cls.__name__} or its fields as keywords, not both (got {sorted(fields)})")
    if not isinstance(config, cls):
        raise ProbeError(f"config must be a {cls.__name__}, got {type(config).__name__}")
    return config


# --- validation of config fields (one set of checks for the library, the CLI and the dashboard) ----------


def int_value(value, what: str, lo: int | None = None, hi: int | None = None) -> int:
    """An integer (not a bool, not 2.5) within [lo, hi], or a clear error naming the field."""
    import operator

    if isinstance(value, bool):
        raise ProbeError(f"{what} must be an integer, got {value!r}")
    try:
        v = operator.index(value)
    except TypeError:
        raise ProbeError(f"{what} must be an integer, got {value!r}") from None
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        bounds = f"≥ {lo}" if hi is None else (f"≤ {hi}" if lo is None else f"in {lo}..{hi}")
        raise ProbeError(f"{what} must be {bounds}, got {v}")
    return v


def int_list(value, what: str, lo: int | None = None, hi: int | None = None) -> tuple[int, ...]:
    """A non-empty list of integers (a lone int or a string like "500" is refused, not split into digits)."""
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise ProbeError(f"{what} must be a list of integers, e.g. [500, 1000], got {value!r}")
    out = tuple(int_value(v, f"{what}: each value", lo, hi) for v in value)
    if not out:
        raise ProbeError(f"no {what} given")
    return out


def float_value(value, what: str, lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False) -> float:
    """A real number within the given interval (open or closed ends)."""
    import math

    if isinstance(value, bool) or not isinstance(value, (int, float)) or (isinstance(value, float) and math.isnan(value)):
        raise ProbeError(f"{what} must be a number, got {value!r}")
    v = float(value)
    if v < lo or v > hi or (lo_open and v == lo) or (hi_open and v == hi):
        raise ProbeError(f"{what} must lie in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}, got {v:g}")
    return v

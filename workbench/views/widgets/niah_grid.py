"""``NIAHGrid``: needle-in-a-haystack accuracy (depth × context length), baseline beside ablated."""
from __future__ import annotations

import math
import numbers
from typing import Sequence

import pandas as pd
import traitlets

from ...base.errors import ProbeError
from ._base import WorkbenchWidget, esm


def accuracy_frame(source, what: str) -> pd.DataFrame:
    """A depth × length accuracy DataFrame from a RetrievalResult or such a DataFrame (validated)."""
    from ...measure.retrieval import RetrievalResult

    if isinstance(source, RetrievalResult):
        return source.accuracy_grid()
    if not isinstance(source, pd.DataFrame):
        raise ProbeError(f"NIAHGrid: {what} must be a RetrievalResult or an accuracy DataFrame, got {type(source).__name__}")
    if source.empty:
        raise ProbeError(f"NIAHGrid: {what} is an empty DataFrame")
    try:
        grid = source.astype(float)
    except (TypeError, ValueError):
        raise ProbeError(f"NIAHGrid: {what} must hold numbers (accuracy per depth row × length column)") from None
    if ((grid < 0) | (grid > 1)).any().any():
        raise ProbeError(f"NIAHGrid: {what} accuracies must lie in [0, 1]")
    return grid


class NIAHGrid(WorkbenchWidget):
    """Depth × context-length NIAH accuracy heatmaps side by side: ``baseline`` and, optionally,
    ``ablated`` (each a RetrievalResult or ``RetrievalResult.accuracy_grid()``-style DataFrame)."""

    _esm = esm("niah_grid")
    panels = traitlets.List(traitlets.Dict()).tag(sync=True)  # [{title, lengths, depths, z}]
    _inputs = ()  # a picture: nothing is set from the page

    def __init__(self, baseline, ablated=None, *, titles: Sequence[str] = ("baseline", "ablated"), **kwargs):
        sources = [("baseline", baseline)] + ([("ablated", ablated)] if ablated is not None else [])
        if len(titles) < len(sources):
            raise ProbeError(f"NIAHGrid: {len(sources)} grids need {len(sources)} titles, got {list(titles)}")
        self.frames = [accuracy_frame(s, what) for what, s in sources]
        super().__init__(panels=[_panel(t, f) for t, f in zip(titles, self.frames)], **kwargs)


def _panel(title: str, grid: pd.DataFrame) -> dict:
    z = [[None if math.isnan(v) else float(v) for v in row] for row in grid.to_numpy().tolist()]
    label = lambda v: f"{v:g}" if isinstance(v, numbers.Real) else str(v)  # noqa: E731
    return {"title": str(title), "lengths": [label(c) for c in grid.columns], "depths": [label(d) for d in grid.index], "z": z}

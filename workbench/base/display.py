"""Rich display for results: one mixin gives each result ``figure()``, HTML/PNG export and the picture
a notebook shows for ``result`` in a cell. Figures come from :mod:`workbench.base.plots`' builders."""
from __future__ import annotations

import json
from pathlib import Path

from .errors import WorkbenchError


class Figures:
    """Mixin: a subclass lists its figures in ``_figures()`` (name → zero-argument builder; the
    first is the default and the one notebooks display)."""

    def _figures(self) -> dict:
        raise NotImplementedError

    def figure(self, kind: str | None = None):
        """The plotly figure ``kind`` (default: the first of :attr:`figure_kinds`)."""
        figures = self._figures()
        kind = kind or next(iter(figures))
        if kind not in figures:
            raise WorkbenchError(f"{type(self).__name__} has no figure {kind!r}; choose one of {list(figures)}")
        return figures[kind]()

    @property
    def figure_kinds(self) -> list[str]:
        return list(self._figures())

    def write_html(self, path: str | Path, kind: str | None = None) -> Path:
        """A self-contained HTML file of the figure (plotly.js inlined: opens offline)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.figure(kind).write_html(path, include_plotlyjs=True)
        return path

    def write_image(self, path: str | Path, kind: str | None = None, *, scale: float = 2.0) -> Path:
        """A static image (PNG, SVG, PDF by suffix) through kaleido, which drives the local Chromium."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.figure(kind).write_image(path, scale=scale)
        return path

    def _repr_mimebundle_(self, include=None, exclude=None) -> dict:
        # plotly's own JSON mime type: JupyterLab, VS Code and nbconvert render it without inlining plotly.js
        fig = self.figure()
        return {
            "application/vnd.plotly.v1+json": {**json.loads(fig.to_json()), "config": {"displaylogo": False}},
            "text/plain": f"<{type(self).__name__}: figures {self.figure_kinds}; .figure(kind) for plotly>",
        }

"""Notebook views (anywidget; the same ESM runs in Panel through :func:`to_panel`).

    grid = wb.widgets.HeadGrid(cap, prompt=text)   # click a head ...
    grid.view()                                                        # ... its attention below
"""
from .attention_view import AttentionView
from .head_grid import HeadGrid
from .niah_grid import NIAHGrid
from .routing_view import RoutingView
from .rows import attention_rows
from .scores import head_scores


def to_panel(widget):
    """The widget as a Panel component with the same front-end, its traits mirrored both ways
    (see :mod:`workbench.widgets.panel`)."""
    from .panel import to_panel as _to_panel

    return _to_panel(widget)


__all__ = ["AttentionView", "HeadGrid", "NIAHGrid", "RoutingView", "attention_rows", "head_scores", "to_panel"]

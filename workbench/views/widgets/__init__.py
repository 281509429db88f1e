"""Notebook views (anywidget; the same ESM runs in Panel through :func:`to_panel`).

    grid = wb.widgets.HeadGrid(cap, prompt=text)   # click a head ...
    grid.view()                                    # ... its pattern / attention rows below (one selection)
    wb.widgets.PatternView(m, text)                # every head's exact pattern (short prompts), rows beyond
"""
from .attention_view import AttentionView
from ...measure.drilldown import Drilldown
from ...measure.effects import PromptEffect, prompt_effect
from .head_grid import HeadGrid
from .niah_grid import NIAHGrid
from .pattern_view import PatternView
from .routing_view import RoutingView
from .rows import attention_rows
from .scores import head_scores
from ...models.tokens import token_labels


def to_panel(widget):
    """The widget as a Panel component with the same front-end, its traits mirrored both ways
    (see :mod:`workbench.views.widgets.panel`)."""
    from .panel import to_panel as _to_panel

    return _to_panel(widget)


__all__ = ["AttentionView", "Drilldown", "HeadGrid", "NIAHGrid", "PatternView", "PromptEffect", "RoutingView", "attention_rows",
           "head_scores", "prompt_effect", "to_panel", "token_labels"]  # fmt: skip

"""The views the pages show: the notebook widgets of :mod:`workbench.widgets` hosted through
``workbench.widgets.panel.to_panel`` (one view, two hosts). Pages host a widget with
:meth:`workbench.dashboard.common.Page.host`, which sets its ``runner`` so that every model computation the
widget makes runs in a worker thread (under the model's lock when it runs the model), never on the
server's event loop. Static figures are the results' own (``figure()``, :mod:`workbench.plots`) in ``pn.pane.Plotly``
(works offline)."""

from __future__ import annotations


def to_panel_component(widget):
    """The widget as a Panel component (``wb-widget`` CSS class)."""
    from ..widgets.panel import to_panel

    pane = to_panel(widget)
    pane.css_classes = list(getattr(pane, "css_classes", []) or []) + ["wb-widget"]
    return pane


def head_grid(scores, *, title: str = "", editable: bool = False):
    """A :class:`~workbench.widgets.HeadGrid` of scores only (``HeadGrid(...)``, its component); ``editable``:
    shift-click collects heads in its ``ablate`` list (the page runs the edits)."""
    from ..widgets import HeadGrid

    widget = HeadGrid(scores, title=title, editable=editable)
    return widget, to_panel_component(widget)


class HeadGridView:
    """A scores-only HeadGrid and its Panel component (``.widget``, ``.panel``); ``select(layer, head)`` sets
    its selection from Python (what a click does)."""

    def __init__(self, scores, *, title: str = ""):
        self.widget, self.panel = head_grid(scores, title=title)

    def select(self, layer: int, head: int) -> None:
        self.widget.selected = [int(layer), int(head)]


def niah_view(baseline, ablated=None, titles=("baseline", "ablated")):
    """NIAH accuracy grids (baseline and, when given, ablated): the NIAHGrid widget."""
    from ..widgets import NIAHGrid

    return to_panel_component(NIAHGrid(baseline, ablated, titles=titles))

"""The views the pages show: the notebook widgets of :mod:`workbench.views.widgets` hosted through
``workbench.views.widgets.panel.to_panel`` (one view, two hosts). Pages host a widget with
:meth:`workbench.views.dashboard.common.Page.host`, which sets its ``runner`` so that every model computation the
widget makes runs in a worker thread (under the model's lock when it runs the model), never on the
server's event loop. Static figures are the results' own (``figure()``, :mod:`workbench.base.plots`) in ``pn.pane.Plotly``
(works offline)."""

from __future__ import annotations

import threading
import weakref

import panel as pn

# the widgets each server session showed: ipywidgets keeps every widget ever opened in a process-wide registry
# until it is closed, so a closed browser tab would otherwise keep its widgets — and their drill-downs, patterns
# and scans — alive for the server's lifetime
_SESSION_WIDGETS: "weakref.WeakKeyDictionary[object, weakref.WeakSet]" = weakref.WeakKeyDictionary()
_SESSION_LOCK = threading.Lock()


def to_panel_component(widget):
    """The widget as a Panel component (``wb-widget`` CSS class); in a server session it is closed with the session."""
    from ..widgets.panel import to_panel

    pane = to_panel(widget)
    pane.css_classes = list(getattr(pane, "css_classes", []) or []) + ["wb-widget"]
    close_with_session(widget)
    return pane


def close_with_session(widget) -> None:
    """Close ``widget`` when the current server session is destroyed (no-op outside a server session)."""
    doc = pn.state.curdoc
    if doc is None or getattr(doc, "session_context", None) is None:
        return
    with _SESSION_LOCK:
        widgets = _SESSION_WIDGETS.get(doc)
        if widgets is None:
            widgets = _SESSION_WIDGETS[doc] = weakref.WeakSet()
            ref = weakref.ref(doc)
            doc.on_session_destroyed(lambda context: close_session_widgets(ref()))
        widgets.add(widget)


def close_session_widgets(doc) -> int:
    """Close every widget the session of ``doc`` showed (its session ended); how many were closed."""
    with _SESSION_LOCK:
        widgets = list(_SESSION_WIDGETS.pop(doc, ())) if doc is not None else []
    for w in widgets:
        close(w)
    return len(widgets)


def close(widget) -> None:
    """Close a widget that is no longer shown: out of ipywidgets' registry, its data free to go."""
    if widget is None:
        return
    try:
        widget.close()
    except Exception:  # noqa: BLE001 — a widget whose comm is already gone is closed enough
        pass


def head_grid(scores, *, title: str = "", editable: bool = False):
    """A :class:`~workbench.views.widgets.HeadGrid` of scores only (``HeadGrid(...)``, its component); ``editable``:
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

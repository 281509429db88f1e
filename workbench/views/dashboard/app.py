"""The dashboard page: a plain Panel layout with the six tabs, built per browser session over a shared Workbench."""

from __future__ import annotations

import html

import panel as pn

from .common import Page, Selection
from .heads_page import HeadsPage
from .prompt_lab import PromptLab
from .retrieval_page import RetrievalPage
from .routing_page import RoutingPage
from .runs_page import RunsPage
from .sinks_page import SinksPage
from .state import Workbench

PAGES = (PromptLab, RetrievalPage, SinksPage, HeadsPage, RoutingPage, RunsPage)


class Dashboard(pn.viewable.Viewer):
    """All pages of one session. ``pages[name]`` gives a page (its controller methods are public)."""

    def __init__(self, wb: Workbench, **params):
        super().__init__(**params)
        self.wb = wb
        self.session = wb.new_session()  # how this session is named to others waiting for a model
        self.selection = Selection()  # one head selection for every tab of this session
        self.pages: dict[str, Page] = {}
        for cls in PAGES:
            try:
                self.pages[cls.title] = cls(wb, session=self.session, selection=self.selection, **self._links(cls))
            except Exception as e:  # noqa: BLE001 — one broken page must not take the app down
                page = Page(wb, session=self.session)
                page.title = cls.title
                page.fail(e)
                page.__panel__ = lambda p=page: pn.Column(p.alert)  # type: ignore[method-assign]
                self.pages[cls.title] = page
        self.tabs = pn.Tabs(*[(name, p) for name, p in self.pages.items()], dynamic=True, sizing_mode="stretch_width",
                            css_classes=["wb-tabs"])  # fmt: skip

    def _links(self, cls) -> dict:
        """What a page reads from another: the Heads tab joins the Retrieval tab's scan."""
        if cls is HeadsPage:
            return {"retrieval": lambda: getattr(self.pages.get(RetrievalPage.title), "result", None)}
        return {}

    def __panel__(self):
        return self.tabs


def build(wb: Workbench, *, title: str = "workbench dashboard"):
    """The served page. A plain Panel layout, not a template: Panel's templates pull web fonts from
    Google; this page loads nothing from outside the server (works offline)."""
    pn.extension("plotly", sizing_mode="stretch_width", notifications=False)
    dash = Dashboard(wb)
    try:
        source = wb.model().source
    except Exception:  # noqa: BLE001 — the prompt lab shows the error
        source = "(model failed to load)"
    header = pn.pane.HTML(f"<div style='background:#33415c;color:white;padding:8px 16px;font:600 20px sans-serif'>{html.escape(title)}"
                          f"<span style='font-weight:400;font-size:14px;margin-left:16px'>{html.escape(source)}</span>"
                          f"<span class='wb-session' style='font-weight:400;font-size:13px;float:right'>you are session {dash.session}</span></div>",
                          sizing_mode="stretch_width")  # fmt: skip
    page = pn.Column(header, dash, sizing_mode="stretch_width")
    page.dashboard = dash  # reachable from tests and scripts
    return page

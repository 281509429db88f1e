"""What every dashboard page shares: background computations, progress, errors shown in the page."""

from __future__ import annotations

import html
import logging
import re
import threading
from typing import Callable

import panel as pn
import param

from ..errors import WorkbenchError
from .state import Cancelled, Progress, Workbench

log = logging.getLogger("workbench.dashboard")


def _in_session(doc, fn: Callable, *args) -> None:
    """Run ``fn(*args)`` on the session's event loop (safe from worker threads); inline without a session."""
    if doc is not None and getattr(doc, "session_context", None) is not None:
        from panel.io.state import set_curdoc

        def call():
            with set_curdoc(doc):
                fn(*args)

        try:
            doc.add_next_tick_callback(call)
            return
        except Exception:  # the session went away: nobody is watching
            return
    fn(*args)


_MD_PUNCT = re.compile(r"([\\`*_{}\[\]()#+\-.!|~<>])")


def md_escape(text) -> str:
    """``text`` for a Markdown pane, shown as text: HTML tags escaped (Panel's Markdown passes raw HTML
    through, so ``<img onerror=...>`` would run) and Markdown punctuation backslash-escaped (``__x__``,
    links, code spans); line breaks kept. Everything user- or file-derived (run ids, paths, error texts,
    model names) goes through this or :func:`html_text` before it reaches the page."""
    lines = str(text).splitlines() or [""]
    return "<br>\n".join(_MD_PUNCT.sub(r"\\\1", html.escape(line, quote=True)) for line in lines)


def html_text(text) -> str:
    """``text`` for an HTML pane: escaped, line breaks kept."""
    return html.escape(str(text), quote=True).replace("\n", "<br>")


def table(frame, **kwargs) -> pn.pane.DataFrame:
    """A DataFrame pane whose cells are always escaped (run files, tokens and texts are data, never HTML)."""
    return pn.pane.DataFrame(frame, escape=True, **kwargs)


def message(err: BaseException) -> str:
    """What the page shows for a failure: workbench errors verbatim, anything else by type (logged in full)."""
    if isinstance(err, Cancelled):
        return "stopped."
    if isinstance(err, WorkbenchError):
        return str(err)
    log.error("dashboard computation failed", exc_info=err)
    return f"internal error ({type(err).__name__}): {err}. The server keeps running; see its log."


class Page(pn.viewable.Viewer):
    """A tab: ``busy`` while its computation runs in a worker thread; errors land in :attr:`alert`."""

    busy = param.Boolean(default=False, doc="a computation of this page is running")
    last_error = param.String(default="", doc="the last failure shown in the page")

    title = "page"

    def __init__(self, wb: Workbench, **params):
        super().__init__(**params)
        self.wb = wb
        self.alert = pn.pane.Alert(
            "", alert_type="danger", visible=False, css_classes=["wb-error"], sizing_mode="stretch_width"
        )
        self.status = pn.pane.Markdown("", css_classes=["wb-status"])
        self.task: threading.Thread | None = None
        self.progress: Progress | None = None
        self._queued: tuple | None = None

    # errors
    def fail(self, err: BaseException | str) -> None:
        text = err if isinstance(err, str) else message(err)
        self.last_error = text
        self.alert.object = md_escape(text)  # error texts quote run ids, file contents and prompts
        self.alert.visible = True

    def clear(self) -> None:
        self.last_error = ""
        self.alert.visible = False

    def guarded(self, fn: Callable) -> Callable:
        """A synchronous callback whose failures show in the page instead of escaping to the server."""

        def wrapper(*a, **k):
            try:
                return fn(*a, **k)
            except Exception as e:  # noqa: BLE001 — every failure ends up in the page
                self.fail(e)

        return wrapper

    # background work
    def start(self, label: str, work: Callable[[], object], done: Callable[[object], None], *,
              progress: Progress | None = None, on_progress: Callable[[Progress], None] | None = None,
              queue: bool = False) -> bool:  # fmt: skip
        """Run ``work()`` in a worker thread; then ``done(result)`` on the session's loop. One at a time per
        page: another request while busy is refused (shown in the page), or with ``queue=True`` run after it."""
        if self.busy:
            if queue:  # views that follow a selection: the latest request runs next, older ones are dropped
                self._queued = (label, work, done)
                return True
            self.fail("a computation is already running on this page: wait for it (or stop it)")
            return False
        doc = pn.state.curdoc
        self.clear()
        self.busy = True
        self.status.object = f"running: {md_escape(label)} …"
        self.progress = progress
        if progress is not None and on_progress is not None:
            progress.callback = lambda p: _in_session(doc, on_progress, p)

        def finish(result, err):
            self.busy = False
            if err is not None:
                self.status.object = f"{md_escape(label)}: {'stopped' if isinstance(err, Cancelled) else 'failed'}"
                self.fail(err)
            else:
                try:
                    done(result)
                    self.status.object = f"{md_escape(label)}: done"
                except Exception as e:  # noqa: BLE001
                    self.status.object = f"{md_escape(label)}: failed"
                    self.fail(e)
            queued, self._queued = self._queued, None
            if queued is not None and not self.busy:
                self.start(*queued, queue=True)

        def target():
            try:
                result, err = work(), None
            except BaseException as e:  # noqa: BLE001 — reported in the page
                result, err = None, e
            _in_session(doc, finish, result, err)

        self.task = threading.Thread(target=target, daemon=True, name=f"workbench-dashboard {label}")
        self.task.start()
        return True

    def wait(self, timeout: float = 120) -> None:
        """Block until the running computation and any queued one finished (tests, scripts)."""
        import time

        end = time.monotonic() + timeout
        while time.monotonic() < end:
            task = self.task
            if task is not None:
                task.join(max(0.0, end - time.monotonic()))
            if not self.busy and self._queued is None and (self.task is task):
                return
            time.sleep(0.01)

    def cancel(self, *_) -> None:
        if self.progress is not None:
            self.progress.cancel()
            self.status.object = "stopping after the current step …"

    def header(self, text: str) -> pn.pane.Markdown:
        return pn.pane.Markdown(text, sizing_mode="stretch_width")

"""What every dashboard page shares: background computations (a spinner and a Cancel button; never on the
server's event loop), errors and notices shown in the page, compact tables."""

from __future__ import annotations

import html
import logging
import math
import re
import threading
from typing import Callable

import panel as pn
import param

from ...base.errors import WorkbenchError
from .pool import Turn, Waiting
from .state import Progress, Workbench
from .validation import DashboardError, is_cancel

log = logging.getLogger("workbench.dashboard")  # the logger keeps its name from before the views folder


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


# Markdown punctuation, the HTML specials and whitespace that starts a line: written as numeric character
# references, which Markdown turns back into literal characters and never reads as markup. Backslash escapes
# would break entities (``&#x27;`` → ``&\#x27;`` shows as text: the double escape users saw).
_MD_SPECIAL = re.compile(r"""[\\`*_{}\[\]()#+\-.!|~<>&"'$:=]|^[ \t]+""")


def md_escape(text) -> str:
    """``text`` for a Markdown pane, shown exactly as written, escaped once: HTML specials and Markdown
    punctuation become character references (Panel's Markdown passes raw HTML through, so ``<img onerror=...>``
    would run; ``__x__``, links and code spans would format); line breaks kept. Everything user- or
    file-derived (run ids, paths, error texts, model names) goes through this or :func:`html_text` before it
    reaches the page."""
    lines = str(text).splitlines() or [""]
    return "<br>\n".join(_MD_SPECIAL.sub(lambda m: "".join(f"&#{ord(c)};" for c in m.group(0)), line) for line in lines)


def html_text(text) -> str:
    """``text`` for an HTML pane: escaped, line breaks kept."""
    return html.escape(str(text), quote=True).replace("\n", "<br>")


TABLE_CSS = """
table { border-collapse: collapse; font: 12px/1.35 system-ui, sans-serif; width: auto; }
th, td { text-align: left !important; padding: 2px 10px 2px 4px; border-bottom: 1px solid #e5e5e5; white-space: nowrap; }
th { background: #f4f5f7; font-weight: 600; }
td { max-width: 36em; overflow: hidden; text-overflow: ellipsis; }
"""


def table(frame, **kwargs) -> pn.pane.DataFrame:
    """A compact, left-aligned DataFrame pane (as wide as its columns, not the page) whose cells are always
    escaped (run files, tokens and texts are data, never HTML)."""
    kwargs["sizing_mode"] = "fixed"  # as wide as its columns (the app's default stretches panes to the page)
    kwargs["stylesheets"] = [*kwargs.get("stylesheets", []), TABLE_CSS]
    kwargs.setdefault("float_format", lambda x: f"{x:.4g}")
    return pn.pane.DataFrame(frame, escape=True, **kwargs)


def with_heads(frame, layer: str = "layer", head: str = "head", name: str = "head"):
    """Heads as names (``L17H3``) in one column instead of two number columns."""
    if layer not in frame or head not in frame:
        return frame
    out = frame.copy()
    names = [f"L{int(l)}H{int(h)}" for l, h in zip(out[layer], out[head])]
    out = out.drop(columns=[layer, head])
    out.insert(0, name, names)
    return out


def details(title: str, *objects, **kwargs) -> pn.Card:
    """Secondary detail (token ids, unit configs, JSON) behind a toggle, collapsed."""
    return pn.Card(*objects, title=title, collapsed=True, sizing_mode="stretch_width", css_classes=["wb-details"], **kwargs)


def message(err: BaseException) -> str:
    """What the page shows for a failure: workbench errors verbatim, anything else by type (logged in full)."""
    if is_cancel(err):
        return "stopped."
    if isinstance(err, WorkbenchError):
        return str(err)
    log.error("dashboard computation failed", exc_info=err)
    return f"internal error ({type(err).__name__}): {err}. The server keeps running; see its log."


class Worker:
    """Runs a widget's model computations (its :attr:`~workbench.views.widgets._base.WorkbenchWidget.runner`) in a
    thread — never on the server's event loop — and hands the result back on the session's loop. One job
    at a time; a newer request replaces a queued one (clicks that follow a selection). ``lock``: the model
    whose lock the job holds (a name; ``None``: the main model); ``False``: the job takes no lock — drill-down
    rows from the cache, which fetch under the lock themselves only when they must run the model."""

    def __init__(self, wb: Workbench, lock: str | None | bool = False, session: int | None = None):
        self.wb, self.lock, self.session = wb, lock, session
        self.doc = pn.state.curdoc
        self._queued = None
        self._running = False
        self._guard = threading.Lock()
        self.thread: threading.Thread | None = None

    def __call__(self, label: str, work: Callable, finish: Callable) -> None:
        with self._guard:
            if self._running:
                self._queued = (label, work, finish)
                return
            self._running = True
        self._start(label, work, finish)

    def _start(self, label, work, finish) -> None:
        def target():
            try:
                with self.wb.pool.on_behalf(Turn(label, self.session)):
                    if self.lock is False:
                        result, err = work(), None
                    else:
                        with self.wb.using(self.lock):
                            result, err = work(), None
            except BaseException as e:  # noqa: BLE001 — shown in the widget
                result, err = None, e
                if not isinstance(e, WorkbenchError):
                    log.error("widget computation failed", exc_info=e)
            _in_session(self.doc, self._done, finish, result, err)

        self.thread = threading.Thread(target=target, daemon=True, name=f"workbench-widget {label}")
        self.thread.start()

    def _done(self, finish, result, err) -> None:
        if err is not None and not isinstance(err, WorkbenchError):
            err = WorkbenchError(message(err))
        finish(result, err)
        with self._guard:
            queued, self._queued = self._queued, None
            if queued is None:
                self._running = False
        if queued is not None:
            self._start(*queued)

    def wait(self, timeout: float = 60) -> None:
        """Block until nothing runs or waits (tests, scripts)."""
        import time

        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if not self._running and self._queued is None:
                return
            time.sleep(0.01)


class Selection(param.Parameterized):
    """One browser session's head selection, shared by its tabs: a click in any head grid (Prompt lab,
    Retrieval, Sinks, Heads) sets ``selected``; "ablate the top K" of any ranking sets ``ablate``; the Prompt
    lab shows and edits both."""

    selected = param.List(default=[], doc="[layer, head], or [] before anything is selected")
    ablate = param.List(default=[], doc="heads to ablate, [[layer, head], ...]")


def sync(a: param.Parameterized, b: param.Parameterized, **names: str) -> list:
    """Keep ``a.<x>`` and ``b.<names[x]>`` equal both ways (``b`` takes ``a``'s value now); returns the watchers."""
    watchers = []
    for x, y in names.items():
        def push(e, target=b, name=y):
            if getattr(target, name) != e.new:
                setattr(target, name, e.new)

        def pull(e, target=a, name=x):
            if getattr(target, name) != e.new:
                setattr(target, name, e.new)

        setattr(b, y, getattr(a, x))
        watchers += [(a, a.param.watch(push, x)), (b, b.param.watch(pull, y))]
    return watchers


def link_two_way(component, target, **links) -> tuple:
    """``component.link(target, bidirectional=True, **links)`` (Panel's own two-way link); returns what
    :func:`unlink_two_way` needs to undo it."""
    forward = component.link(target, bidirectional=True, **links)
    reverse = component._links[-1].bidirectional_watcher if getattr(component, "_links", None) else None
    return component, target, forward, reverse


def unlink_two_way(link) -> None:
    """Undo :func:`link_two_way`: both watchers go (the old views, and what they hold — a drill-down of a long prompt —
    can be freed)."""
    if not link:
        return
    component, target, forward, reverse = link
    component.param.unwatch(forward)
    if reverse is not None:
        target.param.unwatch(reverse)


class Page(pn.viewable.Viewer):
    """A tab: ``busy`` while its computation runs in a worker thread (a spinner and a Cancel button show);
    errors land in :attr:`alert`, neutral notices (a cancelled run) in :attr:`notice`."""

    busy = param.Boolean(default=False, doc="a computation of this page is running")
    last_error = param.String(default="", doc="the last failure shown in the page")
    last_notice = param.String(default="", doc="the last neutral notice shown in the page")

    title = "page"

    def __init__(self, wb: Workbench, *, session: int | None = None, selection=None, **params):
        super().__init__(**params)
        self.wb = wb
        self.session = wb.new_session() if session is None else session  # a number shown to others, never the session id
        self.selection = selection  # the session's head selection, shared by its tabs (Selection; None: standalone page)
        self._followed = None  # the link of this page's grid to the session's selection (follow_selection)
        self._error_from = None  # the guarded action whose failure the alert shows (its success clears it)
        self.queue_note = pn.pane.Alert("", alert_type="warning", visible=False, css_classes=["wb-queue"], sizing_mode="stretch_width")
        self.alert = pn.pane.Alert("", alert_type="danger", visible=False, css_classes=["wb-error"], sizing_mode="stretch_width")
        self.notice = pn.pane.Alert("", alert_type="info", visible=False, css_classes=["wb-notice"], sizing_mode="stretch_width")
        self.status = pn.pane.Markdown("", css_classes=["wb-status"])
        self.spinner = pn.indicators.LoadingSpinner(value=self.param.busy, visible=self.param.busy, size=18, width=18, height=18,
                                                    css_classes=["wb-spinner"])  # fmt: skip
        self.cancel_button = pn.widgets.Button(label="Cancel", color="warning", width=90, disabled=True, css_classes=["wb-cancel"])
        self.cancel_button.on_click(self.cancel)
        self.param.watch(lambda e: setattr(self.cancel_button, "disabled", not e.new), "busy")
        self.task: threading.Thread | None = None
        self.progress: Progress | None = None
        self._queued: tuple | None = None
        self.workers: list[Worker] = []

    def host(self, widget, *, lock: str | None | bool = False):
        """``widget`` as a Panel component whose computations run in a :class:`Worker` (off the event loop)."""
        from .views import to_panel_component

        worker = Worker(self.wb, lock, self.session)
        self.workers.append(worker)
        self.workers[:] = self.workers[-8:]
        widget.runner = worker
        return to_panel_component(widget)

    def follow_selection(self, view) -> None:
        """A head grid of this page (a :class:`~.views.HeadGridView`) shows the session's selected head, and a
        click in it selects that head in every tab (the Prompt lab's edits act on it)."""
        sel = self.selection
        if sel is None:
            return
        L, H = view.widget.shape
        if len(sel.selected) == 2 and sel.selected[0] < L and sel.selected[1] < H:
            view.panel.selected = list(sel.selected)
        elif view.panel.selected:
            sel.selected = list(view.panel.selected)
        unlink_two_way(self._followed)  # the page's previous grid lets go of the selection
        self._followed = link_two_way(view.panel, sel, selected="selected")

    def rank_row(self, view, *, what: str = "grid") -> pn.Row:
        """"Ablate the top K" of a ranking in one click: the K highest heads of ``view``'s current metric
        (:meth:`~workbench.views.widgets.HeadGrid.top`; NaN never ranks) become the Prompt lab's ablation set."""
        k_input = pn.widgets.IntInput(name="K", value=5, start=1, end=self.wb.caps.max_ablation_k, width=80, css_classes=["wb-rank-k"])
        button = pn.widgets.Button(label=f"ablate the top K of this {what} in the Prompt lab", css_classes=["wb-ablate-top"], width=330)

        def ablate_top(_=None):
            if self.selection is None:
                raise DashboardError("this page is not part of a dashboard session")
            k = int(k_input.value or 0)
            if not 1 <= k <= self.wb.caps.max_ablation_k:
                raise DashboardError(f"K must lie in 1..{self.wb.caps.max_ablation_k}, got {k}")
            heads = [[l, h] for l, h, v in view.widget.top(k) if math.isfinite(v)]
            if not heads:
                raise DashboardError("this scan ranks no head (every score is undefined)")
            self.selection.ablate = heads
            self.inform(f"Prompt lab: ablating {', '.join(f'L{l}H{h}' for l, h in heads)} (top {len(heads)} by "
                        f"{view.widget.metric}); its output re-runs with them")  # fmt: skip

        button.on_click(lambda e: self.guarded(ablate_top)())
        return pn.Row(k_input, button, align="end")

    def status_row(self) -> pn.Row:
        return pn.Column(pn.Row(self.spinner, self.status, self.cancel_button, align="center"), self.queue_note)

    # errors and notices
    def fail(self, err: BaseException | str) -> None:
        text = err if isinstance(err, str) else message(err)
        self.last_error = text
        self.alert.object = md_escape(text)  # error texts quote run ids, file contents and prompts
        self.alert.visible = True

    def inform(self, text: str) -> None:
        self.last_notice = text
        self.notice.object = md_escape(text)
        self.notice.visible = True

    def clear(self) -> None:
        self._error_from = None
        self.last_error = self.last_notice = ""
        self.alert.visible = False
        self.notice.visible = False

    def guarded(self, fn: Callable) -> Callable:
        """A synchronous callback whose failures show in the page instead of escaping to the server."""

        def wrapper(*a, **k):
            try:
                out = fn(*a, **k)
            except Exception as e:  # noqa: BLE001 — every failure ends up in the page
                self.fail(e)
                self._error_from = fn
                return None
            if self._error_from is not None and self._error_from == fn:  # the input that failed is fixed
                self.clear()
            return out

        return wrapper

    # background work
    def start(self, label: str, work: Callable[[], object], done: Callable[[object], None], *,
              progress: Progress | None = None, on_progress: Callable[[Progress], None] | None = None,
              queue: bool = False, failed: Callable[[BaseException], None] | None = None) -> bool:  # fmt: skip
        """Run ``work()`` in a worker thread; then ``done(result)`` on the session's loop. One at a time per
        page: another request while busy is refused (shown in the page), or with ``queue=True`` run after it.
        ``progress``: what Cancel sets (a fresh one is made when not given; ``work`` reads :attr:`progress`);
        it also stops waiting for a model another session holds — the wait is shown (:meth:`show_waiting`).
        ``failed(err)``: called on an error (not on Cancel), e.g. to clear the result the error replaces."""
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
        progress = progress or Progress()
        self.progress = progress
        if progress is not None and on_progress is not None:
            progress.callback = lambda p: _in_session(doc, on_progress, p)

        def finish(result, err):
            self.busy = False
            self.show_waiting(None)
            if err is not None and not is_cancel(err) and failed is not None:
                failed(err)
            if err is not None and is_cancel(err):
                self.status.object = f"{md_escape(label)}: stopped"
                self.inform(f"{label}: stopped before it finished; nothing was changed.")
            elif err is not None:
                self.status.object = f"{md_escape(label)}: failed"
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

        turn = Turn(label, self.session)

        def target():
            try:
                with self.wb.pool.on_behalf(turn, cancel=progress, on_wait=lambda w: _in_session(doc, self.show_waiting, w)):
                    result, err = work(), None
            except BaseException as e:  # noqa: BLE001 — reported in the page
                result, err = None, e
            _in_session(doc, finish, result, err)

        self.task = threading.Thread(target=target, daemon=True, name=f"workbench-dashboard {label}")
        self.task.start()
        return True

    def wait(self, timeout: float = 120) -> None:
        """Block until the running computation, any queued one and the hosted widgets' jobs finished (tests, scripts)."""
        import time

        end = time.monotonic() + timeout
        while time.monotonic() < end:
            task = self.task
            if task is not None:
                task.join(max(0.0, end - time.monotonic()))
            for w in list(self.workers):
                w.wait(max(0.0, end - time.monotonic()))
            if not self.busy and self._queued is None and (self.task is task) and not any(w._running for w in self.workers):
                return
            time.sleep(0.01)

    def show_waiting(self, waiting: Waiting | None) -> None:
        """The line for a model this page's computation waits for (who runs, since when, its place), or
        nothing once it runs."""
        if waiting is None:
            self.queue_note.visible = False
            self.queue_note.object = ""
            return
        self.queue_note.object = md_escape(waiting.describe())
        self.queue_note.visible = True

    def cancel(self, *_) -> None:
        if self.progress is not None and self.busy:
            self.progress.cancel()
            self.status.object = "stopping at the next step …"

    def header(self, text: str) -> pn.pane.Markdown:
        return pn.pane.Markdown(text, sizing_mode="stretch_width")


def _diverging(v: float, mx: float) -> str:
    """Blue (loss went down) … white … red (loss went up)."""
    t = max(-1.0, min(1.0, v / mx if mx else 0.0))
    a, b = ((247, 247, 247), (178, 24, 43)) if t >= 0 else ((247, 247, 247), (33, 102, 172))
    u = abs(t)
    return "rgb({},{},{})".format(*(round(x + u * (y - x)) for x, y in zip(a, b)))


def tokens_html(tokens, notes, user, delta=None, *, css: str = "wb-delta-tokens") -> str:
    """The prompt's tokens as escaped spans: the user's own tokens coloured by ``delta`` (Δloss per token, a
    diverging scale with its colour bar), template tokens greyed out and labelled."""
    mx = max((abs(d) for d in (delta or []) if d is not None), default=0.0) or 1.0
    spans = []
    for i, t in enumerate(tokens):
        label = html.escape(str(t).replace("\n", "↵\n"))
        note = (notes[i] if notes and i < len(notes) else "") or ""
        if not user[0] <= i < user[1]:
            spans.append(f"<span class='wb-template' title='template token (not counted)' style='color:#999;background:#f2f2f2'>{label}</span>")
            continue
        d = delta[i] if delta and i < len(delta) else None
        tip = html.escape((f"Δloss {d:+.4f} nats" if d is not None else "not predicted (first token)") + (f"; {note}" if note else ""), quote=True)
        style = f"background:{_diverging(d, mx)}" if d is not None else ""
        spans.append(f"<span class='wb-user-tok' title='{tip}' style='{style}'>{label}</span>")
    bar = ""
    if delta is not None:
        stops = ", ".join(_diverging(v, 1.0) for v in (-1, -0.5, 0, 0.5, 1))
        bar = (f"<div style='font-size:11px;color:#444;margin:2px 0'>Δloss per token: <b>{-mx:+.3g}</b> "
               f"<span style='display:inline-block;width:120px;height:10px;vertical-align:middle;border:1px solid #ccc;"
               f"background:linear-gradient(to right, {stops})'></span> <b>{mx:+.3g}</b> nats (blue: better, red: worse; "
               "grey: template tokens, not counted)</div>")  # fmt: skip
    return (f"{bar}<div class='{css}' style='white-space:pre-wrap;font:12px/1.7 ui-monospace,monospace;max-height:220px;"
            f"overflow-y:auto;border:1px solid #ddd;padding:4px'>{''.join(spans)}</div>")


def words_html(words) -> str:
    """A word diff (``[[op, word]]``) as one text: removed words struck through in red, added ones in green."""
    out = []
    for op, w in words:
        w = html.escape(w)
        out.append(f"<del class='wb-del' style='background:#fdd'>{w}</del>" if op == "-" else
                   f"<ins class='wb-add' style='background:#dfd;text-decoration:none'>{w}</ins>" if op == "+" else w)  # fmt: skip
    return " ".join(out)


def effect_html(pe, *, title: str = "With edits") -> str:
    """What an edit did (a :class:`workbench.effects.PromptEffect`): the edits named, the loss on the user's own
    tokens before → after, the continuation as a word diff, Δloss per token."""
    n = pe.user[1] - pe.user[0]
    tmpl = f" ({pe.n_template} template tokens excluded)" if pe.n_template else ""
    extra = ""
    if pe.max_logit_change is not None:
        extra = f", max |Δlogit| {pe.max_logit_change:.3g}, mean KL {pe.mean_kl:.3g}"
    changed = pe.text_before != pe.text_after
    cont = ("<i>no continuation generated</i>" if pe.text_before is None else
            f"<div class='wb-diff' style='white-space:pre-wrap'>{words_html(pe.diff())}</div>" if changed else
            f"<div class='wb-diff' style='white-space:pre-wrap'>unchanged: {html.escape(pe.text_before)}</div>")  # fmt: skip
    return (f"<div><b>{html.escape(title)}</b> <span class='wb-edits'>[{html.escape('; '.join(pe.edits))}]</span>: loss on your {n} tokens{tmpl} "
            f"<span class='wb-loss-before'>{pe.loss_before:.4f}</span> → <span class='wb-loss'>{pe.loss_after:.4f}</span> "
            f"(Δ <span class='wb-delta-loss'>{pe.delta_loss:+.4f}</span> nats){extra} — <b>{'output changed' if changed else 'output unchanged'}</b>"
            f"<div><b>continuation</b> (before → after):</div>{cont}{tokens_html(pe.tokens, pe.notes, pe.user, pe.token_delta())}</div>")  # fmt: skip

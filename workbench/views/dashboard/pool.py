"""The models a dashboard serves: loaded once per server, one lock per model.

Sessions never touch a model directly: a computation holds the model's lock (:meth:`ModelPool.using`) for
as long as its probes or edits are attached, so concurrent sessions queue instead of mixing their hooks
into each other's captures. The line is first come, first served and visible: a waiting computation learns
who holds the model (what, for which session number — never a prompt or a session id — and since when) and
its place (:class:`Waiting`), and leaves the line when its page's Cancel is pressed. Only sources from the
server's configuration can ever be loaded."""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

from ...base.errors import Cancelled
from .validation import DashboardError


@dataclass(eq=False)
class Turn:
    """One computation's turn on a model: what it is (``label``, e.g. "prompt"), for which session (a
    number, never the session's id or its inputs), since when (epoch seconds) it waits or runs."""

    label: str
    session: int | None = None
    since: float = field(default_factory=time.time)

    def describe(self) -> str:
        who = f"session {self.session}" if self.session is not None else "a script"
        return f"{self.label} for {who}"


@dataclass
class Waiting:
    """What a computation waiting for a model sees: who holds it (``holder``; None between turns), since
    when, and this computation's place in line (1 = next)."""

    model: str
    holder: Turn | None
    place: int
    ahead: list[Turn]

    def describe(self) -> str:
        """One line for the page (no prompt, no session id: labels and session numbers only)."""
        held = (f"it runs {self.holder.describe()} since {time.strftime('%H:%M:%S', time.localtime(self.holder.since))}"
                if self.holder is not None else "it is between two computations")  # fmt: skip
        order = {1: "1st", 2: "2nd", 3: "3rd"}.get(self.place, f"{self.place}th")
        queued = f" (after {', '.join(t.describe() for t in self.ahead)})" if self.ahead else ""
        return f"waiting for the model {self.model}: {held}; you are {order} in line{queued}. Cancel stops waiting."


class _Behalf(threading.local):
    """The computation a worker thread runs for (:meth:`ModelPool.on_behalf`)."""

    turn: Turn | None = None
    cancel = None
    on_wait: Callable[[Waiting], None] | None = None


class _Slot:
    """A model and its lock: first come, first served (the line is what a waiting page shows), re-entrant
    for the thread that holds it, and given up while waiting when the waiter's ``cancel`` is set."""

    def __init__(self, name: str, source):
        self.name = name
        self.source = source
        self.model = None
        self.cond = threading.Condition()
        self.owner: int | None = None  # thread ident holding the lock
        self.depth = 0
        self.holder: Turn | None = None
        self.line: list[Turn] = []  # waiting, first = next
        self.load_lock = threading.Lock()
        self.uses = 0
        self.active = 0  # sessions inside the lock right now (tests assert it never exceeds 1)
        self.max_active = 0

    def waiting(self, turn: Turn) -> Waiting:
        i = self.line.index(turn)
        return Waiting(self.name, self.holder, i + 1, list(self.line[:i]))

    def acquire(self, turn: Turn, *, timeout: float | None = None, cancel=None, on_wait=None) -> bool:
        """Wait in line for the lock (``on_wait(Waiting)`` on each change, ``on_wait(None)`` once it is ours)."""
        me = threading.get_ident()
        with self.cond:
            if self.owner == me:
                self.depth += 1
                return True
            self.line.append(turn)
            self.cond.notify_all()  # others' place descriptions change
            end = None if timeout is None or timeout < 0 else time.monotonic() + timeout
            shown = None
            try:
                while self.owner is not None or self.line[0] is not turn:
                    if cancel is not None and cancel.is_set():
                        raise Cancelled("stopped while waiting for the model")
                    if on_wait is not None:
                        w = self.waiting(turn)
                        key = (id(w.holder), w.place)
                        if key != shown:  # tell the page when its place or the holder changes
                            shown = key
                            on_wait(w)
                    left = None if end is None else end - time.monotonic()
                    if left is not None and left <= 0:
                        return False
                    self.cond.wait(0.2 if left is None else min(0.2, left))  # polls cancel
            except BaseException:
                self.line.remove(turn)
                self.cond.notify_all()
                raise
            self.line.pop(0)
            self.owner, self.depth, self.holder = me, 1, turn
            turn.since = time.time()
            self.cond.notify_all()
        if shown is not None:
            on_wait(None)  # its turn came: the page stops showing the line
        return True

    def release(self) -> None:
        with self.cond:
            self.depth -= 1
            if self.depth == 0:
                self.owner, self.holder = None, None
                self.cond.notify_all()


class ModelPool:
    """``main``: the main model's source (``None``: the embedded SmolLM2) under the name ``"default"``;
    ``others``: further sources, named by themselves (the Routing tab's MoE models)."""

    def __init__(self, main=None, others: Sequence[str] = (), *, loader: Callable | None = None):
        self.main_name = "default" if main is None else str(main)
        self._slots: dict[str, _Slot] = {self.main_name: _Slot(self.main_name, main)}
        for name in others:
            self._slots.setdefault(str(name), _Slot(str(name), str(name)))
        self._loader = loader
        self._behalf = _Behalf()

    def names(self) -> list[str]:
        return list(self._slots)

    def _slot(self, name: str | None) -> _Slot:
        name = self.main_name if name is None else name
        if name not in self._slots:
            raise DashboardError(f"unknown model {name!r}; this server offers {self.names()}")
        return self._slots[name]

    def model(self, name: str | None = None):
        """The loaded model (loads it on first use; run it only inside :meth:`using`)."""
        slot = self._slot(name)
        with slot.load_lock:
            if slot.model is None:
                load = self._loader
                if load is None:
                    from ... import load
                slot.model = load(slot.source)
        return slot.model

    @contextmanager
    def on_behalf(self, turn: Turn, *, cancel=None, on_wait: Callable[[Waiting | None], None] | None = None) -> Iterator[None]:
        """In this thread, the computations :meth:`using` runs are ``turn`` (what a waiting session is shown);
        ``cancel`` (an Event-like ``is_set()``) stops waiting for a model; ``on_wait(Waiting)`` is called when
        this thread's place in a model's line or the model's holder changes, ``on_wait(None)`` when it got the model."""
        b = self._behalf
        saved = (b.turn, b.cancel, b.on_wait)
        b.turn, b.cancel, b.on_wait = turn, cancel, on_wait
        try:
            yield
        finally:
            b.turn, b.cancel, b.on_wait = saved

    @contextmanager
    def using(self, name: str | None = None, *, timeout: float | None = None) -> Iterator[object]:
        """Exclusive use of a model: hold its lock while attaching probes/edits and running it. Waiters are
        served in order (:meth:`queue`); a waiter under :meth:`on_behalf` with ``cancel`` set stops waiting
        (:class:`~workbench.base.errors.Cancelled`). ``timeout`` (seconds): give up with a :class:`DashboardError`."""
        slot = self._slot(name)
        model = self.model(name)
        b = self._behalf
        turn = Turn(b.turn.label, b.turn.session) if b.turn is not None else Turn("computation")
        if not slot.acquire(turn, timeout=timeout, cancel=b.cancel, on_wait=b.on_wait):
            raise DashboardError("the model is busy with another computation (another tab or user); try again in a moment")
        outer = slot.depth == 1
        try:
            if outer:
                slot.active += 1
                slot.max_active = max(slot.max_active, slot.active)
            slot.uses += 1
            try:
                yield model
            finally:
                if outer:
                    slot.active -= 1
        finally:
            slot.release()

    def pause(self, name: str | None = None, seconds: float = 0.0) -> None:
        """Inside :meth:`using`: give the lock up and take the last place in line, so every session already
        waiting for the model runs first (long scans call this between tests)."""
        slot = self._slot(name)
        b = self._behalf
        with slot.cond:
            turn, depth = slot.holder, slot.depth
            if slot.owner != threading.get_ident() or turn is None:
                return
            if not slot.line:  # nobody waits: keep the model
                return
            slot.active -= 1
            slot.owner, slot.depth, slot.holder = None, 0, None
            slot.cond.notify_all()
        time.sleep(seconds)
        slot.acquire(Turn(turn.label, turn.session), on_wait=b.on_wait)  # no cancel here: the scan checks it after the pause
        with slot.cond:
            slot.depth = depth
            slot.active += 1

    def queue(self, name: str | None = None) -> tuple[Turn | None, list[Turn]]:
        """Who holds the model now and who waits, in order (labels and session numbers only)."""
        slot = self._slot(name)
        with slot.cond:
            return slot.holder, list(slot.line)

    def busy(self, name: str | None = None) -> bool:
        """Some computation holds the model now."""
        return self._slot(name).owner is not None

    def lock_stats(self, name: str | None = None) -> dict:
        s = self._slot(name)
        return {"uses": s.uses, "max_active": s.max_active}

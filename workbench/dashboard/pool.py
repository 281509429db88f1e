"""The models a dashboard serves: loaded once per server, one lock per model.

Sessions never touch a model directly: a computation holds the model's lock (:meth:`ModelPool.using`) for
as long as its probes or edits are attached, so concurrent sessions queue instead of mixing their hooks
into each other's captures. Only sources from the server's configuration can ever be loaded."""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

from .validation import DashboardError


class _Slot:
    def __init__(self, source):
        self.source = source
        self.model = None
        self.lock = threading.RLock()  # held while probes/edits are attached or the model runs
        self.load_lock = threading.Lock()
        self.uses = 0
        self.active = 0  # sessions inside the lock right now (tests assert it never exceeds 1)
        self.max_active = 0


class ModelPool:
    """``main``: the main model's source (``None``: the embedded SmolLM2) under the name ``"default"``;
    ``others``: further sources, named by themselves (the Routing tab's MoE models)."""

    def __init__(self, main=None, others: Sequence[str] = (), *, loader: Callable | None = None):
        self.main_name = "default" if main is None else str(main)
        self._slots: dict[str, _Slot] = {self.main_name: _Slot(main)}
        for name in others:
            self._slots.setdefault(str(name), _Slot(str(name)))
        self._loader = loader

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
                    from .. import load
                slot.model = load(slot.source)
        return slot.model

    @contextmanager
    def using(self, name: str | None = None, *, timeout: float | None = None) -> Iterator[object]:
        """Exclusive use of a model: hold its lock while attaching probes/edits and running it. ``timeout``
        (seconds): give up with a :class:`DashboardError` instead of waiting longer."""
        slot = self._slot(name)
        model = self.model(name)
        if not slot.lock.acquire(timeout=-1 if timeout is None else timeout):
            raise DashboardError("the model is busy with another computation (another tab or user); try again in a moment")
        try:
            slot.active += 1
            slot.uses += 1
            slot.max_active = max(slot.max_active, slot.active)
            try:
                yield model
            finally:
                slot.active -= 1
        finally:
            slot.lock.release()

    def pause(self, name: str | None = None, seconds: float = 0.01) -> None:
        """Inside :meth:`using`: give the lock up for a moment, so a session waiting for the model gets it
        (long scans call this between tests), then take it back."""
        slot = self._slot(name)
        slot.active -= 1
        slot.lock.release()
        try:
            time.sleep(seconds)
        finally:
            slot.lock.acquire()
            slot.active += 1

    def busy(self, name: str | None = None) -> bool:
        """Some computation holds the model now."""
        return self._slot(name).active > 0

    def lock_stats(self, name: str | None = None) -> dict:
        s = self._slot(name)
        return {"uses": s.uses, "max_active": s.max_active}

"""Cancels streams that stop making progress, so a silent caller cannot hold a server thread.

gRPC's synchronous server gives a handler no timeout on reading the next request or on a send that waits for
the reader's flow-control window: a caller that opens a Put and never sends its header, or that stops reading
a Get, holds a thread until its own deadline, which it chooses (or leaves unset). One watchdog thread per node
keeps a deadline per open stream, moved forward at every chunk, and cancels the call when it passes; the
handler's blocked read or send then fails and the thread is free.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass
class Watch:
    """One stream's deadline; `touch` after each unit of progress."""

    deadline: float
    what: str
    expired: bool = False

    def touch(self, timeout: float) -> None:
        self.deadline = time.monotonic() + timeout


class Watchdog:
    def __init__(self, tick: float = 0.2) -> None:
        self._tick = tick
        self._lock = threading.Lock()
        self._watches: dict[int, tuple[Watch, Callable[[], None]]] = {}
        self._ids = itertools.count()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.cancelled = 0

    @contextmanager
    def watch(self, cancel: Callable[[], None], timeout: float, what: str) -> Iterator[Watch]:
        """Call `cancel` if the stream makes no progress for `timeout` seconds (the first wait included)."""
        w = Watch(time.monotonic() + timeout, what)
        key = next(self._ids)
        with self._lock:
            self._watches[key] = (w, cancel)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="mesh-watchdog", daemon=True)
                self._thread.start()
        try:
            yield w
        finally:
            with self._lock:
                self._watches.pop(key, None)

    def _run(self) -> None:
        while not self._stop.wait(self._tick):
            now = time.monotonic()
            with self._lock:
                due = [(k, w, c) for k, (w, c) in self._watches.items() if w.deadline <= now]
                for k, w, _ in due:
                    del self._watches[k]
                    w.expired = True
                self.cancelled += len(due)
            for _, w, cancel in due:
                log.info("cancelled a stalled stream: %s", w.what)
                try:
                    cancel()
                except Exception:  # pragma: no cover - a call that already ended
                    log.debug("cancel failed", exc_info=True)

    def stop(self) -> None:
        self._stop.set()

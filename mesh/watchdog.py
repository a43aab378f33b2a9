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


LOG_EVERY = 10.0  # seconds between log lines about cancelled streams


class Watchdog:
    def __init__(self, tick: float = 0.2) -> None:
        self._tick = tick
        self._lock = threading.Lock()
        self._watches: dict[int, tuple[Watch, Callable[[], None]]] = {}
        self._ids = itertools.count()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.cancelled = 0
        self._logged_at = -LOG_EVERY  # the last log line about cancelled streams
        self._unlogged = 0            # cancelled since, not named in a line yet

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
            if due:
                self._log(now, [w.what for _, w, _ in due])
            for _, w, cancel in due:
                try:
                    cancel()
                except Exception:  # pragma: no cover - a call that already ended
                    log.debug("cancel failed", exc_info=True)

    def _log(self, now: float, what: list[str]) -> None:
        """One line per LOG_EVERY seconds at most: a caller that opens silent streams as fast as they are cancelled
        must not fill the log (1,242 lines in one squat, one per stream, before this)."""
        self._unlogged += len(what)
        if now - self._logged_at < LOG_EVERY:
            return
        log.info("cancelled %d stalled stream(s), e.g. %s (at most one such line per %.0f s)", self._unlogged,
                 what[0], LOG_EVERY)
        self._logged_at, self._unlogged = now, 0

    def stop(self) -> None:
        self._stop.set()

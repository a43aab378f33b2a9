"""Request coalescing: concurrent calls for the same key share one execution (groupcache's singleflight).

ComfyUI fleets often start the same workflow on several instances at once; without coalescing, every
concurrent lookup of a hot key on one node would start its own transfer from the owner.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Generic, TypeVar

T = TypeVar("T")


class Group(Generic[T]):
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._calls: dict[str, Future[T]] = {}

    def do(self, key: str, fn: Callable[[], T], timeout: float | None = None) -> T:
        """Run fn once for all concurrent callers of `key`; a follower waits at most `timeout` seconds."""
        with self._lock:
            call = self._calls.get(key)
            leader = call is None
            if leader:
                call = self._calls[key] = Future()
        assert call is not None
        if not leader:
            return call.result(timeout)
        try:
            call.set_result(fn())
        except BaseException as e:
            call.set_exception(e)
        finally:
            with self._lock:
                del self._calls[key]
        return call.result()

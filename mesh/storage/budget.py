"""A node-wide budget of bytes in flight: the sum of what concurrent Put streams hold before it is stored.

The store's budget counts a blob only once it is stored, one put at a time; sixteen puts of a blob that each
fit alone can together hold many times the budget while they stream. Every received chunk takes its bytes
from this budget first; a put that would overrun it is refused at once (RESOURCE_EXHAUSTED) rather than queued,
so memory stays bounded by the store budget plus this one.
"""

from __future__ import annotations

import threading


class ByteBudget:
    def __init__(self, limit: int) -> None:
        if limit <= 0:
            raise ValueError("an in-flight budget must be positive")
        self.limit = limit
        self._lock = threading.Lock()
        self._used = 0
        self.refusals = 0

    @property
    def used(self) -> int:
        return self._used

    def take(self, n: int) -> bool:
        """Reserve n bytes, or False (and nothing reserved) if that would exceed the limit."""
        with self._lock:
            if self._used + n > self.limit:
                self.refusals += 1
                return False
            self._used += n
            return True

    def give(self, n: int) -> None:
        with self._lock:
            self._used = max(0, self._used - n)

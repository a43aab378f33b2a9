"""The one way tests and their support wait for something: poll a condition under a bounded deadline.

No fixed sleeps stand in for "it should have happened by now"; an absence is asserted only after something
that proves the system had its chance. Kept free of pytest so the scripts that use the test support can too.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def poll(check: Callable[[], T], what: str, timeout: float = 30.0, interval: float = 0.05) -> T:
    """Wait until `check()` holds, at most `timeout` seconds, and return what it answered (truthy);
    TimeoutError naming `what` otherwise. `check` may raise to stop the wait early (a process that died)."""
    deadline = time.monotonic() + timeout
    while not (got := check()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"not within {timeout} s: {what}")
        time.sleep(interval)
    return got

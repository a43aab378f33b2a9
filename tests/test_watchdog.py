"""The stream watchdog cancels what stalls, and says so in a few log lines however many streams a caller stalls."""

from __future__ import annotations

import logging
import threading

import pytest

from mesh.watchdog import Watchdog
from tests.support.poll import poll


def test_a_flood_of_stalled_streams_is_cancelled_in_a_few_log_lines(caplog: pytest.LogCaptureFixture) -> None:
    dog = Watchdog(tick=0.01)
    cancelled = []
    lock = threading.Lock()

    def cancel() -> None:
        with lock:
            cancelled.append(1)

    with caplog.at_level(logging.INFO, logger="mesh.watchdog"):
        for i in range(300):  # a squat: silent streams opened again as fast as they are cancelled
            with dog.watch(cancel, 0.001, f"Hello from 10.0.0.{i % 250}"):
                poll(lambda: len(cancelled) > i, "cancelled", timeout=5, interval=0.001)
    dog.stop()
    assert len(cancelled) == 300 and dog.cancelled == 300
    lines = [r.getMessage() for r in caplog.records if "stalled stream" in r.getMessage()]
    assert 1 <= len(lines) <= 2, lines  # the whole squat took well under 2 x LOG_EVERY
    assert lines[0].startswith("cancelled 1 stalled stream(s), e.g. Hello from 10.0.0.0")

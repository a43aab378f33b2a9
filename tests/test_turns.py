"""Turns: a semaphore that serves waiters in arrival order, and the transfer slots PeerClient takes from it."""

from __future__ import annotations

import threading
import time

import pytest

from mesh.transport.turns import Turns
from tests.conftest import poll


def test_waiters_are_served_in_arrival_order_and_a_releaser_cannot_barge() -> None:
    turns = Turns(1)
    assert turns.acquire(1)
    order: list[int] = []
    threads = []
    for i in range(5):
        def wait(i: int = i) -> None:
            assert turns.acquire(10)
            order.append(i)
            turns.release()
        t = threading.Thread(target=wait)
        t.start()
        threads.append(t)
        poll(lambda n=i + 1: len(turns._waiting) == n, f"{i + 1} waiting")  # queued in this order
    turns.release()
    assert not turns.acquire(0)  # the freed slot went to the longest waiter, not to this late caller
    for t in threads:
        t.join(10)
    assert order == [0, 1, 2, 3, 4]
    assert turns.acquire(0)


def test_a_wait_that_times_out_leaves_the_line_and_takes_nothing() -> None:
    turns = Turns(2)
    assert turns.acquire(0) and turns.acquire(0)
    t0 = time.monotonic()
    assert not turns.acquire(0.05)
    assert time.monotonic() - t0 >= 0.05 and not turns._waiting
    turns.release()
    assert turns.acquire(0)  # the slot released was not lost to the waiter that gave up
    with pytest.raises(ValueError):
        Turns(0)

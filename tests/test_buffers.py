"""The memory received values land in (mesh/buffers.py): exact sizes, zero-filled, never handed out twice, and a
reserve that refills the sizes asked for, within its budget, and lets go of sizes no longer asked for."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from mesh.buffers import HUGE, Reserve
from tests.support.poll import poll

MiB = 1024**2


@pytest.fixture
def reserve() -> Iterator[Reserve]:
    r = Reserve()
    yield r
    r.configure(0)


def held(r: Reserve) -> int:
    return r.stats().held


def test_small_requests_are_ordinary_memory_of_the_exact_size(reserve: Reserve) -> None:
    reserve.configure(64 * MiB)
    view = reserve.take(1000)
    assert len(view) == 1000 and not view.readonly and bytes(view) == bytes(1000)
    assert reserve.stats().warm == reserve.stats().cold == 0  # not the reserve's business


def test_off_every_large_request_is_fresh_and_nothing_is_held(reserve: Reserve) -> None:
    view = reserve.take(3 * MiB + 5)
    assert len(view) == 3 * MiB + 5 and not view.readonly
    assert view.tobytes() == bytes(len(view))
    view[-1] = 7
    assert reserve.stats().cold == 1 and held(reserve) == 0 and reserve._thread is None


def test_a_size_asked_for_is_ready_the_next_time_zeroed_and_exact(reserve: Reserve) -> None:
    reserve.configure(64 * MiB)
    first = reserve.take(5 * MiB)
    first[:] = b"\xab" * len(first)
    poll(lambda: held(reserve) == 6 * MiB, "a 6 MiB mapping (5 MiB rounded up to huge pages) touched ahead")
    second = reserve.take(5 * MiB + 1)  # the same size class
    assert reserve.stats().warm == 1 and reserve.stats().cold == 1
    assert len(second) == 5 * MiB + 1 and second.tobytes() == bytes(len(second))
    second[:] = b"\x01" * len(second)
    assert first.tobytes() == b"\xab" * len(first)  # two hand-outs never share memory
    # two requests of that size among the recent ones: two mappings kept ready
    poll(lambda: held(reserve) == 12 * MiB, "two mappings of the size asked for twice")
    third, fourth = reserve.take(6 * MiB), reserve.take(6 * MiB)
    assert reserve.stats().warm == 3
    assert third.tobytes() == fourth.tobytes() == bytes(6 * MiB)


def test_the_budget_bounds_what_is_held(reserve: Reserve) -> None:
    reserve.configure(10 * MiB)
    views = [reserve.take(4 * MiB) for _ in range(4)]  # four wanted, two fit
    poll(lambda: held(reserve) == 8 * MiB, "two 4 MiB mappings, all the 10 MiB budget takes")
    reserve.take(12 * MiB)  # larger than the whole budget: asked for, never reserved
    with reserve._lock:
        assert reserve._next_size() is None  # nothing more fits: the refill thread has nothing to do
    assert held(reserve) <= 10 * MiB
    reserve.configure(4 * MiB)  # a lower budget drops what is over it at once
    assert held(reserve) <= 4 * MiB
    reserve.configure(0)
    assert held(reserve) == 0
    assert all(v.tobytes() == bytes(4 * MiB) for v in views)  # memory handed out is the caller's


def test_sizes_no_longer_asked_for_make_room(reserve: Reserve) -> None:
    reserve.configure(16 * MiB)
    reserve.take(8 * MiB)
    poll(lambda: held(reserve) == 8 * MiB, "the 8 MiB size ready")
    for _ in range(8):  # the 8 MiB request falls out of the recent ones
        reserve.take(HUGE)
    # 8 x 2 MiB == the budget: only possible once the stale 8 MiB mapping is gone
    poll(lambda: held(reserve) == 16 * MiB, "eight 2 MiB mappings in place of the 8 MiB one")
    with reserve._lock:
        assert not reserve._ready.get(8 * MiB)


def test_the_refill_thread_runs_at_the_process_priority(reserve: Reserve) -> None:
    """A niced thread that takes the GIL stalls the whole process on a busy host (it got the GIL hand-off and was
    then not scheduled for hundreds of ms): the refill thread must keep the priority of ComfyUI's own threads."""
    import os

    reserve.configure(8 * MiB)
    assert reserve._thread is not None
    reserve.take(HUGE)
    poll(lambda: held(reserve) == HUGE, "the refill thread at work")  # it has run its loop, past any set-up
    native = reserve._thread.native_id
    assert native is not None
    assert os.getpriority(os.PRIO_PROCESS, native) == os.getpriority(os.PRIO_PROCESS, 0)

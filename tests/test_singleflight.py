"""singleflight: concurrent calls for one key share one execution; its result or its error reaches every caller."""

from __future__ import annotations

import threading
from concurrent import futures

import pytest

from mesh.cluster.singleflight import Group
from tests.conftest import poll


def waiting(group: Group[int], key: str) -> int:
    """Callers blocked on the in-flight call for `key` (the future's condition holds one waiter per caller)."""
    call = group._calls.get(key)
    return 0 if call is None else len(call._condition._waiters)  # type: ignore[attr-defined]


def test_concurrent_callers_share_one_execution() -> None:
    group: Group[int] = Group()
    calls = 0
    joined = threading.Event()

    def fetch() -> int:
        nonlocal calls
        calls += 1
        joined.wait(10)  # held open until the followers are waiting on this very call
        return 42

    with futures.ThreadPoolExecutor(4) as pool:
        leader = pool.submit(group.do, "k", fetch)
        # Followers join only while the leader's call is in flight (the group's table has the key).
        poll(lambda: "k" in group._calls, "the leader's call is in flight", timeout=10, interval=0.001)
        followers = [pool.submit(group.do, "k", fetch) for _ in range(3)]
        # Released only once all three wait on the leader's future (else a late one would lead a second call).
        poll(lambda: waiting(group, "k") == 3, "three followers wait on the leader", timeout=10, interval=0.001)
        joined.set()
        results = [leader.result(10)] + [f.result(10) for f in followers]
    assert results == [42] * 4
    assert calls == 1


def test_an_error_reaches_every_waiting_caller_and_the_next_call_runs_again() -> None:
    group: Group[int] = Group()
    joined = threading.Event()
    calls = 0

    def broken() -> int:
        nonlocal calls
        calls += 1
        joined.wait(10)
        raise ConnectionError("owner gone")

    with futures.ThreadPoolExecutor(3) as pool:
        leader = pool.submit(group.do, "k", broken)
        poll(lambda: "k" in group._calls, "the leader's call is in flight", timeout=10, interval=0.001)
        follower = pool.submit(group.do, "k", broken)
        poll(lambda: waiting(group, "k") == 1, "the follower waits on the leader", timeout=10, interval=0.001)
        joined.set()
        for job in (leader, follower):
            with pytest.raises(ConnectionError):
                job.result(10)
    assert calls == 1
    # Nothing is remembered: a failed (or finished) call is not a cache.
    assert group.do("k", lambda: 7) == 7
    assert group._calls == {}


def test_different_keys_do_not_wait_for_each_other() -> None:
    group: Group[str] = Group()
    slow_started = threading.Event()
    release = threading.Event()

    def slow() -> str:
        slow_started.set()
        release.wait(10)
        return "slow"

    with futures.ThreadPoolExecutor(2) as pool:
        job = pool.submit(group.do, "a", slow)
        assert slow_started.wait(10)
        assert group.do("b", lambda: "fast") == "fast"  # returns while "a" is still running
        assert not job.done()
        release.set()
        assert job.result(10) == "slow"


def test_a_follower_gives_up_after_its_own_timeout_while_the_leader_runs_on() -> None:
    group: Group[int] = Group()
    started = threading.Event()
    release = threading.Event()

    def slow() -> int:
        started.set()
        release.wait(10)
        return 1

    with futures.ThreadPoolExecutor(1) as pool:
        leader = pool.submit(group.do, "k", slow)
        assert started.wait(10)
        with pytest.raises(futures.TimeoutError):
            group.do("k", slow, timeout=0.05)
        release.set()
        assert leader.result(10) == 1

"""Compute leases (mesh/cluster/leases.py): the table's rules, then the Lease RPC over real nodes."""

from __future__ import annotations

import pytest

from mesh.cluster import leases
from mesh.cluster.leases import COMPUTE, DONE, GRANTED, HELD, RELEASED, LeaseTable
from mesh.pb import mesh_pb2 as pb
from mesh.transport.peer import Refused
from tests.support.localmesh import LocalMesh


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def table(present: set[str] | None = None) -> tuple[LeaseTable, Clock]:
    clock = Clock()
    held = present if present is not None else set()
    return LeaseTable(lambda k: k in held, clock), clock


def test_first_asker_is_granted_the_others_are_told_who_holds_it() -> None:
    t, clock = table()
    assert t.acquire("k", "a", 3.0, expected_seconds=4.0).state == GRANTED
    clock.now += 1.0
    other = t.acquire("k", "b", 3.0)
    assert (other.state, other.holder, other.held_seconds, other.expected_seconds) == (HELD, "a", 1.0, 4.0)
    assert other.ttl_left == pytest.approx(2.0)
    assert t.acquire("other-key", "b", 3.0).state == GRANTED  # leases are per key
    assert t.stats()["lease_granted"] == 2 and t.stats()["lease_held"] == 1


def test_the_holder_renews_and_a_lapsed_lease_goes_to_the_next_asker() -> None:
    t, clock = table()
    t.acquire("k", "a", 3.0)
    clock.now += 2.5
    assert t.acquire("k", "a", 3.0).state == GRANTED  # renewed: lives 3 s from now
    clock.now += 2.5
    assert t.acquire("k", "b", 3.0).state == HELD
    clock.now += 0.6  # 3.1 s since the renewal: the holder stopped renewing (crashed, frozen)
    answer = t.acquire("k", "b", 3.0)
    assert (answer.state, answer.holder) == (GRANTED, "b")
    assert t.stats()["lease_expired"] == 1
    assert t.acquire("k", "a", 3.0).state == HELD  # the old holder lost it


def test_a_value_its_holder_will_not_store_is_answered_compute_for_a_while() -> None:
    """The holder's value is too cheap to keep or not cacheable: everyone computes it now, in parallel, instead
    of the next waiter being granted it, computing, not storing either, while the rest wait again."""
    t, clock = table()
    t.acquire("k", "a", 3.0)
    assert t.release("k", "b", uncached=True).state == RELEASED  # not the holder: says nothing
    assert t.acquire("k", "b", 3.0).state == HELD
    t.release("k", "a", uncached=True)
    assert t.acquire("k", "b", 3.0).state == COMPUTE and t.acquire("k", "c", 3.0).state == COMPUTE
    assert t.stats()["lease_uncached"] == 2
    clock.now += leases.DONE_TTL + 0.1  # a while later (other inputs, another size): leased as usual again
    assert t.acquire("k", "b", 3.0).state == GRANTED


def test_release_frees_the_key_only_for_its_holder() -> None:
    t, _ = table()
    t.acquire("k", "a", 3.0)
    assert t.release("k", "b").state == RELEASED
    assert t.acquire("k", "b", 3.0).state == HELD  # b could not release a's lease
    t.release("k", "a")
    assert t.acquire("k", "b", 3.0).state == GRANTED
    assert t.stats()["lease_released"] == 1


def test_a_stored_value_is_done_and_a_release_as_stored_answers_done_for_a_while() -> None:
    present: set[str] = set()
    t, clock = table(present)
    t.acquire("k", "a", 3.0)
    t.release("k", "a", done=True)  # stored, though the copy to this owner is still on its way
    assert t.acquire("k", "b", 3.0).state == DONE
    clock.now += leases.DONE_TTL + 1
    assert t.acquire("k", "b", 3.0).state == GRANTED  # the mark lapsed and the value never came here
    present.add("j")
    t.acquire("j", "a", 3.0)
    assert t.acquire("j", "b", 3.0).state == DONE  # held here: nothing to compute
    assert t.holding() == 1


def test_ttl_is_capped_and_the_table_is_bounded(monkeypatch) -> None:
    t, clock = table()
    assert t.acquire("k", "a", 1e9).ttl_left == leases.MAX_TTL
    monkeypatch.setattr(leases, "MAX_LEASES", 3)
    for i in range(6):
        t.acquire(f"x{i}", "a", 10.0)
    assert t.holding() <= 4 and t.stats()["lease_dropped"] >= 2


def test_the_lease_rpc_meets_at_the_keys_owner_from_every_node() -> None:
    """Two real nodes, replicas 1: whichever node a caller asks, the lease is decided by the key's one owner."""
    with LocalMesh() as mesh:
        mesh.start(2, args=["--replicas", "1"])
        mesh.wait_members(2)
        a, b = (mesh.client(n) for n in mesh.nodes)
        try:
            grants = 0
            for i in range(8):  # keys owned by either node
                key = f"lease-key-{i}"
                first = a.lease(pb.LeaseRequest(key=key, holder="one", ttl=5.0), timeout=5.0)
                second = b.lease(pb.LeaseRequest(key=key, holder="two", ttl=5.0), timeout=5.0)
                assert first.state == pb.LEASE_GRANTED
                assert (second.state, second.holder) == (pb.LEASE_HELD, "one"), key
                assert first.owner == second.owner  # one table answered both
                grants += 1
                a.lease(pb.LeaseRequest(key=key, holder="one", op=pb.LEASE_RELEASE, done=True), timeout=5.0)
                assert b.lease(pb.LeaseRequest(key=key, holder="two", ttl=5.0), timeout=5.0).state == pb.LEASE_DONE
            owners = {a.stats().counters["lease_granted"], b.stats().counters["lease_granted"]}
            assert sum(owners) == grants and 0 not in owners  # both nodes own some keys
            with pytest.raises(Refused):
                a.lease(pb.LeaseRequest(key="k", holder=""), timeout=5.0)  # a holder must be named
        finally:
            a.close()
            b.close()


def test_instances_compute_a_value_nobody_stores_side_by_side_not_in_turns() -> None:
    """Three instances at one node whose value is not stored (too cheap to keep, not cacheable), through the
    real table and the provider's Dedupe: the holder's release says so, and the waiters compute at once. Without
    it each waited for the one before: 0.4 s of compute took three times as long (found by review)."""
    import asyncio
    import time
    from collections import deque

    from provider.costs import ComputeCosts
    from provider.dedupe import Dedupe

    t = LeaseTable(lambda k: False)

    class Client:
        def lease(self, key: str, holder: str, timeout: float, *, release: bool = False, done: bool = False,
                  ttl: float = 0.0, expected: float = 0.0, uncached: bool = False) -> leases.Answer:
            return t.release(key, holder, done, uncached) if release else t.acquire(key, holder, ttl, expected)

    compute = 1.0

    async def instance(i: int, t0: float) -> tuple[float, float]:
        costs = ComputeCosts()
        costs._recent.setdefault("Upscale", deque()).append(compute)  # the class took `compute` here before
        d = Dedupe(Client(), costs, max_wait=60.0, holder=f"i{i}")  # type: ignore[arg-type]

        async def fetch() -> None:
            return None

        try:
            await d.before_compute("k", "Upscale", f"p{i}", fetch)
            start = time.monotonic() - t0
            await asyncio.sleep(compute)  # the node runs
            if d.claim("k"):
                d.stored("k", False, True)  # not stored, and never will be
            return start, time.monotonic() - t0
        finally:
            d.close()

    async def main() -> list[tuple[float, float]]:
        t0 = time.monotonic()
        return list(await asyncio.gather(*(instance(i, t0) for i in range(3))))

    runs = sorted(asyncio.run(main()))
    waiters = runs[1:]  # they waited for the holder's value, then learnt it is not coming: all compute now
    assert max(start for start, _ in waiters) < min(end for _, end in waiters), runs  # side by side, not in turns
    # ... and as soon as the holder said so (a poll or two), not when their wait for its value ran out
    assert max(start for start, _ in waiters) < runs[0][1] + compute / 2, runs

"""The peer-failure policy (mesh/transport/peers.py): when a peer is skipped, when it is asked again, how long one try waits.

These are the rules every read, write, Has and delete obeys, so they are pinned here without any network: a
fake transport stands in for gRPC.
"""

from __future__ import annotations

import pytest

from mesh.transport.peers import BUDGET_FACTOR, MAX_BUDGET, MIN_BUDGET, PeerPool
from mesh.transport.wire import Limits

A, B = "10.0.0.1:7437", "10.0.0.2:7437"


class FakeTransport:
    """Only what the pool itself touches: it is made once per address and closed when forgotten."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.closed = False

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def made() -> list[FakeTransport]:
    return []


@pytest.fixture
def pool(made: list[FakeTransport]) -> PeerPool:
    def connect(address: str) -> FakeTransport:
        made.append(FakeTransport(address))
        return made[-1]

    return PeerPool(b"secret", Limits(), connect=connect)  # type: ignore[arg-type]


def test_a_peer_never_failed_is_usable(pool: PeerPool) -> None:
    assert pool.usable(A)


def test_a_failure_opens_the_breaker_for_that_peer_only(pool: PeerPool) -> None:
    pool.failed(A)
    assert not pool.usable(A)
    assert pool.usable(B)


def test_hearing_from_the_peer_after_the_failure_closes_the_breaker(pool: PeerPool) -> None:
    pool.heard(A)
    pool.failed(A)
    assert not pool.usable(A), "a heartbeat from before the failure must not reopen the peer"
    pool.heard(A)
    assert pool.usable(A)


def test_second_hand_news_older_than_the_failure_does_not_close_it(pool: PeerPool) -> None:
    pool.failed(A)
    pool.heard(A, age=60.0)  # another member heard from it a minute ago: before our failure
    assert not pool.usable(A)
    pool.heard(A, age=0.0)
    assert pool.usable(A)


def test_a_later_failure_opens_it_again(pool: PeerPool) -> None:
    pool.failed(A)
    pool.heard(A)
    assert pool.usable(A)
    pool.failed(A)
    assert not pool.usable(A)


def test_the_attempt_budget_follows_the_peers_latency_within_bounds(pool: PeerPool) -> None:
    assert pool.attempt_budget(A) == MIN_BUDGET  # nothing known: the floor
    pool.observe(A, 0.1)
    assert pool.attempt_budget(A) == pytest.approx(BUDGET_FACTOR * 0.1)
    pool.observe(B, 10.0)
    assert pool.attempt_budget(B) == MAX_BUDGET  # a frozen host costs a reader at most the ceiling
    pool.observe(A, 0.0001)
    assert pool.attempt_budget(A) == pytest.approx(BUDGET_FACTOR * (0.1 + 0.2 * (0.0001 - 0.1)))  # smoothed
    for _ in range(100):
        pool.observe(A, 0.0001)
    assert pool.attempt_budget(A) == MIN_BUDGET  # a fast LAN peer still gets the floor


def test_one_transport_per_address_and_forget_resets_everything(pool: PeerPool, made: list[FakeTransport]) -> None:
    first = pool.client(A)
    assert pool.client(A) is first and pool.client(B) is not first
    assert [t.address for t in made] == [A, B]
    pool.failed(A)
    pool.observe(A, 10.0)
    pool.forget(A)
    assert first.closed
    assert pool.usable(A) and pool.attempt_budget(A) == MIN_BUDGET
    assert pool.client(A) is not first


def test_close_closes_every_transport(pool: PeerPool, made: list[FakeTransport]) -> None:
    pool.client(A)
    pool.client(B)
    pool.close()
    assert all(t.closed for t in made)

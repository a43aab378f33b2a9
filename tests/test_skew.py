"""No wall clock decides (mesh/storage/store.py): a node 10 minutes fast and one 10 minutes slow, real processes
under libfaketime, change neither which value of a key stays nor what a delete removes.

Measured before the rule changed: the fast node's value lost 15 of 15 conflicts to one written 0.3 s later, and
14 of 48 acknowledged re-puts after a delete through the fast node vanished (its tombstone, stamped 10 minutes
ahead, refused them, and repair then deleted the other owners' good copies)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.conftest import poll
from tests.support.clock import skewed_env
from tests.support.localmesh import LocalMesh, LocalNode

FAST = ["--heartbeat", "0.2", "--suspect-after", "1.0", "--dead-after", "2.0", "--replicas", "3",
        "--repair-interval", "1"]


@dataclass
class Skewed:
    mesh: LocalMesh
    nodes: dict[str, LocalNode]

    def held(self, name: str, key: str) -> bytes | None:
        with self.mesh.client(self.nodes[name]) as c:
            got = c.get(key, local_only=True)
            return bytes(got.data) if got is not None else None

    def everywhere(self, key: str) -> set[bytes | None]:
        return {self.held(name, key) for name in self.nodes}

    def put(self, name: str, key: str, value: bytes) -> None:
        with self.mesh.client(self.nodes[name]) as c:
            c.put(key, value)

    def delete(self, name: str, key: str) -> None:
        with self.mesh.client(self.nodes[name]) as c:
            c.delete([key])


@pytest.fixture
def skewed() -> Iterator[Skewed]:
    """Three owners of every key: one true clock, one 10 minutes fast, one 10 minutes slow."""
    with LocalMesh(extra_args=FAST) as mesh:
        nodes = {"normal": mesh.start_node(node_id="normal"),
                 "fast": mesh.start_node(node_id="fast", env=skewed_env("+10m")),
                 "slow": mesh.start_node(node_id="slow", env=skewed_env("-10m"))}
        mesh.wait_members(3)
        skewed = Skewed(mesh, nodes)
        for name, sign in (("fast", 1), ("slow", -1)):  # the clocks are really off (else this proves nothing)
            skewed.put(name, f"clock/{name}", b"x")
            with mesh.client(nodes[name]) as c:
                got = c.get(f"clock/{name}", local_only=True)
            assert got is not None and sign * (got.header.created_unix - time.time()) > 500, name
        yield skewed


@pytest.mark.parametrize("first,second", [("fast", "normal"), ("normal", "slow"), ("slow", "fast")])
def test_a_skewed_clock_wins_no_conflict(skewed: Skewed, first: str, second: str) -> None:
    for i in range(5):
        key = f"conflict/{first}-{second}/{i}"
        skewed.put(first, key, b"first" * 200)
        poll(lambda key=key: skewed.everywhere(key) == {b"first" * 200}, "every owner holds the first value")
        skewed.put(second, key, b"second" * 200)  # written later, through a node whose clock says otherwise
        assert skewed.everywhere(key) == {b"first" * 200}


@pytest.mark.parametrize("deleter", ["fast", "slow"])
def test_a_skewed_clock_neither_undoes_a_delete_nor_swallows_a_later_put(skewed: Skewed, deleter: str) -> None:
    keys = [f"delete/{deleter}/{i}" for i in range(8)]
    for key in keys:
        skewed.put("normal", key, b"old" * 200)
    poll(lambda: all(skewed.everywhere(k) == {b"old" * 200} for k in keys), "every owner holds the old values")
    for key in keys:
        skewed.delete(deleter, key)
        skewed.put("normal", key, b"new" * 200)  # at once: well inside any tombstone's lifetime
    poll(lambda: all(skewed.everywhere(k) == {b"new" * 200} for k in keys),
         "every owner holds every acknowledged re-put", timeout=30)


def test_a_copy_stamped_by_a_clock_days_ahead_is_still_taken(skewed: Skewed) -> None:
    """created_unix is only shown: a bound read from this host's clock once refused such a member's copies."""
    from dataclasses import replace

    from mesh.transport.wire import Limits, iter_chunks, make_header

    value = b"from the future" * 10
    header = replace(make_header("future", value, Limits().chunk_size), created_unix=4_000_000_000.0)
    with skewed.mesh.client(skewed.nodes["normal"]) as c:
        assert c.put_chunks(header, tuple(iter_chunks(value, Limits().chunk_size)), local_only=True).stored
    assert skewed.held("normal", "future") == value

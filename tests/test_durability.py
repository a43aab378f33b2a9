"""Durability and failover with real `mesh serve` processes on 127.0.0.1: restarts, frozen owners, big blobs
through non-owners, deletes that stick, concurrent puts that converge.

Every wait is a bounded poll on something observable (copies per key, a counter); no test sleeps to let
something happen and then asserts its absence.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator

import pytest

from mesh.membership.driver import ring_weights
from mesh.cluster.ring import Ring
from tests.conftest import poll
from tests.support.cli import run_cli
from tests.support.localmesh import LocalMesh, LocalNode

FAST = ["--heartbeat", "0.2", "--suspect-after", "1.0", "--dead-after", "2.5", "--repair-interval", "1",
        "--replicas", "2"]




def copies(mesh: LocalMesh, keys: list[str]) -> dict[str, int]:
    """How many live nodes hold each key in their own store."""
    out = dict.fromkeys(keys, 0)
    for node in mesh.nodes:
        if node.alive:
            with mesh.client(node, timeout=10) as c:
                for key, yes in zip(keys, c.has(keys, local_only=True)):
                    out[key] += yes
    return out


def ring_of(mesh: LocalMesh, node: LocalNode) -> Ring:
    with mesh.client(node) as c:
        return Ring(ring_weights(c.stats().members))


def wait_repair_passes(mesh: LocalMesh, n: int) -> None:
    """Until every node has run `n` more full repair passes than now."""
    passes = {}
    for node in mesh.nodes:
        with mesh.client(node) as c:
            passes[node.node_id] = c.stats().counters["repair_passes"]

    def done() -> bool:
        for node in mesh.nodes:
            with mesh.client(node) as c:
                if c.stats().counters["repair_passes"] < passes[node.node_id] + n:
                    return False
        return True

    poll(done, f"{n} more repair passes everywhere", timeout=60)


@pytest.fixture
def three() -> Iterator[LocalMesh]:
    with LocalMesh(extra_args=FAST) as mesh:
        mesh.start(3)
        mesh.wait_members(3)
        yield mesh


def _value(i: int) -> bytes:
    return os.urandom(3000) + bytes([i % 251]) * 5000


def test_rolling_restart_keeps_every_key(three: LocalMesh) -> None:
    """Each node in turn killed -9 and restarted with the same id and port: once 40 of 40 keys were lost."""
    values = {f"rr/{i}": _value(i) for i in range(40)}
    keys = list(values)
    with three.client(three.nodes[0]) as c:
        for key, value in values.items():
            c.put(key, value)
    poll(lambda: min(copies(three, keys).values()) == 2, "every key has its 2 copies")
    for i in range(3):
        three.kill(three.nodes[i])
        three.restart(three.nodes[i])
        poll(lambda: min(copies(three, keys).values()) == 2, f"every key has 2 copies again after restart {i}")
    with three.client(three.nodes[2]) as c:
        for key, value in values.items():
            got = c.get(key)
            assert got is not None and bytes(got.data) == value
    repaired = 0
    for node in three.nodes:
        with three.client(node) as c:
            repaired += int(c.stats().counters["repaired"])
    assert repaired > 0  # copies came back by repair (restarted nodes count theirs from their restart)


def test_a_node_back_after_dead_gets_its_copies_back(three: LocalMesh) -> None:
    values = {f"dead/{i}": _value(i) for i in range(30)}
    keys = list(values)
    with three.client(three.nodes[1]) as c:
        for key, value in values.items():
            c.put(key, value)
    poll(lambda: min(copies(three, keys).values()) == 2, "every key has its 2 copies")
    victim = three.nodes[0]
    three.kill(victim)
    # While it is DEAD the ring has two members: both hold every key (repair copies what the dead one had).
    poll(lambda: min(copies(three, keys).values()) == 2 and len(ring_of(three, three.nodes[1])) == 2,
         "the survivors hold 2 copies of every key")
    back = three.restart(victim)
    poll(lambda: len(ring_of(three, back)) == 3 and len(ring_of(three, three.nodes[1])) == 3, "the ring is whole")
    ring = ring_of(three, three.nodes[1])
    theirs = [k for k in keys if back.node_id in ring.owners(k, 2)]
    assert theirs
    with three.client(back) as c:
        poll(lambda: all(c.has(theirs, local_only=True)), "the keys it owns are on it again")
    # ...and the survivor that held them while it was away handed them back: exactly R copies of each key.
    poll(lambda: set(copies(three, keys).values()) == {2}, "every key has exactly its 2 copies")


def test_a_frozen_first_owner_does_not_turn_a_hit_into_a_miss(three: LocalMesh) -> None:
    """SIGSTOP: the port still accepts, nothing answers. Once a lookup's whole 3 s deadline went to it."""
    frozen, reader = three.nodes[0], three.nodes[2]
    values = {f"frozen/{i}": _value(i) for i in range(120)}
    with three.client(three.nodes[1]) as c:
        for key, value in values.items():
            c.put(key, value)
    keys = list(values)
    poll(lambda: min(copies(three, keys).values()) == 2, "every key has its 2 copies")
    ring = ring_of(three, reader)
    theirs = [k for k in keys if ring.owners(k, 2)[0] == frozen.node_id and reader.node_id not in ring.owners(k, 2)]
    assert len(theirs) >= 3
    os.kill(frozen.process.pid, signal.SIGSTOP)
    try:
        with three.client(reader) as c:
            for key in theirs:
                got = c.get(key, timeout=3.0)  # a provider lookup's deadline
                assert got is not None and bytes(got.data) == values[key]
            assert c.stats().counters["owner_failures"] >= 1  # it did try the frozen owner first
    finally:
        os.kill(frozen.process.pid, signal.SIGCONT)


def test_a_blob_larger_than_the_near_cache_is_served_through_a_non_owner() -> None:
    with LocalMesh(extra_args=[*FAST[:8], "--replicas", "1", "--max-memory", "32MiB"]) as mesh:
        mesh.start(2)
        mesh.wait_members(2)
        a, b = mesh.nodes
        ring = ring_of(mesh, a)
        key = next(f"big/{i}" for i in range(100) if ring.owners(f"big/{i}", 1) == [a.node_id])
        value = os.urandom(16 * 2**20)  # fits a's store (24 MiB), not b's near cache (8 MiB)
        with mesh.client(a) as c:
            c.put(key, value)
        with mesh.client(b) as c:
            got = c.get(key)
            assert got is not None and bytes(got.data) == value
            assert c.stats().counters["uncached_reads"] == 1


def test_a_delete_sticks_and_reaches_near_copies(three: LocalMesh) -> None:
    """No tombstones once: a delete right after a put was undone by the in-flight replica write (10 of 10)."""
    keys = [f"del/{i}" for i in range(10)]
    with three.client(three.nodes[0]) as c:
        for key in keys:
            c.put(key, b"value of " + key.encode())
            assert c.delete([key]) == 1
    # Near copies: read each key through every node, then delete through one.
    near_keys = [f"near/{i}" for i in range(10)]
    with three.client(three.nodes[1]) as c:
        for key in near_keys:
            c.put(key, b"near value")
    for node in three.nodes:
        with three.client(node) as c:
            assert all(c.get(k) is not None for k in near_keys)
    with three.client(three.nodes[2]) as c:
        assert c.delete_keys(near_keys + ["never-was"]) == [True] * 10 + [False]
    wait_repair_passes(three, 2)  # two full passes on every node after the deletes: nothing brings them back
    for node in three.nodes:
        with three.client(node) as c:
            assert not any(c.has(keys + near_keys)), node.node_id
            assert all(c.get(k) is None for k in keys + near_keys)


def test_concurrent_puts_of_one_key_each_owner_keeps_what_it_took_first(three: LocalMesh) -> None:
    """Different content entering at both owners at once. Values are never replaced (the conflict rule in
    mesh/storage/store.py), so each owner keeps the value that reached it first, repair never overwrites one with
    the other, and every read returns one of the two values, whole."""
    ring = ring_of(three, three.nodes[0])
    by_id = {n.node_id: n for n in three.nodes}
    keys = [f"race/{i}" for i in range(10)]
    barrier = threading.Barrier(2)
    values = {k: {b"A" * 5000 + k.encode(), b"B" * 5000 + k.encode()} for k in keys}

    def put_through(node: LocalNode, key: str, value: bytes) -> None:
        with three.client(node) as c:
            barrier.wait(timeout=10)
            c.put(key, value)

    for key in keys:
        first, second = (by_id[o] for o in ring.owners(key, 2))
        a, b = sorted(values[key])
        threads = [threading.Thread(target=put_through, args=(first, key, a)),
                   threading.Thread(target=put_through, args=(second, key, b))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)

    def held() -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for key in keys:
            for o in ring.owners(key, 2):
                with three.client(by_id[o]) as c:
                    out.setdefault(key, {})[o] = c.versions([key], [0])[0][0]
        return out

    poll(lambda: all(all(held()[k].values()) for k in keys), "both owners of every key hold a copy", timeout=60)
    before = held()
    wait_repair_passes(three, 2)
    assert held() == before  # repair replaced nothing: no rule a writer could game picks a "winner"
    for key in keys:
        for node in three.nodes:
            with three.client(node) as c:
                got = c.get(key)
                assert got is not None and bytes(got.data) in values[key]


def test_the_sidecar_client_keeps_working_while_its_sidecar_is_down(three: LocalMesh) -> None:
    """Once RemoteClient errored as long as its own sidecar was down; the other members were never asked."""
    from mesh.client import RemoteClient

    sidecar = three.nodes[0]
    client = RemoteClient(sidecar.address, three.secret)
    values = {f"side/{i}": _value(i) for i in range(20)}
    try:
        for key, value in values.items():
            assert client.put(key, value, {}, timeout=10) >= 1
        assert client.get("side/0", timeout=10) == values["side/0"]  # learns the ring from the sidecar
        keys = list(values)
        poll(lambda: min(copies(three, keys).values()) == 2, "every key has its 2 copies")
        three.kill(sidecar)
        for key, value in values.items():
            assert client.get(key, timeout=5) == value
        assert client.has(keys, timeout=5) == [True] * len(keys)
        assert client.put("side/new", b"while the sidecar is down", {}, timeout=10) >= 1
        with three.client(three.nodes[1]) as c:
            got = c.get("side/new")
            assert got is not None and bytes(got.data) == b"while the sidecar is down"
    finally:
        client.close()


def test_a_delete_an_owner_missed_is_not_undone(three: LocalMesh) -> None:
    """Found by attack: with one owner frozen during a delete, reads kept returning its copy and its repair
    pushed the copy back once the tombstones expired."""
    ring = ring_of(three, three.nodes[0])
    by_id = {n.node_id: n for n in three.nodes}
    key = next(f"missed/{i}" for i in range(100) if three.nodes[0].node_id in ring.owners(f"missed/{i}", 2))
    first, other = (by_id[o] for o in ring.owners(key, 2))
    frozen = other if first is three.nodes[0] else first
    with three.client(three.nodes[0]) as c:
        c.put(key, b"to be deleted")
    poll(lambda: copies(three, [key])[key] == 2, "both owners hold it")
    os.kill(frozen.process.pid, signal.SIGSTOP)
    try:
        with three.client(three.nodes[0]) as c:
            assert c.delete_keys([key], timeout=3) == [True]
            assert c.get(key, timeout=3) is None
    finally:
        os.kill(frozen.process.pid, signal.SIGCONT)
    with three.client(frozen) as c:
        poll(lambda: not c.has([key], local_only=True)[0], "the frozen owner drops its pre-delete copy")
        assert c.stats().counters["repair_deletes_applied"] >= 1
    for node in three.nodes:
        with three.client(node) as c:
            assert c.get(key) is None


def test_a_put_no_owner_can_take_is_kept_as_a_hint_and_reaches_the_owners_later(three: LocalMesh) -> None:
    """Once such a put answered replicas=0 as a success and parked the value in a near cache, from which it never
    reached its owners: 38 keys lost after a 90 s partition. Now it is a hint that repair hands on."""
    entry_node = three.nodes[0]
    ring = ring_of(three, entry_node)
    others = {n.node_id: n for n in three.nodes[1:]}
    key = next(k for k in (f"hint/{i}" for i in range(10_000)) if set(ring.owners(k, 2)) == set(others))
    value = _value(7)
    for node in others.values():  # both owners frozen: they accept connections and answer nothing
        node.process.send_signal(signal.SIGSTOP)
    try:
        with three.client(entry_node, timeout=4) as c:
            reply = c.put(key, value)
        assert reply.replicas == 0 and reply.hinted and reply.stored
        with three.client(entry_node) as c:
            assert c.has([key], local_only=True) == [True]
            assert c.stats().counters["hinted_puts"] == 1
        # The CLI says so too: a hint is not an ordinary store.
        second = next(k for k in (f"hint-cli/{i}" for i in range(10_000)) if set(ring.owners(k, 2)) == set(others))
        file = three.workdir / "value"
        file.write_bytes(value)
        out = run_cli("--timeout", "8", "put", second, str(file), node=entry_node.address,
                      secret_file=three.secret_file, timeout=30)
        assert out.returncode == 0 and f"no owner of {second} was reachable" in out.stderr, out.stderr
    finally:
        for node in others.values():
            node.process.send_signal(signal.SIGCONT)
    poll(lambda: copies(three, [key])[key] == 2 and not has_local(three, entry_node, key),
         "the hint reached both owners and left the node that kept it", timeout=60)
    for node in others.values():
        with three.client(node) as c:
            got = c.get(key, local_only=True)
            assert got is not None and bytes(got.data) == value


def has_local(mesh: LocalMesh, node: LocalNode, key: str) -> bool:
    with mesh.client(node) as c:
        return c.has([key], local_only=True)[0]

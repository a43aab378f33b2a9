"""The cluster with real `mesh serve` processes on 127.0.0.1: membership, placement, failures, scaling, drain."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterable

import pytest

from mesh.cluster.ring import Ring
from tests.conftest import poll
from tests.support.cli import run_cli
from tests.support.localmesh import LocalMesh

FAST = ["--heartbeat", "0.2", "--suspect-after", "1.0", "--dead-after", "2.0"]
# dead_after, a probe round, and the Lifeguard suspicion, which lasts up to 3x its minimum (1 s here) while
# few confirmations arrive, plus slack for a loaded CI machine
DEAD_WITHIN = 2.0 + 1.0 + 2.0 + 3.0


def _blob(i: int, size: int = 20_000) -> bytes:
    return os.urandom(size // 2) + bytes([i % 251]) * (size // 2)


def _cli(mesh: LocalMesh, node_address: str, *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli(*args, node=node_address, secret_file=mesh.secret_file, rpc_timeout=10)


def _members(mesh: LocalMesh, node) -> dict[str, int]:  # type: ignore[no-untyped-def]
    with mesh.client(node) as c:
        return {m.node_id: m.state for m in c.stats(timeout=5).members}


def _wait_replicated(mesh: LocalMesh, keys: Iterable[str], prefix: str) -> None:
    """Until every key is on both its owners: a put returns after one ack, the other copy follows in the background."""
    nodes = [n for n in mesh.nodes if n.alive]
    ring = Ring({n.node_id: 1.0 for n in nodes})
    keys = list(keys)
    want = {n.node_id: {k for k in keys if n.node_id in ring.owners(k, 2)} for n in nodes}

    def held() -> bool:
        for node in nodes:
            with mesh.client(node) as c:
                if not want[node.node_id] <= {k.key for k in c.list_keys(prefix=prefix)}:
                    return False
        return True

    poll(held, f"every {prefix}* key on both its owners", timeout=20, interval=0.1)


def _wait_state(mesh: LocalMesh, observer, node_id: str, state: int, timeout: float) -> None:  # type: ignore[no-untyped-def]
    poll(lambda: _members(mesh, observer).get(node_id) == state, f"{node_id} in state {state} at {observer.node_id}",
         timeout=timeout, interval=0.1)


@pytest.fixture
def five():
    with LocalMesh(extra_args=FAST) as mesh:
        mesh.start(5)
        mesh.wait_members(5)
        yield mesh


def test_five_nodes_from_one_seed_share_values(five: LocalMesh) -> None:
    first, last = five.nodes[0], five.nodes[4]
    values = {f"ns/key-{i}": _blob(i) for i in range(20)}
    with five.client(first) as c:
        for key, value in values.items():
            assert c.put(key, value).replicas >= 1
    with five.client(last) as c:
        for key, value in values.items():
            got = c.get(key)
            assert got is not None and bytes(got.data) == value
    # Every value is held by its owners: R=2 copies spread over the members.
    held = 0
    for node in five.nodes:
        with five.client(node) as c:
            held += len(c.list_keys(prefix="ns/"))
    assert held >= 2 * len(values)
    ring = _cli(five, last.address, "ring", "--json")
    assert ring.returncode == 0, ring.stderr
    shares = json.loads(ring.stdout)["members"]
    assert len(shares) == 5
    assert abs(sum(r["share"] for r in shares) - 100.0) < 0.1
    peers = _cli(five, first.address, "peers", "--json")
    assert peers.returncode == 0, peers.stderr
    assert sorted(r["node_id"] for r in json.loads(peers.stdout)) == [f"node{i}" for i in range(5)]


def test_killed_owner_is_detected_and_replica_serves(five: LocalMesh) -> None:
    victim = five.nodes[2]
    reader = five.nodes[0]
    ring = Ring({n.node_id: 1.0 for n in five.nodes})
    # Keys owned by the victim, whose other owner is not the reader (so the read must cross the mesh).
    keys = [k for k in (f"kill/{i}" for i in range(400))
            if victim.node_id in ring.owners(k, 2) and reader.node_id not in ring.owners(k, 2)][:15]
    values = {k: _blob(i) for i, k in enumerate(keys)}
    with five.client(five.nodes[1]) as c:
        for k, v in values.items():
            c.put(k, v)
    _wait_replicated(five, values, "kill/")
    five.kill(victim)
    killed_at = time.monotonic()
    # Reads during detection and after: never wrong bytes, never longer than the deadline.
    with five.client(reader, timeout=3.0) as c:
        for k, v in values.items():
            started = time.monotonic()
            got = c.get(k, timeout=3.0)
            assert time.monotonic() - started < 3.0 + 1.0
            assert got is not None and bytes(got.data) == v
    _wait_state(five, reader, victim.node_id, 2, DEAD_WITHIN - (time.monotonic() - killed_at))  # DEAD
    with five.client(five.nodes[3]) as c:
        for k, v in values.items():
            got = c.get(k, timeout=5.0)
            assert got is not None and bytes(got.data) == v


def test_added_node_keeps_keys_readable_and_moves_about_one_nth(five: LocalMesh) -> None:
    values = {f"scale/{i}": _blob(i, 2_000) for i in range(300)}
    with five.client(five.nodes[0]) as c:
        for k, v in values.items():
            c.put(k, v)
    _wait_replicated(five, values, "scale/")
    newcomer = five.start_node()
    # Right after the change, through the newcomer itself: misses at a new owner ask the previous owners.
    with five.client(newcomer) as c:
        for k, v in list(values.items())[:60]:
            got = c.get(k, timeout=5.0)
            assert got is not None and bytes(got.data) == v
    five.wait_members(6)
    old = Ring({n.node_id: 1.0 for n in five.nodes[:5]})
    new = Ring({n.node_id: 1.0 for n in five.nodes})
    moved = sum(1 for k in values if newcomer.node_id in new.owners(k, 2))
    assert 0.5 * 2 / 6 * len(values) < moved < 1.6 * 2 / 6 * len(values)
    # Keys whose owner sets did not change involve no movement at all.
    assert all(set(old.owners(k, 2)) == set(new.owners(k, 2)) for k in values if newcomer.node_id not in new.owners(k, 2))
    # The rebalancer copies the newcomer's keys to it in the background.
    owned = {k for k in values if newcomer.node_id in new.owners(k, 2)}

    def newcomer_holds_its_keys() -> bool:
        with five.client(newcomer) as c:
            return owned <= {k.key for k in c.list_keys(prefix="scale/")}

    poll(newcomer_holds_its_keys, "the newcomer holds every key it owns", timeout=20, interval=0.2)
    with five.client(five.nodes[4]) as c:
        for k, v in values.items():
            got = c.get(k, timeout=5.0)
            assert got is not None and bytes(got.data) == v


def test_drained_node_hands_off_its_keys(five: LocalMesh) -> None:
    leaving = five.nodes[3]
    values = {f"drain/{i}": _blob(i, 4_000) for i in range(100)}
    with five.client(five.nodes[0]) as c:
        for k, v in values.items():
            c.put(k, v)
    _wait_replicated(five, values, "drain/")
    result = _cli(five, leaving.address, "drain", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["failed"] == 0
    leaving.process.wait(timeout=20)  # the drained node stops by itself
    assert leaving.process.returncode == 0
    for node in five.nodes:
        if node is not leaving:
            assert _members(five, node).get(leaving.node_id) == 3  # LEFT, at once, not after dead_after
    with five.client(five.nodes[1]) as c:
        for k, v in values.items():
            got = c.get(k, timeout=5.0)
            assert got is not None and bytes(got.data) == v


def test_restarted_node_with_same_id_rejoins() -> None:
    with LocalMesh(extra_args=FAST) as mesh:
        mesh.start(3)
        mesh.wait_members(3)
        victim = mesh.nodes[2]
        mesh.kill(victim)
        _wait_state(mesh, mesh.nodes[0], victim.node_id, 2, DEAD_WITHIN)  # DEAD
        mesh.start_node(node_id=victim.node_id)
        mesh.wait_members(3, nodes=[mesh.nodes[0], mesh.nodes[1], mesh.nodes[3]])


def test_node_with_wrong_secret_is_not_admitted() -> None:
    with LocalMesh(extra_args=FAST) as good, LocalMesh(secret=b"another-secret", extra_args=FAST) as bad:
        good.start(2)
        good.wait_members(2)
        intruder = bad.start_node(seeds=[good.nodes[0].address], node_id="intruder")

        def refused() -> bool:  # the intruder did knock, and was told no: only then is the absence below news
            with bad.client(intruder) as c:
                return any("is not a member" in w for w in c.stats(timeout=5).warnings)

        poll(refused, "the intruder's seed refused it", timeout=20, interval=0.1)
        for node in good.nodes:
            assert intruder.node_id not in _members(good, node) or intruder.node_id == node.node_id
        with bad.client(intruder) as c:
            assert [m.node_id for m in c.stats(timeout=5).members] == [intruder.node_id]


def test_concurrent_reads_of_one_key_make_one_transfer_and_stay_near() -> None:
    from concurrent.futures import ThreadPoolExecutor

    with LocalMesh(extra_args=FAST) as mesh:
        mesh.start(3)
        mesh.wait_members(3)
        ring = Ring({n.node_id: 1.0 for n in mesh.nodes})
        key = next(k for k in (f"hot/{i}" for i in range(1000)) if mesh.nodes[0].node_id not in ring.owners(k, 2))
        value = _blob(7, 3_000_000)
        owners = [n for n in mesh.nodes if n.node_id in ring.owners(key, 2)]
        with mesh.client(owners[0]) as c:
            c.put(key, value)
        _wait_replicated(mesh, [key], "hot/")

        def owner_hits() -> int:
            total = 0
            for node in owners:
                with mesh.client(node) as c:
                    total += int(c.stats(timeout=5).counters["hits"])
            return total

        before = owner_hits()
        reader = mesh.nodes[0]

        def read(_: int) -> bytes:
            with mesh.client(reader) as c:
                got = c.get(key, timeout=10)
                assert got is not None
                return bytes(got.data)

        with ThreadPoolExecutor(8) as pool:
            assert all(v == value for v in pool.map(read, range(8)))
        assert owner_hits() - before == 1  # eight readers, one transfer from the owners
        for _ in range(5):
            read(0)
        assert owner_hits() - before == 1  # later reads are served from the reader's near cache
        with mesh.client(reader) as c:
            assert c.stats(timeout=5).counters["near_hits"] >= 5

"""Cluster routing as a specification, in one process: a fixed Directory and in-memory peers behind the
PeerTransport interface stand in for SWIM and gRPC, so each rule is checked exactly, without timing.

The rules: reads try the local store, then the owners in ring order, skipping a peer whose breaker is open;
a copy read by a non-owner lands in its near cache; after a ring change the previous owners are asked too and
what they hold is repaired onto the new owners; writes go to every owner; deletes reach every member.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace

import pytest

from mesh.cluster.routing import Cluster, ClusterConfig
from mesh.transport.peer import Unreachable
from mesh.transport.peers import PeerPool
from mesh.cluster.ring import Ring
from mesh.storage.store import BlobStore, Entry, StoreFull
from mesh.transport.wire import RAW, Header, Limits, MiB, StoredChunk, Tee, make_header, raw_parts
from tests.conftest import Collect

ME = "me"


@dataclass
class FixedDirectory:
    """The Directory of a test: members, weights and addresses as the test sets them."""

    weights: dict[str, int]
    left: bool = False

    def ring_members(self) -> dict[str, int]:
        return dict(self.weights)

    def address_of(self, node_id: str) -> str | None:
        return f"addr-{node_id}" if node_id in self.weights else None

    def known_members(self) -> list[str]:
        return list(self.weights)

    def leave(self) -> None:
        self.left = True
        self.weights.pop(ME, None)


@dataclass
class MemoryPeer:
    """A peer node reduced to its store; `down` makes every call fail the way an unreachable node does."""

    store: BlobStore = field(default_factory=lambda: BlobStore(64 * MiB))
    down: bool = False
    breaks_midway: bool = False  # a Get that starts streaming, then loses the connection
    calls: list[str] = field(default_factory=list)

    def _call(self, name: str) -> None:
        self.calls.append(name)
        if self.down:
            raise Unreachable("connection refused")

    def get_chunks(self, key: str, timeout: float | None = None, local_only: bool = True,
                   first_byte: float | None = None, on_first_byte: Callable[[float], None] | None = None,
                   tee: Tee | None = None) -> tuple[Header, list[StoredChunk]] | None:
        self._call("get")
        entry = self.store.get(key)
        if on_first_byte is not None:
            on_first_byte(0.001)
        if entry is None:
            return None
        if tee is not None:
            tee.start(entry.header.raw_size, entry.header)
            for raw in raw_parts(entry.chunks):
                tee.feed(bytes(raw)[: len(raw) // 2] if self.breaks_midway else raw)
                if self.breaks_midway:
                    raise Unreachable("connection reset mid-stream")
        return entry.header, list(entry.chunks)

    def has(self, keys: list[str], timeout: float | None = None, local_only: bool = False) -> list[bool]:
        self._call("has")
        return [k in self.store for k in keys]

    def put_chunks(self, header: Header, chunks: Iterable[StoredChunk], timeout: float | None = None,
                   local_only: bool = False, wait_for_ready: bool = False) -> None:
        self._call("put")
        self.store.put(Entry(header, tuple(chunks)))

    def delete_keys(self, keys: list[str], timeout: float | None = None, local_only: bool = False) -> list[bool]:
        self._call("delete")
        return [bool(self.store.delete([k], tombstone=True)) for k in keys]

    def purge(self, writer: str, timeout: float | None = None, local_only: bool = False) -> int:
        self._call("purge")
        return self.store.delete(self.store.written_by(writer), tombstone=True)

    def close(self) -> None:
        pass


def entry(key: str, value: bytes = b"value") -> Entry:
    return Entry(make_header(key, value, 1024), (StoredChunk(RAW, len(value), value),))


@dataclass
class Mesh:
    cluster: Cluster
    directory: FixedDirectory
    peers: dict[str, MemoryPeer]
    pool: PeerPool

    def key(self, owners: set[str], prefix: str = "k") -> str:
        """A key whose owners (R=2) on the current ring are exactly `owners`, in some order."""
        for i in range(100_000):
            k = f"{prefix}/{i}"
            if set(self.cluster.owners(k)) == owners:
                return k
        raise AssertionError(f"no key owned by {owners}")

    def peer(self, node_id: str) -> MemoryPeer:
        return self.peers[node_id]


@pytest.fixture
def mesh() -> Iterator[Mesh]:
    """This node and peers a, b, c (equal weights, R=2, one ack)."""
    directory = FixedDirectory({ME: 1, "a": 1, "b": 1, "c": 1})
    peers = {n: MemoryPeer() for n in ("a", "b", "c", "d")}
    pool = PeerPool(b"secret", Limits(), connect=lambda address: peers[address.removeprefix("addr-")])  # type: ignore[arg-type,return-value]
    cluster = Cluster(node_id=ME, store=BlobStore(64 * MiB), near=BlobStore(16 * MiB), directory=directory,
                      peers=pool, config=ClusterConfig(replicas=2, write_acks=1))
    cluster.on_membership_change()
    yield Mesh(cluster, directory, peers, pool)
    cluster.close(flush_timeout=5)


def test_the_ring_is_the_directorys(mesh: Mesh) -> None:
    assert mesh.cluster.ring.weights == Ring({ME: 1.0, "a": 1.0, "b": 1.0, "c": 1.0}).weights


def test_a_non_owner_reads_from_the_first_owner_and_keeps_a_near_copy(mesh: Mesh) -> None:
    key = mesh.key({"a", "b"})
    first, second = mesh.cluster.owners(key)
    mesh.peer(first).store.put(entry(key, b"from the owner"))
    got = mesh.cluster.get(key, timeout=5)
    assert got is not None and bytes(got.chunks[0].data) == b"from the owner"
    assert mesh.peer(first).calls == ["get"] and mesh.peer(second).calls == []
    assert key in mesh.cluster.near and key not in mesh.cluster.store  # not an owner: near cache only
    assert mesh.cluster.get(key, timeout=5) is not None
    assert mesh.peer(first).calls == ["get"]  # the second read stayed local
    assert mesh.cluster.counters["near_hits"] == 1


def test_a_fetch_feeds_the_readers_tee_and_a_local_read_does_not(mesh: Mesh) -> None:
    key = mesh.key({"a", "b"})
    mesh.peer(mesh.cluster.owners(key)[0]).store.put(entry(key, b"streamed"))
    tee = Collect()
    got = mesh.cluster.get(key, timeout=5, tee=tee)
    assert got is not None and tee.header is got.header and b"".join(tee.pieces) == b"streamed"
    again = Collect()
    assert mesh.cluster.get(key, timeout=5, tee=again) is not None and again.starts == 0  # held here now


def test_a_stream_broken_midway_restarts_the_tee_at_the_next_owner(mesh: Mesh) -> None:
    key = mesh.key({"a", "b"})
    first, second = mesh.cluster.owners(key)
    for node_id in (first, second):
        mesh.peer(node_id).store.put(entry(key, b"whole value"))
    mesh.peer(first).breaks_midway = True
    tee = Collect()
    got = mesh.cluster.get(key, timeout=5, tee=tee)
    assert got is not None and tee.starts == 2  # once per owner tried
    assert tee.header is got.header and b"".join(tee.pieces) == b"whole value"  # only the good stream's bytes


def test_an_unreachable_owner_is_skipped_until_heard_from_again(mesh: Mesh) -> None:
    key = mesh.key({"a", "b"})
    first, second = mesh.cluster.owners(key)
    mesh.peer(second).store.put(entry(key))
    mesh.peer(first).down = True
    assert mesh.cluster.get(key, timeout=5) is not None  # the replica serves
    assert mesh.cluster.counters["owner_failures"] == 1
    assert not mesh.pool.usable(f"addr-{first}")
    other = mesh.key({first, second}, prefix="other")
    mesh.peer(second).store.put(entry(other))
    calls = len(mesh.peer(first).calls)
    assert mesh.cluster.get(other, timeout=5) is not None
    assert len(mesh.peer(first).calls) == calls  # the open breaker spared the dead owner a second attempt
    mesh.pool.heard(f"addr-{first}")
    mesh.peer(first).down = False
    assert mesh.cluster.has([mesh.key({first, ME}, prefix="h")], timeout=5) == [False]
    assert len(mesh.peer(first).calls) == calls + 1  # heard from: asked again


def test_a_miss_everywhere_is_a_miss(mesh: Mesh) -> None:
    key = mesh.key({"a", "c"})
    assert mesh.cluster.get(key, timeout=5) is None
    assert mesh.cluster.counters["remote_misses"] == 1
    assert mesh.cluster.has([key], timeout=5) == [False]


def test_a_write_reaches_every_owner(mesh: Mesh) -> None:
    mine = mesh.key({ME, "b"})
    theirs = mesh.key({"a", "c"})
    assert mesh.cluster.put(entry(mine))[0] >= 1
    assert mesh.cluster.put(entry(theirs))[0] >= 1
    assert mesh.cluster.flush(timeout=5)
    assert mine in mesh.cluster.store and mine in mesh.peer("b").store
    assert theirs in mesh.peer("a").store and theirs in mesh.peer("c").store
    assert theirs not in mesh.cluster.store and theirs not in mesh.peer("b").store
    assert mesh.cluster.has([mine, theirs, "absent"], timeout=5) == [True, True, False]


def test_no_owner_reachable_keeps_the_write_here_as_a_hint(mesh: Mesh) -> None:
    key = mesh.key({"a", "c"})
    mesh.peer("a").down = mesh.peer("c").down = True
    assert mesh.cluster.put(entry(key), timeout=5) == (0, True)
    # in the store, not the near cache: durable as any value, and repair hands on what it does not own
    assert key in mesh.cluster.store and key not in mesh.cluster.near
    assert mesh.cluster.counters["replica_write_failures"] == 2 and mesh.cluster.counters["hinted_puts"] == 1


def test_a_hint_that_cannot_be_kept_is_an_error_not_an_acknowledgement(mesh: Mesh) -> None:
    key = mesh.key({"a", "c"})
    mesh.peer("a").down = mesh.peer("c").down = True
    held = entry(key, b"x" * 1000)
    mesh.cluster.store.put(held)
    mesh.cluster.store.delete([key], tombstone=True)  # this very write was deleted here: no hint can be kept
    with pytest.raises(StoreFull):
        mesh.cluster.put(held, timeout=5)
    assert mesh.cluster.counters["hinted_puts"] == 0


def test_after_a_ring_change_previous_owners_are_asked_and_the_new_owners_repaired(mesh: Mesh) -> None:
    mesh.directory.weights["d"] = 1
    before = {k: set(mesh.cluster.owners(k)) for k in (f"move/{i}" for i in range(2000))}
    mesh.cluster.on_membership_change()
    # A key that d took over from an old owner (this node owns it neither before nor after), held only by the
    # owner it left: the new owners miss, so only asking the previous owner finds it.
    key = next(k for k, old in before.items()
               if "d" in mesh.cluster.owners(k) and ME not in old | set(mesh.cluster.owners(k)))
    old_owner = (before[key] - set(mesh.cluster.owners(key))).pop()
    mesh.peer(old_owner).store.put(entry(key))
    assert mesh.cluster.get(key, timeout=5) is not None
    assert mesh.cluster.counters["previous_owner_hits"] == 1
    assert mesh.cluster.flush(timeout=5)
    assert all(key in mesh.peer(o).store for o in mesh.cluster.owners(key))


def test_a_delete_reaches_every_member(mesh: Mesh) -> None:
    key = mesh.key({"a", "b"})
    for node_id in ("a", "b", "c"):
        mesh.peer(node_id).store.put(entry(key))  # c holds a near copy, say
    assert mesh.cluster.delete([key, "never"], timeout=5) == [True, False]
    assert all(key not in mesh.peer(n).store for n in ("a", "b", "c"))
    assert mesh.peer("d").calls == []  # not a member


def test_drain_leaves_the_directory_and_hands_every_blob_to_its_owners(mesh: Mesh) -> None:
    mine = [mesh.key({ME, "a"}, prefix="drain-a"), mesh.key({ME, "c"}, prefix="drain-c")]
    for key in mine:
        mesh.cluster.store.put(entry(key))
    reply = mesh.cluster.drain()
    assert mesh.directory.left
    assert reply.handed_off == 2 and reply.failed == 0
    ring = Ring({n: 1.0 for n in ("a", "b", "c")})
    for key in mine:
        assert all(key in mesh.peer(o).store for o in ring.owners(key, 2))


def test_a_copy_of_a_write_deleted_here_is_not_served_from_an_owner_that_missed_the_delete(mesh: Mesh) -> None:
    """The window after a delete where a co-owner is back with the old copy and repair has not run yet."""
    key = mesh.key({ME, "b"})
    old = Entry(replace(entry(key).header, write_id=41), entry(key).chunks)
    mesh.cluster.store.put(old)
    mesh.peer("b").store.put(old)  # b was away when the key was deleted: it still holds the old write
    mesh.cluster.store.delete([key], tombstone=True)
    assert mesh.cluster.get(key, timeout=5) is None
    assert key not in mesh.cluster.store and key not in mesh.cluster.near
    fresh = Entry(replace(old.header, write_id=42), old.chunks)  # a put after the delete is served at once
    mesh.peer("b").store.delete([key])
    mesh.peer("b").store.put(fresh)
    got = mesh.cluster.get(key, timeout=5)
    assert got is not None and got.header.write_id == 42


def test_a_purge_reaches_the_near_cache_and_names_the_members_that_did_not_answer(mesh: Mesh) -> None:
    def by_m(key: str) -> Entry:
        e = entry(key)
        return Entry(replace(e.header, writers=("m", "a")), e.chunks)

    mine, theirs = mesh.key({ME, "b"}), mesh.key({"a", "c"})
    mesh.cluster.store.put(by_m(mine))
    mesh.cluster.near.put(by_m(theirs))  # a copy read here earlier
    mesh.peer("b").store.put(by_m(mine))
    mesh.peer("c").down = True  # down, or cut off: it must be named, so the purge is run again
    deleted, failed = mesh.cluster.purge("m", timeout=5)
    assert deleted == 3 and failed == ["c"]
    assert mine not in mesh.cluster.store and theirs not in mesh.cluster.near and mine not in mesh.peer("b").store


def test_a_value_a_revoked_member_wrote_is_not_fetched_from_an_owner_without_the_flag(mesh: Mesh) -> None:
    key = mesh.key({"a", "c"})
    e = entry(key)
    mesh.peer("a").store.put(Entry(replace(e.header, writers=("m", "a")), e.chunks))
    mesh.cluster.revoked = frozenset({"m"})
    assert mesh.cluster.get(key, timeout=5) is None
    assert key not in mesh.cluster.near

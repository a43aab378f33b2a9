"""Placement and routing: which nodes own a key, and how reads and writes reach them.

Reads try the local store, then the key's owners in ring order (each under a deadline, skipping peers whose
circuit breaker is open), then, for a while after a membership change, the key's previous owners, so a
scale-out does not empty the cache; what a new owner finds there it keeps. Writes go to all R owners and
return once `write_acks` of them stored the blob; the rest finish in the background. Anti-entropy
(mesh/cluster/repair.py) brings every key back to R copies on its current owners after any ring change, restart or
failed write, and hands keys this node no longer owns to their owners; a draining node hands all its blobs
off before it stops.

Concurrent reads of one key on this node share one transfer (singleflight), and a node that reads a key it
does not own keeps it in a bounded near cache, so hot keys stop crossing the network.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, replace

from mesh.cluster.directory import Directory
from mesh.cluster.leases import Answer, LeaseTable
from mesh.membership.members import Change, ring_changed
from mesh.cluster.repair import AntiEntropy
from mesh.pb import mesh_pb2 as pb
from mesh.transport.peer import MeshError, Unreachable
from mesh.transport.peers import PeerPool
from mesh.cluster.ring import Ring
from mesh.cluster.singleflight import Group
from mesh.storage.store import BlobStore, Entry, StoreFull
from mesh.transport.wire import Tee

log = logging.getLogger(__name__)

_STATES = {pb.LEASE_GRANTED: "granted", pb.LEASE_HELD: "held", pb.LEASE_DONE: "done", pb.LEASE_RELEASED: "released",
           pb.LEASE_COMPUTE: "compute"}


@dataclass(frozen=True)
class ClusterConfig:
    name: str = "default"
    replicas: int = 2
    write_acks: int = 1           # owners that must hold a put before it returns; the others finish later
    read_timeout: float = 10.0    # one attempt at one owner; a dead owner costs at most this
    write_timeout: float = 30.0
    previous_owner_window: float = 600.0  # how long after a ring change previous owners are asked on a miss
    repair_interval: float = 10.0  # seconds between anti-entropy passes (one also runs after every change)


class Cluster:
    """Routing for one node: takes the ring from a Directory and reaches peers through the PeerPool's transports.

    Membership is not its business: the node wires SWIM (mesh/membership/driver.py) in as its directory and tells the
    cluster when the ring changed (on_membership_change)."""

    def __init__(self, *, node_id: str, store: BlobStore, near: BlobStore, directory: Directory,
                 peers: PeerPool, config: ClusterConfig) -> None:
        self.node_id = node_id
        self.store = store
        self.near = near
        self.directory = directory
        self.revoked: frozenset[str] = frozenset()  # writers whose values are never served (revocation.py)
        self.peers = peers
        self.config = config
        self._lock = threading.Lock()
        self._ring = Ring({node_id: 1.0})
        self._previous: Ring | None = None
        self._changed_at = 0.0
        self._flight: Group[tuple[Entry | None, bool]] = Group()
        # Reads (Has, Get fan-out, deletes) and writes (replica puts, read repair) get their own threads: a burst of
        # background replication after a prompt must not queue the next prompt's lookups behind it.
        self._pool = futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="mesh-route")
        self._writes = futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="mesh-replicate")
        self._writes_idle = threading.Condition()
        self._pending_writes = 0
        self.repair = AntiEntropy(self, store, interval=config.repair_interval, timeout=config.read_timeout)
        # Compute leases of the keys this node is primary owner of (in-flight dedupe, mesh/cluster/leases.py).
        self.leases = LeaseTable(lambda key: self.store.header(key) is not None)
        self.counters: dict[str, int] = {"remote_hits": 0, "remote_misses": 0, "previous_owner_hits": 0,
                                         "near_hits": 0, "owner_failures": 0, "replica_write_failures": 0,
                                         "uncached_reads": 0, "hinted_puts": 0}

    # -- the ring ------------------------------------------------------------------------------------------------

    @property
    def replicas(self) -> int:
        return self.config.replicas

    @property
    def cluster_name(self) -> str:
        return self.config.name

    @property
    def ring(self) -> Ring:
        return self._ring

    def address_of(self, node_id: str) -> str | None:
        return self.directory.address_of(node_id)

    def start(self) -> None:
        self.repair.start()

    def on_membership_change(self, changes: list[Change] | None = None) -> None:
        """Told what changed: only changes of ring membership, addresses or weights rebuild the ring."""
        if changes is not None and not ring_changed(changes):
            return
        weights = {k: float(v) for k, v in self.directory.ring_members().items()}
        with self._lock:
            if self._ring.weights == weights:
                return
            old = self._ring
            self._ring = Ring(weights)
            self._previous = old
            self._changed_at = time.monotonic()
        log.info("ring now has %d members", len(self._ring))
        self.repair.kick()

    def on_member_restart(self, node_id: str) -> None:
        """A member came back under a new incarnation, maybe empty: the ring is the same, its copies are not."""
        log.info("member %s restarted: repairing its copies", node_id)
        self.repair.kick()

    def owners(self, key: str) -> list[str]:
        return self._ring.owners(key, self.config.replicas)

    def _previous_owners(self, key: str, current: list[str]) -> list[str]:
        prev = self._previous
        if prev is None or time.monotonic() - self._changed_at > self.config.previous_owner_window:
            return []
        return [o for o in prev.owners(key, self.config.replicas) if o not in current]

    def _count(self, name: str) -> None:
        with self._lock:
            self.counters[name] += 1

    # -- reads -------------------------------------------------------------------------------------------------

    def local(self, key: str) -> Entry | None:
        entry = self.store.get(key)
        if entry is None:
            entry = self.near.peek(key)
            if entry is not None:
                self.near.get(key)
                self._count("near_hits")
        return entry

    def get(self, key: str, timeout: float, tee: Tee | None = None) -> Entry | None:
        """The entry of `key`: held here, or fetched from its owners (then kept as a replica or a near copy).

        `tee` gets the raw bytes of a fetch this call leads as they arrive (a reader decoding meanwhile); it is
        restarted for every owner tried. A local entry, or one fetched for another caller, never reaches it:
        the caller compares `tee`'s header with the entry's to know."""
        entry = self.local(key)
        if entry is not None:
            return entry
        deadline = time.monotonic() + timeout
        try:
            entry, complete = self._flight.do(key, lambda: self._fetch(key, deadline, tee), timeout)
        except futures.TimeoutError:
            return None
        if entry is None and not complete and deadline - time.monotonic() > 0.01:
            # The fetch this call joined ran out of *its* caller's deadline; ours has time left: ask again.
            entry, _ = self._fetch(key, deadline, tee)
        return entry

    def _fetch(self, key: str, deadline: float, tee: Tee | None = None) -> tuple[Entry | None, bool]:
        """(the entry or None, whether every owner asked gave an answer before the deadline)."""
        owners = self.owners(key)
        previous = self._previous_owners(key, owners)
        for node_id in [o for o in owners if o != self.node_id] + [o for o in previous if o != self.node_id]:
            entry = self._fetch_from(node_id, key, deadline, tee)
            if entry is None:
                continue
            if self.store.deleted(entry.header) or self.near.deleted(entry.header):
                continue  # a copy of a value deleted here (its owner missed the delete)
            if self.revoked.intersection(entry.header.writers):
                continue  # written by a revoked member: an owner without the flag yet still holds it
            if node_id in previous:
                self._count("previous_owner_hits")
                self._submit_write(self._repair, entry, [o for o in owners if o != self.node_id])
            try:
                (self.store if self.node_id in owners else self.near).put(entry)
            except StoreFull:
                self._count("uncached_reads")  # larger than the budget: served, not kept
            self._count("remote_hits")
            return entry, True
        self._count("remote_misses")
        return None, time.monotonic() < deadline

    def _fetch_from(self, node_id: str, key: str, deadline: float, tee: Tee | None = None) -> Entry | None:
        address = self.directory.address_of(node_id)
        remaining = deadline - time.monotonic()
        if address is None or remaining <= 0 or not self.peers.usable(address):
            return None
        try:
            got = self.peers.client(address).get_chunks(
                key, timeout=min(remaining, self.config.read_timeout),
                first_byte=min(remaining, self.peers.attempt_budget(address)),
                on_first_byte=lambda seconds: self.peers.observe(address, seconds), tee=tee)
        except Unreachable as e:
            self.peers.failed(address)
            self._count("owner_failures")
            log.debug("owner %s unreachable for %s: %s", node_id, key, e)
            return None
        except MeshError as e:
            self._count("owner_failures")
            log.warning("owner %s failed a read of %s: %s", node_id, key, e)
            return None
        if got is None:
            return None
        header, chunks = got
        return Entry(header, tuple(chunks))

    def has(self, keys: list[str], timeout: float) -> list[bool]:
        present = [key in self.store or key in self.near for key in keys]
        ask: dict[str, list[int]] = {}
        for i, key in enumerate(keys):
            if not present[i]:
                owners = self.owners(key)
                for node_id in owners + self._previous_owners(key, owners):
                    if node_id != self.node_id:
                        ask.setdefault(node_id, []).append(i)
        deadline = time.monotonic() + timeout
        if len(ask) == 1:  # one peer to ask (a small mesh, or keys that share owners): no hop to a pool thread
            (node_id, idx), = ask.items()
            answers = [(idx, self._has_at(node_id, [keys[i] for i in idx], deadline))]
        else:
            jobs = {self._pool.submit(self._has_at, node_id, [keys[i] for i in idx], deadline): idx
                    for node_id, idx in ask.items()}
            done, _ = futures.wait(jobs, timeout=timeout)
            answers = [(jobs[job], job.result()) for job in done]
        for idx, flags in answers:
            for i, yes in zip(idx, flags):
                present[i] = present[i] or yes
        return present

    def _has_at(self, node_id: str, keys: list[str], deadline: float) -> list[bool]:
        address = self.directory.address_of(node_id)
        remaining = deadline - time.monotonic()
        if address is None or remaining <= 0 or not self.peers.usable(address):
            return [False] * len(keys)
        try:
            return self.peers.client(address).has(
                keys, timeout=min(remaining, self.peers.attempt_budget(address)), local_only=True)
        except Unreachable:
            self.peers.failed(address)
        except MeshError as e:
            log.debug("Has at %s failed: %s", node_id, e)
        return [False] * len(keys)

    # -- compute leases ----------------------------------------------------------------------------------------

    def lease(self, request: pb.LeaseRequest, timeout: float) -> Answer:
        """A lease call answered by the key's primary owner's table: here, or asked of it (local_only).

        An owner that does not answer is skipped for the next one in ring order, so callers that all see the
        primary down still meet at one table. Raises Unreachable when no owner answered within `timeout`: the
        caller then computes without a lease (a possible duplicate, never a stall)."""
        deadline = time.monotonic() + timeout
        last: MeshError | None = None
        for node_id in self.owners(request.key):
            if node_id == self.node_id:
                return self.lease_local(request)
            address = self.directory.address_of(node_id)
            remaining = deadline - time.monotonic()
            if address is None or not self.peers.usable(address):
                continue
            if remaining <= 0:
                break
            try:
                reply = self.peers.client(address).lease(
                    request, timeout=min(remaining, max(0.5, self.peers.attempt_budget(address))), local_only=True)
            except Unreachable as e:
                self.peers.failed(address)
                self._count("owner_failures")
                last = e
                continue
            except MeshError as e:
                last = e
                continue
            return Answer(_STATES[reply.state], reply.holder, reply.held_seconds, reply.ttl_left,
                          reply.expected_seconds, reply.owner or node_id)
        raise last if last is not None else Unreachable(f"no owner of {request.key[:80]} answered a lease call")

    def lease_local(self, request: pb.LeaseRequest) -> Answer:
        """This node's own table answers (it is the owner asked)."""
        if request.op == pb.LEASE_RELEASE:
            answer = self.leases.release(request.key, request.holder, request.done, request.uncached)
        else:
            answer = self.leases.acquire(request.key, request.holder, request.ttl, request.expected_seconds)
        return replace(answer, owner=self.node_id)

    # -- writes ------------------------------------------------------------------------------------------------

    def put(self, entry: Entry, timeout: float | None = None) -> tuple[int, bool]:
        """Store on the owners: (how many hold it when the call returns, whether this node keeps it as a hint).
        See put_detail."""
        _, acked, hinted = self.put_detail(entry, timeout)
        return len(acked), hinted

    def put_detail(self, entry: Entry, timeout: float | None = None) -> tuple[list[str], list[str], bool]:
        """Store on the owners: (the owners, those that acknowledged before the call returned, whether this node
        keeps it as a hint). `mesh put` shows the first two, so an operator sees where a value went.

        Waits at most `timeout` (default: the write timeout) for the acknowledgements; copies still under way
        then finish in the background. When no owner took it (all unreachable, say behind a partition), this node
        keeps it in its store although it does not own it: a hint, durable as any stored value (on disk with a
        data dir), that repair hands to the owners once they are reachable and only then drops (repair.py, step
        3). A hint that cannot be kept raises StoreFull: a put is never acknowledged for a value held nowhere."""
        wait = self.config.write_timeout + 1 if timeout is None else timeout
        owners = self.owners(entry.header.key)
        acked: list[str] = []
        if self.node_id in owners:
            self.store.put(entry)
            acked.append(self.node_id)
        remote = {self._submit_write(self.put_to, o, entry): o for o in owners if o != self.node_id}
        need = min(self.config.write_acks, len(owners))
        if len(acked) < need and remote:
            try:
                for job in futures.as_completed(remote, timeout=wait):
                    if job.result():
                        acked.append(remote[job])
                    if len(acked) >= need:
                        break
            except futures.TimeoutError:
                pass
        if acked:
            return owners, acked, False
        self.store.put(entry)  # StoreFull when it can never fit: the caller is told, not acknowledged
        if self.store.header(entry.header.key) is None:
            raise StoreFull(f"no owner of {entry.header.key[:80]} is reachable, and this node could not keep it "
                            f"to hand on later (deleted here, or evicted at once)")
        self._count("hinted_puts")
        self.repair.kick()
        return owners, [], True

    def purge(self, writer: str, timeout: float) -> tuple[int, list[str]]:
        """Delete what `writer` wrote on every member: (values deleted, members that did not answer)."""
        deadline = time.monotonic() + timeout
        deleted = self.purge_local(writer)
        failed: list[str] = []
        # Every member we know of but those that left: one that is DEAD now (down, or cut off) is named as not
        # answering, so the operator runs the purge again once it is back, before its tombstones expire.
        others = [m for m in self.directory.known_members() if m != self.node_id]
        jobs = {self._pool.submit(self._purge_at, m, writer, deadline): m for m in others}
        for job, member in jobs.items():
            try:
                got = job.result(timeout=max(0.0, deadline - time.monotonic()) + 1)
            except futures.TimeoutError:
                got = None
            if got is None:
                failed.append(member)
            else:
                deleted += got
        return deleted, failed

    def purge_local(self, writer: str) -> int:
        """Delete, with tombstones, what `writer` wrote from this node's store and near cache."""
        return (self.store.delete(self.store.written_by(writer), tombstone=True)
                + self.near.delete(self.near.written_by(writer), tombstone=True))

    def _purge_at(self, node_id: str, writer: str, deadline: float) -> int | None:
        address = self.directory.address_of(node_id)
        remaining = deadline - time.monotonic()
        if address is None or remaining <= 0:
            return None
        try:
            return self.peers.client(address).purge(writer, timeout=remaining, local_only=True)
        except MeshError as e:
            log.info("purge at %s failed: %s", node_id, e)
            return None

    def _submit_write(self, fn: Callable[..., int | None], *args: object) -> futures.Future[int | None]:
        """A background copy; counted, so a stopping node can wait for the queue to empty (`flush`)."""
        with self._writes_idle:
            self._pending_writes += 1

        def run() -> int | None:
            try:
                return fn(*args)
            finally:
                with self._writes_idle:
                    self._pending_writes -= 1
                    self._writes_idle.notify_all()

        return self._writes.submit(run)

    def flush(self, timeout: float) -> bool:
        """Wait until queued replica writes are done; False if some were still pending at the timeout."""
        deadline = time.monotonic() + timeout
        with self._writes_idle:
            while self._pending_writes:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    log.warning("%d replica writes still pending after %.0f s", self._pending_writes, timeout)
                    return False
                self._writes_idle.wait(remaining)
        return True

    def put_to(self, node_id: str, entry: Entry) -> int:
        """Store a copy on one owner; 1 if it holds the key afterwards, 0 if not (counted and logged)."""
        address = self.directory.address_of(node_id)
        if address is None or not self.peers.usable(address):
            self._count("replica_write_failures")
            return 0
        try:
            self.peers.client(address).put_chunks(entry.header, entry.chunks, timeout=self.config.write_timeout,
                                                  local_only=True, wait_for_ready=True)
            return 1
        except MeshError as e:
            if isinstance(e, Unreachable):
                self.peers.failed(address)
            self._count("replica_write_failures")
            log.warning("replica write of %s to %s failed: %s", entry.header.key, node_id, e)
            return 0

    def _repair(self, entry: Entry, owners: list[str]) -> int:
        return sum(self.put_to(node_id, entry) for node_id in owners)

    def delete_local(self, keys: list[str]) -> list[bool]:
        """Drop keys from this node's store and near cache, leaving tombstones; per key, whether it was here."""
        return [bool(self.store.delete([k], tombstone=True) + self.near.delete([k], tombstone=True)) for k in keys]

    def delete(self, keys: list[str], timeout: float) -> list[bool]:
        """Delete every copy: on every member, since any may hold a near-cache copy. Per key, whether it existed."""
        existed = self.delete_local(keys)
        deadline = time.monotonic() + timeout
        members = [m for m in self.directory.ring_members() if m != self.node_id]

        def delete_at(node_id: str) -> list[bool]:
            address = self.directory.address_of(node_id)
            remaining = deadline - time.monotonic()
            if address is None or remaining <= 0 or not self.peers.usable(address):
                return []
            try:
                return self.peers.client(address).delete_keys(keys, timeout=remaining, local_only=True)
            except Unreachable:
                self.peers.failed(address)
            except MeshError as e:
                log.warning("delete at %s failed: %s", node_id, e)
            return []

        jobs = [self._pool.submit(delete_at, n) for n in members]
        done, _ = futures.wait(jobs, timeout=timeout)
        for job in done:
            for i, yes in enumerate(job.result()):
                existed[i] = existed[i] or yes
        return existed

    def digest(self, requester: str, buckets: int) -> tuple[list[int], list[int]]:
        return self.repair.digest_for(requester, buckets)

    # -- leaving -------------------------------------------------------------------------------

    def drain(self, on_done: Callable[[], None] | None = None) -> pb.DrainReply:
        """Leave gracefully: announce it, hand every local blob to its owners without us, then call on_done."""
        self.repair.stop()  # no pass may drop or push keys while they are being handed off
        self.flush(self.config.write_timeout)  # copies acknowledged to writers reach their owners first
        self.directory.leave()
        ring = Ring({k: float(v) for k, v in self.directory.ring_members().items()})
        handed, failed = 0, 0
        for header, _ in self.store.catalog():
            entry = self.store.peek(header.key)
            if entry is None:
                continue
            owners = ring.owners(header.key, self.config.replicas)
            ok = sum(self.put_to(o, entry) for o in owners)
            handed += ok > 0
            failed += ok == 0 and bool(owners)
        log.info("drained: handed %d blobs off, %d failed", handed, failed)
        if on_done is not None:
            on_done()
        return pb.DrainReply(handed_off=handed, failed=failed)

    def stats(self) -> dict[str, float]:
        with self._lock:
            out: dict[str, float] = {k: float(v) for k, v in self.counters.items()}
        out.update({f"near_{k}": v for k, v in self.near.stats().items()
                    if k in ("entries", "bytes_used", "max_memory", "evictions")})
        out["ring_members"] = len(self._ring)
        out.update(self.leases.stats())
        r = self.repair.stats
        out.update(repair_passes=r.passes, repaired=r.repaired, handed_off=r.handed_off,
                   under_replicated=r.under_replicated, repair_pending=r.pending,
                   repair_last_pass_seconds=r.last_pass_seconds, repair_errors=r.errors,
                   repair_deletes_applied=r.deletes_applied, hints=r.hints, divergent_keys=r.divergent)
        return out

    def close(self, flush_timeout: float = 5.0) -> None:
        """Stop; queued replica writes get `flush_timeout` seconds to finish first (a SIGTERM loses none)."""
        self.repair.stop()
        self.flush(flush_timeout)
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._writes.shutdown(wait=False, cancel_futures=True)

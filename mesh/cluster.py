"""Placement and routing: which nodes own a key, and how reads and writes reach them.

Reads try the local store, then the key's owners in ring order (each under a deadline, skipping peers whose
circuit breaker is open), then, for a while after a membership change, the key's previous owners, so a
scale-out does not empty the cache; what a new owner finds there it keeps. Writes go to all R owners and
return once `write_acks` of them stored the blob; the rest finish in the background. After every change of
the ring a rebalancer copies local blobs to owners that did not own them before (the first surviving old
owner of a key does it, so each blob moves once), and a draining node hands all its blobs off before it stops.

Concurrent reads of one key on this node share one transfer (singleflight), and a node that reads a key it
does not own keeps it in a bounded near cache, so hot keys stop crossing the network.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass

from mesh.membership import Membership
from mesh.pb import mesh_pb2 as pb
from mesh.peer import MeshError, Unreachable
from mesh.peers import PeerPool
from mesh.ring import Ring
from mesh.singleflight import Group
from mesh.store import BlobStore, Entry

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClusterConfig:
    name: str = "default"
    replicas: int = 2
    write_acks: int = 1           # owners that must hold a put before it returns; the others finish later
    read_timeout: float = 10.0    # one attempt at one owner; a dead owner costs at most this
    write_timeout: float = 30.0
    previous_owner_window: float = 600.0  # how long after a ring change previous owners are asked on a miss


class Cluster:
    def __init__(self, *, node_id: str, store: BlobStore, near: BlobStore, membership: Membership,
                 peers: PeerPool, config: ClusterConfig) -> None:
        self.node_id = node_id
        self.store = store
        self.near = near
        self.membership = membership
        self.peers = peers
        self.config = config
        self._lock = threading.Lock()
        self._ring = Ring({node_id: 1.0})
        self._previous: Ring | None = None
        self._changed_at = 0.0
        self._generation = 0
        self._flight: Group[Entry | None] = Group()
        # Reads (Has, Get fan-out, deletes) and writes (replica puts, read repair) get their own threads: a burst of
        # background replication after a prompt must not queue the next prompt's lookups behind it.
        self._pool = futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="mesh-route")
        self._writes = futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="mesh-replicate")
        self._rebalancer = futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="mesh-rebalance")
        self.counters: dict[str, int] = {"remote_hits": 0, "remote_misses": 0, "previous_owner_hits": 0,
                                         "near_hits": 0, "owner_failures": 0, "replica_write_failures": 0,
                                         "rebalanced": 0}

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

    def on_membership_change(self) -> None:
        weights = {k: float(v) for k, v in self.membership.ring_members().items()}
        with self._lock:
            if self._ring.weights == weights:
                return
            old = self._ring
            self._ring = Ring(weights)
            self._previous = old
            self._changed_at = time.monotonic()
            self._generation += 1
            generation = self._generation
        log.info("ring now has %d members", len(self._ring))
        self._rebalancer.submit(self._rebalance, old, self._ring, generation)

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

    def get(self, key: str, timeout: float) -> Entry | None:
        entry = self.local(key)
        if entry is not None:
            return entry
        deadline = time.monotonic() + timeout
        try:
            return self._flight.do(key, lambda: self._fetch(key, deadline), timeout)
        except futures.TimeoutError:
            return None

    def _fetch(self, key: str, deadline: float) -> Entry | None:
        owners = self.owners(key)
        previous = self._previous_owners(key, owners)
        for node_id in [o for o in owners if o != self.node_id] + [o for o in previous if o != self.node_id]:
            entry = self._fetch_from(node_id, key, deadline)
            if entry is None:
                continue
            if node_id in previous:
                self._count("previous_owner_hits")
                self._writes.submit(self._repair, entry, [o for o in owners if o != self.node_id])
            if self.node_id in owners:
                self.store.put(entry)
            else:
                self.near.put(entry)
            self._count("remote_hits")
            return entry
        self._count("remote_misses")
        return None

    def _fetch_from(self, node_id: str, key: str, deadline: float) -> Entry | None:
        address = self.membership.address_of(node_id)
        remaining = deadline - time.monotonic()
        if address is None or remaining <= 0 or not self.peers.usable(address):
            return None
        try:
            got = self.peers.client(address).get_chunks(key, timeout=min(remaining, self.config.read_timeout))
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
        jobs = {self._pool.submit(self._has_at, node_id, [keys[i] for i in idx], deadline): idx
                for node_id, idx in ask.items()}
        done, _ = futures.wait(jobs, timeout=timeout)
        for job in done:
            for i, yes in zip(jobs[job], job.result()):
                present[i] = present[i] or yes
        return present

    def _has_at(self, node_id: str, keys: list[str], deadline: float) -> list[bool]:
        address = self.membership.address_of(node_id)
        remaining = deadline - time.monotonic()
        if address is None or remaining <= 0 or not self.peers.usable(address):
            return [False] * len(keys)
        try:
            return self.peers.client(address).has(keys, timeout=remaining, local_only=True)
        except MeshError:
            self.peers.failed(address)
            return [False] * len(keys)

    # -- writes ------------------------------------------------------------------------------------------------

    def put(self, entry: Entry) -> int:
        """Store on the owners; returns how many hold it when the call returns (at least write_acks if able)."""
        owners = self.owners(entry.header.key)
        acks = 0
        if self.node_id in owners:
            self.store.put(entry)
            acks += 1
        remote = [self._writes.submit(self._put_at, o, entry) for o in owners if o != self.node_id]
        need = min(self.config.write_acks, len(owners))
        if acks < need and remote:
            try:
                for job in futures.as_completed(remote, timeout=self.config.write_timeout + 1):
                    acks += job.result()
                    if acks >= need:
                        break
            except futures.TimeoutError:
                pass
        if acks == 0:
            self.near.put(entry)  # no owner took it: keep it here rather than lose it
        return acks

    def _put_at(self, node_id: str, entry: Entry) -> int:
        address = self.membership.address_of(node_id)
        if address is None or not self.peers.usable(address):
            self._count("replica_write_failures")
            return 0
        try:
            self.peers.client(address).put_chunks(entry.header, entry.chunks, timeout=self.config.write_timeout,
                                                  local_only=True)
            return 1
        except MeshError as e:
            if isinstance(e, Unreachable):
                self.peers.failed(address)
            self._count("replica_write_failures")
            log.warning("replica write of %s to %s failed: %s", entry.header.key, node_id, e)
            return 0

    def _repair(self, entry: Entry, owners: list[str]) -> None:
        for node_id in owners:
            self._put_at(node_id, entry)

    def delete(self, keys: list[str], timeout: float) -> int:
        """Deletes every copy it can reach; returns the number of copies removed across the mesh."""
        deleted = self.store.delete(keys) + self.near.delete(keys)
        targets: dict[str, list[str]] = {}
        for key in keys:
            owners = self.owners(key)
            for node_id in owners + self._previous_owners(key, owners):
                if node_id != self.node_id:
                    targets.setdefault(node_id, []).append(key)
        deadline = time.monotonic() + timeout

        def delete_at(node_id: str, node_keys: list[str]) -> int:
            address = self.membership.address_of(node_id)
            remaining = deadline - time.monotonic()
            if address is None or remaining <= 0:
                return 0
            try:
                return self.peers.client(address).delete(node_keys, timeout=remaining, local_only=True)
            except MeshError:
                return 0

        jobs = [self._pool.submit(delete_at, n, k) for n, k in targets.items()]
        done, _ = futures.wait(jobs, timeout=timeout)
        return deleted + sum(j.result() for j in done)

    # -- rebalancing and leaving -------------------------------------------------------------------------------

    def _rebalance(self, old: Ring, new: Ring, generation: int) -> None:
        """Copy local blobs to their new owners; stops early if the ring changes again."""
        moved = 0
        for entry in self.store.items():
            if self._generation != generation:
                return
            key = entry.header.key
            old_owners = [o for o in old.owners(key, self.config.replicas) if o in new]
            if old_owners and old_owners[0] != self.node_id:
                continue  # another surviving owner moves it
            for node_id in new.owners(key, self.config.replicas):
                if node_id != self.node_id and node_id not in old_owners:
                    moved += self._put_at(node_id, entry)
        if moved:
            with self._lock:
                self.counters["rebalanced"] += moved
            log.info("rebalanced %d blob copies to new owners", moved)

    def drain(self, on_done: Callable[[], None] | None = None) -> pb.DrainReply:
        """Leave gracefully: announce it, hand every local blob to its owners without us, then call on_done."""
        self.membership.leave()
        ring = Ring({k: float(v) for k, v in self.membership.ring_members().items()})
        handed, failed = 0, 0
        for entry in self.store.items():
            owners = ring.owners(entry.header.key, self.config.replicas)
            ok = sum(self._put_at(o, entry) for o in owners)
            handed += ok > 0
            failed += ok == 0 and bool(owners)
        log.info("drained: handed %d blobs off, %d failed", handed, failed)
        if on_done is not None:
            on_done()
        return pb.DrainReply(handed_off=handed, failed=failed)

    def ping(self, request: pb.PingRequest) -> pb.PingReply:
        return self.membership.handle_ping(request)

    def members(self) -> list[pb.Member]:
        return self.membership.members_pb()

    def stats(self) -> dict[str, float]:
        with self._lock:
            out: dict[str, float] = {k: float(v) for k, v in self.counters.items()}
        out.update({f"near_{k}": v for k, v in self.near.stats().items()
                    if k in ("entries", "bytes_used", "max_memory", "evictions")})
        out["ring_members"] = len(self._ring)
        return out

    def close(self) -> None:
        self._rebalancer.shutdown(wait=False, cancel_futures=True)
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._writes.shutdown(wait=False, cancel_futures=True)

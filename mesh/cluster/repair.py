"""Anti-entropy: every key goes back to R copies on its current owners, without waiting for a read.

Why: a node restarted with the same id (a deploy, a crash) comes back empty, and the ring does not change, so
nothing else would copy its keys back; a replica write can fail while a peer is in reconnect backoff; a
rebalance can be cut short by the next membership change. Each of those leaves a key with fewer than R copies
until it is gone. Here every node, every `interval` seconds and at once after a membership change or a
member's restart, compares notes with each peer it shares keys with:

1. Both sides summarise the keys they hold that *both* own (by the ring) into BUCKETS hash buckets: per bucket
   a count and the xor of a hash of (key, write id, checksum). Equal buckets need nothing more; a summary costs
   a few KiB whatever the number of keys.
2. For the buckets that differ, this node asks the peer about its own keys there (one batched Has naming the
   write id of each copy): it drops a copy the peer has deleted (a tombstone for that write id) and pushes the
   keys the peer lacks. A key the peer holds with another value stays as each has it: values are never replaced
   (mesh/storage/store.py says why), so no writer and no clock decides between them. The peer's pass does
   the same the other way, so both converge.
3. Keys this node holds but no longer owns (it was an owner before the ring changed) are pushed to owners that
   lack them, then dropped here: that is the rebalance, retried every pass until it completes.

The rate is bounded: one pass at a time, each pushes at most `max_push_bytes` before yielding to the next
interval, and passes after a kick are at least `min_gap` apart.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

import xxhash

from mesh.transport.peer import MeshError, Unreachable
from mesh.transport.peers import PeerPool
from mesh.cluster.ring import Ring
from mesh.storage.store import BlobStore, Entry
from mesh.transport.wire import Header

log = logging.getLogger(__name__)

BUCKETS = 256
HAS_BATCH = 1000


def bucket_of(key: str, buckets: int = BUCKETS) -> int:
    return xxhash.xxh3_64_intdigest(key.encode()) % buckets


def version_hash(header: Header) -> int:
    """Key, write and content: two owners holding copies of one write agree, whenever each stored them."""
    return xxhash.xxh3_64_intdigest(f"{header.key}\0{header.write_id}\0{header.checksum}".encode())


def digest(headers: Iterable[Header], shared: Callable[[str], bool], buckets: int = BUCKETS
           ) -> tuple[list[int], list[int]]:
    """(xor of version hashes, count) per bucket, over the keys `shared` accepts."""
    xors, counts = [0] * buckets, [0] * buckets
    for header in headers:
        if shared(header.key):
            b = bucket_of(header.key, buckets)
            xors[b] ^= version_hash(header)
            counts[b] += 1
    return xors, counts


class Placement(Protocol):
    """What repair needs of the cluster: the ring, and a way to reach a peer."""

    node_id: str
    peers: PeerPool

    @property
    def ring(self) -> Ring: ...
    @property
    def replicas(self) -> int: ...
    def address_of(self, node_id: str) -> str | None: ...
    def put_to(self, node_id: str, entry: Entry) -> int: ...


@dataclass
class RepairStats:
    passes: int = 0
    repaired: int = 0            # copies pushed to an owner that lacked the key
    handed_off: int = 0          # keys this node no longer owns, dropped once their owners held them
    under_replicated: int = 0    # copies found missing in the last pass (before it pushed them)
    pending: int = 0             # copies the last pass could not push (peer unusable, budget spent)
    deletes_applied: int = 0     # copies dropped because a co-owner had deleted that write
    divergent: int = 0           # keys found with another value at a co-owner in the last pass (both kept)
    hints: int = 0               # keys held here for owners that lacked them, in the last pass
    last_pass_seconds: float = 0.0
    errors: int = 0


class AntiEntropy:
    def __init__(self, placement: Placement, store: BlobStore, interval: float = 10.0, min_gap: float = 1.0,
                 max_push_bytes: int = 1 << 30, timeout: float = 10.0, retry_after: float = 2.0) -> None:
        self.placement = placement
        self.store = store
        self.interval = interval
        self.min_gap = min_gap
        self.max_push_bytes = max_push_bytes
        self.timeout = timeout
        self.retry_after = retry_after
        self.stats = RepairStats()
        self._divergent = 0
        self._kick = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- what a peer asks of us ---------------------------------------------------------------------------

    def digest_for(self, requester: str, buckets: int) -> tuple[list[int], list[int]]:
        """Our summary of the keys we hold that both we and `requester` own."""
        ring, me, r = self.placement.ring, self.placement.node_id, self.placement.replicas

        def shared(key: str) -> bool:
            owners = ring.owners(key, r)
            return me in owners and requester in owners

        return digest((h for h, _ in self.store.catalog()), shared, buckets)

    # -- the loop -----------------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="mesh-repair", daemon=True)
        self._thread.start()

    def kick(self) -> None:
        """Run a pass soon: the membership changed, or a member restarted (and may have come back empty)."""
        self._kick.set()

    def stop(self) -> None:
        self._stop.set()
        self._kick.set()
        if self._thread is not None:
            self._thread.join(timeout=self.timeout + 2)

    def _run(self) -> None:
        last = 0.0
        while not self._stop.is_set():
            # Copies left unpushed (a peer unreachable, the byte budget spent) are retried soon, not in `interval`.
            self._kick.wait(self.retry_after if self.stats.pending else self.interval)
            self._kick.clear()
            if self._stop.is_set():
                return
            gap = self.min_gap - (time.monotonic() - last)
            if gap > 0 and self._stop.wait(gap):
                return
            last = time.monotonic()
            try:
                self.run_pass()
            except Exception:  # pragma: no cover - the loop must survive anything
                self.stats.errors += 1
                log.exception("repair pass failed")

    # -- one pass -----------------------------------------------------------------------------------------

    def run_pass(self) -> RepairStats:
        started = time.monotonic()
        ring, me, r = self.placement.ring, self.placement.node_id, self.placement.replicas
        by_peer: dict[str, list[Header]] = {}   # peer -> our keys it should hold too
        not_ours: list[tuple[Header, list[str]]] = []
        for header, _ in self.store.catalog():
            owners = ring.owners(header.key, r)
            if me in owners:
                for peer in owners:
                    if peer != me:
                        by_peer.setdefault(peer, []).append(header)
            else:
                not_ours.append((header, owners))
        budget = [self.max_push_bytes]
        missing = pending = repaired = 0
        self._divergent = 0
        for peer, headers in by_peer.items():
            m, unpushed, done = self._sync_peer(peer, headers, budget)
            missing, pending, repaired = missing + m, pending + len(unpushed), repaired + done
        handoff: dict[str, list[Header]] = {}
        for header, owners in not_ours:
            for owner in owners:
                handoff.setdefault(owner, []).append(header)
        kept: set[str] = set()
        for owner, headers in handoff.items():
            m, unpushed, done = self._push_missing(owner, headers, budget)
            missing, pending, repaired = missing + m, pending + len(unpushed), repaired + done
            kept |= unpushed
        handed = 0
        ring = self.placement.ring  # read again: drop nothing that the ring now says is ours after all
        for header, owners in not_ours:
            key = header.key
            if owners and key not in kept and self.store.header(key) == header and me not in ring.owners(key, r):
                self.store.delete([key])  # every owner holds it now: it was only ours to hand on
                handed += 1
        s = self.stats
        s.passes += 1
        s.repaired += repaired
        s.handed_off += handed
        s.under_replicated, s.pending = missing, pending
        s.divergent, s.hints = self._divergent, len(not_ours)
        s.last_pass_seconds = time.monotonic() - started
        if repaired or handed:
            log.info("repair: pushed %d copies to owners that lacked them, handed off %d keys (%.1f s)",
                     repaired, handed, s.last_pass_seconds)
        return s

    def _usable(self, peer: str) -> str | None:
        address = self.placement.address_of(peer)
        if address is None or not self.placement.peers.usable(address):
            return None
        return address

    def _sync_peer(self, peer: str, headers: list[Header], budget: list[int]) -> tuple[int, set[str], int]:
        address = self._usable(peer)
        if address is None:
            return 0, {h.key for h in headers}, 0
        try:
            theirs = self.placement.peers.client(address).digest(self.placement.node_id, BUCKETS,
                                                                  timeout=self.timeout)
        except MeshError as e:
            self._failed(address, e)
            return 0, {h.key for h in headers}, 0
        mine = digest(headers, lambda _key: True)
        differ = {b for b in range(BUCKETS) if (mine[0][b], mine[1][b]) != (theirs[0][b], theirs[1][b])}
        return self._push_missing(peer, [h for h in headers if bucket_of(h.key) in differ], budget)

    def _push_missing(self, peer: str, headers: list[Header], budget: list[int]) -> tuple[int, set[str], int]:
        """(copies the peer lacked, keys not confirmed at the peer, copies pushed) for our `headers` at `peer`."""
        if not headers:
            return 0, set(), 0
        all_keys = {h.key for h in headers}
        address = self._usable(peer)
        if address is None:
            return 0, all_keys, 0
        client = self.placement.peers.client(address)
        lacking: list[Header] = []
        tombstoned: list[Header] = []
        divergent = 0
        try:
            for i in range(0, len(headers), HAS_BATCH):
                batch = headers[i:i + HAS_BATCH]
                versions = client.versions([h.key for h in batch], [h.write_id for h in batch],
                                           timeout=self.timeout)
                for h, (held, deleted) in zip(batch, versions):
                    if deleted:
                        tombstoned.append(h)  # the peer deleted this very write: it goes here too
                    elif held == 0:
                        lacking.append(h)
                    elif held != h.write_id:
                        divergent += 1
        except MeshError as e:
            self._failed(address, e)
            return 0, all_keys, 0
        self._divergent += divergent
        for h in tombstoned:
            if self.store.delete_copy(h):
                self.stats.deletes_applied += 1
        unpushed = {h.key for h in lacking}
        for h in lacking:
            entry = self.store.peek(h.key)
            if entry is None or entry.header != h:
                continue  # gone or replaced since the catalog was read: the next pass sees what is there now
            if budget[0] < entry.size:
                break
            if self.placement.put_to(peer, entry):
                budget[0] -= entry.size
                unpushed.discard(h.key)
            elif not self.placement.peers.usable(address):
                break
        return len(lacking), unpushed, len(lacking) - len(unpushed)

    def _failed(self, address: str, e: MeshError) -> None:
        self.stats.errors += 1
        if isinstance(e, Unreachable):
            self.placement.peers.failed(address)
        log.debug("repair with %s failed: %s", address, e)

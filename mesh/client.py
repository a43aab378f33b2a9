"""The mesh as the provider sees it: get, has and put of byte values under deadlines.

Two ways to reach the mesh, one interface:
- `LocalClient` (embedded mode): the node runs in this process, so reads and writes call its cluster directly;
  a value held locally is one dictionary lookup away, no RPC.
- `RemoteClient` (sidecar mode): a `mesh serve` runs beside ComfyUI. The client learns the ring from it and
  reads straight from a key's owners (one hop instead of two), falling back to the sidecar's routed read.
Readers get a value into a Sink (`get_into`): a decoder fed chunk by chunk, as they arrive from another node or
out of the local store. Neither client raises on a miss or a dead mesh: a miss is None or False; errors surface
as MeshError for the caller to count and contain.
"""

from __future__ import annotations

import threading
import time
from dataclasses import replace
from collections.abc import Mapping
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol, TypeVar

from mesh.transport.auth import Secret, as_keyring
from mesh.transport.link import AUTO, LZ4, Links
from mesh.membership.driver import ring_weights
from mesh.node import Node
from mesh.transport.peer import MeshError, PeerClient, Unreachable
from mesh.transport.peers import PeerPool
from mesh.cluster.leases import COMPUTE, DONE, GRANTED, HELD, RELEASED, Answer
from mesh.cluster.ring import Ring
from mesh.pb import mesh_pb2 as pb
from mesh.storage.store import Entry, fresh_write_id
from mesh.transport.wire import Limits, Tee, iter_chunks, make_header, raw_parts

if TYPE_CHECKING:
    from mesh.transport.tls import TlsConfig

Bytes = bytes | bytearray | memoryview
T = TypeVar("T")
R = TypeVar("R")


class Sink(Tee, Protocol):
    """Where a reader's value goes chunk by chunk (mesh.codec.StreamDecoder): fed while it arrives when the
    reader fetches it, or from the stored chunks when the value is already here."""

    header: object
    received: int


class MeshClient(Protocol):
    def get_into(self, key: str, timeout: float, sink: Sink) -> bool: ...
    def has(self, keys: list[str], timeout: float) -> list[bool]: ...
    def put(self, key: str, data: Bytes, meta: Mapping[str, str], timeout: float,
            compute_seconds: float = 0.0) -> int: ...
    def stats(self) -> dict[str, float]: ...
    def report(self, reporter: str, counters: Mapping[str, float], timeout: float) -> None: ...
    def lease(self, key: str, holder: str, timeout: float, *, release: bool = False, done: bool = False,
              ttl: float = 0.0, expected: float = 0.0, uncached: bool = False) -> Answer: ...
    def close(self) -> None: ...


def lease_request(key: str, holder: str, release: bool, done: bool, ttl: float, expected: float,
                  uncached: bool = False) -> pb.LeaseRequest:
    """A compute-lease call (mesh/cluster/leases.py): acquire (or renew) unless `release`."""
    return pb.LeaseRequest(key=key, holder=holder, op=pb.LEASE_RELEASE if release else pb.LEASE_ACQUIRE,
                           ttl=ttl, done=done, expected_seconds=expected, uncached=uncached)


_STATES = {pb.LEASE_GRANTED: GRANTED, pb.LEASE_HELD: HELD, pb.LEASE_DONE: DONE, pb.LEASE_RELEASED: RELEASED,
           pb.LEASE_COMPUTE: COMPUTE}


class NodeStopped(Unreachable):
    """The embedded node was stopped (drained, or shut down): nothing will answer until ComfyUI restarts."""


class LocalClient:
    def __init__(self, node: Node) -> None:
        if node.cluster is None:
            raise ValueError("the node is not started")
        self.node = node
        self.cluster = node.cluster
        self.limits = node.config.limits

    def _live(self) -> None:
        if self.node.stopped.is_set() or self.node.server is None:
            raise NodeStopped(f"the embedded mesh node {self.node.node_id} has stopped")

    def get_into(self, key: str, timeout: float, sink: Sink) -> bool:
        """Feed the value's bytes to `sink`; False on a miss.

        From another node they go to `sink` as they arrive, so it decodes while the rest is on the wire. A value
        held here (or fetched for another caller at the same time) is fed from its stored chunks, without
        hashing them again: every entry in this process's store was verified when it got there (a put, a copy
        from a peer, a file read back from disk)."""
        self._live()
        entry = self.cluster.get(key, timeout, tee=sink)
        if entry is None:
            return False
        if sink.header is not entry.header or sink.received != entry.header.raw_size:
            sink.start(entry.header.raw_size, entry.header)
            for raw in raw_parts(entry.chunks):
                sink.feed(raw)
        return True

    def has(self, keys: list[str], timeout: float) -> list[bool]:
        self._live()
        return self.cluster.has(keys, timeout)

    def put(self, key: str, data: Bytes, meta: Mapping[str, str], timeout: float,
            compute_seconds: float = 0.0) -> int:
        """`compute_seconds`: what computing the value cost (0: unknown); nodes evict by it (eviction.py)."""
        self._live()
        header = make_header(key, data, self.limits.chunk_size, meta, compute_seconds)
        # Stored raw unless the operator asked for lz4 everywhere: each transfer to a slow link compresses on the way.
        chunks = tuple(iter_chunks(data, self.limits.chunk_size, self.node.config.compress == LZ4))
        stored = sum(len(c.data) for c in chunks)
        entry = Entry(replace(header, stored_size=stored, created_unix=time.time(), write_id=fresh_write_id(),
                              writers=(self.node.node_id,)), chunks)
        replicas, hinted = self.cluster.put(entry, timeout=timeout)
        return max(replicas, int(hinted))  # a hint is held: the provider counts the store as done

    def stats(self) -> dict[str, float]:
        out = self.node.store.stats()
        out.update(self.cluster.stats())
        return out

    def lease(self, key: str, holder: str, timeout: float, *, release: bool = False, done: bool = False,
              ttl: float = 0.0, expected: float = 0.0, uncached: bool = False) -> Answer:
        """A compute lease at the key's primary owner (this node's table, or asked of the owner)."""
        self._live()
        return self.cluster.lease(lease_request(key, holder, release, done, ttl, expected, uncached), timeout)

    def report(self, reporter: str, counters: Mapping[str, float], timeout: float) -> None:
        pass  # in-process: the node reads the provider's counters itself (MeshServicer.stats_sources)

    def close(self) -> None:
        pass


class RemoteClient:
    """Talks to a sidecar node; with `direct`, reads go straight to the owners from the ring it learns."""

    MEMBERS_TTL = 5.0

    def __init__(self, address: str, secret: Secret = None, limits: Limits | None = None,
                 direct: bool = True, tls: TlsConfig | None = None, compress: str = AUTO) -> None:
        self.address = address
        self.limits = limits or Limits()
        self.direct = direct
        keyring = as_keyring(secret)
        links = Links(compress)
        self.node = PeerClient(address, keyring, self.limits, tls=tls, links=links)
        self.peers = PeerPool(keyring, self.limits, tls=tls, links=links)
        self._lock = threading.Lock()
        self._ring = Ring({})
        self._addresses: dict[str, str] = {}
        self._replicas = 1
        self._learned = -1e9

    def _refresh(self, timeout: float) -> None:
        if time.monotonic() - self._learned < self.MEMBERS_TTL:
            return
        self._learned = time.monotonic()  # at most one refresh per TTL, even when it fails
        stats = self.node.stats(timeout=timeout)
        weights = ring_weights(stats.members)
        live = [m for m in stats.members if m.node_id in weights]
        with self._lock:
            self._ring = Ring(weights)
            self._addresses = {m.node_id: m.address for m in live}
            self._replicas = max(1, stats.replicas)
        for m in live:
            self.peers.heard(m.address, age=m.last_heard_age)

    def get(self, key: str, timeout: float) -> memoryview | None:
        got = self._read(key, timeout, lambda client, t, local_only: client.get(key, t, local_only))
        return None if got is None else got.data

    def get_into(self, key: str, timeout: float, sink: Sink) -> bool:
        """Feed the value's bytes to `sink` as they arrive from an owner (or the sidecar); False on a miss."""
        return self._read(key, timeout, lambda client, t, local_only: client.get_into(key, sink, t, local_only)) \
            is not None

    def _read(self, key: str, timeout: float, fetch: Callable[[PeerClient, float, bool], R | None]) -> R | None:
        """Straight from the key's owners when `direct`, else (or when they do not have it) routed by the sidecar."""
        deadline = time.monotonic() + timeout
        if self.direct:
            try:
                self._refresh(timeout)
            except MeshError:
                pass
            for node_id in self._ring.owners(key, self._replicas):
                address = self._addresses.get(node_id)
                remaining = deadline - time.monotonic()
                if address is None or remaining <= 0 or not self.peers.usable(address):
                    continue
                try:
                    got = fetch(self.peers.client(address), remaining, True)
                except Unreachable:
                    self.peers.failed(address)
                    continue
                if got is not None:
                    return got
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        try:
            return fetch(self.node, remaining, False)  # routed: previous owners, repair, near cache
        except Unreachable:
            if not self.direct or not self._others():
                raise
            return None  # the owners, asked directly above, did not have it: a miss while the sidecar is down

    def _others(self) -> list[str]:
        """Addresses of the other live members learned from the sidecar: where to go while it is down."""
        with self._lock:
            return [a for a in self._addresses.values() if a != self.address and self.peers.usable(a)]

    def _routed(self, call: Callable[[PeerClient, float], T], timeout: float) -> T:
        """`call` on the sidecar; while it is unreachable, on the other members (any member routes a call to
        the key's owners), each under what is left of the one deadline."""
        deadline = time.monotonic() + timeout
        try:
            return call(self.node, timeout)
        except Unreachable:
            for address in self._others():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    return call(self.peers.client(address), remaining)
                except Unreachable:
                    self.peers.failed(address)
            raise

    def has(self, keys: list[str], timeout: float) -> list[bool]:
        return self._routed(lambda client, t: client.has(keys, timeout=t), timeout)

    def put(self, key: str, data: Bytes, meta: Mapping[str, str], timeout: float,
            compute_seconds: float = 0.0) -> int:
        return self._routed(lambda client, t: client.put(key, data, meta, timeout=t,
                                                         compute_seconds=compute_seconds).replicas, timeout)

    def lease(self, key: str, holder: str, timeout: float, *, release: bool = False, done: bool = False,
              ttl: float = 0.0, expected: float = 0.0, uncached: bool = False) -> Answer:
        """A compute lease, routed by the sidecar (or, while it is down, another member) to the key's owner."""
        request = lease_request(key, holder, release, done, ttl, expected, uncached)
        reply = self._routed(lambda client, t: client.lease(request, timeout=t), timeout)
        return Answer(_STATES.get(reply.state, HELD), reply.holder, reply.held_seconds, reply.ttl_left,
                      reply.expected_seconds, reply.owner)

    def stats(self) -> dict[str, float]:
        return dict(self.node.stats().counters)

    def report(self, reporter: str, counters: Mapping[str, float], timeout: float) -> None:
        """Hand this process's counters to the sidecar, which shows them in its `mesh stats`."""
        self.node.stats(timeout=timeout, reporter=reporter, report=counters)

    def close(self) -> None:
        self.node.close()
        self.peers.close()

"""The node's connections to its peers, and the one policy that says whether a peer is worth asking.

A dead or slow owner may cost a reader one attempt budget, never more: after a failure the peer is skipped
until membership hears from it again (a successful heartbeat after the failure closes the breaker). Reads,
writes, Has, deletes and the provider's sidecar client all ask this one place (`usable`, `failed`, `heard`),
and all report failures the same way: a peer that did not answer (Unreachable) is failed; a peer that answered
"no" (busy, refused) is alive and is not.

The attempt budget is how long one read may wait for a peer's first byte before the next owner is tried:
a few times what that peer usually takes, within [MIN_BUDGET, MAX_BUDGET]. A frozen host (SIGSTOP: its port
still accepts, nothing answers) then costs a reader that budget instead of the whole lookup deadline.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from mesh.transport.auth import Secret, as_keyring
from mesh.transport.link import Links
from mesh.transport.peer import PeerClient
from mesh.transport.base import PeerTransport
from mesh.transport.wire import Limits

if TYPE_CHECKING:
    from mesh.transport.tls import TlsConfig

MIN_BUDGET = 0.25     # seconds: a LAN round trip plus a busy host's scheduling hiccup
MAX_BUDGET = 2.0
BUDGET_FACTOR = 8.0   # times the peer's smoothed first-byte latency
_ALPHA = 0.2          # weight of a new sample in the smoothed latency


class PeerPool:
    def __init__(self, secret: Secret, limits: Limits, tls: TlsConfig | None = None,
                 links: Links | None = None, connect: Callable[[str], PeerTransport] | None = None) -> None:
        """`connect(address)` makes the transport to one peer (default: a gRPC PeerClient); made once per address."""
        self._secret = as_keyring(secret)  # shared by every client: a reloaded secret file reaches them all
        self._limits = limits
        self._tls = tls
        self.links = links if links is not None else Links()  # measured per address, shared by every client
        self._lock = threading.Lock()
        self._connect = connect or self._grpc_client
        self._clients: dict[str, PeerTransport] = {}
        self._failed_at: dict[str, float] = {}
        self._heard_at: dict[str, float] = {}
        self._latency: dict[str, float] = {}

    def _grpc_client(self, address: str) -> PeerTransport:
        return PeerClient(address, self._secret, self._limits, tls=self._tls, links=self.links)

    def client(self, address: str) -> PeerTransport:
        with self._lock:
            c = self._clients.get(address)
            if c is None:
                c = self._clients[address] = self._connect(address)
            return c

    def failed(self, address: str) -> None:
        with self._lock:
            self._failed_at[address] = time.monotonic()

    def heard(self, address: str, age: float = 0.0) -> None:
        """We (or a node we trust, `age` seconds ago) heard from the peer: its breaker may close."""
        with self._lock:
            self._heard_at[address] = max(self._heard_at.get(address, 0.0), time.monotonic() - age)

    def usable(self, address: str) -> bool:
        """Closed breaker: never failed, or heard from since the last failure."""
        with self._lock:
            failed = self._failed_at.get(address)
            return failed is None or self._heard_at.get(address, 0.0) > failed

    def observe(self, address: str, seconds: float) -> None:
        """A peer answered a read's first byte after `seconds`."""
        with self._lock:
            old = self._latency.get(address)
            self._latency[address] = seconds if old is None else old + _ALPHA * (seconds - old)

    def attempt_budget(self, address: str) -> float:
        with self._lock:
            latency = self._latency.get(address, 0.0)
        return min(MAX_BUDGET, max(MIN_BUDGET, BUDGET_FACTOR * latency))

    def forget(self, address: str) -> None:
        with self._lock:
            c = self._clients.pop(address, None)
            self._failed_at.pop(address, None)
            self._heard_at.pop(address, None)
            self._latency.pop(address, None)
        if c is not None:
            c.close()

    def close(self) -> None:
        with self._lock:
            clients = list(self._clients.values())
            self._clients.clear()
        for c in clients:
            c.close()

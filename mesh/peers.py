"""The node's connections to its peers, with a circuit breaker per peer.

A dead or slow owner may cost a reader one deadline, never more: after a failure the peer is skipped until
membership hears from it again (a successful heartbeat after the failure closes the breaker).
"""

from __future__ import annotations

import threading
import time

from typing import TYPE_CHECKING

from mesh.auth import Secret, as_keyring
from mesh.peer import PeerClient
from mesh.wire import Limits

if TYPE_CHECKING:
    from mesh.tls import TlsConfig


class PeerPool:
    def __init__(self, secret: Secret, limits: Limits, tls: TlsConfig | None = None) -> None:
        self._secret = as_keyring(secret)  # shared by every client: a reloaded secret file reaches them all
        self._limits = limits
        self._tls = tls
        self._lock = threading.Lock()
        self._clients: dict[str, PeerClient] = {}
        self._failed_at: dict[str, float] = {}
        self._heard_at: dict[str, float] = {}

    def client(self, address: str) -> PeerClient:
        with self._lock:
            c = self._clients.get(address)
            if c is None:
                c = self._clients[address] = PeerClient(address, self._secret, self._limits, tls=self._tls)
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

    def forget(self, address: str) -> None:
        with self._lock:
            c = self._clients.pop(address, None)
            self._failed_at.pop(address, None)
            self._heard_at.pop(address, None)
        if c is not None:
            c.close()

    def close(self) -> None:
        with self._lock:
            clients = list(self._clients.values())
            self._clients.clear()
        for c in clients:
            c.close()

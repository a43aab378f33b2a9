"""Places a node hands out to concurrent calls, bounded as a whole, per session and per source host.

A gate whose only bound is its size lets one caller take all of it: 120 silent calls with valid proofs from one
member once froze a node (every thread held), 40 idle Put streams from one member refused every real put for
10-30 s, and 16 silent Hello streams from one outsider refused every new handshake. A `Gate` therefore also
bounds what one key may hold: its session (the session of the call's proof, so one caller's calls) and its
source host (so one machine's sessions together, since a member can mint sessions at will). What the others may
still take is the room one key can never reach: at least `size - host_share` places for other hosts, and
`size - session_share` for the other sessions of the same host.

Pure bookkeeping (no gRPC): the server maps a call to its keys (mesh/server.py).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

SESSION_SHARE = 0.5  # of a gate's places, what one session may hold at once
HOST_SHARE = 0.75    # of a gate's places, what one source host may hold at once (all its sessions together)


def peer_host(peer: str) -> str:
    """The host part of a gRPC peer string: "ipv4:10.0.0.5:5123" -> "ipv4:10.0.0.5", "ipv6:[::1]:80" ->
    "ipv6:[::1]". Ports are the caller's to choose, so only the host names a source."""
    host, sep, port = peer.rpartition(":")
    return host if sep and port.isdigit() else peer


class Gate:
    """`size` places; one session at most `session_share` of them, one host at most `host_share`.

    `enter` never waits unless told to: a handler that waited for a place would hold its thread meanwhile.
    """

    def __init__(self, name: str, size: int, session_share: float = SESSION_SHARE,
                 host_share: float = HOST_SHARE) -> None:
        if size < 1:
            raise ValueError(f"gate {name} needs at least one place")
        self.name = name
        self.size = size
        self.session_cap = max(1, int(size * session_share))
        self.host_cap = max(1, int(size * host_share))
        self._cond = threading.Condition()
        self._held = 0
        self._sessions: dict[str, int] = {}
        self._hosts: dict[str, int] = {}
        self.refusals = 0

    @property
    def held(self) -> int:
        return self._held

    def _fits(self, session: str, host: str) -> str:
        """"" if a call with these keys may take a place now, else why not."""
        if self._held >= self.size:
            return f"{self.size} {self.name} in progress"
        if session and self._sessions.get(session, 0) >= self.session_cap:
            return f"{self.session_cap} {self.name} in progress in this session"
        if host and self._hosts.get(host, 0) >= self.host_cap:
            return f"{self.host_cap} {self.name} in progress from this host"
        return ""

    def try_enter(self, session: str = "", host: str = "", timeout: float = 0.0) -> str:
        """Take a place ("" returned) or say why not, after waiting at most `timeout` seconds for one."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                why = self._fits(session, host)
                if not why:
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    self.refusals += 1
                    return why
                self._cond.wait(left)
            self._held += 1
            if session:
                self._sessions[session] = self._sessions.get(session, 0) + 1
            if host:
                self._hosts[host] = self._hosts.get(host, 0) + 1
        return ""

    def leave(self, session: str = "", host: str = "") -> None:
        with self._cond:
            self._held -= 1
            for table, key in ((self._sessions, session), (self._hosts, host)):
                if key:
                    left = table[key] - 1
                    if left:
                        table[key] = left
                    else:
                        del table[key]  # no key outlives its calls: the tables stay as small as what is in progress
            self._cond.notify_all()

    @contextmanager
    def place(self, session: str = "", host: str = "") -> Iterator[bool]:
        """A place for the block if one is free now (yields True), else yields False and takes nothing."""
        if self.try_enter(session, host):
            yield False
            return
        try:
            yield True
        finally:
            self.leave(session, host)

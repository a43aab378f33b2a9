"""Whether a transfer to or from a peer should be compressed: measured per peer, because lz4 only pays on links
slower than itself.

lz4 compresses at about 0.3-0.8 GB/s per core and decompresses several times faster. Over loopback or a
10 Gbit/s link, raw bytes arrive sooner than compressed ones could be made; over 1 Gbit/s (125 MB/s) a value
that shrinks to 60% arrives in 60% of the time. So values are stored as they were written (raw, unless an
operator asks otherwise) and compressed per transfer, by the sender, only where the link to that peer is slow:
- a node copying an entry to a peer compresses when its link to that peer is slow;
- a reader asks its source to compress when its link from that source is slow (GetRequest.compress).

"Slow" is measured, not configured: the throughput of each raw transfer of at least MEASURE_MIN bytes, as an
exponentially weighted average per address. A peer never measured gets raw (the first big transfer measures
it); a peer on loopback always gets raw; a compressed link is sent raw now and then to notice it got faster.
`--compress off|lz4` (MESH_COMPRESS) overrides the measurement in either direction.
"""

from __future__ import annotations

import ipaddress
import threading
from dataclasses import dataclass

from mesh.address import split_hostport

AUTO, OFF, LZ4 = "auto", "off", "lz4"
MODES = (AUTO, OFF, LZ4)
COMPRESS_BELOW = 300e6   # bytes/s: links measured slower than this get compressed transfers (lz4's own pace)
MEASURE_MIN = 4 * 1024**2  # smaller transfers measure latency more than throughput
REMEASURE_EVERY = 16     # every so many transfers to a compressed link go raw, to measure it again
_WEIGHT = 0.3            # of a new measurement in the average
MAX_LINKS = 4096


@dataclass
class _Link:
    rate: float = 0.0       # bytes/s of raw transfers, averaged; 0 until measured
    transfers: int = 0      # decisions made for this link, for the periodic raw re-measurement
    owed: bool = False      # a re-measurement is due: raw until a transfer big enough to measure has happened


def is_local(address: str) -> bool:
    """A loopback address: the peer is on this host, where raw always wins."""
    try:
        host, _ = split_hostport(address)
    except ValueError:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Links:
    """Measured throughput per peer address, and whether to compress to or from each."""

    def __init__(self, mode: str = AUTO) -> None:
        if mode not in MODES:
            raise ValueError(f"compression must be one of {', '.join(MODES)}, not {mode!r}")
        self.mode = mode
        self._lock = threading.Lock()
        self._links: dict[str, _Link] = {}
        self._no_planes4: set[str] = set()  # peers that refused 4-byte-plane chunks: older versions

    def compress(self, address: str) -> bool:
        """Whether the next transfer to or from `address` should be compressed (counts as a decision)."""
        if self.mode != AUTO:
            return self.mode == LZ4
        if is_local(address):
            return False
        with self._lock:
            link = self._links.get(address)
            if link is None or link.rate == 0.0 or link.rate >= COMPRESS_BELOW or link.owed:
                return False
            link.transfers += 1
            # Raw now and then, and raw until that measurement happens: the raw turn may fall on a transfer too
            # small to measure, and a fixed pattern of big and small ones would otherwise never re-measure.
            link.owed = link.transfers % REMEASURE_EVERY == 0
            return not link.owed

    def observe(self, address: str, raw_bytes: int, seconds: float, compressed: bool) -> None:
        """A finished transfer: only raw ones of at least MEASURE_MIN bytes measure the link."""
        if compressed or raw_bytes < MEASURE_MIN or seconds <= 0:
            return
        rate = raw_bytes / seconds
        with self._lock:
            link = self._links.get(address)
            if link is None:
                if len(self._links) >= MAX_LINKS:
                    self._links.pop(next(iter(self._links)))
                link = self._links[address] = _Link()
            link.rate = rate if link.rate == 0.0 else (1 - _WEIGHT) * link.rate + _WEIGHT * rate
            link.owed = False

    def rate(self, address: str) -> float:
        """Measured bytes/s to or from `address`; 0 if never measured."""
        with self._lock:
            link = self._links.get(address)
            return 0.0 if link is None else link.rate

    def planes4(self, address: str) -> bool:
        """Whether `address` takes CHUNK_LZ4_PLANES4 chunks: yes, until it refused one (a node from before them)."""
        with self._lock:
            return address not in self._no_planes4

    def refused_planes4(self, address: str) -> None:
        with self._lock:
            if len(self._no_planes4) >= MAX_LINKS:
                self._no_planes4.clear()  # forgetting costs one refused transfer per old peer, then it is relearnt
            self._no_planes4.add(address)

    def snapshot(self) -> dict[str, float]:
        with self._lock:
            return {a: link.rate for a, link in self._links.items() if link.rate}

"""Compute leases: which instance computes a key right now, kept by the key's primary owner.

In-flight dedupe (provider/dedupe.py) asks the owner for a lease on a key just before its node would run. The
first asker is granted it and computes; the others are told who holds it and wait for the value instead. The
lease lives where the value will be written (the primary owner), so the same table answers "who computes it"
and "is it there yet".

Why it cannot stall anyone:
- a lease lapses `ttl` seconds after it was granted or last renewed. Its holder renews it while it computes and
  releases it when the value is stored or the node failed; a holder that crashed, froze or lost its network
  stops renewing, and the next asker after the lapse is granted it (counted as expired);
- the table answers at once, never waits: a waiter asks again (provider/dedupe.py says how often and for how
  long), so no server thread is held by a waiting instance;
- losing the table (the owner restarts, the ring changes and another node becomes primary) loses leases: the
  next asker is granted a fresh one and computes too. A duplicate computation, never a stall or a wrong value:
  a lease decides only who computes, never what a value is.

A holder whose value will not be stored at all (too cheap to keep, not cacheable) releases with `uncached`: the
key is then answered COMPUTE for DONE_TTL seconds, and every waiter computes it at once, in parallel. Without
it the next waiter would be granted the lease, compute, not store either, and the next would wait for it: the
instances would take turns at a node that none of them can share.

A holder that stored the value releases with `done`: the key is then answered DONE for DONE_TTL seconds, even
if the value is not (yet) in this node's store (a put returns once one owner holds it; the copy to this owner
may still be on its way), so waiters read it from the mesh rather than compute it again.

Bounded: at most MAX_LEASES leases and MAX_DONE done marks; the oldest go first (a lost lease costs a
duplicate computation, nothing else).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

MAX_LEASES = 65536
MAX_DONE = 65536
MAX_TTL = 30.0       # seconds; a caller asking for more gets this
MIN_TTL = 0.5
DONE_TTL = 30.0      # seconds a released-as-stored key is answered DONE without the value here
MAX_HOLDER = 200     # bytes of a holder name

GRANTED, HELD, DONE, RELEASED, COMPUTE = "granted", "held", "done", "released", "compute"


@dataclass
class Lease:
    holder: str
    granted_at: float
    expires_at: float
    expected_seconds: float = 0.0


@dataclass(frozen=True)
class Answer:
    state: str
    holder: str = ""
    held_seconds: float = 0.0
    ttl_left: float = 0.0
    expected_seconds: float = 0.0
    owner: str = ""  # the node whose table answered


class LeaseTable:
    """The leases this node keeps as primary owner. Thread-safe; every call is O(1) amortised."""

    def __init__(self, present: Callable[[str], bool], clock: Callable[[], float] = time.monotonic) -> None:
        """`present(key)`: whether this node holds the value (then there is nothing to compute)."""
        self._present = present
        self._clock = clock
        self._lock = threading.Lock()
        self._leases: OrderedDict[str, Lease] = OrderedDict()   # oldest grant first
        self._done: OrderedDict[str, float] = OrderedDict()     # key -> when it was released as stored
        self._uncached: OrderedDict[str, float] = OrderedDict()  # key -> when its holder said it is not stored
        self.counters: dict[str, int] = {"lease_granted": 0, "lease_renewed": 0, "lease_released": 0,
                                         "lease_expired": 0, "lease_done": 0, "lease_held": 0,
                                         "lease_dropped": 0, "lease_uncached": 0}

    def acquire(self, key: str, holder: str, ttl: float, expected_seconds: float = 0.0) -> Answer:
        """Grant (or renew, for its holder) the lease on `key`; HELD naming another live holder; DONE when
        the value is here or was released as stored."""
        ttl = min(MAX_TTL, max(MIN_TTL, ttl))
        now = self._clock()
        with self._lock:
            lease = self._leases.get(key)
            if self._is_done(key, now):
                if lease is not None:
                    del self._leases[key]
                self.counters["lease_done"] += 1
                return Answer(DONE)
            if self._is_uncached(key, now):
                self.counters["lease_uncached"] += 1
                return Answer(COMPUTE)
            if lease is not None and lease.expires_at <= now:
                del self._leases[key]
                self.counters["lease_expired"] += 1
                lease = None
            if lease is not None and lease.holder != holder:
                self.counters["lease_held"] += 1
                return Answer(HELD, lease.holder, now - lease.granted_at, lease.expires_at - now,
                              lease.expected_seconds)
            if lease is not None:  # its holder renews it
                lease.expires_at = now + ttl
                lease.expected_seconds = expected_seconds or lease.expected_seconds
                self.counters["lease_renewed"] += 1
                return Answer(GRANTED, holder, now - lease.granted_at, ttl, lease.expected_seconds)
            self._leases[key] = Lease(holder, now, now + ttl, expected_seconds)
            self.counters["lease_granted"] += 1
            self._trim(now)
            return Answer(GRANTED, holder, 0.0, ttl, expected_seconds)

    def release(self, key: str, holder: str, done: bool = False, uncached: bool = False) -> Answer:
        """Give the lease back (only its holder can); `done`: the value was stored, answer DONE for a while;
        `uncached` (from its holder only): the value will not be stored, answer COMPUTE for a while."""
        now = self._clock()
        with self._lock:
            lease = self._leases.get(key)
            if lease is not None and lease.holder == holder:
                del self._leases[key]
                self.counters["lease_released"] += 1
                if uncached and not done:
                    self._uncached[key] = now
                    self._uncached.move_to_end(key)
                    while len(self._uncached) > MAX_DONE:
                        self._uncached.popitem(last=False)
            if done:
                self._done[key] = now
                self._done.move_to_end(key)
                while len(self._done) > MAX_DONE:
                    self._done.popitem(last=False)
        return Answer(RELEASED)

    def _is_uncached(self, key: str, now: float) -> bool:
        at = self._uncached.get(key)
        if at is not None and now - at > DONE_TTL:
            del self._uncached[key]
            return False
        return at is not None

    def _is_done(self, key: str, now: float) -> bool:
        at = self._done.get(key)
        if at is not None and now - at > DONE_TTL:
            del self._done[key]
            at = None
        if at is not None:
            return True
        try:
            return bool(self._present(key))
        except Exception:  # a store that cannot answer: not done, which costs at most a computation
            return False

    def _trim(self, now: float) -> None:
        """Drop lapsed leases from the old end, then the oldest while over MAX_LEASES."""
        while self._leases:
            key, lease = next(iter(self._leases.items()))
            if lease.expires_at > now and len(self._leases) <= MAX_LEASES:
                break
            del self._leases[key]
            self.counters["lease_expired" if lease.expires_at <= now else "lease_dropped"] += 1

    def holding(self) -> int:
        with self._lock:
            return len(self._leases)

    def stats(self) -> dict[str, float]:
        with self._lock:
            out = {k: float(v) for k, v in self.counters.items()}
            out["leases_live"] = float(len(self._leases))
        return out

"""ComputeCosts: how long a node takes to compute on this instance, learned from what the provider sees.

The provider sees a node's pre-execution lookup miss (ComfyUI runs the node next) and, later, its store (the
value exists). The time between the two is what computing that key cost. That figure is used twice:
- in-flight dedupe (provider/dedupe.py) bounds a wait for another instance's computation by what computing
  would take here: `measured(key)`, the key's own last figure where seen, else `ceiling(class_type)`, the
  longest of the class type's recent figures (one class runs for very different times: a sampler with 4 steps
  or 40, a blur of no delay or of 3 s; its mean would make waiters give up on the slow ones), a guess past
  which a waiter still waits for a live holder (see dedupe.py, "Bounded");
- cost-aware eviction stores `finish()`'s seconds with the value, so the node can keep what is dear to recompute.

The figure is an upper bound on the compute time: in ComfyUI the store may be handed over only when the event
loop next yields (at the latest as the prompt ends), so the prompt's later nodes can be counted in. A wait bound
that is too long by that much is still bounded (MESH_DEDUPE_MAX_WAIT caps it); one that is too short would make
waiters give up on a computation that is about to finish. Per class type the figure is an exponentially weighted
mean, so one odd run (a cold model load) does not set it for good.

Bounded: at most MAX_KEYS keys, MAX_CLASSES class types and MAX_PENDING started computations are remembered;
the oldest go first. Thread-safe (lookups run on ComfyUI's loop, stores may be finished on provider threads).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass

MAX_KEYS = 4096
MAX_CLASSES = 512
MAX_PENDING = 1024
WEIGHT = 0.3  # of a new figure in a class type's mean
RECENT = 16   # figures per class type kept for its ceiling


@dataclass
class _Started:
    class_type: str
    at: float


class ComputeCosts:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._pending: OrderedDict[str, _Started] = OrderedDict()
        self._by_key: OrderedDict[str, float] = OrderedDict()
        self._by_class: OrderedDict[str, float] = OrderedDict()
        self._recent: dict[str, deque[float]] = {}  # class type -> its last RECENT figures (same classes as above)

    def start(self, key: str, class_type: str) -> None:
        """The node of `key` runs next here (its pre-execution lookup missed)."""
        with self._lock:
            self._pending[key] = _Started(str(class_type), self._clock())
            self._pending.move_to_end(key)
            while len(self._pending) > MAX_PENDING:
                self._pending.popitem(last=False)

    def cancel(self, key: str) -> None:
        """The computation of `key` did not finish (failed, interrupted, served by another instance after all)."""
        with self._lock:
            self._pending.pop(key, None)

    def finish(self, key: str) -> float | None:
        """The value of `key` exists: learn and return the seconds since start(key); None if never started."""
        with self._lock:
            started = self._pending.pop(key, None)
            if started is None:
                return None
            seconds = max(0.0, self._clock() - started.at)
            self._by_key[key] = seconds
            self._by_key.move_to_end(key)
            while len(self._by_key) > MAX_KEYS:
                self._by_key.popitem(last=False)
            mean = self._by_class.get(started.class_type)
            self._by_class[started.class_type] = seconds if mean is None else mean + WEIGHT * (seconds - mean)
            self._by_class.move_to_end(started.class_type)
            self._recent.setdefault(started.class_type, deque(maxlen=RECENT)).append(seconds)
            while len(self._by_class) > MAX_CLASSES:
                gone, _ = self._by_class.popitem(last=False)
                self._recent.pop(gone, None)
            return seconds

    def expected(self, class_type: str, key: str | None = None) -> float | None:
        """Seconds computing `key` (else a node of `class_type`) took here; None when never seen."""
        with self._lock:
            if key is not None and key in self._by_key:
                return self._by_key[key]
            return self._by_class.get(str(class_type))

    def measured(self, key: str) -> float | None:
        """Seconds computing `key` itself took here; None when this instance has not computed it."""
        with self._lock:
            return self._by_key.get(key)

    def ceiling(self, class_type: str, key: str | None = None) -> float | None:
        """Seconds computing `key` took here, else the longest recent figure of `class_type`; None if never seen."""
        with self._lock:
            if key is not None and key in self._by_key:
                return self._by_key[key]
            recent = self._recent.get(str(class_type))
            return max(recent) if recent else None

    def by_class(self) -> dict[str, float]:
        """class type -> its mean compute seconds (for metrics and the log)."""
        with self._lock:
            return dict(self._by_class)

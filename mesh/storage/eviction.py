"""Which value a full store drops: the one whose bytes save the fleet the fewest compute seconds (or plain LRU).

A ComfyUI cache holds values whose worth differs by four orders of magnitude at the same size: a 5 ms blur and
a 40 s sampler output are both a 4 MiB image tensor. LRU keeps whichever was used last, so a burst of cheap
blurs pushes out the sampler results that the cache exists for. What a byte of the budget is worth is the
compute seconds it saves per unit of time: (how often the value is asked for) x (what recomputing it costs) /
(the bytes it takes). The writer measures the cost and sends it with the value (BlobHeader.compute_seconds).

Why GreedyDual-Size-Frequency (Cherkasova 1998; Jin & Bestavros' GD*) and not another policy:

- Its priority is that very quantity: H = L + frequency x cost / size, and the victim is the lowest H.
- Aging is one number, L, the priority of the last victim, added to every priority set on insertion or hit.
  A value that stops being asked for keeps its old H while L climbs past it with every eviction, so an
  expensive value that went stale is dropped eventually, after the cheaper ones that were evicted before it.
  No clock, no periodic decay pass, no tuning constant: O(log n) per operation with a heap.
- GreedyDual-Size (no frequency) keeps a one-off expensive value as long as it keeps a value asked for 100
  times; LFU with dynamic aging ignores size; LRU and TinyLFU-style admission ignore cost; learned policies
  (LRB) need training data a fresh fleet does not have. GDSF needs nothing but the cost the writer measured.
- Cost per byte, not per value: two 0.6 s values of 2 MiB save as much as one 1.2 s value of 4 MiB and take
  the same room.

Values without a cost (written by a node or provider from before the field, or by `mesh put`) count as the
mean cost of the values this store has seen with one (DEFAULT_SECONDS until it has seen any): neither pinned
nor first to go. Frequency counts hits in this store since the value arrived (a restarted node starts every
value from disk at one). `lru` (`--eviction lru`) is kept for comparison (scripts/bench_fleet.py) and for
fleets whose writers measure no cost.

Not thread-safe: the store calls it under its own lock.
"""

from __future__ import annotations

import heapq
import itertools
from collections import OrderedDict
from dataclasses import dataclass
from typing import Protocol

POLICIES = ("cost", "lru")
DEFAULT_POLICY = "cost"
DEFAULT_SECONDS = 1.0  # the cost of a value without one, until the store has seen values that carry one
_COMPACT_SLACK = 64    # stale heap items tolerated beyond twice the live ones before the heap is rebuilt


class EvictionPolicy(Protocol):
    def add(self, key: str, size: int, cost: float) -> None: ...
    def touch(self, key: str) -> None: ...
    def remove(self, key: str) -> None: ...
    def victim(self) -> str | None: ...
    def __len__(self) -> int: ...
    def __contains__(self, key: object) -> bool: ...


class LruPolicy:
    """Least recently used first: what the store did before costs were measured."""

    def __init__(self) -> None:
        self._order: OrderedDict[str, None] = OrderedDict()

    def add(self, key: str, size: int, cost: float) -> None:
        self._order[key] = None
        self._order.move_to_end(key)

    def touch(self, key: str) -> None:
        if key in self._order:
            self._order.move_to_end(key)

    def remove(self, key: str) -> None:
        self._order.pop(key, None)

    def victim(self) -> str | None:
        """Remove and return the key to evict next (None when empty)."""
        if not self._order:
            return None
        return self._order.popitem(last=False)[0]

    def __len__(self) -> int:
        return len(self._order)

    def __contains__(self, key: object) -> bool:
        return key in self._order


@dataclass(slots=True)
class _Item:
    size: int
    cost: float        # seconds, the default for a value without one
    frequency: int
    priority: float


class CostPolicy:
    """GreedyDual-Size-Frequency: evict the lowest L + frequency x cost / size (see the module docstring)."""

    def __init__(self) -> None:
        self.inflation = 0.0  # L: the priority of the last victim
        self._items: dict[str, _Item] = {}
        self._heap: list[tuple[float, int, str]] = []  # (priority, tie-break, key); stale items are skipped
        self._seq = itertools.count()
        self._known_seconds = 0.0
        self._known = 0

    def default_cost(self) -> float:
        return self._known_seconds / self._known if self._known else DEFAULT_SECONDS

    def _push(self, key: str, item: _Item) -> None:
        item.priority = self.inflation + item.frequency * item.cost / max(1, item.size)
        heapq.heappush(self._heap, (item.priority, next(self._seq), key))
        if len(self._heap) > 2 * len(self._items) + _COMPACT_SLACK:
            self._heap = [(i.priority, next(self._seq), k) for k, i in self._items.items()]
            heapq.heapify(self._heap)

    def add(self, key: str, size: int, cost: float) -> None:
        if cost > 0:
            self._known_seconds += cost
            self._known += 1
        else:
            cost = self.default_cost()
        old = self._items.get(key)
        item = _Item(size, cost, old.frequency + 1 if old else 1, 0.0)
        self._items[key] = item
        self._push(key, item)

    def touch(self, key: str) -> None:
        item = self._items.get(key)
        if item is not None:
            item.frequency += 1
            self._push(key, item)

    def remove(self, key: str) -> None:
        self._items.pop(key, None)  # its heap items go stale

    def victim(self) -> str | None:
        """Remove and return the key to evict next (None when empty); L rises to its priority."""
        while self._heap:
            priority, _, key = heapq.heappop(self._heap)
            item = self._items.get(key)
            if item is None or item.priority != priority:
                continue  # removed, or re-prioritised since this heap item was pushed
            del self._items[key]
            self.inflation = max(self.inflation, priority)
            return key
        return None

    def priority(self, key: str) -> float | None:
        item = self._items.get(key)
        return None if item is None else item.priority

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: object) -> bool:
        return key in self._items


def make_policy(name: str) -> EvictionPolicy:
    if name == "cost":
        return CostPolicy()
    if name == "lru":
        return LruPolicy()
    raise ValueError(f"eviction must be one of {', '.join(POLICIES)}, not {name!r}")

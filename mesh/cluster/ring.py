"""Consistent hashing with weighted virtual nodes: which members own a key.

Why a ring: a key's owners depend only on the key and the member set, so every node and client computes the
same owners without asking anyone, and adding or removing one of N members moves only about 1/N of the keys
(a plain `hash % N` would move almost all of them).

Why virtual nodes: one point per member leaves arcs whose sizes differ by a factor of ten or more. With v points
per member, a member's share is the sum of v arcs, so its spread around the mean shrinks like 1/sqrt(v) (about 8%
at v=160), and a weight becomes simply "more points".

Why xxh3: it is among the fastest 64-bit hashes for short strings (keys like "ns/<sha256>", node ids like
"node-7#42") and spreads such near-identical inputs uniformly, which is all a ring needs; it is not meant to resist
an adversary choosing keys.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Mapping
from types import MappingProxyType

from xxhash import xxh3_64_intdigest

SPACE = 1 << 64  # positions and key hashes are unsigned 64-bit integers


def position(text: str) -> int:
    """Where a key (or a virtual node's label) lands on the ring."""
    return xxh3_64_intdigest(text.encode())


class Ring:
    """An immutable ring: a membership change builds a new one, so readers never see a half-updated ring
    and need no lock to call `owners`.

    Member i's virtual nodes are the labels "id#0" .. "id#(c-1)" with c = round(vnodes * weight / mean weight),
    at least 1. Because the labels are a prefix, a member whose count changes keeps its other points. The
    count depends on the mean weight, though: with unequal weights, a join or leave that shifts the mean also adds
    or drops a few points of every member and so moves a few keys between members that stayed.
    """

    __slots__ = ("_weights", "_members", "_vnodes", "_points", "_owners")

    def __init__(self, members: Mapping[str, float], vnodes: int = 160) -> None:
        if vnodes < 1:
            raise ValueError(f"vnodes must be at least 1, not {vnodes}")
        for node_id, weight in members.items():
            if not (weight > 0 and math.isfinite(weight)):
                raise ValueError(f"weight of {node_id!r} must be positive and finite, not {weight}")
        self._weights: Mapping[str, float] = MappingProxyType(dict(sorted(members.items())))
        self._members = frozenset(self._weights)
        self._vnodes = vnodes
        mean = sum(self._weights.values()) / len(self._weights) if self._weights else 1.0
        points = sorted(
            (position(f"{node_id}#{i}"), node_id)
            for node_id, weight in self._weights.items()
            for i in range(max(1, round(vnodes * weight / mean)))
        )  # ties (vanishingly rare) break by node id, so insertion order never matters
        self._points: list[int] = [p for p, _ in points]
        self._owners: list[str] = [o for _, o in points]

    @property
    def members(self) -> frozenset[str]:
        return self._members

    @property
    def weights(self) -> Mapping[str, float]:
        """Read-only, so the ring cannot drift from the weights it was built with."""
        return self._weights

    @property
    def vnodes(self) -> int:
        return self._vnodes

    def __len__(self) -> int:
        return len(self._members)

    def __contains__(self, node_id: object) -> bool:
        return node_id in self._members

    def __repr__(self) -> str:
        return f"Ring({dict(self._weights)!r}, vnodes={self._vnodes})"

    def owners(self, key: str, n: int) -> list[str]:
        """The first n distinct members clockwise from the key, primary first (all members if there are fewer).

        The order matters: when a member leaves, the others keep their places in every key's list, so a
        replica that was second becomes first rather than a stranger taking over.
        """
        want = min(n, len(self._members))
        if want <= 0:
            return []
        owners = self._owners
        size = len(owners)
        i = bisect_left(self._points, position(key))  # the first point at or after the key owns it
        first = owners[i % size]
        if want == 1:
            return [first]
        out = [first]
        for step in range(i + 1, i + size):
            owner = owners[step % size]
            if owner not in out:
                out.append(owner)
                if len(out) == want:
                    break
        return out

    def shares(self) -> dict[str, float]:
        """Fraction of the hash space each member owns as primary (sums to 1): the load it should expect."""
        arcs = dict.fromkeys(self._weights, 0)
        if self._points:
            previous = self._points[-1] - SPACE  # the first point owns the arc wrapping around zero
            for point, owner in zip(self._points, self._owners):
                arcs[owner] += point - previous
                previous = point
        return {node_id: arc / SPACE for node_id, arc in arcs.items()}

    def with_member(self, node_id: str, weight: float = 1.0) -> Ring:
        """A ring with node_id added (or its weight changed)."""
        return Ring({**self._weights, node_id: weight}, self._vnodes)

    def without_member(self, node_id: str) -> Ring:
        """A ring without node_id; KeyError if it is not a member, since that usually means a stale id."""
        if node_id not in self._members:
            raise KeyError(node_id)
        return Ring({k: w for k, w in self._weights.items() if k != node_id}, self._vnodes)

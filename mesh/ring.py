"""Consistent hashing with virtual nodes and weights: which members own a key.

Each member is placed on a 64-bit ring at many points (virtual nodes), in proportion to its weight, so load
spreads evenly and adding or removing one of N members moves only about 1/N of the keys. A key's owners are
the first `n` distinct members clockwise from the key's own point. xxh3 is used for both: it is fast and
spreads short, similar strings (node ids, "ns/<sha256>") well.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping

import xxhash

_SPACE = 1 << 64


def _point(text: str) -> int:
    return xxhash.xxh3_64_intdigest(text.encode())


class Ring:
    """Immutable: membership changes build a new ring, so readers never see a half-updated one."""

    def __init__(self, members: Mapping[str, float], vnodes: int = 160) -> None:
        for node_id, weight in members.items():
            if weight <= 0:
                raise ValueError(f"weight of {node_id!r} must be positive, not {weight}")
        self.weights: dict[str, float] = dict(sorted(members.items()))
        mean = sum(self.weights.values()) / len(self.weights) if self.weights else 1.0
        points: list[tuple[int, str]] = []
        for node_id, weight in self.weights.items():
            count = max(1, round(vnodes * weight / mean))
            points.extend((_point(f"{node_id}#{i}"), node_id) for i in range(count))
        points.sort()
        self._points = [p for p, _ in points]
        self._owners = [o for _, o in points]

    @property
    def members(self) -> frozenset[str]:
        return frozenset(self.weights)

    def __len__(self) -> int:
        return len(self.weights)

    def __contains__(self, node_id: object) -> bool:
        return node_id in self.weights

    def owners(self, key: str, n: int) -> list[str]:
        """The first n distinct members clockwise from the key (fewer if the ring has fewer)."""
        want = min(n, len(self.weights))
        if want <= 0:
            return []
        out: list[str] = []
        i = bisect.bisect(self._points, _point(key))
        size = len(self._points)
        for step in range(size):
            owner = self._owners[(i + step) % size]
            if owner not in out:
                out.append(owner)
                if len(out) == want:
                    break
        return out

    def shares(self) -> dict[str, float]:
        """Fraction of the hash space each member owns as primary (sums to 1)."""
        share = dict.fromkeys(self.weights, 0.0)
        if not self._points:
            return share
        prev = self._points[-1] - _SPACE
        for point, owner in zip(self._points, self._owners):
            share[owner] += (point - prev) / _SPACE
            prev = point
        return share

    def with_member(self, node_id: str, weight: float = 1.0) -> Ring:
        return Ring({**self.weights, node_id: weight})

    def without_member(self, node_id: str) -> Ring:
        return Ring({k: v for k, v in self.weights.items() if k != node_id})

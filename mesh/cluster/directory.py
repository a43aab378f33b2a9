"""The directory: which members own keys, with what ring weight, and where each is reached.

Routing (mesh/cluster/routing.py) needs nothing else from membership, so it takes this instead of the gossip protocol
(mesh/membership/driver.py): SWIM can change without touching placement, and a test can route over a fixed table.
"""

from __future__ import annotations

from typing import Protocol


class Directory(Protocol):
    def ring_members(self) -> dict[str, int]:
        """node id -> ring weight (its capacity) of every member that owns keys, this node included."""
        ...

    def address_of(self, node_id: str) -> str | None:
        """Where a member is dialled; None for a node the directory does not know (any more)."""
        ...

    def known_members(self) -> list[str]:
        """Every member but those that left: ALIVE, SUSPECT and DEAD ones (a fleet-wide purge must reach all)."""
        ...

    def leave(self) -> None:
        """Tell the members this node leaves the ring (a drain), waiting briefly for them to hear it."""
        ...

"""The transport to one peer: what routing, repair and membership ask of another node, behind which gRPC sits.

mesh/transport/peer.py's PeerClient is the one real implementation. Naming the calls here keeps the callers honest about
what they use, and lets PeerPool (mesh/transport/peers.py) hand out a fake, so routing is tested without processes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Protocol

from mesh.pb import mesh_pb2 as pb
from mesh.transport.wire import Header, StoredChunk, Tee


class PeerTransport(Protocol):
    def ping(self, request: pb.PingRequest, timeout: float | None = None) -> pb.PingReply:
        """The membership probe."""
        ...

    def get_chunks(self, key: str, timeout: float | None = None, local_only: bool = True,
                   first_byte: float | None = None, on_first_byte: Callable[[float], None] | None = None,
                   tee: Tee | None = None) -> tuple[Header, list[StoredChunk]] | None:
        """A stored blob as its header and chunks, or None if the peer does not hold the key; `tee` also gets
        each chunk's raw bytes as they are verified."""
        ...

    def has(self, keys: list[str], timeout: float | None = None, local_only: bool = False) -> list[bool]: ...

    def put_chunks(self, header: Header, chunks: Iterable[StoredChunk], timeout: float | None = None,
                   local_only: bool = False, wait_for_ready: bool = False) -> pb.PutReply: ...

    def delete_keys(self, keys: list[str], timeout: float | None = None, local_only: bool = False) -> list[bool]: ...

    def digest(self, requester: str, buckets: int, timeout: float | None = None) -> tuple[list[int], list[int]]:
        """Anti-entropy: per bucket, a digest and a count of the keys the peer holds for `requester`."""
        ...

    def versions(self, keys: list[str], write_ids: list[int], timeout: float | None = None
                 ) -> list[tuple[int, bool]]:
        """Per key: (the peer's write id or 0, whether the peer deleted the write named in `write_ids`)."""
        ...

    def close(self) -> None: ...

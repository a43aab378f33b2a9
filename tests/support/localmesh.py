"""A mesh of `mesh serve` processes on loopback: for the demo, tests and benchmarks.

Each node is a real process with its own gRPC server, started by tests.support.serve; the first is every other
node's seed. Everything started here is stopped by `close()` (or the context manager), even when a caller fails
half-way.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from mesh.pb import mesh_pb2 as pb
from mesh.transport.peer import MeshError, PeerClient
from tests.support.poll import poll
from tests.support.serve import READY_TIMEOUT, ServeProcess, start_serve


@dataclass
class LocalNode(ServeProcess):
    """A ServeProcess that knows its place in the mesh and what it was started with, so it can be restarted."""

    index: int = 0
    args: list[str] = field(default_factory=list)  # everything after `serve` but --listen and --ready-file
    own_args: list[str] = field(default_factory=list)  # what start_node was given beyond the mesh's extra_args


class LocalMesh:
    def __init__(self, workdir: Path | None = None, secret: bytes | None = b"local-mesh-secret",
                 extra_args: list[str] | None = None) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="comfy-mesh-") if workdir is None else None
        self.workdir = Path(self._tmp.name) if self._tmp else workdir  # type: ignore[union-attr]
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.secret = secret
        self.secret_file: Path | None = None
        if secret is not None:
            self.secret_file = self.workdir / "secret"
            self.secret_file.write_bytes(secret)
            os.chmod(self.secret_file, 0o600)
        self.extra_args = list(extra_args or [])
        self.nodes: list[LocalNode] = []

    def __enter__(self) -> LocalMesh:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start_node(self, *, seeds: list[str] | None = None, args: list[str] | None = None,
                   node_id: str | None = None, listen: str = "127.0.0.1:0",
                   timeout: float = READY_TIMEOUT, env: Mapping[str, str] | None = None) -> LocalNode:
        """`env`: the node's whole environment (default: this process's), e.g. a faked clock."""
        index = len(self.nodes)
        if seeds is None:
            seeds = [self.nodes[0].address] if self.nodes else []
        node_args = ["--node-id", node_id or f"node{index}"] + (["--seeds", ",".join(seeds)] if seeds else []) \
            + self.extra_args + list(args or [])
        started = start_serve(self.workdir, f"node{index}", *node_args, secret_file=self.secret_file,
                              listen=listen, timeout=timeout, env=env)
        base = {f.name: getattr(started, f.name) for f in dataclasses.fields(ServeProcess)}
        node = LocalNode(**base, index=index, args=node_args, own_args=list(args or []))
        self.nodes.append(node)
        return node

    def start(self, n: int, args: list[str] | None = None) -> LocalMesh:
        for _ in range(n):
            self.start_node(args=args)
        return self

    def client(self, node: LocalNode, timeout: float = 30.0) -> PeerClient:
        return PeerClient(node.address, self.secret, timeout=timeout)

    def wait_members(self, count: int, nodes: list[LocalNode] | None = None, timeout: float = 20.0) -> None:
        """Until every given node sees `count` ALIVE members (itself included)."""
        def sees(node: LocalNode) -> bool:
            try:
                with self.client(node) as c:
                    return sum(1 for m in c.stats(timeout=2.0).members if m.state == pb.ALIVE) == count
            except MeshError:
                return False

        deadline = time.monotonic() + timeout
        for node in [n for n in (nodes or self.nodes) if n.alive]:
            poll(lambda: sees(node), f"node {node.node_id} sees {count} alive members",
                 timeout=max(0.0, deadline - time.monotonic()), interval=0.1)

    def restart(self, node: LocalNode, extra: list[str] | None = None, timeout: float = READY_TIMEOUT) -> LocalNode:
        """Start a stopped node again with the same id, port and seeds (the others'), as a deploy would."""
        if node.alive:
            raise ValueError(f"node {node.node_id} is still running")
        seeds = [n.address for n in self.nodes if n is not node]
        fresh = self.start_node(node_id=node.node_id, listen=node.address, seeds=seeds,
                                args=node.own_args + list(extra or []), timeout=timeout)
        self.nodes.remove(fresh)
        self.nodes[self.nodes.index(node)] = fresh
        return fresh

    def kill(self, node: LocalNode, sig: int = signal.SIGKILL) -> None:
        if node.alive:
            node.process.send_signal(sig)
            node.process.wait(timeout=30)

    def close(self) -> None:
        """Terminate every node first, so they shut down together, then wait for each (killing the late)."""
        for node in self.nodes:
            if node.alive:
                node.process.terminate()
        for node in self.nodes:
            node.close()
        if self._tmp is not None:
            self._tmp.cleanup()

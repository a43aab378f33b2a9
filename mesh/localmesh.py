"""Start a mesh of `mesh serve` processes on loopback: for the demo, tests and benchmarks.

Each node is a real process with its own gRPC server; the first is every other node's seed. Everything
started here is stopped by `close()` (or the context manager), even when a caller fails half-way.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from mesh.pb import mesh_pb2 as pb
from mesh.peer import MeshError, PeerClient


def wait_until_serving(process: subprocess.Popen[bytes], ready: Path, log_path: Path,
                       timeout: float) -> dict[str, str]:
    """What a `mesh serve --ready-file READY` wrote there ({address, node_id}), once it is serving.

    Raises RuntimeError if the process exits first and TimeoutError after `timeout` seconds, killing the process
    and quoting its log either way, so a caller never waits unbounded nor leaks a half-started node.
    """
    deadline = time.monotonic() + timeout
    try:
        while not ready.exists():
            if process.poll() is not None:
                raise RuntimeError(f"mesh serve exited with {process.returncode}; log:\n{log_path.read_text()[-4000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"mesh serve wrote no ready file in {timeout} s; log:\n"
                                   f"{log_path.read_text()[-4000:]}")
            time.sleep(0.05)
        return json.loads(ready.read_text())  # written whole, then renamed into place
    except BaseException:
        process.kill()
        process.wait(timeout=10)
        raise


@dataclass
class LocalNode:
    index: int
    address: str
    node_id: str
    process: subprocess.Popen[bytes]
    log_path: Path
    args: list[str] = field(default_factory=list)
    own_args: list[str] = field(default_factory=list)  # what start_node was given beyond the mesh's extra_args

    @property
    def alive(self) -> bool:
        return self.process.poll() is None


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

    def mesh_command(self) -> list[str]:
        return [sys.executable, "-m", "mesh.cli"]

    def start_node(self, *, seeds: list[str] | None = None, args: list[str] | None = None,
                   node_id: str | None = None, listen: str = "127.0.0.1:0", timeout: float = 20.0) -> LocalNode:
        index = len(self.nodes)
        ready = self.workdir / f"node{index}.ready"
        ready.unlink(missing_ok=True)
        log_path = self.workdir / f"node{index}.log"
        if seeds is None:
            seeds = [self.nodes[0].address] if self.nodes else []
        argv = self.mesh_command()
        if self.secret_file is not None:
            argv += ["--secret-file", str(self.secret_file)]
        node_args = ["--listen", listen, "--ready-file", str(ready), "--node-id", node_id or f"node{index}",
                     "--min-free-ram", "0"] + (["--seeds", ",".join(seeds)] if seeds else []) \
            + self.extra_args + list(args or [])
        with open(log_path, "ab") as log:
            process = subprocess.Popen(argv + ["serve"] + node_args, stdout=log, stderr=subprocess.STDOUT)
        info = wait_until_serving(process, ready, log_path, timeout)
        node = LocalNode(index, info["address"], info["node_id"], process, log_path, node_args, list(args or []))
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
        deadline = time.monotonic() + timeout
        pending = [n for n in (nodes or self.nodes) if n.alive]
        while pending:
            node = pending[0]
            try:
                with self.client(node) as c:
                    alive = sum(1 for m in c.stats(timeout=2.0).members if m.state == pb.ALIVE)
            except MeshError:
                alive = -1
            if alive == count:
                pending.pop(0)
                continue
            if time.monotonic() > deadline:
                raise TimeoutError(f"node {node.node_id} sees {alive} alive members, wanted {count}")
            time.sleep(0.1)

    def restart(self, node: LocalNode, extra: list[str] | None = None, timeout: float = 20.0) -> LocalNode:
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
        for node in self.nodes:
            if node.alive:
                node.process.terminate()
        for node in self.nodes:
            try:
                node.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                node.process.kill()
                node.process.wait()
        if self._tmp is not None:
            self._tmp.cleanup()

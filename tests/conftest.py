"""Shared fixtures: real mesh nodes on 127.0.0.1, in this process or as `mesh serve` subprocesses.

Everything started here is stopped in teardown, including when a test fails half-way; subprocesses are killed if
they do not stop in time. Every wait is bounded.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from mesh.transport.auth import METADATA_KEY, AuthInterceptor, Keyring, ServerAuth, call_tag, key_id
from mesh.node import Node, NodeConfig
from mesh.pb import mesh_pb2 as pb
from mesh.pb import mesh_pb2_grpc as pb_grpc
from mesh.transport.peer import PeerClient
from mesh.server import MeshServicer, add_to_server
from mesh.storage.store import BlobStore
from mesh.transport.wire import GiB, MiB, Limits
from tests.support.poll import poll as poll  # the tests import it from here
from tests.support.serve import ServeProcess, start_serve

SECRET = b"test-cluster-secret"
# The `mesh` processes tests start never read this host's /etc/comfy-mesh/mesh.toml (mesh/settings.py).
os.environ.setdefault("MESH_CONFIG_DEFAULT", "")

# The root __init__.py (the ComfyUI entry) makes a checkout a package: in a folder whose name is an identifier
# (`comfy_mesh`) pytest imports this file as `comfy_mesh.tests.conftest`, while tests import `tests.conftest`.
# One module under both names, not two copies (tests/test_install.py checks it).
sys.modules.setdefault("tests.conftest", sys.modules[__name__])


def token_metadata(address: str, method: str, secret: bytes = SECRET) -> tuple[tuple[str, str], ...]:
    """A fresh proof under `secret` for one call of `method` ("Put", "Get", ...) to the node at `address`.

    Built by hand (the node's own proof is not checked) so that a test can also sign with a wrong secret.
    """
    channel = grpc.insecure_channel(address)
    try:
        reply = pb_grpc.MeshStub(channel).Hello(pb.HelloRequest(client_nonce=os.urandom(16)), timeout=5)
    finally:
        channel.close()
    tag = call_tag(secret, f"/comfymesh.v1.Mesh/{method}", reply.session, 1)
    return ((METADATA_KEY, f"{key_id(secret)}.{reply.session}.1.{tag}"),)


# -- in-process nodes ------------------------------------------------------------------------------------------

def start_node(secret: bytes | None = SECRET, max_memory: int = 1 * GiB, limits: Limits | None = None,
               near_fraction: float = 0.25) -> Node:
    """A real Node on 127.0.0.1:0 (lone: no seeds, no zeroconf); the caller stops it."""
    config = NodeConfig(listen="127.0.0.1:0", node_id="", max_memory=max_memory, min_free_ram=0,
                        near_fraction=near_fraction, secret=secret, limits=limits or Limits())
    return Node(config).start()


@pytest.fixture
def node_factory() -> Iterator[Callable[..., Node]]:
    """start_node(...) for tests that need their own settings; every node started is stopped afterwards."""
    started: list[Node] = []

    def make(**kwargs: object) -> Node:
        node = start_node(**kwargs)  # type: ignore[arg-type]
        started.append(node)
        return node

    yield make
    for node in started:
        node.stop(grace=0.5)


@pytest.fixture
def node(node_factory: Callable[..., Node]) -> Node:
    """A lone node with the cluster secret and a 1 GiB budget (store 768 MiB, near cache 256 MiB)."""
    return node_factory()


@pytest.fixture
def client(node: Node) -> Iterator[PeerClient]:
    with PeerClient(node.address, SECRET, timeout=30) as c:
        yield c


@pytest.fixture
def stub(node: Node) -> Iterator[pb_grpc.MeshStub]:
    """The generated stub on its own channel: for hand-crafted (malformed) requests."""
    limits = Limits()
    channel = grpc.insecure_channel(node.address, options=[
        ("grpc.max_send_message_length", limits.max_message_size),
        ("grpc.max_receive_message_length", limits.max_message_size)])
    try:
        yield pb_grpc.MeshStub(channel)
    finally:
        channel.close()


# -- a bare servicer, without a cluster ----------------------------------------------------------------

@dataclass
class Served:
    """A MeshServicer (no cluster) on its own gRPC server: the servicer under a chosen registration."""

    address: str
    store: BlobStore
    servicer: MeshServicer
    server: grpc.Server = field(repr=False)

    def stop(self) -> None:
        self.server.stop(0.5).wait()


def serve_servicer(limits: Limits | None = None, max_memory: int = 256 * MiB,
                   secret: bytes = SECRET) -> Served:
    limits = limits or Limits()
    store = BlobStore(max_memory)
    auth = ServerAuth(Keyring([secret]), node_id="bare")
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), interceptors=[AuthInterceptor(auth)],
                         options=[("grpc.max_send_message_length", limits.max_message_size),
                                  ("grpc.max_receive_message_length", limits.max_message_size)])
    port = server.add_insecure_port("127.0.0.1:0")
    servicer = MeshServicer("bare", f"127.0.0.1:{port}", store, limits, auth=auth)
    add_to_server(servicer, server)
    server.start()
    return Served(f"127.0.0.1:{port}", store, servicer, server)


@pytest.fixture(params=["node", "bare"])
def target(request: pytest.FixtureRequest, node_factory: Callable[..., Node]) -> Iterator[tuple[str, BlobStore]]:
    """(address, store) of a real node (a cluster of one), and of the bare servicer with no cluster at all."""
    limits = Limits(max_blob_size=64 * MiB)
    if request.param == "node":
        n = node_factory(limits=limits, max_memory=256 * MiB)
        yield n.address, n.store
        return
    served = serve_servicer(limits=limits)
    try:
        yield served.address, served.store
    finally:
        served.stop()


# -- `mesh serve` subprocesses (started by tests.support.serve) -------------------------------------------------

@pytest.fixture
def secret_file(tmp_path: Path) -> Path:
    path = tmp_path / "secret"
    path.write_bytes(SECRET + b"\n")
    os.chmod(path, 0o600)
    return path


@pytest.fixture
def serve(tmp_path: Path, secret_file: Path) -> Iterator[Callable[..., ServeProcess]]:
    """serve(*extra_args) starts a `mesh serve` with the test secret; all are killed in teardown."""
    started: list[ServeProcess] = []

    def start(*args: str, secret: Path | None = secret_file, pre: Sequence[str] = ()) -> ServeProcess:
        """`pre`: global options, before `serve` (TLS); a 256 MiB budget unless `args` say otherwise."""
        proc = start_serve(tmp_path, f"serve-{len(started)}", "--max-memory", "256MiB", *args, secret_file=secret,
                           global_args=pre)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.kill()


def free_port() -> int:
    """A port nothing listens on (bound, then released)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Collect:
    """A Sink that keeps what it is fed, for checking what reached it."""

    def __init__(self) -> None:
        self.header: object = None
        self.received = 0
        self.pieces: list[bytes] = []
        self.starts = 0

    def start(self, size: int, header: object) -> None:
        self.header, self.received, self.pieces = header, 0, []
        self.starts += 1

    def feed(self, raw: bytes | memoryview) -> None:
        self.pieces.append(bytes(raw))
        self.received += len(raw)

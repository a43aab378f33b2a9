"""A mesh node: the gRPC server, its blob store, and (issue 3) its place in the cluster.

The node runs on its own threads (gRPC's pool and a housekeeping thread), never on a caller's event loop, so
it can live inside ComfyUI's process (embedded mode) as well as on its own (`mesh serve`).
"""

from __future__ import annotations

import logging
import socket
import threading
import uuid
from concurrent import futures
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from mesh.auth import AuthInterceptor
from mesh.pb import mesh_pb2_grpc as pb_grpc
from mesh.server import MeshServicer
from mesh.store import BlobStore
from mesh.units import format_size
from mesh.wire import GiB, Limits

log = logging.getLogger(__name__)

DEFAULT_PORT = 8288
SERVICE_NAME = "comfymesh.v1.Mesh"
HOUSEKEEPING_INTERVAL = 1.0


@dataclass
class NodeConfig:
    listen: str = f"127.0.0.1:{DEFAULT_PORT}"
    node_id: str = ""                 # default: <hostname>-<port>, stable across restarts of the same node
    max_memory: int = 4 * GiB
    min_free_ram: int = 1 * GiB
    secret: bytes | None = None
    limits: Limits = field(default_factory=Limits)


def split_hostport(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"not a HOST:PORT address: {address!r}")
    return host.strip("[]"), int(port)


def join_hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Node:
    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.store = BlobStore(config.max_memory, config.min_free_ram)
        self.server: grpc.Server | None = None
        self.servicer: MeshServicer | None = None
        self.health = health.HealthServicer()
        self.address = ""
        self.node_id = config.node_id
        self._stop = threading.Event()
        self._housekeeper: threading.Thread | None = None

    def start(self) -> Node:
        c = self.config
        host, port = split_hostport(c.listen)
        interceptors = [AuthInterceptor(c.secret)] if c.secret else []
        if not c.secret:
            log.warning("no cluster secret set: this node accepts any caller (set --secret-file or MESH_SECRET)")
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=c.limits.max_transfers + 16, thread_name_prefix="mesh-rpc"),
            interceptors=interceptors,
            options=[
                ("grpc.max_send_message_length", c.limits.max_message_size),
                ("grpc.max_receive_message_length", c.limits.max_message_size),
                ("grpc.so_reuseport", 0),
            ],
        )
        bound = server.add_insecure_port(join_hostport(host, port))
        if bound == 0:
            raise OSError(f"cannot listen on {c.listen}")
        self.address = join_hostport(host, bound)
        self.node_id = c.node_id or f"{socket.gethostname()}-{bound}-{uuid.uuid4().hex[:4]}"
        self.servicer = MeshServicer(self.node_id, self.address, self.store, c.limits)
        pb_grpc.add_MeshServicer_to_server(self.servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        server.start()
        self.server = server
        for name in ("", SERVICE_NAME):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self._housekeeper = threading.Thread(target=self._housekeep, name="mesh-housekeeping", daemon=True)
        self._housekeeper.start()
        log.info("mesh node %s listening on %s (budget %s, min free RAM %s, auth %s)", self.node_id, self.address,
                 format_size(c.max_memory), format_size(c.min_free_ram), "on" if c.secret else "OFF")
        return self

    def _housekeep(self) -> None:
        """RAM pressure can come from ComfyUI, not from us, so it is watched even when nothing is stored."""
        while not self._stop.wait(HOUSEKEEPING_INTERVAL):
            try:
                evicted = self.store.relieve_pressure()
                if evicted:
                    log.info("RAM pressure: evicted %d blobs", evicted)
            except Exception:  # pragma: no cover - must never kill the thread
                log.exception("housekeeping failed")

    def stop(self, grace: float = 2.0) -> None:
        if self.server is None:
            return
        self._stop.set()
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait()
        self.server = None
        log.info("mesh node %s stopped", self.node_id)

    def wait(self) -> None:
        if self.server is not None:
            self.server.wait_for_termination()

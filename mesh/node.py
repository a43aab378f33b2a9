"""A mesh node: the gRPC server, its blob store, and its place in the cluster.

The node runs on its own threads (gRPC's pool, membership, housekeeping), never on a caller's event loop, so
it can live inside ComfyUI's process (embedded mode) as well as on its own (`mesh serve`). A node with no
seeds and no zeroconf is a cluster of one; the code path is the same.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket
import threading
import time
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health, health_pb2

import mesh
from mesh.address import WILDCARDS, is_loopback, join_hostport, routable_host, split_hostport
from mesh.transport.auth import AuthInterceptor, Secret, ServerAuth, as_keyring
from mesh.transport.revocation import RevocationInterceptor, certificate_name
from mesh.transport.tls import subject_name
from mesh.cluster.routing import Cluster, ClusterConfig
from mesh.storage.disk import DiskStore, probe_directory
from mesh.transport.link import AUTO, MODES, Links
from mesh.metrics import Metrics
from mesh.node_id import default_node_id
from mesh.membership.members import Change
from mesh.membership.driver import Member, Membership, Timing
from mesh.pb import mesh_pb2 as pb
from mesh.transport.peers import PeerPool
from mesh.server import HEALTH_SERVICE, MeshServicer, add_health_to_server, add_reflection_to_server, add_to_server
from mesh.storage.eviction import DEFAULT_POLICY, POLICIES
from mesh.storage.store import BlobStore
from mesh.units import format_size
from mesh.transport.wire import SERVICE, GiB, Limits

if TYPE_CHECKING:
    from mesh.transport.tls import TlsConfig

log = logging.getLogger(__name__)

DEFAULT_PORT = 8288
SERVICE_NAME = SERVICE  # what the health service reports on, besides the server as a whole ("")
HOUSEKEEPING_INTERVAL = 1.0


@dataclass
class NodeConfig:
    listen: str = f"127.0.0.1:{DEFAULT_PORT}"
    node_id: str = ""                 # default <hostname>-<random>, kept in data_dir/node-id (mesh/node_id.py)
    advertise: str = ""               # address peers dial; default: the listen address (a LAN IP for 0.0.0.0)
    max_memory: int = 4 * GiB
    min_free_ram: int = 1 * GiB
    near_fraction: float = 0.25       # share of max_memory for copies of keys this node reads but does not own
    data_dir: str = ""                # the disk tier: blobs survive a restart (empty: RAM only)
    metrics_listen: str = ""          # HOST:PORT of the Prometheus endpoint (empty: none)
    max_disk: int = 16 * GiB
    eviction: str = DEFAULT_POLICY    # cost: compute seconds saved per byte (mesh/storage/eviction.py); lru
    secret: Secret = None             # one secret, several (the first signs: rotation), or a shared Keyring
    tls: TlsConfig | None = None      # with it, the node serves TLS only (mTLS when it has a CA) and dials peers so
    limits: Limits = field(default_factory=Limits)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    seeds: list[str] = field(default_factory=list)
    zeroconf: bool = False
    zeroconf_interfaces: list[str] | None = None
    timing: Timing = field(default_factory=Timing)
    compress: str = AUTO              # lz4 per transfer: auto (where a measured link is slow), off, or lz4 (always,
                                      # and values written through this node are stored compressed)
    revoked: list[str] = field(default_factory=list)  # certificate names refused (mesh/transport/revocation.py)


class ConfigError(ValueError):
    """A setting that cannot work, named as the operator wrote it (a usage error: exit code 2)."""


def validate(config: NodeConfig) -> None:
    """Refuse settings that cannot work, one line naming the setting, before anything starts."""
    c, t, cl, lim = config, config.timing, config.cluster, config.limits
    checks = [
        (c.max_memory > 0, "--max-memory must be positive"),
        (c.compress in MODES, f"--compress must be one of {', '.join(MODES)}"),
        (c.min_free_ram >= 0, "--min-free-ram must not be negative"),
        (c.eviction in POLICIES, f"--eviction must be one of {', '.join(POLICIES)}"),
        (not c.data_dir or c.max_disk > 0, "--max-disk must be positive"),
        (t.interval > 0, "--heartbeat must be positive"),
        (t.suspect_after > t.interval, "--suspect-after must be longer than --heartbeat"),
        (t.dead_after > t.suspect_after, "--dead-after must be longer than --suspect-after"),
        (cl.replicas >= 1, "--replicas must be at least 1"),
        (1 <= cl.write_acks <= cl.replicas, f"--write-acks must be between 1 and --replicas ({cl.replicas})"),
        (cl.repair_interval > 0, "--repair-interval must be positive"),
        (lim.max_transfers >= 1, "--max-transfers must be at least 1"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    for name, address in (("--listen", c.listen), ("--advertise", c.advertise)):
        if address:
            try:
                split_hostport(address)
            except ValueError as e:
                raise ConfigError(f"{name}: {e}") from None
    if c.revoked and (c.tls is None or c.tls.ca is None):
        raise ConfigError("--revoke needs mutual TLS (--tls-cert, --tls-key and --tls-ca): without it every member "
                          "holds the same secret and none can be told apart; rotate the secret instead")
    if as_keyring(c.secret) is None:
        open_node_only_on_loopback(c.listen, c.advertise, c.seeds, c.zeroconf, c.metrics_listen)
    no_loopback_with_remote_seeds(c.listen, c.advertise, c.seeds)


def no_loopback_with_remote_seeds(listen: str, advertise: str, seeds: list[str] | tuple[str, ...]) -> None:
    """A node advertises the address its peers dial: a loopback one reaches only this host, so with seeds on
    other hosts one seed on this host admitted it and the others could not, and their rings disagreed on who owns
    which key (issue 22). Refused before anything starts, naming the fix.

    A seed is on another host when it is, or its name resolves to, an address that is not loopback. A name that
    does not resolve (yet: a Kubernetes Service before its pods are ready) is not counted here: the node starts,
    warns that the seed does not resolve, and a member on the LAN still refuses it if it advertises loopback
    (membership/members.py), so no ring ever holds it. This check is the early, clear error; that one the rule."""
    address = advertise or listen
    host = split_hostport(address)[0]
    if host in WILDCARDS or not is_loopback(host):
        return
    remote = [s.strip() for s in seeds if s.strip() and _seed_is_remote(s.strip())]
    if remote:
        raise ConfigError(f"this node would advertise {address}, a loopback address, but its seeds "
                          f"({', '.join(remote)}) are other hosts, which cannot reach it there: listen on the LAN "
                          f"(--listen / MESH_LISTEN 0.0.0.0:PORT) or set the address peers dial (--advertise / "
                          f"MESH_ADVERTISE HOST:PORT)")


def _seed_is_remote(seed: str) -> bool:
    """Whether a seed as written (`host:port` or `dns:NAME:PORT`) is on another host: an address that is not
    loopback, or a name that resolves to one. False for a name that does not resolve (see above)."""
    try:
        host = split_hostport(seed[4:] if seed.startswith("dns:") else seed)[0]
    except ValueError:
        return False  # not a seed at all: validation names it
    if is_loopback(host):
        return False
    try:
        ipaddress.ip_address(host.strip("[]"))
        return True  # an address, not loopback
    except ValueError:
        pass
    try:
        found = {info[4][0] for info in socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)}
    except (OSError, UnicodeError):
        return False
    return any(not is_loopback(a) for a in found)


NO_SECRET_HELP = ("make one with `mesh secret /etc/comfy-mesh/secret` and give it to every node and ComfyUI "
                  "(--secret-file / MESH_SECRET_FILE)")


def open_node_only_on_loopback(listen: str, advertise: str, seeds: list[str] | tuple[str, ...],
                               zeroconf: bool, metrics_listen: str = "") -> None:
    """Without a cluster secret anyone who can reach a node can read, replace and delete its values and stop it:
    such a node serves this host alone and joins nothing. Anything more is refused before it starts."""
    for name, address in (("--listen", listen), ("--advertise", advertise), ("--metrics-listen", metrics_listen)):
        if address and not is_loopback(split_hostport(address)[0]):
            raise ConfigError(f"without a cluster secret a node listens on loopback only, not {name} {address}: "
                              + NO_SECRET_HELP)
    if seeds:
        raise ConfigError("without a cluster secret a node joins no mesh (--seeds): " + NO_SECRET_HELP)
    if zeroconf:
        raise ConfigError("without a cluster secret a node joins no mesh (--zeroconf): " + NO_SECRET_HELP)


def check_data_dir(path: str, create: bool = True) -> None:
    """Refuse a --data-dir this process cannot write, before the node starts. Why refuse rather than run on:
    the disk tier is what an operator asked for (values that survive a restart), and a node that cannot write
    it keeps every value in RAM only while each put logs Permission denied; refused, the fix is one line away."""
    try:
        probe_directory(Path(path), create=create)
    except OSError as e:
        who = _user()
        fix = (f"make it writable by {who}, the user this node runs as (e.g. `chown -R {who} {path}`), or choose "
               f"another" if e.errno in (errno.EACCES, errno.EPERM) else "choose another")
        raise ConfigError(f"cannot use --data-dir {path} (MESH_DATA_DIR): {e.strerror or e}: {fix} directory, "
                          f"or run without --data-dir (RAM only)") from None


def _user() -> str:
    """This process's user, by name where it has one: what a chown needs."""
    import os
    import pwd

    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return str(os.geteuid())


def advertised_host(host: str, advertise: str) -> str:
    """What peers dial. A wildcard listen address is no address: take a routable interface address, never
    loopback (peers on other hosts would dial themselves), or refuse and say what to set."""
    if advertise or host not in WILDCARDS:
        return host
    routable = routable_host()
    if routable is None:
        raise ConfigError(f"listening on {host or '*'} but this host has no routable interface address: "
                         "set --advertise HOST:PORT (MESH_ADVERTISE) to the address peers should dial")
    return routable


class Node:
    def __init__(self, config: NodeConfig) -> None:
        if not 0.0 <= config.near_fraction < 1.0:
            raise ValueError("near_fraction must be in [0, 1)")
        self.config = config
        near_budget = max(1, int(config.max_memory * config.near_fraction))
        if config.data_dir:
            check_data_dir(config.data_dir)
        disk = DiskStore(Path(config.data_dir), config.max_disk, config.limits,
                         eviction=config.eviction) if config.data_dir else None
        self.store = BlobStore(config.max_memory - near_budget if config.near_fraction else config.max_memory,
                               config.min_free_ram, disk=disk, eviction=config.eviction)
        self.near = BlobStore(near_budget, config.min_free_ram, eviction=config.eviction)
        self.server: grpc.Server | None = None
        self.servicer: MeshServicer | None = None
        self.cluster: Cluster | None = None
        self.membership: Membership | None = None
        self.discovery: object | None = None
        self.health = health.HealthServicer()
        self.metrics = Metrics()
        self.keyring = as_keyring(config.secret)
        self.auth = ServerAuth(self.keyring) if self.keyring is not None else None
        self.peers = PeerPool(self.keyring, config.limits, tls=config.tls, links=Links(config.compress))
        self.address = ""
        self.node_id = config.node_id
        self.stopped = threading.Event()
        self._stop = threading.Event()
        self._housekeeper: threading.Thread | None = None
        self._drain_lock = threading.Lock()

    def start(self) -> Node:
        c = self.config
        validate(c)
        host, port = split_hostport(c.listen)
        ad_host = advertised_host(host, c.advertise)  # refuse before binding anything
        self.node_id, id_source = self._pick_node_id()
        interceptors: list[grpc.ServerInterceptor] = [RevocationInterceptor(c.revoked)] if c.revoked else []
        if self.auth is not None:
            interceptors.append(AuthInterceptor(self.auth))
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=MeshServicer.threads(c.limits), thread_name_prefix="mesh-rpc"),
            interceptors=interceptors,
            options=[
                ("grpc.max_send_message_length", c.limits.max_message_size),
                ("grpc.max_receive_message_length", c.limits.max_message_size),
                ("grpc.so_reuseport", 0),
            ],
        )
        try:
            if c.tls is not None:
                bound = server.add_secure_port(join_hostport(host, port), c.tls.server_credentials())
            else:
                bound = server.add_insecure_port(join_hostport(host, port))
        except RuntimeError:
            bound = 0
        if bound == 0:
            raise OSError(f"cannot listen on {c.listen}: the port is taken or the address is not one of this host's")
        self.address = c.advertise or join_hostport(ad_host, bound)
        if c.revoked and c.tls is not None and subject_name(c.tls.cert) != self.node_id:
            server.stop(0)
            raise ConfigError(f"with --revoke, a node's --node-id must be its certificate's name "
                              f"({subject_name(c.tls.cert)!r}, not {self.node_id!r}): members are admitted to the "
                              f"ring only under the name their certificate shows")
        if self.auth is not None:
            self.auth.node_id, self.auth.address = self.node_id, self.address
        me = Member(self.node_id, self.address, c.max_memory, incarnation=int(time.time() * 1000))
        self.membership = Membership(me=me, cluster=c.cluster.name, peers=self.peers, seeds=c.seeds,
                                     timing=c.timing, on_change=self._on_membership_change,
                                     on_restart=self._on_member_restart,
                                     local_stats=self.store.held)
        self.cluster = Cluster(node_id=self.node_id, store=self.store, near=self.near,
                               directory=self.membership, peers=self.peers, config=c.cluster)
        self.servicer = MeshServicer(self.node_id, self.address, self.store, c.limits, self.cluster, self.auth,
                                     membership=self.membership)
        self.servicer.revoked = frozenset(c.revoked)
        self.membership.revoked = self.cluster.revoked = frozenset(c.revoked)
        if c.revoked and c.tls is not None:
            tls = c.tls
            self.membership.certificate_name = lambda address: certificate_name(address, tls)
        for name in c.revoked:  # what a revoked member wrote before: gone here, whatever purge missed
            if purged := self.cluster.purge_local(name):
                log.warning("dropped %d values written by revoked member %s", purged, name)
        self.servicer.on_drain = self._drain_rpc
        self.metrics.watch(self.servicer.counters, self.membership.members_pb)
        self.servicer.rpc_seconds = self.metrics.rpc_seconds
        add_to_server(self.servicer, server)
        add_health_to_server(self.servicer, self.health, server)
        add_reflection_to_server(self.servicer, server, (SERVICE_NAME, HEALTH_SERVICE))
        server.start()
        self.server = server
        if self.auth is None:
            log.warning("no cluster secret set: this node serves this host alone (loopback, no seeds), and every "
                        "process on this host can read, replace and delete its values; " + NO_SECRET_HELP)
        for name in ("", SERVICE_NAME):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self.membership.start()
        self.cluster.start()
        if c.metrics_listen:
            self.metrics.serve(c.metrics_listen)
        if c.zeroconf:
            self._start_zeroconf(host, bound)
        self._housekeeper = threading.Thread(target=self._housekeep, name="mesh-housekeeping", daemon=True)
        self._housekeeper.start()
        log.info("node id %s (%s)", self.node_id, id_source)
        log.info("mesh node %s serving on %s (cluster %r, budget %s, disk %s, min free RAM %s, replicas %d, auth %s, "
                 "tls %s, seeds %s, zeroconf %s)", self.node_id, self.address, c.cluster.name, format_size(c.max_memory),
                 f"{c.data_dir} ({format_size(c.max_disk)})" if c.data_dir else "off",
                 format_size(c.min_free_ram), c.cluster.replicas, "on" if self.auth else "OFF",
                 ("mutual" if c.tls.ca else "on") if c.tls else "off",
                 ",".join(c.seeds) or "none", "on" if c.zeroconf else "off")
        return self

    def _pick_node_id(self) -> tuple[str, str]:
        """(id, where it came from): --node-id as given; with --revoke (mutual TLS) the certificate's name, the
        only id such a node may run under; else this host's name and a random suffix kept in the data dir."""
        c = self.config
        if c.node_id:
            return c.node_id, "--node-id"
        if c.revoked and c.tls is not None and (name := subject_name(c.tls.cert)):
            return name, "its certificate's name"
        try:
            return default_node_id(c.data_dir)
        except ValueError as e:
            raise ConfigError(str(e)) from None

    def _start_zeroconf(self, host: str, port: int) -> None:
        from mesh.membership.discovery import ZeroconfDiscovery

        assert self.membership is not None
        membership = self.membership
        ad_host, _ = split_hostport(self.address)
        self.discovery = ZeroconfDiscovery(
            node_id=self.node_id, cluster=self.config.cluster.name, host=ad_host, port=port,
            capacity=self.config.max_memory, protocol=mesh.PROTOCOL_VERSION,
            on_found=lambda advert: membership.add_candidate(advert.address),
            interfaces=self.config.zeroconf_interfaces,
        )
        self.discovery.start()  # type: ignore[attr-defined]

    def _on_membership_change(self, changes: list[Change]) -> None:
        if self.cluster is not None:
            self.cluster.on_membership_change(changes)

    def _on_member_restart(self, node_id: str) -> None:
        if self.cluster is not None:
            self.cluster.on_member_restart(node_id)

    def _housekeep(self) -> None:
        """RAM pressure can come from ComfyUI, not from us, so it is watched even when nothing is stored."""
        while not self._stop.wait(HOUSEKEEPING_INTERVAL):
            try:
                evicted = self.near.relieve_pressure() + self.store.relieve_pressure()
                if evicted:
                    log.info("RAM pressure: evicted %d blobs", evicted)
            except Exception:  # pragma: no cover - must never kill the thread
                log.exception("housekeeping failed")

    def drain(self) -> pb.DrainReply:
        """Leave gracefully (announce, hand blobs off), then stop. Safe to call more than once."""
        with self._drain_lock:
            if self.cluster is None or self.server is None:
                return pb.DrainReply()
            self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)
            if self.servicer is not None:
                self.servicer.accepting = False  # first: no new puts, then the replica queue, then hand-off
            return self.cluster.drain()

    def _drain_rpc(self) -> pb.DrainReply:
        reply = self.drain()
        threading.Thread(target=self.stop, name="mesh-stop", daemon=True).start()
        return reply

    def stop(self, grace: float = 2.0) -> None:
        server, self.server = self.server, None
        if server is None:
            return
        self._stop.set()
        self.health.enter_graceful_shutdown()
        if self.discovery is not None:
            self.discovery.stop()  # type: ignore[attr-defined]
        if self.membership is not None:
            self.membership.stop()
        server.stop(grace).wait()
        self.metrics.stop()
        if self.servicer is not None:
            self.servicer.watchdog.stop()
        if self.cluster is not None:
            self.cluster.close()
        self.peers.close()
        log.info("mesh node %s stopped", self.node_id)
        self.stopped.set()

    def wait(self) -> None:
        self.stopped.wait()

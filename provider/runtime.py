"""Wires a provider to a mesh: an embedded node in this process, or a sidecar `mesh serve` to attach to.

Kept apart from ComfyUI's imports (see comfy.py) so the test harness runs exactly this wiring without ComfyUI.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import secrets
import socket
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from mesh import codec
from mesh.client import LocalClient, MeshClient, RemoteClient
from mesh.cluster.routing import ClusterConfig
from mesh.buffers import RESERVE
from mesh.address import is_loopback, split_hostport, with_port
from mesh.node import DEFAULT_PORT, NO_SECRET_HELP, ConfigError, Node, NodeConfig, open_node_only_on_loopback
from mesh.transport.wire import Limits

from .bridge import Bridge
from .cache_provider import MeshCacheProvider
from .config import DEFAULT_LISTEN, ProviderConfig
from .dedupe import Dedupe
from .fastkeys import FastKeys
from .filehash import FileHashes
from .identity import KeyIdentities
from .models import ModelFolders
from .packs import PackIdentities
from .policy import Policy, TraitsLookup

log = logging.getLogger("comfy_mesh")

CODEC_VERSION = "cm1"
REPORT_EVERY = 2.0  # seconds between sidecar-mode reports of the provider's counters to the sidecar


def torch_on_one_core() -> None:
    """Run torch ops of the calling thread (a provider thread encoding or decoding values) on one core.

    OpenMP keeps the thread count per thread, so ComfyUI's own threads keep theirs. A value is one copy and at
    most one division: one core runs it at memory speed, while a full team contending with ComfyUI's work for
    the same cores spins (a 48 MiB image decoded in 94 ms on a busy 2-core host instead of 11 ms)."""
    import torch

    if "OpenMP" in torch.__config__.parallel_info():
        torch.set_num_threads(1)


def namespace_for(comfy_version: str, operator_namespace: str) -> str:
    """Keys never cross fleets with different code: codec version, ComfyUI version, then the operator's part."""
    parts = [CODEC_VERSION, f"comfyui-{comfy_version}"] + ([operator_namespace] if operator_namespace else [])
    return "/".join(parts)


@dataclass
class Runtime:
    provider: MeshCacheProvider
    bridge: Bridge
    client: MeshClient
    node: Node | None
    config: ProviderConfig
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _reporting: bool = field(default=False, repr=False)
    fast_keys: FastKeys | None = field(default=None, repr=False)
    identities: KeyIdentities | None = field(default=None, repr=False)
    _reporter: str = field(default_factory=lambda: f"comfyui@{socket.gethostname()}:{os.getpid()}", repr=False)
    private: bool = False  # an embedded node with a random secret of this process: nothing else can call it

    def start_reporting(self) -> None:
        """Sidecar mode: the sidecar's `mesh stats` shows this provider's counters, as an embedded node's does."""
        self._reporting = True
        threading.Thread(target=self._report_loop, name="mesh-provider-report", daemon=True).start()

    def _report(self) -> None:
        try:
            self.client.report(self._reporter, self.provider.stats(), timeout=2.0)
        except Exception as e:  # the sidecar may be down: the lookups notice that on their own
            log.debug("cannot report counters to the sidecar: %r", e)

    def _report_loop(self) -> None:
        while not self._stop.wait(REPORT_EVERY):
            self._report()

    def describe(self) -> str:
        where = (f"embedded node {self.node.node_id} on {self.node.address}" if self.node
                 else f"sidecar at {self.config.node}")
        if self.private:
            where += (" (no MESH_SECRET_FILE: a secret of this process alone, so no other process can call it and "
                      "it joins no fleet; `mesh secret FILE` makes one)")
        return (f"comfy-mesh: {where}, namespace {self.provider.namespace!r}, "
                f"seeds {','.join(self.config.seeds) or 'none'}, zeroconf {'on' if self.config.zeroconf else 'off'}, "
                f"lookup deadline {self.config.lookup_timeout:g} s, "
                + (f"dedupe on (waits at most {self.config.dedupe_max_wait:g} s)" if self.config.dedupe
                   else "dedupe off"))

    def close(self) -> None:
        self._stop.set()
        if self.identities is not None:
            self.identities.close()  # before the fast keys: it was installed over them
        if self.fast_keys is not None:
            self.fast_keys.uninstall()
        if self._reporting:
            self.bridge.flush(5.0)
            self._report()  # the last counters too, not those of up to REPORT_EVERY seconds ago
        if self.provider.dedupe is not None:
            self.provider.dedupe.close()  # its leases released while the client still answers
        self.bridge.close()
        self.client.close()
        RESERVE.configure(0)
        if self.node is not None:
            self.node.stop(grace=1.0)


def start(config: ProviderConfig, *, cache_value: Callable[..., Any], traits: TraitsLookup, comfy_version: str,
          base: type | None = None, api: Any = None, folder_paths: Any = None, nodes: Any = None) -> Runtime:
    """`api`: ComfyUI's comfy_execution.cache_provider module, where the identity hook and the fast cache keys
    install; `folder_paths` and `nodes`: ComfyUI's modules of those names (model folders; node classes and the
    folders of their packs). Without `api` and with the identity on, nothing is shared (see identity.py)."""
    secret = config.keyring()
    private = config.mode == "embedded" and secret is None
    if config.mode == "sidecar" and secret is None and \
            not is_loopback(split_hostport(with_port(config.node, DEFAULT_PORT))[0]):
        # Whatever answers at that address would feed this ComfyUI values over an unauthenticated link.
        raise ConfigError(f"without a cluster secret the sidecar must be on this host, not {config.node}: "
                          + NO_SECRET_HELP)
    if private:
        # No secret configured: the embedded node serves this process alone. Seeds, zeroconf or a LAN address
        # without a secret are refused (one line; ComfyUI runs without the mesh), and a random secret that only
        # this process knows keeps every other local process out of it.
        open_node_only_on_loopback(config.listen, config.advertise, config.seeds, config.zeroconf,
                                   config.metrics_listen)
        secret = secrets.token_bytes(32)
    tls = config.tls()
    RESERVE.configure(config.warm_memory)
    # No value larger than MESH_MAX_VALUE_SIZE is ever stored, so none larger is ever accepted off the wire.
    limits = Limits(max_blob_size=min(Limits().max_blob_size, max(config.max_value_size, 1)))
    node: Node | None = None
    client: MeshClient
    if config.mode == "embedded":
        node_config = NodeConfig(
            listen=config.listen, node_id=config.node_id, advertise=config.advertise,
            max_memory=config.max_memory, min_free_ram=config.min_free_ram, secret=secret, tls=tls, limits=limits,
            data_dir=config.data_dir, max_disk=config.max_disk, metrics_listen=config.metrics_listen,
            eviction=config.eviction, cluster=ClusterConfig(name=config.cluster, replicas=config.replicas),
            seeds=list(config.seeds), zeroconf=config.zeroconf, compress=config.compress,
        )
        try:
            node = Node(node_config).start()
        except OSError:
            if config.listen != DEFAULT_LISTEN:
                raise  # a port the operator chose: taken is an error, not a guess
            fallback = DEFAULT_LISTEN.rsplit(":", 1)[0] + ":0"
            log.warning("comfy-mesh: %s is taken (another ComfyUI on this host?); the embedded node takes a free "
                        "port instead (set MESH_LISTEN to choose one)", DEFAULT_LISTEN)
            node = Node(dataclasses.replace(node_config, listen=fallback)).start()
        client = LocalClient(node)
    else:
        client = RemoteClient(config.node, secret, limits, direct=config.direct, tls=tls, compress=config.compress)
    policy = Policy(traits, allow=config.allow, deny=config.deny, cache_output_nodes=config.cache_output_nodes,
                    max_value_size=config.max_value_size)

    def encode(tree: object, meta: Mapping[str, str]) -> bytearray | None:
        if not policy.allows_value(meta.get("class_type", "?"), tree):
            return None
        return codec.encode(tree, shuffle=config.shuffle, levels=True)

    bridge = Bridge(client, encode=encode, decoder=codec.StreamDecoder, lookup_timeout=config.lookup_timeout,
                    store_timeout=config.store_timeout, store_queue=config.store_queue, thread_init=torch_on_one_core,
                    skip_cheap=not config.store_cheap)
    cls = type("MeshCacheProvider", (MeshCacheProvider, base), {}) if base is not None else MeshCacheProvider
    provider = cls(bridge, policy, namespace=namespace_for(comfy_version, config.namespace),
                   cache_value=cache_value, lookup_timeout=config.lookup_timeout)
    if config.dedupe:
        holder = f"{node.node_id if node is not None else socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        provider.dedupe = Dedupe(client, provider.costs, max_wait=config.dedupe_max_wait, holder=holder,
                                 call_timeout=min(1.0, config.lookup_timeout), available=bridge.available)
    runtime = Runtime(provider, bridge, client, node, config, private=private)
    if api is not None and config.fast_keys:
        fast = FastKeys(api)
        if fast.install():
            provider.fast_keys = fast
            runtime.fast_keys = fast
    if config.identity:
        runtime.identities = provider.identities = identities_for(config, api, folder_paths, nodes)
    else:
        log.warning("comfy-mesh: MESH_IDENTITY=0: keys name model files and node packs without their contents; "
                    "hosts whose files or custom nodes differ under the same names will serve each other wrong "
                    "results")
    if node is not None and node.servicer is not None:
        node.servicer.stats_sources.append(provider.stats)
        node.metrics.watch_classes(provider.class_stats)
    else:
        runtime.start_reporting()
    return runtime


def identities_for(config: ProviderConfig, api: Any, folder_paths: Any, nodes: Any) -> KeyIdentities:
    """The identity hook over ComfyUI's key function (over the fast keys when those are installed)."""
    mappings = getattr(nodes, "NODE_CLASS_MAPPINGS", {}) if nodes is not None else {}
    packs = PackIdentities(mappings, lambda: folder_paths.get_folder_paths("custom_nodes") if folder_paths else [])
    identities = KeyIdentities(ModelFolders(folder_paths).start(), FileHashes(config.identity_cache_path()), packs,
                               mappings)
    if api is None:
        log.warning("comfy-mesh: no ComfyUI key functions to watch: nothing is shared")
    else:
        identities.install(api)
        identities.watch(folder_paths)
    return identities

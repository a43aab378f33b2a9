"""Zeroconf (mDNS/DNS-SD) discovery: nodes on one LAN find each other without a seed list.

Every node advertises `_comfy-mesh._tcp.local.` with its node id, cluster name, protocol version and cache
budget in TXT properties, and browses for the same type. Discovery only *suggests* peers: anybody on the LAN
can send an advert, so `on_found` must be treated as a hint (membership pings the address with the cluster
secret and admits the node only if that succeeds). Adverts of other clusters and our own are dropped here so
membership is not asked to ping them at all.

Threads: zeroconf runs its own asyncio loop thread and a `ServiceBrowser` thread that delivers state
changes. Resolving an instance (`get_service_info`) blocks up to its timeout, so it is not done on either of
those: every event is handed to one small worker thread, which resolves and then calls our callbacks one at a
time, in the order the events arrived (a node's `on_lost` never overtakes its `on_found`).
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import re
import socket
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import psutil
from zeroconf import IPVersion, ServiceBrowser, ServiceInfo, ServiceStateChange, Zeroconf

from mesh.address import join_hostport

log = logging.getLogger(__name__)

SERVICE_TYPE = "_comfy-mesh._tcp.local."

# RFC 6762 suggests 75 minutes for SRV/TXT/PTR; a node that crashed without goodbye packets would then stay
# "discovered" for that long. Membership does the real liveness checks, but two minutes keeps on_lost useful.
ADVERT_TTL = 120
RESOLVE_TIMEOUT_MS = 3000  # get_service_info re-asks several times within this window
MAX_LABEL = 63  # bytes in one DNS label
MAX_TXT_ENTRY = 255  # bytes in one "key=value" TXT string

_WILDCARDS = ("", "0.0.0.0", "::")
_NOT_LABEL_CHARS = re.compile(r"[^A-Za-z0-9-]+")


@dataclass(frozen=True)
class Advert:
    """What a node says about itself on the LAN. Unauthenticated: a hint, never proof."""

    node_id: str
    cluster: str
    address: str  # "host:port" usable for gRPC (IPv6 in brackets)
    protocol: int
    capacity: int  # bytes of cache budget


class MalformedAdvert(ValueError):
    """A TXT record we cannot read; such adverts are ignored, not reported."""


def instance_label(node_id: str) -> str:
    """A DNS label (<= 63 bytes, letters, digits, '-') that stays unique per node id.

    Node ids are free-form (host names with dots, ports, unicode). Where sanitizing or truncating changes the
    id, a hash of the original is appended so two ids that sanitize alike still get different instance names
    (mDNS probing would otherwise make the second node fail to register).
    """
    clean = _NOT_LABEL_CHARS.sub("-", node_id).strip("-")
    if clean == node_id and 0 < len(clean) <= MAX_LABEL:
        return clean
    digest = hashlib.sha1(node_id.encode("utf-8")).hexdigest()[:8]
    return f"{clean[:MAX_LABEL - len(digest) - 1].rstrip('-')}-{digest}".lstrip("-")


def txt_properties(*, node_id: str, cluster: str, protocol: int, capacity: int) -> dict[str, str]:
    """The TXT properties we advertise; raises ValueError if one would not fit in a TXT string."""
    props = {"id": node_id, "cluster": cluster, "proto": str(protocol), "cap": str(capacity)}
    for key, value in props.items():
        if len(f"{key}={value}".encode()) > MAX_TXT_ENTRY:
            raise ValueError(f"TXT property {key!r} is longer than {MAX_TXT_ENTRY} bytes")
    return props


def parse_advert(properties: Mapping[bytes | str, bytes | str | None], address: str) -> Advert:
    """Build an Advert from TXT properties; raises MalformedAdvert for anything we would not advertise.

    Strict on purpose: a half-understood advert (missing cluster, negative capacity) from an old or foreign
    implementation is better ignored than passed on as a candidate.
    """
    props: dict[str, str] = {}
    for key, value in properties.items():
        try:
            k = key.decode("utf-8") if isinstance(key, bytes) else key
            v = value.decode("utf-8") if isinstance(value, bytes) else value
        except UnicodeDecodeError as e:
            raise MalformedAdvert(f"TXT property is not UTF-8: {key!r}") from e
        if v is not None:
            props[k] = v
    missing = [k for k in ("id", "cluster", "proto", "cap") if k not in props]
    if missing:
        raise MalformedAdvert(f"TXT properties missing: {', '.join(missing)}")
    if not props["id"]:
        raise MalformedAdvert("empty node id")
    numbers: dict[str, int] = {}
    for key in ("proto", "cap"):
        text = props[key]
        if not text.isascii() or not text.isdigit():  # rejects "-1", "+1", " 1", "1.0", "0x10", "١"
            raise MalformedAdvert(f"TXT property {key}={text!r} is not a non-negative integer")
        numbers[key] = int(text)
    return Advert(node_id=props["id"], cluster=props["cluster"], address=address,
                  protocol=numbers["proto"], capacity=numbers["cap"])


def pick_address(addresses: list[str]) -> str | None:
    """The address to hand to gRPC: IPv4 first, then global IPv6, as advertised.

    Link-local IPv6 needs a scope id that the advert does not carry, and loopback only reaches ourselves, so
    both are used only when nothing else was advertised (loopback) or never (link-local).
    """
    parsed = []
    for text in addresses:
        try:
            parsed.append(ipaddress.ip_address(text))
        except ValueError:
            continue
    usable = [a for a in parsed if not a.is_link_local and not a.is_unspecified]
    preferred = [a for a in usable if not a.is_loopback] or usable
    preferred.sort(key=lambda a: a.version)  # stable: keeps the advertised order within a family
    return str(preferred[0]) if preferred else None


def _local_addresses(ipv6: bool) -> list[str]:
    """Non-loopback, non-link-local addresses of this machine, for a node listening on all interfaces."""
    families = (socket.AF_INET, socket.AF_INET6) if ipv6 else (socket.AF_INET,)
    found = []
    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family not in families:
                continue
            ip = ipaddress.ip_address(a.address.split("%")[0])
            if not ip.is_loopback and not ip.is_link_local:
                found.append(str(ip))
    return found


class ZeroconfDiscovery:
    """Advertise this node and report other nodes of the same cluster found via mDNS.

    `on_found(advert)` is called when a node of our cluster appears or changes its advert, `on_lost(node_id)`
    when it sends goodbye packets or its records expire. Both run on one discovery worker thread, never on
    zeroconf's own threads; exceptions they raise are logged and swallowed so discovery keeps running.
    """

    def __init__(self, *, node_id: str, cluster: str, host: str, port: int, capacity: int, protocol: int,
                 on_found: Callable[[Advert], None], on_lost: Callable[[str], None] | None = None,
                 interfaces: list[str] | None = None, advertise: bool = True) -> None:
        self.node_id = node_id
        self.cluster = cluster
        self.port = port
        self.on_found = on_found
        self.on_lost = on_lost
        self.interfaces = list(interfaces) if interfaces else None
        self.advertise = advertise
        self.properties = txt_properties(node_id=node_id, cluster=cluster, protocol=protocol, capacity=capacity)
        label = instance_label(node_id)
        self.instance_name = f"{label}.{SERVICE_TYPE}"
        self.server = f"{label}.local."
        self.host = host.strip("[]")
        self._ipv6 = ":" in self.host or any(":" in i for i in self.interfaces or [])

        self._lock = threading.Lock()
        self._zc: Zeroconf | None = None
        self._browser: ServiceBrowser | None = None
        self._info: ServiceInfo | None = None
        self._registering: threading.Thread | None = None
        self._registered = threading.Event()
        self._worker: ThreadPoolExecutor | None = None
        self._present: set[str] = set()  # instance names the browser currently sees (touched on the worker only)
        self._reported: dict[str, Advert] = {}  # instance name -> what we last passed to on_found
        self._stopped = False

    # -- lifecycle ----------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Open the mDNS sockets, start browsing, and register our advert in the background.

        Registration probes the LAN for name conflicts and then announces three times (about 1.5 s in all),
        so it runs on its own thread: a node's startup is not held up by it.
        """
        with self._lock:
            if self._zc is not None or self._stopped:
                return
            ip_version = IPVersion.All if self._ipv6 else IPVersion.V4Only
            zc = Zeroconf(interfaces=self.interfaces, ip_version=ip_version) if self.interfaces \
                else Zeroconf(ip_version=ip_version)
            try:
                addresses = self._advertised_addresses() if self.advertise else []
            except Exception:
                zc.close()  # do not leak the sockets and zeroconf's thread when the host does not resolve
                raise
            self._zc = zc
            self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mesh-discovery")
            self._browser = ServiceBrowser(zc, SERVICE_TYPE, handlers=[self._on_state_change])
            if self.advertise:
                if not addresses:
                    log.warning("zeroconf: no address to advertise for %s; peers will not be able to resolve us",
                                self.node_id)
                self._info = ServiceInfo(
                    SERVICE_TYPE, self.instance_name, port=self.port, properties=self.properties,
                    server=self.server, host_ttl=ADVERT_TTL, other_ttl=ADVERT_TTL,
                    parsed_addresses=addresses)
                self._registering = threading.Thread(target=self._register, args=(zc, self._info),
                                                     name="mesh-discovery-register", daemon=True)
                self._registering.start()
        log.info("zeroconf discovery started for %s in cluster %r (%s)", self.node_id, self.cluster,
                 f"advertising {self._info.parsed_addresses()} port {self.port}" if self._info else "browse only")

    def stop(self) -> None:
        """Say goodbye (peers drop us at once instead of after the TTL) and close; safe to call repeatedly."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            zc, browser, worker, info = self._zc, self._browser, self._worker, self._info
        if zc is None:
            return
        if browser is not None:
            browser.cancel()
        if worker is not None:
            worker.shutdown(wait=False, cancel_futures=True)
        if self._registering is not None:
            self._registering.join(timeout=5)  # unregistering a half-registered service would race it
        try:
            if info is not None and self._registered.is_set():
                zc.unregister_service(info)
        except Exception:  # the node is shutting down; a lost goodbye only delays peers' on_lost
            log.debug("zeroconf unregister failed", exc_info=True)
        finally:
            zc.close()
        log.debug("zeroconf discovery stopped for %s", self.node_id)

    def _register(self, zc: Zeroconf, info: ServiceInfo) -> None:
        try:
            zc.register_service(info)
            self._registered.set()
        except Exception:
            # NonUniqueNameException means another live node uses our node id: a configuration error that
            # membership will also see. We keep browsing; only our own advert is missing.
            if not self._stopped:
                log.exception("zeroconf: cannot advertise %s", self.instance_name)

    def _advertised_addresses(self) -> list[str]:
        """The addresses peers should dial: our host, or every interface address when listening on all."""
        if self.host not in _WILDCARDS:
            try:
                return [str(ipaddress.ip_address(self.host))]
            except ValueError:  # a host name: advertise what it resolves to
                return sorted({str(ai[4][0]) for ai in socket.getaddrinfo(self.host, self.port,
                                                                         type=socket.SOCK_STREAM)})
        if self.interfaces:
            return [i for i in self.interfaces if _is_ip(i)]
        return _local_addresses(ipv6=self.host == "::")

    # -- events -------------------------------------------------------------------------------------------------

    def _on_state_change(self, zeroconf: Zeroconf, service_type: str, name: str,
                         state_change: ServiceStateChange) -> None:
        """Runs on the ServiceBrowser thread: hand the event over, never block here."""
        worker = self._worker
        if worker is None or self._stopped:
            return
        try:
            worker.submit(self._handle, zeroconf, service_type, name, state_change)
        except RuntimeError:  # worker shut down by stop() meanwhile
            pass

    def _handle(self, zc: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange) -> None:
        try:
            if state_change is ServiceStateChange.Removed:
                self._present.discard(name)
                gone = self._reported.pop(name, None)
                if gone is not None and self.on_lost is not None:
                    self.on_lost(gone.node_id)
                return
            self._present.add(name)
            if name.lower() == self.instance_name.lower():
                return
            advert = self._resolve(zc, service_type, name)
            if advert is None or name not in self._present or self._stopped:
                return
            if self._reported.get(name) != advert:
                self._reported[name] = advert
                self.on_found(advert)
        except Exception:
            log.exception("zeroconf discovery: handling %s %s failed", state_change.name, name)

    def _resolve(self, zc: Zeroconf, service_type: str, name: str) -> Advert | None:
        """Fetch SRV/TXT/A records (usually already cached from the announcement) and vet the advert."""
        info = zc.get_service_info(service_type, name, timeout=RESOLVE_TIMEOUT_MS)
        if info is None or info.port is None:
            log.debug("zeroconf: %s did not resolve", name)
            return None
        host = pick_address(info.parsed_addresses())
        if host is None:
            log.debug("zeroconf: %s advertises no usable address (%s)", name, info.parsed_addresses())
            return None
        try:
            advert = parse_advert(info.properties, join_hostport(host, info.port))
        except MalformedAdvert as e:
            log.debug("zeroconf: ignoring %s: %s", name, e)
            return None
        if advert.cluster != self.cluster or advert.node_id == self.node_id:
            log.debug("zeroconf: ignoring %s (node %s, cluster %r)", name, advert.node_id, advert.cluster)
            return None
        return advert


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True

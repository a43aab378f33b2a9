"""HOST:PORT strings as gRPC takes them (IPv6 hosts in brackets), and which address peers can reach."""

from __future__ import annotations

import ipaddress
import socket

WILDCARDS = ("0.0.0.0", "::", "")


def split_hostport(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"not a HOST:PORT address: {address!r}")
    if not 0 <= int(port) <= 65535:
        raise ValueError(f"port {port} of {address!r} is not in 0..65535")
    return host.strip("[]"), int(port)


def with_port(address: str, default_port: int) -> str:
    """`host` becomes `host:default_port` (gRPC would otherwise dial 443); `host:port` is kept as it is."""
    host, sep, port = address.rpartition(":")
    if sep and port.isdigit() and (not host.count(":") or host.endswith("]")):
        return address
    return join_hostport(address.strip("[]"), default_port)


def routable_host() -> str | None:
    """An address of this host that peers on other hosts can dial: the first IPv4 address of an interface that
    is up and not loopback or link-local; None if there is none."""
    import psutil

    stats = psutil.net_if_stats()
    for name, addrs in sorted(psutil.net_if_addrs().items()):
        if name in stats and not stats[name].isup:
            continue
        for a in addrs:
            if a.family != socket.AF_INET:
                continue
            ip = ipaddress.ip_address(a.address)
            if not (ip.is_loopback or ip.is_link_local or ip.is_unspecified):
                return a.address
    return None


def is_loopback(host: str) -> bool:
    """Whether only this host can reach `host`: 127.0.0.0/8, ::1 or "localhost" (names are not resolved: a name
    could point anywhere)."""
    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def join_hostport(host: str, port: int | str) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

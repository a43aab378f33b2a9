"""A small LAN of Linux network namespaces for multi-host tests (needs root and iproute2).

Layout, for a lab with prefix P (unique per run) and N hosts::

    namespace P-sw:  bridge br0 (multicast snooping off) with ports p0 .. p{N-1}
    namespace P-h0:  eth0 = 10.213.X.1/24   (veth peer of p0), lo up, 224.0.0.0/4 routed via eth0
    ...
    namespace P-h{N-1}: eth0 = 10.213.X.N/24

The bridge lives in its own namespace rather than in the root one, so the machine's own network is never
touched, interface names can stay short and fixed (br0, pN, eth0: well under the 15-character limit), and
clean-up is just deleting our namespaces: the kernel then destroys the veths, the bridge and their qdiscs.

Namespace names carry the creating process's pid and start time (``cm-<pid>-<starttime>-<hex>-<role>``). A
lab whose creator is gone (a crashed or SIGKILLed run) is stale and is deleted when the next lab starts;
namespaces that do not match that pattern, or whose creator still runs, are never touched.

Usage::

    with netlab_or_skip(3) as lab:          # pytest.skip(reason) where namespaces are unavailable
        p = lab.popen(lab.hosts[0], [sys.executable, "-c", "..."], stdout=subprocess.PIPE)
        lab.link_down(lab.hosts[1])         # partition host 1; lab.link_up heals it
        lab.shape(lab.hosts[2], "100mbit")  # tc tbf both ways (netem is not available on this kernel)
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import secrets
import shutil
import signal
import subprocess
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import pytest

_NAME = re.compile(r"^cm-(\d+)-(\d+)-([0-9a-f]{4})-(sw|probe|h\d+)$")
_SUBNET = "10.213.{x}.0/24"
IP_TIMEOUT = 10.0
_NOWHERE = "02:00:5e:00:00:01"  # a locally administered MAC no host of a lab has: frames to it are dropped


@dataclass
class Host:
    name: str  # "h0", "h1", ...
    ns: str  # network namespace name, for `ip netns exec`
    addr: str  # IPv4 address on the lab subnet
    ifname: str  # the host's interface inside its namespace
    index: int = 0

    @property
    def bridge_port(self) -> str:
        """The bridge port (in the switch namespace) this host is plugged into."""
        return f"p{self.index}"


def _start_time(pid: int) -> int | None:
    """Process start time in clock ticks since boot (field 22 of /proc/PID/stat); None if no such process."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            stat = f.read()
    except OSError:
        return None
    return int(stat.rpartition(")")[2].split()[19])


def _owner_token() -> str:
    pid = os.getpid()
    return f"cm-{pid}-{_start_time(pid)}-{secrets.token_hex(2)}"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=IP_TIMEOUT)
    if check and proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def _list_namespaces() -> list[str]:
    out = _ip("netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def cleanup_stale() -> list[str]:
    """Delete namespaces of labs whose creating process is gone; returns their names. Never touches others."""
    removed = []
    for ns in _list_namespaces():
        m = _NAME.match(ns)
        if m is None:
            continue
        pid, started = int(m.group(1)), int(m.group(2))
        if _start_time(pid) == started:  # creator still running (maybe a concurrent test run)
            continue
        if _ip("netns", "del", ns, check=False).returncode == 0:
            removed.append(ns)
    return removed


@functools.lru_cache(maxsize=1)
def netns_available() -> str | None:
    """None if labs can be built here, else why not (for pytest.skip). Probes once per process."""
    if os.geteuid() != 0:
        return "needs root (ip netns, veth, bridge)"
    if shutil.which("ip") is None:
        return "iproute2 `ip` not found"
    ns = f"{_owner_token()}-probe"
    try:
        for args in (("netns", "add", ns),
                     ("-n", ns, "link", "add", "br0", "type", "bridge"),
                     ("-n", ns, "link", "add", "v0", "type", "veth", "peer", "name", "v1")):
            proc = _ip(*args, check=False)
            if proc.returncode != 0:
                return f"`ip {' '.join(args)}` failed: {proc.stderr.strip()}"
    except (OSError, subprocess.SubprocessError) as e:
        return f"cannot run ip: {e}"
    finally:
        _ip("netns", "del", ns, check=False)
    return None


class NetLab:
    """N hosts on one bridge. A context manager: everything it built is removed on exit, even on failure."""

    def __init__(self, n_hosts: int, *, subnet_octet: int | None = None) -> None:
        if not 1 <= n_hosts <= 250:
            raise ValueError("a lab has 1 to 250 hosts")
        self.n_hosts = n_hosts
        self.prefix = _owner_token()
        self.switch_ns = f"{self.prefix}-sw"
        x = subnet_octet if subnet_octet is not None else secrets.randbelow(256)
        self.subnet = _SUBNET.format(x=x)
        self.hosts = [Host(name=f"h{i}", ns=f"{self.prefix}-h{i}", addr=f"10.213.{x}.{i + 1}", ifname="eth0",
                           index=i) for i in range(n_hosts)]
        self._namespaces: list[str] = []
        self._procs: list[subprocess.Popen[Any]] = []
        self._etc: list[str] = []  # /etc/netns/NS folders we made
        self._cuts: list[tuple[Host, Host]] = []  # (host, address it cannot reach) while a `cut` holds

    # -- lifecycle ----------------------------------------------------------------------------------------------

    def __enter__(self) -> NetLab:
        cleanup_stale()
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            self.close()
        except RuntimeError as e:
            if exc is None:
                raise
            warnings.warn(f"NetLab clean-up after a failure: {e}", stacklevel=2)  # keep the original error

    def _add_ns(self, ns: str) -> None:
        _ip("netns", "add", ns)
        self._namespaces.append(ns)

    def _build(self) -> None:
        sw = self.switch_ns
        self._add_ns(sw)
        _ip("-n", sw, "link", "add", "br0", "type", "bridge", "mcast_snooping", "0")
        _ip("-n", sw, "link", "set", "br0", "up")
        for h in self.hosts:
            self._add_ns(h.ns)
            _ip("-n", sw, "link", "add", h.bridge_port, "type", "veth", "peer", "name", h.ifname, "netns", h.ns)
            _ip("-n", sw, "link", "set", h.bridge_port, "master", "br0", "up")
            _ip("-n", h.ns, "link", "set", "lo", "up")
            _ip("-n", h.ns, "addr", "add", f"{h.addr}/24", "dev", h.ifname)
            _ip("-n", h.ns, "link", "set", h.ifname, "up")
            # Without a route, multicast sends (mDNS) fail with ENETUNREACH: the namespace has no default route.
            _ip("-n", h.ns, "route", "add", "224.0.0.0/4", "dev", h.ifname)

    def close(self) -> None:
        """Stop the processes we started, then delete our namespaces (veths, bridge and qdiscs go with them)."""
        procs, self._procs = self._procs, []
        for p in procs:
            _terminate(p)
        for d in self._etc:
            shutil.rmtree(d, ignore_errors=True)
        self._etc = []
        errors = []
        for ns in reversed(self._namespaces):
            proc = _ip("netns", "del", ns, check=False)
            if proc.returncode != 0 and ns in _list_namespaces():
                errors.append(f"{ns}: {proc.stderr.strip()}")
        self._namespaces = []
        if errors:
            raise RuntimeError(f"could not delete namespaces: {'; '.join(errors)}")

    # -- running things on hosts --------------------------------------------------------------------------------

    def hosts_file(self, names: dict[str, str]) -> None:
        """Name resolution for every host: /etc/netns/NS/hosts, which `ip netns exec` puts over /etc/hosts."""
        text = "127.0.0.1 localhost\n" + "".join(f"{addr} {name}\n" for name, addr in names.items())
        for h in self.hosts:
            d = f"/etc/netns/{h.ns}"
            os.makedirs(d, exist_ok=True)
            with open(f"{d}/hosts", "w") as f:
                f.write(text)
            self._etc.append(d)

    def argv(self, host: Host, argv: list[str]) -> list[str]:
        """argv wrapped to run inside host's namespace."""
        return ["ip", "netns", "exec", host.ns, *argv]

    def popen(self, host: Host, argv: list[str], **kw: Any) -> subprocess.Popen[Any]:
        """Start argv inside host's namespace; the lab kills it on exit if the test did not.

        `ip netns exec` execs argv, so the Popen's pid (and signals sent to it) are argv's own.
        """
        return self.adopt(subprocess.Popen(self.argv(host, argv), **kw))

    def adopt(self, p: subprocess.Popen[Any]) -> subprocess.Popen[Any]:
        """Have the lab stop p on exit: for a process started with `argv(host, ...)` by someone else (a launcher)."""
        self._procs.append(p)
        return p

    def run(self, host: Host, argv: list[str], *, check: bool = True, timeout: float = 60.0,
            **kw: Any) -> subprocess.CompletedProcess[Any]:
        return subprocess.run(self.argv(host, argv), check=check, timeout=timeout, **kw)

    # -- faults and link speed ----------------------------------------------------------------------------------

    def link_down(self, host: Host) -> None:
        """Cut host off the LAN (its bridge port goes down). Its own interface, address and routes stay."""
        _ip("-n", self.switch_ns, "link", "set", host.bridge_port, "down")

    def link_up(self, host: Host) -> None:
        _ip("-n", self.switch_ns, "link", "set", host.bridge_port, "up")

    def cut(self, side_a: list[Host], side_b: list[Host], *, both_ways: bool = True) -> None:
        """Partition: every packet between the two sides is dropped silently, both ways, as a failed switch or
        firewall does (no reset, no ICMP: connections time out). Each host is told a MAC address for the other
        side's addresses that nobody has (a permanent neighbour entry), so its frames reach no one; iptables and
        tc actions are not available on this kernel. `both_ways=False`: only side_a's frames to side_b are
        dropped (a one-way fault; TCP then fails both ways between them, its handshake needs both). `heal`
        undoes it."""
        for here, there in ((side_a, side_b), (side_b, side_a)) if both_ways else ((side_a, side_b),):
            for h in here:
                for other in there:
                    _ip("-n", h.ns, "neigh", "replace", other.addr, "lladdr", _NOWHERE, "nud", "permanent",
                        "dev", h.ifname)
                    self._cuts.append((h, other))

    def heal(self) -> None:
        """Undo every `cut`: the hosts learn the real addresses again (ARP) on their next packet."""
        while self._cuts:
            h, other = self._cuts.pop()
            _ip("-n", h.ns, "neigh", "del", other.addr, "dev", h.ifname, check=False)

    def shape(self, host: Host, rate: str = "1gbit", *, burst: str = "1mb", latency: str = "10ms") -> None:
        """Limit host's link to `rate` in both directions with tc tbf (netem is not available here)."""
        if shutil.which("tc") is None:
            raise RuntimeError("tc not found")
        tbf = ["root", "tbf", "rate", rate, "burst", burst, "latency", latency]
        for ns, dev in ((host.ns, host.ifname), (self.switch_ns, host.bridge_port)):
            subprocess.run(["tc", "-n", ns, "qdisc", "replace", "dev", dev, *tbf], check=True,
                           capture_output=True, timeout=IP_TIMEOUT)

    def unshape(self, host: Host) -> None:
        for ns, dev in ((host.ns, host.ifname), (self.switch_ns, host.bridge_port)):
            subprocess.run(["tc", "-n", ns, "qdisc", "del", "dev", dev, "root"], capture_output=True,
                           timeout=IP_TIMEOUT)


def _terminate(p: subprocess.Popen[Any], grace: float = 3.0) -> None:
    if p.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=grace)
    for stream in (p.stdin, p.stdout, p.stderr):
        if stream is not None:
            with contextlib.suppress(OSError):
                stream.close()


@contextlib.contextmanager
def netlab_or_skip(n_hosts: int, **kw: Any) -> Iterator[NetLab]:
    """A NetLab, or pytest.skip with the reason where this machine cannot build one."""
    reason = netns_available()
    if reason is not None:
        pytest.skip(f"network namespaces unavailable: {reason}")
    with NetLab(n_hosts, **kw) as lab:
        yield lab

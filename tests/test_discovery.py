"""Zeroconf discovery: TXT vetting without a network, and real mDNS between network namespaces."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from zeroconf import ServiceInfo, ServiceStateChange

from mesh.membership.discovery import (SERVICE_TYPE, Advert, MalformedAdvert, ZeroconfDiscovery, instance_label,
                            parse_advert, pick_address)
from tests.conftest import poll
from tests.netns import NetLab, netlab_or_skip

REPO = Path(__file__).resolve().parent.parent
FOUND_WITHIN = 10.0
LOST_WITHIN = 5.0

GOOD = {b"id": b"node-a", b"cluster": b"alpha", b"proto": b"1", b"cap": b"1073741824"}


# -- without a network ----------------------------------------------------------------------------------------


def test_parse_advert_accepts_what_we_advertise() -> None:
    assert parse_advert(GOOD, "10.0.0.1:7000") == Advert("node-a", "alpha", "10.0.0.1:7000", 1, 1 << 30)
    as_str = {k.decode(): v.decode() for k, v in GOOD.items()} | {"extra": "ignored"}
    assert parse_advert(as_str, "[fd00::1]:7000").address == "[fd00::1]:7000"


@pytest.mark.parametrize("change", [
    {b"id": None},  # missing
    {b"id": b""},
    {b"cluster": None},
    {b"proto": None},
    {b"cap": None},
    {b"cap": b"-1"},
    {b"cap": b"1.5"},
    {b"cap": b"0x10"},
    {b"cap": b" 12"},
    {b"cap": "١٢".encode()},  # Arabic-Indic digits: str.isdigit() alone would accept them
    {b"proto": b"one"},
    {b"id": b"\xff\xfe"},  # not UTF-8
])
def test_parse_advert_rejects_malformed(change: dict[bytes, bytes | None]) -> None:
    props = {k: v for k, v in (GOOD | change).items() if v is not None}
    with pytest.raises(MalformedAdvert):
        parse_advert(props, "10.0.0.1:7000")


def test_instance_label_is_a_unique_dns_label() -> None:
    assert instance_label("node-a") == "node-a"
    a, b = instance_label("host.example:7000"), instance_label("host-example-7000")
    assert a != b and all(len(x.encode()) <= 63 for x in (a, b))
    long = instance_label("x" * 200)
    assert len(long) <= 63 and long != instance_label("x" * 199)
    assert set(instance_label("ünïcode node")) <= set("abcdefghijklmnopqrstuvwxyz0123456789-")


def test_pick_address_prefers_routable_ipv4() -> None:
    assert pick_address(["fe80::1", "fd00::5", "10.1.2.3"]) == "10.1.2.3"
    assert pick_address(["127.0.0.1", "fd00::5"]) == "fd00::5"
    assert pick_address(["fe80::1"]) is None


class _FakeZeroconf:
    """Answers get_service_info from a dict, so event handling can be tested without sockets."""

    def __init__(self, infos: dict[str, ServiceInfo]) -> None:
        self.infos = infos

    def get_service_info(self, type_: str, name: str, timeout: int = 3000) -> ServiceInfo | None:
        return self.infos.get(name)


def test_events_report_only_wellformed_adverts_of_our_cluster() -> None:
    def info(label: str, props: dict[str, str], addresses: list[str] | None = None) -> ServiceInfo:
        return ServiceInfo(SERVICE_TYPE, f"{label}.{SERVICE_TYPE}", port=7000, properties=props,
                           server=f"{label}.local.", parsed_addresses=addresses or ["10.0.0.9"])

    ok = {"id": "peer", "cluster": "alpha", "proto": "1", "cap": "5"}
    infos = {i.name: i for i in [
        info("peer", ok),
        info("me", ok | {"id": "me"}),
        info("other-cluster", ok | {"id": "stranger", "cluster": "beta"}),
        info("bad-cap", ok | {"id": "bad", "cap": "lots"}),
        info("no-id", {"cluster": "alpha", "proto": "1", "cap": "5"}),
        info("link-local-only", ok | {"id": "ll"}, ["fe80::1"]),
    ]}
    found: list[Advert] = []
    lost: list[str] = []
    d = ZeroconfDiscovery(node_id="me", cluster="alpha", host="10.0.0.1", port=7000, capacity=1, protocol=1,
                          on_found=found.append, on_lost=lost.append)
    zc: Any = _FakeZeroconf(infos)
    for name in [*infos, f"unresolvable.{SERVICE_TYPE}"]:
        d._handle(zc, SERVICE_TYPE, name, ServiceStateChange.Added)
    assert found == [Advert("peer", "alpha", "10.0.0.9:7000", 1, 5)]
    d._handle(zc, SERVICE_TYPE, f"peer.{SERVICE_TYPE}", ServiceStateChange.Updated)  # unchanged: not again
    assert len(found) == 1
    for name in infos:
        d._handle(zc, SERVICE_TYPE, name, ServiceStateChange.Removed)
    assert lost == ["peer"]  # only nodes we reported are reported lost


def test_callback_exceptions_do_not_escape(caplog: pytest.LogCaptureFixture) -> None:
    def boom(advert: Advert) -> None:
        raise RuntimeError("callback bug")

    d = ZeroconfDiscovery(node_id="me", cluster="alpha", host="10.0.0.1", port=7000, capacity=1, protocol=1,
                          on_found=boom)
    name = f"peer.{SERVICE_TYPE}"
    zc: Any = _FakeZeroconf({name: ServiceInfo(SERVICE_TYPE, name, port=1, server="peer.local.",
                                               properties={"id": "p", "cluster": "alpha", "proto": "1",
                                                           "cap": "1"}, parsed_addresses=["10.0.0.2"])})
    d._handle(zc, SERVICE_TYPE, name, ServiceStateChange.Added)
    assert "callback bug" in caplog.text


# -- real mDNS between namespaces -----------------------------------------------------------------------------

CHILD = r"""
import dataclasses, json, signal, sys, threading, time
from mesh.membership.discovery import ZeroconfDiscovery

node_id, cluster, addr, port, cap = sys.argv[1:6]
out = threading.Lock()
def emit(**kw):
    with out:
        print(json.dumps(kw), flush=True)

stop = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: stop.set())
d = ZeroconfDiscovery(node_id=node_id, cluster=cluster, host=addr, port=int(port), capacity=int(cap), protocol=1,
                      on_found=lambda a: emit(event="found", **dataclasses.asdict(a)),
                      on_lost=lambda n: emit(event="lost", node_id=n), interfaces=[addr])
t0 = time.monotonic()
d.start()
emit(event="started", seconds=time.monotonic() - t0)
stop.wait(60)  # bounded: an orphaned child still goes away
t0 = time.monotonic()
d.stop()
emit(event="stopped", seconds=time.monotonic() - t0)
"""


@dataclass
class Node:
    node_id: str
    cluster: str
    address: str
    capacity: int
    proc: subprocess.Popen[str]
    stderr: Path
    events: list[dict[str, Any]] = field(default_factory=list)  # appended by the reader thread

    def read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            event = json.loads(line) | {"t": time.monotonic()}
            self.events.append(event)

    def found(self) -> dict[str, dict[str, Any]]:
        return {e["node_id"]: e for e in list(self.events) if e["event"] == "found"}

    def lost(self) -> set[str]:
        return {e["node_id"] for e in list(self.events) if e["event"] == "lost"}

    def log(self) -> str:
        return f"{self.node_id} events={self.events}\nstderr:\n{self.stderr.read_text()[-3000:]}"


def _start(lab: NetLab, i: int, cluster: str, tmp: Path) -> Node:
    host = lab.hosts[i]
    node_id, port, cap = f"node-{i}", 7000 + i, (i + 1) * 1_000_000_000
    stderr = tmp / f"{node_id}.stderr"
    proc = lab.popen(host, [sys.executable, "-c", CHILD, node_id, cluster, host.addr, str(port), str(cap)],
                     cwd=REPO, stdout=subprocess.PIPE, stderr=stderr.open("w"), text=True)
    node = Node(node_id, cluster, f"{host.addr}:{port}", cap, proc, stderr)
    threading.Thread(target=node.read, daemon=True).start()
    return node


def _wait(what: str, cond: Callable[[], bool], nodes: list[Node], timeout: float) -> float:
    """Poll cond() until true; returns the seconds it took, fails with every node's log otherwise."""
    t0 = time.monotonic()
    try:
        poll(cond, what, timeout=timeout)
    except TimeoutError:
        pytest.fail(f"{what} not within {timeout} s\n" + "\n".join(n.log() for n in nodes))
    return time.monotonic() - t0


@pytest.mark.netns
@pytest.mark.timeout(60)
def test_discovery_across_namespaces(tmp_path: Path) -> None:
    with netlab_or_skip(5) as lab:
        nodes: list[Node] = []
        try:
            for i, cluster in enumerate(["alpha", "alpha", "alpha", "beta", "beta"]):
                nodes.append(_start(lab, i, cluster, tmp_path))
            alpha, beta = nodes[:3], nodes[3:]

            def all_found() -> bool:
                return all(set(n.found()) >= {m.node_id for m in group if m is not n}
                           for group in (alpha, beta) for n in group)

            took = _wait("every node finding the others of its cluster", all_found, nodes, FOUND_WITHIN)
            print(f"full discovery of 3+2 nodes took {took:.2f} s")
            for n in nodes:
                starts = [e["seconds"] for e in n.events if e["event"] == "started"]
                assert starts and starts[0] < 2.0, n.log()
                group = alpha if n in alpha else beta
                expected = {m.node_id: {"event": "found", "node_id": m.node_id, "cluster": m.cluster,
                                        "address": m.address, "protocol": 1, "capacity": m.capacity}
                            for m in group if m is not n}
                # Beta's adverts demonstrably reached the LAN (beta nodes found each other), yet no alpha node
                # reports them, and no node reports itself.
                got = {k: {f: v for f, v in e.items() if f != "t"} for k, e in n.found().items()}
                assert got == expected, n.log()

            victim, survivors = alpha[0], alpha[1:]
            t_term = time.monotonic()
            victim.proc.send_signal(signal.SIGTERM)
            assert victim.proc.wait(timeout=5) == 0, victim.log()
            _wait(f"{victim.node_id} reported lost", lambda: all(victim.node_id in n.lost()
                                                                       for n in survivors), nodes, LOST_WITHIN)
            stops = [e["seconds"] for e in victim.events if e["event"] == "stopped"]
            took = max(e["t"] for n in survivors for e in n.events if e["event"] == "lost") - t_term
            print(f"on_lost {took:.2f} s after SIGTERM (stop() took {stops[0]:.2f} s)")
            assert all(n.lost() == {victim.node_id} for n in survivors)
            assert not any(n.lost() for n in beta), [n.log() for n in beta]
        finally:
            for n in nodes:
                if n.proc.poll() is None:
                    n.proc.kill()
                    n.proc.wait(timeout=5)

"""Who wrote what (BlobHeader.writers), purge by writer, and revoking one member of a mutual-TLS mesh without
rotating its secret (mesh/transport/revocation.py). Real `mesh serve` processes on 127.0.0.1."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import grpc
import pytest

from mesh.pb import mesh_pb2 as pb
from mesh.transport.peer import MeshError, PeerClient, Refused
from mesh.transport.tls import TlsConfig, init_tls, load_tls
from mesh.transport.wire import Limits, iter_chunks, make_header
from tests.conftest import SECRET, free_port, poll
from tests.support.cli import run_cli
from tests.support.serve import ServeProcess


def tls_args(d: Path, name: str) -> list[str]:
    return ["--tls-cert", str(d / f"{name}.pem"), "--tls-key", str(d / f"{name}-key.pem"), "--tls-ca", str(d / "ca.pem")]


def cert(d: Path, name: str) -> TlsConfig:
    config = load_tls(str(d / f"{name}.pem"), str(d / f"{name}-key.pem"), str(d / "ca.pem"), env={})
    assert config is not None
    return config


def writers(address: str, tls: TlsConfig, key: str) -> tuple[str, ...] | None:
    with PeerClient(address, SECRET, tls=tls) as c:
        found = [k for k in c.list_keys(prefix=key) if k.key == key]
    return tuple(found[0].writers) if found else None


def alive(address: str, tls: TlsConfig) -> set[str]:
    with PeerClient(address, SECRET, tls=tls) as c:
        return {m.node_id for m in c.stats().members if m.state == pb.ALIVE}


def state_of(address: str, tls: TlsConfig, node_id: str) -> int | None:
    with PeerClient(address, SECRET, tls=tls) as c:
        return next((m.state for m in c.stats().members if m.node_id == node_id), None)


@pytest.fixture
def certs(tmp_path: Path) -> Path:
    d = tmp_path / "tls"
    init_tls(d, ["a", "b", "c", "m"])
    return d


def test_a_value_names_who_took_it_and_every_member_that_handed_it_on(serve: Callable[..., ServeProcess],
                                                                       certs: Path) -> None:
    a = serve("--node-id", "a", pre=tls_args(certs, "a"))
    b = serve("--node-id", "b", "--seeds", a.address, pre=tls_args(certs, "b"))
    client = cert(certs, "client")
    poll(lambda: alive(a.address, client) == alive(b.address, client) == {"a", "b"}, "a and b formed a mesh")
    with PeerClient(a.address, SECRET, tls=client) as c:
        c.put("k", b"v" * 1000)
    # The client's certificate, then the member that took the write; b's copy came from a, already named.
    for node in (a, b):
        poll(lambda node=node: writers(node.address, client, "k") == ("comfy-mesh client", "a"), "provenance")
    # A member that lies about where a copy came from is still named in it: m claims "a" wrote this.
    evil = b"EVIL" * 100
    header = replace(make_header("lie", evil, Limits().chunk_size), writers=("a",) * 40, write_id=5)
    with PeerClient(b.address, SECRET, tls=cert(certs, "m")) as m:
        assert m.put_chunks(header, tuple(iter_chunks(evil, Limits().chunk_size)), local_only=True).stored
    got = writers(b.address, client, "lie")
    assert got is not None and got[-1] == "m" and len(got) == 16  # the newest kept, the sender always added
    # `mesh purge --writer m` deletes it on every member; what others wrote stays.
    env = dict(MESH_TLS_CERT=str(certs / "client.pem"), MESH_TLS_KEY=str(certs / "client-key.pem"),
               MESH_TLS_CA=str(certs / "ca.pem"), MESH_SECRET=SECRET.decode())
    out = run_cli("purge", "--writer", "m", node=a.address, env=env, timeout=30)
    assert out.returncode == 0 and "purged 1 value written by m" in out.stdout, out.stdout + out.stderr
    assert writers(b.address, client, "lie") is None and writers(b.address, client, "k") is not None
    with PeerClient(b.address, SECRET, tls=cert(certs, "m")) as m:  # and the purged write cannot come back
        assert not m.put_chunks(header, tuple(iter_chunks(evil, Limits().chunk_size)), local_only=True).stored
    # A member that cannot be asked (down, cut off) is named, and the purge does not claim success.
    b.kill()
    poll(lambda: state_of(a.address, client, "b") == pb.DEAD, "a holds b DEAD")  # out of the ring, still known
    out = run_cli("--timeout", "20", "purge", "--writer", "m", node=a.address, env=env, timeout=30)
    assert out.returncode == 1 and "did not answer" in out.stderr and "b" in out.stderr, out.stdout + out.stderr


def test_a_revoked_member_is_refused_everything_and_what_it_wrote_goes(serve: Callable[..., ServeProcess],
                                                                       certs: Path, tmp_path: Path) -> None:
    port = free_port()
    data = tmp_path / "a-data"
    base = ("--node-id", "a", "--listen", f"127.0.0.1:{port}", "--data-dir", str(data))
    a = serve(*base, pre=tls_args(certs, "a"))
    client = cert(certs, "client")
    with PeerClient(a.address, SECRET, tls=cert(certs, "m")) as m:
        m.put("from-m", b"m" * 1000)
    with PeerClient(a.address, SECRET, tls=client) as c:
        c.put("from-client", b"c" * 1000)
    assert writers(a.address, client, "from-m") == ("m", "a")
    a.kill()
    a = serve(*base, "--revoke", "m", pre=tls_args(certs, "a"))  # revoked: no new secret, no new CA
    assert writers(a.address, client, "from-m") is None  # dropped at start: m wrote it
    assert writers(a.address, client, "from-client") == ("comfy-mesh client", "a")
    with PeerClient(a.address, SECRET, tls=cert(certs, "m"), timeout=5) as m:
        for call in (m.stats, lambda: m.get("from-client"), lambda: m.put("again", b"x")):
            with pytest.raises(MeshError) as e:
                call()
            assert e.value.code == grpc.StatusCode.PERMISSION_DENIED and "'m' is revoked" in str(e.value)
    # A value handed on by anyone else that names m in its provenance is refused too.
    value = b"laundered" * 100
    header = replace(make_header("laundered", value, Limits().chunk_size), writers=("m",), write_id=9)
    with PeerClient(a.address, SECRET, tls=client) as c:
        with pytest.raises(Refused) as refused:
            c.put_chunks(header, tuple(iter_chunks(value, Limits().chunk_size)), local_only=True)
        assert refused.value.code == grpc.StatusCode.PERMISSION_DENIED
    # m cannot join: its Hello and Ping are refused, so a never counts it as a member.
    m_node = serve("--node-id", "m", "--seeds", a.address, pre=tls_args(certs, "m"))
    with PeerClient(m_node.address, SECRET, tls=client) as c:
        c.stats()  # m is up, and trying
    assert alive(a.address, client) == {"a"}
    assert alive(m_node.address, client) == {"m"}
    # Mid-way through a rolling revocation b does not refuse m yet, and gossips it to a: a still routes no key
    # to m (its ring leaves m out) and never dials it for a value.
    b = serve("--node-id", "b", "--seeds", f"{a.address},{m_node.address}", pre=tls_args(certs, "b"))
    poll(lambda: alive(b.address, client) == {"a", "b", "m"} and "m" in alive(a.address, client),
         "b admitted m and a heard of it")
    with PeerClient(a.address, SECRET, tls=client) as c:
        assert c.stats().counters["ring_members"] == 2
    # A node id is only a claim: m under another id, gossiped by b and dialled by a as a seed, shows m's
    # certificate at its address, so a keeps it out of the ring and routes it nothing.
    evil = serve("--node-id", "evil", "--seeds", b.address, pre=tls_args(certs, "m"))
    c_node = serve("--node-id", "c", "--seeds", f"{evil.address},{b.address}", "--revoke", "m",
                   pre=tls_args(certs, "c"))
    poll(lambda: all("evil" in alive(n.address, client) for n in (a, b, c_node)), "evil heard of on every node")
    poll(lambda: {"a", "b", "c"} <= alive(c_node.address, client) and "c" in alive(a.address, client),
         "c joined")
    for node in (a, c_node):
        with PeerClient(node.address, SECRET, tls=client) as cl:
            assert cl.stats().counters["ring_members"] == 3  # a, b and c: neither m nor "evil"
            for i in range(20):
                cl.put(f"spread/{node.node_id}/{i}", b"v" * 100)
    with PeerClient(evil.address, SECRET, tls=client) as cl:
        handed_by_flagged = [k.key for k in cl.list_keys(prefix="spread/") if k.writers and k.writers[-1] in ("a", "c")]
    assert handed_by_flagged == []


def test_revoking_without_mutual_tls_or_under_another_name_is_refused_at_start(secret_file: Path,
                                                                                 certs: Path) -> None:
    out = run_cli("--secret-file", str(secret_file), "serve", "--revoke", "m", timeout=30)
    assert out.returncode == 2 and "--revoke needs mutual TLS" in out.stderr, out.stderr
    out = run_cli("--secret-file", str(secret_file), *tls_args(certs, "a"), "serve", "--listen", "127.0.0.1:0",
                  "--node-id", "not-a", "--revoke", "m", timeout=30)
    assert out.returncode == 2 and "must be its certificate's name ('a'" in out.stderr, out.stderr


def test_with_revoke_the_default_node_id_is_the_certificates_name(serve: Callable[..., ServeProcess],
                                                                  certs: Path) -> None:
    """The random default id (issue 22) would never match the certificate: a node with --revoke and no
    --node-id runs under its certificate's name, the only id its peers admit it under."""
    a = serve("--listen", "127.0.0.1:0", "--revoke", "m", pre=tls_args(certs, "a"))
    assert a.node_id == "a"

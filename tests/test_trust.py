"""Trust on a real network, tried as an attacker would: real `mesh serve` processes on 127.0.0.1.

Each test answers one finding of the trust issue: a host without the secret that answers pings, harvested and
replayed proofs, malformed proofs, resource bombs (meta, concurrent puts, silent streams), long keys, terminal
injection through keys, TLS and secret rotation. Every wait is a bounded poll; absences are asserted only
next to a positive proof that the thing being absent had its chance (the rogue was contacted, the puts landed).
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import psutil
import pytest

from mesh.transport.auth import METADATA_KEY, STALE, ClientAuth, Keyring, ServerAuth, key_id
from mesh.pb import mesh_pb2 as pb
from mesh.pb import mesh_pb2_grpc as pb_grpc
from mesh.transport.peer import PeerClient, Refused, Unauthenticated, Unreachable
from mesh.transport.tls import init_tls, load_tls
from mesh.transport.wire import SERVICE, KiB, Limits, MiB, make_header
from tests.rogue import Relay, Rogue
from tests.conftest import SECRET, free_port, poll, token_metadata
from tests.support.cli import run_cli
from tests.support.serve import ServeProcess





def alive_ids(address: str, secret: bytes = SECRET) -> set[str]:
    with PeerClient(address, secret, timeout=5) as c:
        return {m.node_id for m in c.stats().members if m.state == pb.ALIVE}


@pytest.fixture
def rogue() -> Iterator[Rogue]:
    r = Rogue().start()
    yield r
    r.stop()


def test_a_host_without_the_secret_is_never_admitted_and_never_serves(
        serve: Callable[..., ServeProcess], rogue: Rogue) -> None:
    """The rogue is a seed of both nodes (as a zeroconf advert would make it a candidate): they contact it, it
    cannot prove the secret, and it neither receives a put nor answers a get, while the two real nodes share."""
    a = serve("--seeds", rogue.address, "--node-id", "a")
    b = serve("--seeds", f"{a.address},{rogue.address}", "--node-id", "b")
    poll(lambda: alive_ids(a.address) == {"a", "b"} and alive_ids(b.address) == {"a", "b"}, "a and b see each other")
    poll(lambda: rogue.hellos >= 2 and "not admitting " + rogue.address in a.log()
         and "not admitting " + rogue.address in b.log(), "both nodes tried the rogue and refused it")
    values = {f"k{i}": os.urandom(3000 + i) for i in range(30)}
    with PeerClient(a.address, SECRET) as ca, PeerClient(b.address, SECRET) as cb:
        for i, (key, value) in enumerate(values.items()):
            (ca if i % 2 else cb).put(key, value)
        for key, value in values.items():
            assert ca.get(key).data == value and cb.get(key).data == value  # type: ignore[union-attr]
        assert ca.get("never-stored") is None and cb.has(["never-stored"]) == [False]
        for c in (ca, cb):
            ids = {m.node_id for m in c.stats().members}
            assert ids == {"a", "b"}, ids
    assert rogue.puts == 0 and rogue.gets == 0
    assert rogue.proofs == []  # a host that cannot prove the secret is never sent a call proof to harvest


def test_a_client_refuses_a_node_that_cannot_prove_the_secret(rogue: Rogue) -> None:
    with PeerClient(rogue.address, SECRET, timeout=5) as c:
        with pytest.raises(Unauthenticated, match="did not prove"):
            c.get("k")
        with pytest.raises(Unauthenticated):
            c.put("k", b"v")
    assert rogue.hellos == 2 and rogue.gets == 0 and rogue.puts == 0 and rogue.proofs == []


# -- proofs: replay, binding, malformed ---------------------------------------------------------------------------

def _stats(address: str, metadata: tuple[tuple[str, str], ...]) -> grpc.StatusCode | str:
    channel = grpc.insecure_channel(address)
    try:
        return pb_grpc.MeshStub(channel).Stats(pb.StatsRequest(), timeout=5, metadata=metadata).node_id
    except grpc.RpcError as e:
        return e.code()
    finally:
        channel.close()


def _drain(address: str, metadata: tuple[tuple[str, str], ...]) -> grpc.StatusCode:
    channel = grpc.insecure_channel(address)
    try:
        pb_grpc.MeshStub(channel).Drain(pb.DrainRequest(), timeout=5, metadata=metadata)
        return grpc.StatusCode.OK
    except grpc.RpcError as e:
        return e.code()
    finally:
        channel.close()


def test_a_proof_works_once_for_one_method_on_one_node(serve: Callable[..., ServeProcess]) -> None:
    a = serve("--node-id", "a")
    b = serve("--node-id", "b")
    seen = token_metadata(a.address, "Stats")
    assert _stats(a.address, seen) == "a"
    assert _stats(a.address, seen) == grpc.StatusCode.UNAUTHENTICATED          # replayed to the same node
    fresh_for_a = token_metadata(a.address, "Stats")
    assert _stats(b.address, fresh_for_a) == grpc.StatusCode.UNAUTHENTICATED   # replayed to another node
    ping_proof = token_metadata(b.address, "Ping")
    assert _drain(b.address, ping_proof) == grpc.StatusCode.UNAUTHENTICATED    # used for another method
    with PeerClient(b.address, SECRET) as c:
        assert c.health() == "SERVING" and c.stats().node_id == "b"  # b was not drained
    assert "replayed proof" in a.log()  # the first refusal on a is logged with its reason


def test_proofs_of_a_node_before_its_restart_are_stale_and_clients_recover(
        serve: Callable[..., ServeProcess]) -> None:
    port = free_port()
    first = serve("--listen", f"127.0.0.1:{port}", "--node-id", "x")
    old = token_metadata(first.address, "Stats")
    with PeerClient(first.address, SECRET, timeout=10) as client:
        client.put("before", b"1")
        entry_chunks = tuple(make_chunks(b"restart-proof" * 1000))
        first.stop(signal.SIGKILL)
        second = serve("--listen", f"127.0.0.1:{port}", "--node-id", "x")
        assert _stats(second.address, old) == grpc.StatusCode.UNAUTHENTICATED
        # The same client, whose session died with the old process: it says Hello again, once, by itself.
        assert client.stats().node_id == "x"
        header = make_header("after", b"restart-proof" * 1000, Limits().chunk_size)
        assert client.put_chunks(header, entry_chunks).stored
        assert client.get("after").data == b"restart-proof" * 1000  # type: ignore[union-attr]


def make_chunks(data: bytes) -> list:  # type: ignore[type-arg]
    from mesh.transport.wire import iter_chunks

    return list(iter_chunks(data, Limits().chunk_size))


def test_stale_session_is_renewed_for_every_kind_of_call(serve: Callable[..., ServeProcess]) -> None:
    port = free_port()
    first = serve("--listen", f"127.0.0.1:{port}", "--node-id", "x")
    data = b"value" * 100
    with PeerClient(first.address, SECRET, timeout=10) as client:
        client.put("k", data)
        for call in (lambda: client.get("k"), lambda: client.has(["k"]), lambda: client.list_keys(),
                     lambda: client.delete(["nothing"]), lambda: client.stats()):
            first.stop(signal.SIGKILL)
            first = serve("--listen", f"127.0.0.1:{port}", "--node-id", "x")
            call()  # raises if the stale session is not renewed
        header = make_header("k2", data, Limits().chunk_size)
        first.stop(signal.SIGKILL)
        first = serve("--listen", f"127.0.0.1:{port}", "--node-id", "x")
        assert client.put_chunks(header, tuple(make_chunks(data))).stored


@pytest.mark.parametrize("value", [
    "", "garbage", "a.b.c.d", "x" * 5000, f"{key_id(SECRET)}.s.{'9' * 400}.00",
    f"{key_id(SECRET)}.s.-1.00", f"{key_id(SECRET)}.{'s' * 200}.1.{'0' * 64}"
], ids=["empty", "garbage", "dots", "huge", "400-digit-counter", "negative", "long-session"])
def test_malformed_proofs_are_refused_without_a_traceback(serve: Callable[..., ServeProcess], value: str) -> None:
    node = serve()
    md = ((METADATA_KEY, value),)
    for _ in range(30):
        assert _stats(node.address, md) == grpc.StatusCode.UNAUTHENTICATED
    with PeerClient(node.address, SECRET) as c:
        assert c.stats().node_id == node.node_id
    log = node.log()
    assert "Traceback" not in log
    assert 1 <= log.count("refused a call from") <= 2  # one rate-limited warning naming the peer, not 30
    assert "127.0.0.1" in log.split("refused a call from", 1)[1].splitlines()[0]


def test_replay_window_unit() -> None:
    """The node side alone: counters out of order are fine, a repeat is not, the window slides."""
    auth = ServerAuth(Keyring([SECRET]), node_id="n")
    client = ClientAuth(Keyring([SECRET]))
    md = [client.metadata("/m", auth.hello)[0][1] for _ in range(5)]
    for value in reversed(md):
        assert auth.check("/m", value) is None
    assert all(auth.check("/m", v) == "replayed proof" for v in md)
    assert auth.check("/other", client.metadata("/m", auth.hello)[0][1]) == "wrong cluster secret"
    late = [client.metadata("/m", auth.hello)[0][1] for _ in range(5000)]
    assert auth.check("/m", late[-1]) is None
    assert auth.check("/m", late[0]) == "replayed proof"  # fell out of the window: refused, never accepted twice


def test_sessions_expire_and_evicted_sessions_are_stale() -> None:
    now = [0.0]
    auth = ServerAuth(Keyring([SECRET]), node_id="n", ttl=60, max_sessions=2, clock=lambda: now[0])
    clients = [ClientAuth(Keyring([SECRET])) for _ in range(3)]
    first = []
    for c in clients:  # minted a second apart
        now[0] += 1.0
        first.append(c.metadata("/m", auth.hello)[0][1])
    assert auth.check("/m", first[0]) is None and auth.check("/m", first[1]) is None
    assert auth.check("/m", first[2]) is None  # a third session evicts the oldest...
    assert auth.check("/m", clients[0].metadata("/m", auth.hello)[0][1]) == STALE  # ...which is then stale
    now[0] = 64.0
    assert auth.check("/m", clients[2].metadata("/m", auth.hello)[0][1]) == STALE  # past its TTL


# -- resources ---------------------------------------------------------------------------------------------------

def test_meta_bomb_is_refused_and_meta_counts_against_the_budget(serve: Callable[..., ServeProcess]) -> None:
    node = serve("--max-memory", "8MiB")
    with PeerClient(node.address, SECRET) as c:
        with pytest.raises(Refused) as e:
            c.put("bomb", b"", meta={"m": "x" * (15 * MiB)})
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
        meta = {f"m{i}": "x" * 250 for i in range(60)}  # 15 KiB: within the limit
        for i in range(2000):
            c.put(f"meta/{i}", b"", meta=meta)
        counters = c.stats().counters
    assert counters["bytes_used"] <= 8 * MiB and counters["evictions"] > 1000  # 2000 x 15 KiB = 30 MiB: evicted
    assert psutil.Process(node.process.pid).memory_info().rss < 300 * MiB


def _rss_sampler(pid: int, stop: threading.Event, peak: list[int]) -> None:
    """Sample a process's RSS every 10 ms until `stop` is set: the peak a put burst reaches."""
    proc = psutil.Process(pid)
    while True:
        peak[0] = max(peak[0], proc.memory_info().rss)
        if stop.wait(0.01):
            return


def test_concurrent_puts_cannot_overrun_the_node(serve: Callable[..., ServeProcess]) -> None:
    """16 x 40 MiB incompressible puts on a 64 MiB node: once 882 MiB RSS; now bounded by budget + in-flight."""
    node = serve("--max-memory", "64MiB")
    base = psutil.Process(node.process.pid).memory_info().rss
    value = os.urandom(40 * MiB)
    stop, peak = threading.Event(), [base]
    sampler = threading.Thread(target=_rss_sampler, args=(node.process.pid, stop, peak))
    sampler.start()
    outcomes: list[str] = []

    def put(i: int) -> None:
        with PeerClient(node.address, SECRET, timeout=60) as c:
            try:
                c.put(f"big/{i}", value, compress=False)
                outcomes.append("stored")
            except Refused as e:
                outcomes.append(e.code.name if e.code else "refused")

    try:
        threads = [threading.Thread(target=put, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    finally:
        stop.set()
        sampler.join()
    assert len(outcomes) == 16 and "stored" in outcomes and "RESOURCE_EXHAUSTED" in outcomes, outcomes
    grown = (peak[0] - base) / MiB
    assert grown < 350, f"RSS grew by {grown:.0f} MiB"  # budget 64 + in flight 64 + 16 chunks and gRPC buffers
    with PeerClient(node.address, SECRET) as c:
        counters = c.stats().counters
        assert counters["inflight_bytes"] == 0 and counters["bytes_used"] <= 64 * MiB


def _silent_requests(release: threading.Event, first: list[bytes]) -> Iterator[bytes]:
    yield from first
    release.wait(60)


def test_silent_streams_cannot_starve_health_or_stats(serve: Callable[..., ServeProcess]) -> None:
    """40 authenticated puts that never send a header, and 8 that stop after the header: each ends with a clean
    status, while health, Stats and a real put keep answering."""
    node = serve("--header-timeout", "2", "--idle-timeout", "2")
    release = threading.Event()
    header = pb.PutRequest(header=make_header("idle", b"x" * (3 * MiB), 1 * MiB).to_pb()).SerializeToString()
    codes: list[grpc.StatusCode] = []
    channel = grpc.insecure_channel(node.address)
    stub = channel.stream_unary(f"/{SERVICE}/Put", request_serializer=None,
                                response_deserializer=pb.PutReply.FromString)

    def silent(first: list[bytes]) -> None:
        try:
            stub(_silent_requests(release, first), timeout=60, metadata=token_metadata(node.address, "Put"))
            codes.append(grpc.StatusCode.OK)
        except grpc.RpcError as e:
            codes.append(e.code())

    threads = [threading.Thread(target=silent, args=([] if i < 40 else [header],)) for i in range(48)]
    try:
        for t in threads:
            t.start()
        with PeerClient(node.address, SECRET, timeout=2) as c:
            for _ in range(10):  # while the streams are open
                assert c.health(timeout=2) == "SERVING"
                assert c.stats(timeout=2).node_id == node.node_id
        for t in threads:
            t.join(timeout=30)
        assert len(codes) == 48
        assert set(codes) <= {grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.CANCELLED}, codes
        assert codes.count(grpc.StatusCode.CANCELLED) >= 8  # the admitted ones were cut by the watchdog
        with PeerClient(node.address, SECRET) as c:
            c.put("after", b"works")
            counters = c.stats().counters
            assert counters["stalled_streams"] >= 8 and counters["inflight_bytes"] == 0
    finally:
        release.set()
        channel.close()


def test_a_reader_that_stops_reading_is_cut_off(serve: Callable[..., ServeProcess]) -> None:
    node = serve("--idle-timeout", "1", "--max-memory", "256MiB")
    with PeerClient(node.address, SECRET) as c:
        c.put("big", os.urandom(64 * MiB), compress=False)
        channel = grpc.insecure_channel(node.address)
        try:
            call = pb_grpc.MeshStub(channel).Get(pb.GetRequest(key="big"), timeout=60,
                                                 metadata=token_metadata(node.address, "Get"))
            assert next(call).HasField("header")
            poll(lambda: c.stats().counters["stalled_streams"] >= 1, "the watchdog cut the silent reader")
            with pytest.raises(grpc.RpcError) as e:
                for _ in call:
                    pass
            assert e.value.code() == grpc.StatusCode.CANCELLED
        finally:
            channel.close()
        assert len(c.get("big").data) == 64 * MiB  # type: ignore[union-attr]


def test_a_client_refuses_a_value_above_its_maximum_before_allocating(serve: Callable[..., ServeProcess]) -> None:
    node = serve()
    with PeerClient(node.address, SECRET) as c:
        c.put("zeros", bytes(8 * MiB))  # lz4 shrinks it to ~32 KiB on the wire
    with PeerClient(node.address, SECRET, limits=Limits(max_blob_size=1 * MiB)) as small:
        with pytest.raises(Refused) as e:
            small.get("zeros")
        assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "exceeds max blob size" in str(e.value)


# -- keys ----------------------------------------------------------------------------------------------------------

def test_one_key_limit_for_every_rpc_and_no_echo(serve: Callable[..., ServeProcess]) -> None:
    node = serve()
    long_key = "k" * (16 * KiB)
    with PeerClient(node.address, SECRET) as c:
        assert c.get(long_key) is None  # a miss: no node stores such a key
        with pytest.raises(Refused) as e:
            c.put(long_key, b"v")
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
        ok_key = "é" * 512  # 1,024 bytes in UTF-8: the limit is in bytes
        c.put(ok_key, b"v")
        assert c.get(ok_key).data == b"v"  # type: ignore[union-attr]
    channel = grpc.insecure_channel(node.address)
    stub = pb_grpc.MeshStub(channel)
    try:
        for name, call in {
            "Get": lambda md: list(stub.Get(pb.GetRequest(key=long_key), timeout=5, metadata=md)),
            "Has": lambda md: stub.Has(pb.HasRequest(keys=["a", long_key]), timeout=5, metadata=md),
            "Delete": lambda md: stub.Delete(pb.DeleteRequest(keys=[long_key]), timeout=5, metadata=md),
        }.items():
            with pytest.raises(grpc.RpcError) as err:
                call(token_metadata(node.address, name))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert len(err.value.details()) < 200
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Get(pb.GetRequest(key="m" * 1000), timeout=5, metadata=token_metadata(node.address, "Get")))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND and len(err.value.details()) < 200
    finally:
        channel.close()


def test_cli_prints_keys_without_terminal_escapes_or_markup(serve: Callable[..., ServeProcess],
                                                            secret_file: Path) -> None:
    node = serve()
    evil = "\x1b]0;owned\x07\x1b[31mred[bold]loud[/bold]\u009b2J"
    with PeerClient(node.address, SECRET) as c:
        c.put(evil, b"v", meta={"note": "\x1b[2J[link=http://x]y[/link]"})
    out = run_cli("keys", node=node.address, secret_file=secret_file, env={"COLUMNS": "300"}, timeout=30)
    assert out.returncode == 0, out.stderr
    assert "\x1b" not in out.stdout and "\x07" not in out.stdout and "\u009b" not in out.stdout
    assert "[bold]loud[/bold]" in out.stdout and "\\x1b]0;owned\\x07" in out.stdout


# -- TLS and rotation ----------------------------------------------------------------------------------------------

def _tls_args(d: Path, name: str) -> list[str]:
    return ["--tls-cert", str(d / f"{name}.pem"), "--tls-key", str(d / f"{name}-key.pem"), "--tls-ca", str(d / "ca.pem")]


def test_a_tls_mesh_shares_and_refuses_plaintext_and_strangers(serve: Callable[..., ServeProcess],
                                                              tmp_path: Path) -> None:
    certs = tmp_path / "tls"
    init_tls(certs, ["a", "b"])
    a = serve("--node-id", "a", pre=_tls_args(certs, "a"))
    b = serve("--node-id", "b", "--seeds", a.address, pre=_tls_args(certs, "b"))
    client_tls = load_tls(str(certs / "client.pem"), str(certs / "client-key.pem"), str(certs / "ca.pem"))

    def both_see_both() -> bool:
        with PeerClient(a.address, SECRET, tls=client_tls) as ca, PeerClient(b.address, SECRET, tls=client_tls) as cb:
            return all({m.node_id for m in c.stats().members if m.state == pb.ALIVE} == {"a", "b"} for c in (ca, cb))

    poll(both_see_both, "a and b formed a TLS mesh")
    with PeerClient(a.address, SECRET, tls=client_tls) as ca, PeerClient(b.address, SECRET, tls=client_tls) as cb:
        ca.put("over-tls", b"secret image" * 1000)
        assert cb.get("over-tls").data == b"secret image" * 1000  # type: ignore[union-attr]
    # A refusal says it is TLS's, and why where gRPC tells (before: "failed to connect to all addresses").
    with PeerClient(a.address, SECRET, timeout=3) as plain:
        with pytest.raises(Unreachable, match="seems to serve TLS only.*give it --tls-cert, --tls-key and --tls-ca \\(MESH_TLS_CERT"):
            plain.stats()
    other = tmp_path / "other"
    init_tls(other, ["x"])
    stranger = load_tls(str(other / "client.pem"), str(other / "client-key.pem"), str(other / "ca.pem"))
    with PeerClient(a.address, SECRET, timeout=3, tls=stranger) as c:
        with pytest.raises(Unreachable, match="TLS: its certificate is not signed by our CA"):
            c.stats()
    half = load_tls(str(other / "client.pem"), str(other / "client-key.pem"), str(certs / "ca.pem"))
    with PeerClient(a.address, SECRET, timeout=3, tls=half) as c:  # trusts the node; the node does not trust it
        with pytest.raises(Unreachable, match="TLS: the node closed the connection during the handshake"):
            c.stats()
    misnamed = load_tls(str(certs / "client.pem"), str(certs / "client-key.pem"), str(certs / "ca.pem"),
                        "not-comfy-mesh", env={})
    with PeerClient(a.address, SECRET, timeout=3, tls=misnamed) as c:
        with pytest.raises(Unreachable, match="TLS: its certificate does not name --tls-server-name"):
            c.stats()
    plain_node = serve("--node-id", "plain")
    with PeerClient(plain_node.address, SECRET, timeout=3, tls=client_tls) as c:
        with pytest.raises(Unreachable, match="TLS: it does not speak TLS"):
            c.stats()
    refused = run_cli("status", node=a.address, env={"MESH_SECRET": SECRET.decode()}, timeout=30)
    assert refused.returncode != 0 and "TLS" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
    env = dict(MESH_TLS_CERT=str(certs / "client.pem"), MESH_TLS_KEY=str(certs / "client-key.pem"),
               MESH_TLS_CA=str(certs / "ca.pem"), MESH_SECRET=SECRET.decode())
    out = run_cli("get", "over-tls", "-o", "-", node=b.address, env=env, text=False, timeout=30)
    assert out.returncode == 0 and out.stdout == b"secret image" * 1000, out.stderr


def test_secret_rotation_without_a_restart(serve: Callable[..., ServeProcess], tmp_path: Path) -> None:
    old, new = b"old-cluster-secret", b"new-cluster-secret"
    sfile = tmp_path / "rotating"
    sfile.write_bytes(old + b"\n")
    a = serve("--node-id", "a", secret=sfile)
    other_file = tmp_path / "b-secret"
    other_file.write_bytes(old + b"\n")
    b = serve("--node-id", "b", "--seeds", a.address, secret=other_file)
    poll(lambda: alive_ids(a.address, old) == {"a", "b"}, "a and b joined under the old secret")

    def reload(node: ServeProcess, path: Path, keys: list[bytes], count: int) -> None:
        path.write_bytes(b"\n".join(keys) + b"\n")
        node.process.send_signal(signal.SIGHUP)
        poll(lambda: node.log().count("reloaded the cluster secrets") >= count, "the node reloaded its secrets")

    reload(a, sfile, [new, old], 1)          # step 1 on a: sign with new, accept both
    with PeerClient(a.address, new) as c:
        assert c.stats().node_id == "a"
    with PeerClient(a.address, old) as c:
        assert c.stats().node_id == "a"
    # b still knows only the old secret: the mesh holds together, a proves the old one to b
    with PeerClient(a.address, [new, old]) as c:
        c.put("mixed", b"during rotation")
    with PeerClient(b.address, old) as c:
        assert c.get("mixed").data == b"during rotation"  # type: ignore[union-attr]
    reload(b, other_file, [new, old], 1)
    reload(a, sfile, [new], 2)               # step 3: drop the old secret
    reload(b, other_file, [new], 2)
    with PeerClient(a.address, old, timeout=5) as c:
        with pytest.raises(Unauthenticated):
            c.stats()
    poll(lambda: alive_ids(a.address, new) == {"a", "b"} and alive_ids(b.address, new) == {"a", "b"},
         "the mesh stays whole under the new secret")
    with PeerClient(b.address, new) as c:
        assert c.get("mixed").data == b"during rotation"  # type: ignore[union-attr]


def test_the_provider_speaks_tls_to_its_sidecar(serve: Callable[..., ServeProcess], tmp_path: Path) -> None:
    from mesh.client import RemoteClient
    from provider.config import ProviderConfig

    certs = tmp_path / "tls"
    init_tls(certs, ["side"])
    node = serve("--node-id", "side", pre=_tls_args(certs, "side"))
    config = ProviderConfig.load({"MESH_MODE": "sidecar", "MESH_NODE": node.address, "MESH_SECRET": SECRET.decode(),
                                  "MESH_TLS_CERT": str(certs / "client.pem"),
                                  "MESH_TLS_KEY": str(certs / "client-key.pem"), "MESH_TLS_CA": str(certs / "ca.pem"),
                                  "MESH_MAX_VALUE_SIZE": "1MiB"})
    tls = config.tls()
    assert tls is not None
    client = RemoteClient(config.node, config.keyring(), Limits(max_blob_size=config.max_value_size), tls=tls)
    try:
        assert client.put("p/k", b"over tls", {}, timeout=10) >= 1
        assert client.get("p/k", timeout=10) == b"over tls"
    finally:
        client.close()
    plain = RemoteClient(config.node, config.keyring())
    try:
        with pytest.raises(Unreachable):  # the provider's bridge counts it and reports a miss to ComfyUI
            plain.get("p/k", timeout=3)
    finally:
        plain.close()


@pytest.mark.parametrize("method", ["/comfymesh.v1.Mesh/Hello", "/comfymesh.v1.Mesh/Has",
                                    "/grpc.health.v1.Health/Check"])
def test_calls_that_never_send_their_message_hold_no_thread(serve: Callable[..., ServeProcess], method: str) -> None:
    """Found by attack: 64 unary calls without a message (no secret needed) once held every server thread."""
    node = serve()
    channel = grpc.insecure_channel(node.address)
    release = threading.Event()

    def never() -> Iterator[bytes]:
        release.wait(30)
        return
        yield b""

    call = channel.stream_unary(method, request_serializer=None, response_deserializer=None)
    peer = PeerClient(node.address, SECRET, timeout=3)
    assert peer.stats().node_id == node.node_id  # a member's session, made before the flood
    held = [call.future(never(), timeout=30) for _ in range(120)]
    try:
        for _ in range(5):
            assert peer.stats(timeout=3).node_id == node.node_id  # a peer's view: the node is alive
        poll(lambda: all(f.done() for f in held), "every silent call ended")
        assert {f.code() for f in held} <= {grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.CANCELLED,
                                            grpc.StatusCode.UNAUTHENTICATED}
        with PeerClient(node.address, SECRET, timeout=3) as c:
            assert c.health(timeout=3) == "SERVING" and c.stats().node_id == node.node_id  # new sessions too
    finally:
        release.set()
        channel.close()
        peer.close()


def test_a_relay_without_the_secret_is_never_admitted_nor_trusted(serve: Callable[..., ServeProcess]) -> None:
    """Found by attack: a host relaying Hello and Ping to a real node B, with B's address rewritten to its own,
    was admitted as B; its forged bytes were cached and served, and puts to 'B' vanished."""
    b = serve("--node-id", "b")
    relay = Relay(b.address).start()
    try:
        a = serve("--node-id", "a", "--seeds", relay.address)
        poll(lambda: relay.hellos >= 1 and f"not admitting {relay.address}" in a.log(),
             "a tried the relay and refused it")
        with PeerClient(a.address, SECRET) as c:
            for i in range(20):
                c.put(f"relay/{i}", b"real value %d" % i)
            for i in range(20):
                got = c.get(f"relay/{i}")
                assert got is not None and bytes(got.data) == b"real value %d" % i
            assert c.get("never-stored") is None
            assert all(m.address != relay.address for m in c.stats().members)
        assert relay.gets == 0 and relay.puts == 0
    finally:
        relay.stop()


def test_forged_gossip_incarnations_break_nothing(serve: Callable[..., ServeProcess]) -> None:
    """Found by attack: a LEFT with incarnation 2**64-1 made its victim refute with 2**64 (not encodable), and
    every Ping and Stats on it failed until restart; 2**63 pinned it DEAD for good at others."""
    import mesh

    a = serve("--node-id", "a", "--heartbeat", "0.2")
    c_node = serve("--node-id", "c", "--seeds", a.address, "--heartbeat", "0.2")
    poll(lambda: alive_ids(a.address) == {"a", "c"}, "a and c see each other")
    forged = pb.PingRequest(cluster="default", protocol=mesh.PROTOCOL_VERSION, members=[
        pb.Member(node_id="c", address=c_node.address, state=pb.LEFT, incarnation=2**64 - 1, capacity=1),
        pb.Member(node_id="a", address=a.address, state=pb.LEFT, incarnation=2**63, capacity=1)])
    for target in (a, c_node):
        with PeerClient(target.address, SECRET) as client:
            client.ping(forged)
    with PeerClient(c_node.address, SECRET) as client:
        assert client.stats().node_id == "c"
    poll(lambda: alive_ids(a.address) == {"a", "c"} and alive_ids(c_node.address) == {"a", "c"},
         "both still see each other alive")
    assert "Traceback" not in c_node.log() + a.log()


def test_a_client_cannot_claim_to_be_first(serve: Callable[..., ServeProcess]) -> None:
    """Once the earliest creation time won a conflict, and a member claiming 1970 replaced any value. Now a held
    value is never replaced (mesh/storage/store.py), whatever the put claims; a nonsense stamp is still refused."""
    node = serve()
    from dataclasses import replace as dc_replace

    from mesh.transport.wire import iter_chunks

    with PeerClient(node.address, SECRET) as c:
        c.put("k", b"GOOD" * 100)
        evil = b"EVIL" * 100
        header = dc_replace(make_header("k", evil, Limits().chunk_size), created_unix=1.0)
        assert c.put_chunks(header, tuple(iter_chunks(evil, Limits().chunk_size))).existed
        assert bytes(c.get("k").data) == b"GOOD" * 100  # type: ignore[union-attr]
        nan = dc_replace(make_header("n", evil, Limits().chunk_size), created_unix=float("nan"))
        with pytest.raises(Refused) as e:
            c.put_chunks(nan, tuple(iter_chunks(evil, Limits().chunk_size)), local_only=True)
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_a_counter_far_ahead_costs_nothing() -> None:
    """Found by attack: a counter 4e9 ahead made the replay window shift a 4-Gbit integer under a lock."""
    from mesh.transport.auth import _Window

    w = _Window()
    assert w.accept(5) and w.accept(10**17) and w.accept(10**17 - 3)
    assert not w.accept(10**17) and not w.accept(5)
    assert w.bits.bit_length() <= 4096


def test_a_member_claiming_zero_capacity_changes_nothing(serve: Callable[..., ServeProcess]) -> None:
    """Found by attack: a Ping whose sender declared capacity 0 was taken as it was (a weightless member)."""
    import mesh

    a = serve("--node-id", "a", "--heartbeat", "0.2")
    b = serve("--node-id", "b", "--seeds", a.address, "--heartbeat", "0.2")
    poll(lambda: alive_ids(b.address) == {"a", "b"}, "b sees a")
    with PeerClient(b.address, SECRET) as c:
        known = next(m for m in c.stats().members if m.node_id == "a")
        forged = pb.Member(node_id="a", address=a.address, capacity=0, incarnation=known.incarnation + 1)
        c.ping(pb.PingRequest(cluster="default", protocol=mesh.PROTOCOL_VERSION, sender=forged))
        after = next(m for m in c.stats().members if m.node_id == "a")
        assert after.capacity == known.capacity > 0 and after.incarnation == known.incarnation

"""Bounds that hold per member and per source, tried as an attacker would against real `mesh serve` processes.

Each attack keeps its calls open for the whole test: a `Squat` reopens every call the node ends (cancelled by
its watchdog or refused), as a real attacker would, while another client checks that the node still answers.
Every squat is bounded (a number of openings, a stop event), every wait is a bounded poll.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from dataclasses import dataclass, field, replace
from pathlib import Path

import grpc
import lz4.block
import psutil
import pytest

import mesh
from mesh.pb import mesh_pb2 as pb
from mesh.pb import mesh_pb2_grpc as pb_grpc
from mesh.transport.admission import Gate, peer_host
from mesh.client import RemoteClient
from mesh.server import MeshServicer
from mesh.transport.auth import HELLO_KEY, ClientAuth, Keyring, ServerAuth
from mesh.transport.peer import PeerClient, Refused
from mesh.transport.wire import LZ4, SERVICE, GiB, Limits, MiB, encode_chunk_message, make_header
from tests.conftest import SECRET, free_port, poll
from tests.support.cli import run_cli
from tests.support.serve import ServeProcess

Metadata = tuple[tuple[str, str], ...]
MAX_OPENED = 20_000  # calls one squat opens at most, whatever happens
MAX_SQUAT = 60.0     # seconds one squat lasts at most


@dataclass
class Squat:
    """Keeps `count` calls open on `address`, each reopened once it ends; `make(i)` says what call i is:
    (method, its messages before it falls silent, its metadata)."""

    address: str
    count: int
    make: Callable[[int], tuple[str, Sequence[bytes], Metadata]]
    opened: int = 0
    ended: dict[str, int] = field(default_factory=dict)  # status code name -> calls that ended with it
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> Squat:
        self._channel = grpc.insecure_channel(self.address)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _open(self, i: int) -> grpc.Future:
        method, first, md = self.make(i)
        done = threading.Event()

        def silent() -> Iterator[bytes]:
            yield from first
            done.wait(60)  # silent until the call ends: then this client thread is free again

        call = self._channel.stream_unary(method, request_serializer=None, response_deserializer=None)
        future = call.future(silent(), timeout=60, metadata=md)
        future.add_done_callback(lambda _f: done.set())
        self.opened += 1
        return future

    def _run(self) -> None:
        calls = [self._open(i) for i in range(self.count)]
        end = time.monotonic() + MAX_SQUAT
        while not self._stop.wait(0.02) and self.opened < MAX_OPENED and time.monotonic() < end:
            for i, f in enumerate(calls):
                if f.done() and self.opened < MAX_OPENED:
                    code = f.code()
                    self.ended[code.name] = self.ended.get(code.name, 0) + 1
                    calls[i] = self._open(i)
        for f in calls:
            f.cancel()

    @property
    def running(self) -> bool:
        """Still reopening calls (not past its bounds): what a check made meanwhile was made under attack."""
        return self._thread is not None and self._thread.is_alive() and not self._stop.is_set()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self._channel.close()


def one_session(address: str) -> Callable[[str], Metadata]:
    """proof(method): a fresh proof for one call of `method`, all in one session (one Hello)."""
    channel = grpc.insecure_channel(address)
    stub = pb_grpc.MeshStub(channel)
    auth = ClientAuth(Keyring([SECRET]))
    auth.handshake(lambda r, md=(): stub.Hello(r, timeout=5, metadata=md))
    channel.close()

    def proof(method: str) -> Metadata:
        return auth.metadata(f"/{SERVICE}/{method}", lambda r, md=(): pytest.fail("no second Hello expected"))

    return proof


def ping_request() -> pb.PingRequest:
    return pb.PingRequest(cluster="default", protocol=mesh.PROTOCOL_VERSION)


def answers_everything(address: str, rounds: int, tag: str) -> float:
    """Health, Ping, Stats, a small and a streamed put, and gets, from a session of their own: the seconds the
    slowest round took. Each call has 3 s (5 s for the streamed put); any refusal or timeout raises."""
    slowest = 0.0
    big = os.urandom(2 * MiB)
    with PeerClient(address, SECRET, timeout=3) as c:
        for i in range(rounds):
            started = time.monotonic()
            assert c.health(timeout=3) == "SERVING"
            c.ping(ping_request(), timeout=3)
            assert c.stats(timeout=3).node_id
            c.put(f"{tag}/small/{i}", b"small value %d" % i, timeout=3)
            c.put(f"{tag}/big/{i}", big, timeout=5, compress=False)
            assert bytes(c.get(f"{tag}/small/{i}", timeout=3).data) == b"small value %d" % i  # type: ignore[union-attr]
            assert bytes(c.get(f"{tag}/big/{i}", timeout=5).data) == big  # type: ignore[union-attr]
            slowest = max(slowest, time.monotonic() - started)
    return slowest


UNARY = ("Has", "Stats", "PutSmall", "Ping", "Digest", "Delete", "Drain", "Lease")


def test_silent_unary_calls_of_one_member_leave_control_and_data_calls_answering(
        serve: Callable[..., ServeProcess]) -> None:
    """Finding: 120 unary calls with valid proofs that never sent their message froze a node (health
    DEADLINE_EXCEEDED, Stats/get/put Unreachable while they were held; with 40, health failed after 13 s).
    200 here: more than the node's threads (MeshServicer.threads), so the calls cannot simply fit."""
    node = serve("--node-id", "n")
    proof = one_session(node.address)
    assert MeshServicer.threads(Limits()) < 200
    squat = Squat(node.address, 200, lambda i: (f"/{SERVICE}/{UNARY[i % len(UNARY)]}", (),
                                                proof(UNARY[i % len(UNARY)]))).start()
    try:
        poll(lambda: squat.opened >= 200, "the 200 silent calls are open")
        slowest = answers_everything(node.address, rounds=3, tag="unary")
        assert slowest < 10, slowest
        assert squat.running
        poll(lambda: squat.ended.get("CANCELLED", 0) >= 1, "the watchdog cut admitted silent calls")
    finally:
        squat.stop()
    assert set(squat.ended) <= {"RESOURCE_EXHAUSTED", "CANCELLED"}, squat.ended
    assert squat.ended.get("RESOURCE_EXHAUSTED", 0) >= 1  # one session's share: the rest were refused at once
    with PeerClient(node.address, SECRET, timeout=5) as c:
        counters = c.stats().counters
    assert counters["busy_refusals"] >= 1 and counters["stalled_streams"] >= 1


def test_hello_squatters_lock_out_neither_new_handshakes_nor_renewals(serve: Callable[..., ServeProcess]) -> None:
    """Finding: 16 silent Hello streams from an outsider, reopened as the watchdog cancelled them: 0 of 20 new
    handshakes succeeded, and an existing client's session renewal was refused until the squat paused."""
    node = serve("--node-id", "n")
    member = PeerClient(node.address, SECRET, timeout=3)
    channel = grpc.insecure_channel(node.address)
    stub = pb_grpc.MeshStub(channel)

    def hello_as_message(request: pb.HelloRequest, metadata: Metadata = ()) -> pb.HelloReply:
        """A Hello whose request comes only as a message (as an older client's), so it waits at a gate."""
        return stub.Hello(request, timeout=3, metadata=tuple(kv for kv in metadata if kv[0] != HELLO_KEY))

    old = ClientAuth(Keyring([SECRET]))
    try:
        assert member.stats().node_id == "n"  # sessions made before the squat
        old.handshake(hello_as_message)
        squat = Squat(node.address, 16, lambda i: (f"/{SERVICE}/Hello", (), ())).start()
        try:
            # The squat is on: the node has cut silent Hellos and the squatter reopened them.
            poll(lambda: squat.ended.get("CANCELLED", 0) >= 8 and squat.opened >= 24, "the Hello squat is on")
            fresh = 0
            for _ in range(20):
                with PeerClient(node.address, SECRET, timeout=3) as c:
                    fresh += c.stats(timeout=3).node_id == "n"
            assert fresh == 20
            assert member._auth._session is not None
            member._auth._session.renew_at = time.monotonic()  # its 240 s are up: the next call renews
            before = member._auth._session.token
            assert member.stats(timeout=3).node_id == "n"
            assert member._auth._session.token != before  # renewed, not refused
            # A renewal read as a message: its proof admits it at a gate of its own, which strangers cannot fill.
            assert old._session is not None
            old._session.renew_at = time.monotonic()
            renewed = old.handshake(hello_as_message)
            assert renewed.token and renewed is old._session
            assert squat.running  # still squatting while all of this answered
        finally:
            squat.stop()
        counters = member.stats().counters
        assert counters["session_renewals"] >= 2 and counters["busy_refusals"] >= 1
    finally:
        member.close()
        channel.close()


def test_idle_put_streams_of_one_member_leave_room_for_real_puts_and_gets(
        serve: Callable[..., ServeProcess]) -> None:
    """Finding: 40 idle Put streams from a member refused real puts and gets for 10-30 s, and could be renewed
    forever. Half never send a header, half stop after it (each then holds a transfer slot)."""
    node = serve("--node-id", "n")
    proof = one_session(node.address)
    header = pb.PutRequest(header=make_header("idle", b"x" * (3 * MiB), 1 * MiB).to_pb()).SerializeToString()
    squat = Squat(node.address, 40, lambda i: (f"/{SERVICE}/Put", () if i % 2 else (header,), proof("Put"))).start()
    try:
        poll(lambda: squat.opened >= 40, "the 40 idle streams are open")
        poll(lambda: squat.ended.get("RESOURCE_EXHAUSTED", 0) >= 1, "the squat filled its session's share")
        slowest = answers_everything(node.address, rounds=3, tag="idle")
        assert slowest < 15, slowest
        assert squat.running
    finally:
        squat.stop()
    assert set(squat.ended) <= {"RESOURCE_EXHAUSTED", "CANCELLED"}, squat.ended


# -- the gate itself -----------------------------------------------------------------------------------------------

def test_a_gate_bounds_each_session_and_each_host() -> None:
    gate = Gate("calls", 8)  # one session: 4, one host: 6
    assert all(gate.try_enter("s1", "h1") == "" for _ in range(4))
    assert "in this session" in gate.try_enter("s1", "h1")
    assert all(gate.try_enter("s2", "h1") == "" for _ in range(2))
    assert "from this host" in gate.try_enter("s3", "h1")
    assert gate.try_enter("s4", "h2") == "" and gate.try_enter("s5", "h2") == ""
    assert "8 calls in progress" in gate.try_enter("s6", "h3")
    gate.leave("s1", "h1")
    assert gate.try_enter("s6", "h3") == ""  # a place given back is a place for anyone
    assert gate.refusals == 3
    assert peer_host("ipv4:10.0.0.5:5123") == "ipv4:10.0.0.5" and peer_host("ipv6:[::1]:80") == "ipv6:[::1]"


def test_one_source_host_leaves_room_for_another(serve: Callable[..., ServeProcess]) -> None:
    """Per source, not only per session: an outsider's silent health checks and Hellos, and a member's silent
    Stats calls in 40 sessions of their own, all from one host (127.0.0.1), reopened as they end; from another
    source (::1, the same node listening on both), health, an older client's Hello (a message, not headers),
    Ping and Stats answer every time."""
    port = free_port()
    serve("--node-id", "n", "--listen", f"[::]:{port}", "--advertise", f"127.0.0.1:{port}")
    v4, v6 = f"127.0.0.1:{port}", f"[::1]:{port}"
    proofs = [one_session(v4) for _ in range(40)]
    squats = [Squat(v4, 16, lambda i: ("/grpc.health.v1.Health/Check", (), ())),
              Squat(v4, 16, lambda i: (f"/{SERVICE}/Hello", (), ())),
              Squat(v4, 40, lambda i: (f"/{SERVICE}/Stats", (), proofs[i]("Stats")))]
    channel = grpc.insecure_channel(v6)
    stub = pb_grpc.MeshStub(channel)
    try:
        for squat in squats:
            squat.start()
        poll(lambda: all(s.ended.get("RESOURCE_EXHAUSTED", 0) >= 1 for s in squats), "each squat filled its share")
        with PeerClient(v6, SECRET, timeout=3) as c:
            for _ in range(5):
                assert c.health(timeout=3) == "SERVING"
                auth = ClientAuth(Keyring([SECRET]))  # a fresh handshake, read as a message
                auth.handshake(lambda r, md=(): stub.Hello(r, timeout=3))
                c.ping(ping_request(), timeout=3)
                assert c.stats(timeout=3).node_id == "n"
        assert all(s.running and s.opened > s.count for s in squats)  # every squat was still reopening meanwhile
    finally:
        for squat in squats:
            squat.stop()
        channel.close()


# -- clients against a member that lies about its values -------------------------------------------------------

@dataclass
class LyingMember:
    """A node that holds the secret (its Hello proves it) and answers every Get with `reply(key)`: the
    messages of a Get stream, as a malicious or broken member would frame them."""

    reply: Callable[[str], list[bytes]]
    address: str = ""

    def start(self) -> LyingMember:
        auth = ServerAuth(Keyring([SECRET]), node_id="liar")
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        port = self.server.add_insecure_port("127.0.0.1:0")
        self.address = auth.address = f"127.0.0.1:{port}"

        def get(request: pb.GetRequest, context: grpc.ServicerContext) -> Iterator[bytes]:
            yield from self.reply(request.key)

        handlers = {
            "Hello": grpc.unary_unary_rpc_method_handler(lambda r, _c: auth.hello(r), pb.HelloRequest.FromString,
                                                         pb.HelloReply.SerializeToString),
            "Get": grpc.unary_stream_rpc_method_handler(get, pb.GetRequest.FromString, None),
        }
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        self.server.start()
        return self

    def stop(self) -> None:
        self.server.stop(0.5).wait()


def _lies(key: str) -> list[bytes]:
    """"huge": a header of 2 GiB of zeros (8 MiB of lz4 on the wire), then its chunks; "inflating": a 1 MiB value
    whose one chunk (256 KiB of lz4) decompresses to 64 MiB; "oversized": a chunk that claims more raw bytes
    than the header gives it."""
    zeros = lz4.block.compress(bytes(1 * MiB), store_size=False)
    if key == "huge":
        header = replace(make_header(key, b"", 1 * MiB), raw_size=2 * GiB, chunk_count=2048)
        return [pb.GetReply(header=header.to_pb()).SerializeToString(),
                *(encode_chunk_message(i, LZ4, 1 * MiB, zeros) for i in range(2048))]
    header = make_header(key, bytes(1 * MiB), 1 * MiB)
    if key == "inflating":
        bomb = lz4.block.compress(bytes(64 * MiB), store_size=False)
        return [pb.GetReply(header=header.to_pb()).SerializeToString(), encode_chunk_message(0, LZ4, 1 * MiB, bomb)]
    return [pb.GetReply(header=header.to_pb()).SerializeToString(), encode_chunk_message(0, LZ4, 64 * MiB, zeros)]


def test_every_client_refuses_a_value_above_its_maximum_and_chunks_that_inflate(
        tmp_path: Path, secret_file: Path) -> None:
    """Finding: 8 MiB on the wire carried a 2 GiB value of zeros, and a reader grew by 2 GiB. PeerClient.get,
    `mesh get` (to a file and to stdout) and the sidecar client (mesh/client.py) each refuse a header above their
    maximum before allocating or asking for a chunk, and refuse a chunk that inflates past its declared size."""
    liar = LyingMember(_lies).start()
    rss = psutil.Process()
    try:
        before = rss.memory_info().rss
        small = Limits(max_blob_size=64 * MiB)
        with PeerClient(liar.address, SECRET, limits=small, timeout=10) as c:
            with pytest.raises(Refused) as e:
                c.get("huge")
            assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "exceeds max blob size" in str(e.value)
            for key in ("inflating", "oversized"):
                with pytest.raises(Refused) as e:
                    c.get(key)
                assert e.value.code == grpc.StatusCode.DATA_LOSS, e.value
        sidecar = RemoteClient(liar.address, SECRET, small, direct=False)
        try:
            for key, code in (("huge", grpc.StatusCode.RESOURCE_EXHAUSTED), ("inflating", grpc.StatusCode.DATA_LOSS)):
                with pytest.raises(Refused) as e:
                    sidecar.get(key, timeout=10)
                assert e.value.code == code
        finally:
            sidecar.close()
        assert rss.memory_info().rss - before < 256 * MiB
        for output in (str(tmp_path / "out"), "-"):
            out = run_cli("get", "huge", "-o", output, "--max-size", "64MiB", node=liar.address,
                          secret_file=secret_file, timeout=30)
            assert out.returncode != 0 and "exceeds max blob size" in out.stderr, out.stderr
            assert len(out.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
        out = run_cli("get", "inflating", "-o", "-", node=liar.address, secret_file=secret_file, timeout=30)
        assert out.returncode != 0 and "does not decompress" in out.stderr, out.stderr
    finally:
        liar.stop()

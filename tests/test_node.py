"""One mesh node over real gRPC on 127.0.0.1: round trips, malformed streams, auth, concurrency, eviction, RPCs.

Malformed streams are hand-crafted PutRequests sent with the generated stub. Wire-level tests run against a real
Node and against the bare servicer without a cluster.
"""

from __future__ import annotations

import contextlib
import os
import random
import threading
from collections.abc import Callable, Iterator

import grpc
import lz4.block
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import mesh
from mesh.node import SERVICE_NAME, Node
from mesh.pb import mesh_pb2 as pb
from mesh.pb import mesh_pb2_grpc as pb_grpc
from mesh.transport.peer import MAX_TRANSFERS, MeshError, PeerClient, Refused, Unauthenticated, Unreachable
from mesh.storage.store import BlobStore
from mesh.transport.link import Links
from mesh.transport.wire import LZ4, LZ4_PLANES4, RAW, KiB, MiB, Limits, checksum, iter_chunks, make_header
from tests.conftest import SECRET, token_metadata

Target = tuple[str, BlobStore]
BIG_MESSAGE = 64 * MiB  # what the test stub may send: more than any node accepts


@contextlib.contextmanager
def raw_stub(address: str) -> Iterator[pb_grpc.MeshStub]:
    channel = grpc.insecure_channel(address, options=[("grpc.max_send_message_length", BIG_MESSAGE),
                                                      ("grpc.max_receive_message_length", BIG_MESSAGE)])
    try:
        yield pb_grpc.MeshStub(channel)
    finally:
        channel.close()


def put_requests(key: str, data: bytes, chunk_size: int = 256 * KiB, **header_changes: object
                 ) -> list[pb.PutRequest]:
    """A well-formed Put stream (protobuf-serialized), with optional changes to its header."""
    h = make_header(key, data, chunk_size, {"content": "bytes"}).to_pb()
    for name, value in header_changes.items():
        setattr(h, name, value)
    return [pb.PutRequest(header=h)] + [pb.PutRequest(chunk=c.to_pb(i))
                                        for i, c in enumerate(iter_chunks(data, chunk_size))]


def put_status(address: str, requests: list[pb.PutRequest],
               metadata: tuple[tuple[str, str], ...] | None = None) -> grpc.StatusCode:
    with raw_stub(address) as stub:
        try:
            stub.Put(iter(requests), timeout=30,
                     metadata=token_metadata(address, "Put") if metadata is None else metadata)
        except grpc.RpcError as e:
            return e.code()
    return grpc.StatusCode.OK


def assert_serves(address: str) -> None:
    """The node still answers a normal put and get."""
    data = os.urandom(300 * KiB) + bytes(300 * KiB)
    key = f"check/{random.random()}"
    with PeerClient(address, SECRET, timeout=30) as c:
        assert c.put(key, data).stored
        blob = c.get(key)
    assert blob is not None and blob.data == data


def mixed(size: int, seed: int = 0) -> bytes:
    """Half random (sent raw), half zeros (sent lz4)."""
    rnd = random.Random(seed).randbytes(size // 2)
    return rnd + bytes(size - len(rnd))


# -- round trips -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [0, 1, MiB, 3 * MiB + 17], ids=["0B", "1B", "1MiB", "3MiB+17B"])
def test_round_trip(target: Target, size: int) -> None:
    address, store = target
    data = mixed(size, seed=size)
    with PeerClient(address, SECRET) as c:
        reply = c.put("rt/key", data, meta={"content": "bytes", "class_type": "VAEDecode"})
        assert reply.stored and not reply.existed and reply.replicas == 1
        blob = c.get("rt/key")
    assert blob is not None
    assert bytes(blob.data) == data and len(blob.data) == size
    assert blob.header.raw_size == size and blob.header.checksum == checksum(data)
    assert dict(blob.header.meta) == {"content": "bytes", "class_type": "VAEDecode"}
    assert blob.header.created_unix > 0
    assert "rt/key" in store


def test_small_values_go_in_one_message_with_the_checks_of_a_stream(target: Target) -> None:
    """PutSmall is a Put stream's header and chunks in one message: the same answers, the same refusals."""
    address, store = target
    data = os.urandom(3000)
    with PeerClient(address, SECRET) as client:
        client.put("small/ok", data)
        assert client._put_small and bytes(client.get("small/ok").data) == data  # type: ignore[union-attr]
    md = lambda: token_metadata(address, "PutSmall")  # noqa: E731
    with raw_stub(address) as stub:
        def put_small(requests: list[pb.PutRequest]) -> pb.PutReply:
            return stub.PutSmall(pb.PutSmallRequest(header=requests[0].header, chunks=[r.chunk for r in requests[1:]]),
                                 timeout=10, metadata=md())

        assert put_small(put_requests("small/two", data * 100)).stored  # two chunks of 256 KiB
        corrupt = put_requests("small/corrupt", data)
        corrupt[1].chunk.data = bytes(b ^ 1 for b in corrupt[1].chunk.data)
        missing = put_requests("small/missing", data)[:1]
        for requests, code in ((corrupt, grpc.StatusCode.DATA_LOSS), (missing, grpc.StatusCode.DATA_LOSS)):
            with pytest.raises(grpc.RpcError) as e:
                put_small(requests)
            assert e.value.code() == code
        with pytest.raises(grpc.RpcError) as e:
            stub.PutSmall(pb.PutSmallRequest(), timeout=10, metadata=md())
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as e:
            stub.PutSmall(pb.PutSmallRequest(header=corrupt[0].header), timeout=10,
                          metadata=token_metadata(address, "PutSmall", b"wrong-secret"))
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "small/two" in store and "small/corrupt" not in store and "small/missing" not in store


def test_wire_compatible_with_plain_protobuf(target: Target) -> None:
    """Generated-stub clients (protobuf framing either way) interoperate with whatever the server does."""
    address, _ = target
    data = mixed(2 * MiB + 5, seed=3)
    with raw_stub(address) as stub:
        # chunks sent with local_only set on every chunk message: valid protobuf, but not the plain framing
        requests = put_requests("compat/odd", data)
        for r in requests[1:]:
            r.local_only = True
        reply = stub.Put(iter(put_requests("compat/plain", data)), timeout=30,
                         metadata=token_metadata(address, "Put"))
        assert reply.stored
        assert stub.Put(iter(requests), timeout=30, metadata=token_metadata(address, "Put")).stored
        for key in ("compat/plain", "compat/odd"):
            replies = list(stub.Get(pb.GetRequest(key=key), timeout=30, metadata=token_metadata(address, "Get")))
            assert replies[0].HasField("header") and replies[0].header.key == key
            assert [r.chunk.index for r in replies[1:]] == list(range(replies[0].header.chunk_count))
            assert {r.chunk.codec for r in replies[1:]} == {RAW, LZ4}
            got = b"".join(r.chunk.data if r.chunk.codec == RAW else
                           lz4.block.decompress(r.chunk.data, uncompressed_size=r.chunk.raw_size)
                           for r in replies[1:])
            assert got == data
    with PeerClient(address, SECRET) as c:
        assert c.get("compat/odd").data == data


@pytest.mark.slow
def test_round_trip_256MiB(node: Node, client: PeerClient) -> None:
    half = 128 * MiB
    data = np.random.default_rng(256).bytes(half) + bytes(half)
    assert client.put("big/256", data, compress=True).stored
    blob = client.get("big/256")
    assert blob is not None and len(blob.data) == len(data)
    assert blob.data == data
    entry = node.store.peek("big/256")
    assert entry is not None and entry.header.stored_size < len(data)  # the zero half went lz4
    del blob, data


def test_a_raw_entry_is_packed_on_the_way_only_for_a_reader_that_asks(node: Node, client: PeerClient) -> None:
    rng = np.random.default_rng(5)
    data = np.cumsum(rng.standard_normal(MiB // 2, dtype=np.float32) * np.float32(0.01)).tobytes()  # 2 MiB
    client.put("float/raw", data)  # loopback: sent, and so stored, raw
    entry = node.store.peek("float/raw")
    assert entry is not None and {c.codec for c in entry.chunks} == {RAW}
    got = client.get_chunks("float/raw")
    assert got is not None and {c.codec for c in got[1]} == {RAW}
    with PeerClient(node.address, SECRET, links=Links("lz4")) as slow:
        got = slow.get_chunks("float/raw")
        assert got is not None and {c.codec for c in got[1]} == {LZ4_PLANES4} and got[0].stored_size == 0
        assert slow.get("float/raw").data == data  # type: ignore[union-attr]
        slow.put("float/packed", data)  # and a writer on a slow link packs before sending
    entry = node.store.peek("float/packed")
    assert entry is not None and {c.codec for c in entry.chunks} == {LZ4_PLANES4}


def test_transfers_beyond_the_clients_limit_wait_their_turn_within_the_deadline(node: Node,
                                                                                 client: PeerClient) -> None:
    client.put("turns/k", b"x" * 1000)
    held = [client._transfer_slot(5) for _ in range(MAX_TRANSFERS)]
    for slot in held:
        slot.__enter__()
    try:
        with pytest.raises(MeshError) as e:
            client.get("turns/k", timeout=0.2)
        assert e.value.code == grpc.StatusCode.DEADLINE_EXCEEDED and "already under way" in str(e.value)
        assert client.has(["turns/k"]) == [True]  # small calls never queue behind bulk ones
    finally:
        held.pop().__exit__(None, None, None)
    assert client.get("turns/k", timeout=5).data == b"x" * 1000  # one slot free: served
    for slot in held:
        slot.__exit__(None, None, None)


def test_a_slot_that_comes_too_late_is_a_local_timeout_not_an_unreachable_node(node: Node,
                                                                               client: PeerClient) -> None:
    held = [client._transfer_slot(5) for _ in range(MAX_TRANSFERS)]
    for slot in held:
        slot.__enter__()
    timer = threading.Timer(0.45, held[0].__exit__, (None, None, None))  # a slot frees just before the deadline
    timer.start()
    try:
        with pytest.raises(MeshError) as e:
            client.get("late/k", timeout=0.5)
        assert not isinstance(e.value, Unreachable) and "spent waiting" in str(e.value)
    finally:
        timer.join()
        for slot in held[1:]:
            slot.__exit__(None, None, None)
    assert client.get("late/k", timeout=5) is None  # every slot came back; the node was never unreachable


# -- malformed streams: a clear status, nothing stored, and the node keeps serving ----------------------------

DATA = mixed(MiB, seed=7)  # 4 chunks of 256 KiB: 2 raw, 2 lz4


def _corrupt_chunk() -> list[pb.PutRequest]:
    reqs = put_requests("bad", DATA)
    raw = bytearray(reqs[1].chunk.data)
    raw[100] ^= 0x01
    reqs[1].chunk.data = bytes(raw)
    return reqs


def _corrupt_lz4() -> list[pb.PutRequest]:
    reqs = put_requests("bad", DATA)
    assert reqs[4].chunk.codec == LZ4
    reqs[4].chunk.data = b"\xf0" + reqs[4].chunk.data[1:]
    return reqs


def _bomb() -> list[pb.PutRequest]:
    reqs = put_requests("bad", bytes(256 * KiB))
    reqs[1].chunk.codec = LZ4
    reqs[1].chunk.data = lz4.block.compress(bytes(4 * MiB), store_size=False)
    return reqs


def _with(index: int, **changes: object) -> Callable[[], list[pb.PutRequest]]:
    def make() -> list[pb.PutRequest]:
        reqs = put_requests("bad", DATA)
        for name, value in changes.items():
            setattr(reqs[index].chunk, name, value)
        return reqs
    return make


MALFORMED: dict[str, tuple[Callable[[], list[pb.PutRequest]], grpc.StatusCode]] = {
    "corrupt-raw-chunk": (_corrupt_chunk, grpc.StatusCode.DATA_LOSS),
    "corrupt-lz4-chunk": (_corrupt_lz4, grpc.StatusCode.DATA_LOSS),
    "truncated-stream": (lambda: put_requests("bad", DATA)[:-1], grpc.StatusCode.DATA_LOSS),
    "wrong-checksum": (lambda: put_requests("bad", DATA, checksum=checksum(DATA) ^ 1), grpc.StatusCode.DATA_LOSS),
    "wrong-stored-size": (lambda: put_requests("bad", DATA, stored_size=123), grpc.StatusCode.DATA_LOSS),
    "chunks-out-of-order": (lambda: (lambda r: [r[0], r[2], r[1], *r[3:]])(put_requests("bad", DATA)),
                            grpc.StatusCode.DATA_LOSS),
    "chunk-raw-size-lie": (_with(1, raw_size=256 * KiB + 1), grpc.StatusCode.DATA_LOSS),
    "decompression-bomb": (_bomb, grpc.StatusCode.DATA_LOSS),
    "oversize-blob": (lambda: put_requests("bad", b"x", raw_size=64 * MiB + 1, chunk_count=257),
                      grpc.StatusCode.RESOURCE_EXHAUSTED),
    "over-store-budget": (lambda: put_requests("bad", DATA, stored_size=1 << 40), grpc.StatusCode.RESOURCE_EXHAUSTED),
    "oversize-chunk-size": (lambda: put_requests("bad", DATA, chunk_size=16 * MiB + 1, chunk_count=1),
                            grpc.StatusCode.INVALID_ARGUMENT),
    "missing-header": (lambda: put_requests("bad", DATA)[1:], grpc.StatusCode.INVALID_ARGUMENT),
    "empty-stream": (lambda: [], grpc.StatusCode.INVALID_ARGUMENT),
    "second-header": (lambda: (lambda r: [r[0], r[0], *r[1:]])(put_requests("bad", DATA)),
                      grpc.StatusCode.INVALID_ARGUMENT),
    "extra-chunk": (lambda: (lambda r: r + [pb.PutRequest(chunk=pb.Chunk(index=4, raw_size=1, data=b"x"))])(
        put_requests("bad", DATA)), grpc.StatusCode.INVALID_ARGUMENT),
    "unknown-blob-codec": (lambda: put_requests("bad", DATA, codec="zstd-chunks/9"), grpc.StatusCode.INVALID_ARGUMENT),
    "unknown-chunk-codec": (_with(2, codec=9), grpc.StatusCode.INVALID_ARGUMENT),
    "empty-key": (lambda: put_requests("", DATA), grpc.StatusCode.INVALID_ARGUMENT),
    "oversize-message": (lambda: [put_requests("bad", DATA)[0], pb.PutRequest(
        chunk=pb.Chunk(index=0, codec=RAW, raw_size=256 * KiB, data=bytes(21 * MiB)))],
        grpc.StatusCode.RESOURCE_EXHAUSTED),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_put_is_refused_with_a_clear_status(target: Target, case: str) -> None:
    address, store = target
    make, status = MALFORMED[case]
    assert put_status(address, make()) == status
    assert "bad" not in store and "" not in store
    assert_serves(address)


@pytest.mark.parametrize("case", ["no-token", "garbage-token", "wrong-secret"])
def test_put_without_the_secret_is_unauthenticated(target: Target, case: str) -> None:
    address, store = target
    metadata = {"no-token": (), "garbage-token": (("x-mesh-auth", "garbage"),),
                "wrong-secret": token_metadata(address, "Put", b"wrong-secret")}[case]
    assert put_status(address, put_requests("bad", DATA), metadata=metadata) == grpc.StatusCode.UNAUTHENTICATED
    assert "bad" not in store
    assert_serves(address)


def test_corrupt_reply_is_refused_by_the_reader(node: Node, client: PeerClient) -> None:
    """The client verifies too: a stored blob corrupted in the node's memory never reaches the caller."""
    data = os.urandom(600 * KiB)
    client.put("victim", data)
    entry = node.store.peek("victim")
    assert entry is not None
    chunk = entry.chunks[0]
    bad = bytearray(chunk.data)
    bad[0] ^= 0xFF
    object.__setattr__(entry, "chunks", (type(chunk)(chunk.codec, chunk.raw_size, bytes(bad)), *entry.chunks[1:]))
    with pytest.raises(Refused) as e:
        client.get("victim")
    assert e.value.code == grpc.StatusCode.DATA_LOSS
    assert_serves(node.address)


# -- auth and health ---------------------------------------------------------------------------------------------

def test_health_answers_without_a_secret_other_rpcs_do_not(node: Node) -> None:
    channel = grpc.insecure_channel(node.address)
    try:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", SERVICE_NAME):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        stub = pb_grpc.MeshStub(channel)
        calls = {
            "Stats": lambda md: stub.Stats(pb.StatsRequest(), timeout=5, metadata=md),
            "Has": lambda md: stub.Has(pb.HasRequest(keys=["k"]), timeout=5, metadata=md),
            "Delete": lambda md: stub.Delete(pb.DeleteRequest(keys=["k"]), timeout=5, metadata=md),
            "PutSmall": lambda md: stub.PutSmall(pb.PutSmallRequest(), timeout=5, metadata=md),
            "Get": lambda md: list(stub.Get(pb.GetRequest(key="k"), timeout=5, metadata=md)),
            "ListKeys": lambda md: list(stub.ListKeys(pb.ListKeysRequest(), timeout=5, metadata=md)),
            "Drain": lambda md: stub.Drain(pb.DrainRequest(), timeout=5, metadata=md),
            "Lease": lambda md: stub.Lease(pb.LeaseRequest(key="k", holder="h"), timeout=5, metadata=md),
        }
        for name, call in calls.items():
            for md in [(), token_metadata(node.address, name, b"wrong")]:
                with pytest.raises(grpc.RpcError) as e:
                    call(md)
                assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        stats = stub.Stats(pb.StatsRequest(), timeout=5, metadata=token_metadata(node.address, "Stats"))
        assert stats.node_id == node.node_id
    finally:
        channel.close()
    assert len(node.store) == 0  # the refused Delete and Drain did nothing
    with PeerClient(node.address, None) as anonymous:
        assert anonymous.health() == "SERVING"
        with pytest.raises(Unauthenticated):
            anonymous.stats()
    with PeerClient(node.address, b"wrong") as wrong:
        with pytest.raises(Unauthenticated):
            wrong.get("k")


def test_node_without_a_secret_is_open(node_factory: Callable[..., Node]) -> None:
    open_node = node_factory(secret=None)
    with PeerClient(open_node.address, None) as c:
        c.put("k", b"v")
        assert c.get("k").data == b"v"


# -- the other RPCs ----------------------------------------------------------------------------------------------

def test_missing_key_is_not_found(node: Node, client: PeerClient, stub: pb_grpc.MeshStub) -> None:
    assert client.get("no/such/key") is None
    with pytest.raises(grpc.RpcError) as e:
        list(stub.Get(pb.GetRequest(key="no/such/key"), timeout=5, metadata=token_metadata(node.address, "Get")))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    assert client.stats().counters["misses"] >= 2
    assert_serves(node.address)


def test_second_put_of_a_key_is_a_cheap_no_op(node: Node, client: PeerClient) -> None:
    data = os.urandom(700 * KiB)
    first = client.put("dup", data)
    assert first.stored and not first.existed
    again = client.put("dup", os.urandom(10))
    assert again.existed and not again.stored
    assert client.get("dup").data == data  # the first value stays
    # Cheap: the node answers from the header alone. Chunks that would fail verification are never read.
    assert put_status(node.address, _corrupt_chunk_for("dup", data)) == grpc.StatusCode.OK
    assert client.stats().counters["duplicate_puts"] == 2


def _corrupt_chunk_for(key: str, data: bytes) -> list[pb.PutRequest]:
    reqs = put_requests(key, data)
    reqs[1].chunk.data = b"garbage"
    return reqs


def test_has_delete_list_keys_and_stats(node: Node, client: PeerClient) -> None:
    for key, size in [("a/1", 10), ("a/2", 300 * KiB), ("b/1", 0)]:
        client.put(key, bytes(size), meta={"class_type": key.split("/")[0]}, compress=True)
    assert client.has(["a/1", "nope", "b/1", "a/2"]) == [True, False, True, True]
    listed = {k.key: k for k in client.list_keys()}
    assert set(listed) == {"a/1", "a/2", "b/1"}
    assert listed["a/2"].raw_size == 300 * KiB and listed["a/2"].stored_size < 300 * KiB  # zeros shrank
    assert dict(listed["a/1"].meta) == {"class_type": "a"} and listed["a/1"].age_seconds >= 0
    assert [k.key for k in client.list_keys(prefix="a/")] == ["a/1", "a/2"]
    assert len(client.list_keys(limit=2)) == 2
    client.get("a/1")
    client.get("zzz")
    stats = client.stats()
    assert stats.node_id == node.node_id and stats.address == node.address and stats.version == mesh.__version__
    assert stats.counters["entries"] == 3 and stats.counters["puts"] == 3
    assert stats.counters["hits"] >= 1 and stats.counters["misses"] >= 1
    assert stats.counters["bytes_used"] == node.store.used > 0
    assert [m.node_id for m in stats.members] == [node.node_id]
    assert client.delete(["a/1", "nope", "a/1"]) == 1
    assert client.has(["a/1", "a/2"]) == [False, True]
    assert client.delete(["nope"]) == 0
    assert client.stats().counters["entries"] == 2


def test_sidecar_clients_report_counters(node: Node, client: PeerClient, monkeypatch: pytest.MonkeyPatch) -> None:
    """Counters handed along with Stats are summed over reporters, expire, and are bounded."""
    import mesh.server

    client.stats(reporter="comfyui@a:1", report={"provider_hits": 3, "provider_lookups": 10})
    client.stats(reporter="comfyui@b:2", report={"provider_hits": 4})
    client.stats(reporter="comfyui@a:1", report={"provider_hits": 5, "provider_lookups": 12})  # replaces a's
    counters = client.stats().counters
    assert counters["provider_hits"] == 9 and counters["provider_lookups"] == 12
    assert counters["entries"] == 0  # the node's own counters are untouched
    for bad in ({"x" * 300: 1.0}, {"provider_nan": float("nan")}, {f"provider_c{i}": 1.0 for i in range(300)},
                {"entries": 5.0}, {"members": 1.0}):  # a client never shadows the node's own counters
        with pytest.raises(Refused, match="stats report"):
            client.stats(reporter="comfyui@c:3", report=bad)
    assert client.stats().counters["provider_hits"] == 9  # a refused report changed nothing
    monkeypatch.setattr(mesh.server, "REPORT_TTL", 0.0)
    assert "provider_hits" not in client.stats().counters  # reporters that went quiet stop counting


# -- concurrency -------------------------------------------------------------------------------------------------

def _value(key: str) -> bytes:
    """The one value a key ever has in the concurrency test: any reader can check what it got."""
    rng = random.Random(key)
    size = rng.choice([1, 10 * KiB, 200 * KiB])
    return rng.randbytes(size // 2) + bytes(size - size // 2)


def test_concurrent_puts_and_gets_of_same_and_different_keys(node: Node) -> None:
    threads, rounds = 6, 25
    errors: list[BaseException] = []
    shared = [f"shared/{i}" for i in range(5)]
    stored_counts: dict[str, int] = {k: 0 for k in shared}
    lock = threading.Lock()
    small = Limits(chunk_size=64 * KiB)  # several chunks per value
    shared_client = PeerClient(node.address, SECRET, small)

    def work(t: int) -> None:
        own_client = PeerClient(node.address, SECRET, small)
        try:
            for i in range(rounds):
                c = own_client if i % 2 else shared_client
                key = shared[(t + i) % len(shared)]
                reply = c.put(key, _value(key))
                if reply.stored:
                    with lock:
                        stored_counts[key] += 1
                got = c.get(key)
                assert got is not None and got.data == _value(key)
                mine = f"own/{t}/{i % 4}"
                c.put(mine, _value(mine))
                assert c.get(mine).data == _value(mine)
                assert c.has([key, mine]) == [True, True]
        except BaseException as e:
            errors.append(e)
        finally:
            own_client.close()

    workers = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=120)
    shared_client.close()
    assert not any(w.is_alive() for w in workers)
    assert not errors, errors[0]
    assert stored_counts == {k: 1 for k in shared}  # each shared key was stored by exactly one put
    assert len(node.store) == len(shared) + threads * 4
    assert node.store.used == sum(e.size for e in node.store.items())


# -- eviction ----------------------------------------------------------------------------------------------------

@pytest.fixture
def small_node(node_factory: Callable[..., Node]) -> Node:
    """A node whose store holds three 2 MiB random blobs, not four."""
    return node_factory(max_memory=7 * MiB, near_fraction=0.0)


def test_eviction_keeps_the_budget_in_lru_order(small_node: Node) -> None:
    store = small_node.store
    blobs = {k: os.urandom(2 * MiB) for k in "abcdef"}
    with PeerClient(small_node.address, SECRET) as c:
        for k in "abc":
            assert c.put(k, blobs[k]).stored
        assert c.has(list("abc")) == [True] * 3
        assert c.get("a").data == blobs["a"]  # a is now the most recently used
        c.put("d", blobs["d"])
        assert c.has(list("abcd")) == [True, False, True, True]  # b, the least recently used, went
        assert store.used <= store.max_memory
        for k in "ef":
            c.put(k, blobs[k])
            assert store.used <= store.max_memory
        assert c.has(list("abcdef")) == [False, False, False, True, True, True]
        assert c.get("f").data == blobs["f"]
        assert c.stats().counters["evictions"] == 3


def test_blob_bigger_than_the_budget_is_refused_not_half_stored(small_node: Node) -> None:
    store = small_node.store
    with PeerClient(small_node.address, SECRET) as c:
        c.put("keep", os.urandom(MiB))
        used = store.used
        with pytest.raises(Refused) as e:
            c.put("huge", os.urandom(8 * MiB))
        assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert c.has(["huge", "keep"]) == [False, True]  # nothing stored, nothing evicted for it
        assert store.used == used
        # The budget counts bytes held: the same size of zeros, sent compressed, fits.
        assert c.put("zeros", bytes(8 * MiB), compress=True).stored
        assert c.get("zeros").data == bytes(8 * MiB)
    assert_serves(small_node.address)


def test_ram_pressure_evicts_oldest_on_put(node: Node, client: PeerClient) -> None:
    for k in "abc":
        client.put(k, os.urandom(100 * KiB))
    shortfalls: list[int] = []

    def fake_ram() -> int:
        """Plenty of RAM, except once per queued shortfall (whoever asks first: the put or the housekeeper)."""
        return 10**9 - shortfalls.pop() if shortfalls else 10**12

    node.store.min_free_ram = 10**9
    node.store._probe = fake_ram
    client.put("d", os.urandom(100 * KiB))
    assert client.has(list("abcd")) == [True] * 4
    shortfalls.append(150 * KiB)  # short by one and a half blobs
    client.put("e", os.urandom(100 * KiB))
    assert client.has(list("abcde")) == [False, False, True, True, True]
    assert client.stats().counters["pressure_evictions"] == 2


def test_blob_limits_of_the_node(node_factory: Callable[..., Node]) -> None:
    n = node_factory(limits=Limits(max_blob_size=MiB))
    with PeerClient(n.address, SECRET) as c:
        with pytest.raises(Refused) as e:
            c.put("too-big", bytes(MiB + 1))
        assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert c.put("fits", bytes(MiB)).stored



def test_hand_framing_registration_covers_every_rpc() -> None:
    """add_to_server spells its handlers out: an RPC added to proto/mesh.proto must be added there too."""
    from mesh.server import MeshServicer, add_to_server

    registered: dict[str, dict[str, object]] = {}

    class FakeServer:
        def add_generic_rpc_handlers(self, handlers: object) -> None:
            pass

        def add_registered_method_handlers(self, service: str, handlers: dict[str, object]) -> None:
            registered[service] = handlers

    servicer = MeshServicer("n", "a", BlobStore(MiB), Limits())
    add_to_server(servicer, FakeServer())  # type: ignore[arg-type]
    service = pb.DESCRIPTOR.services_by_name["Mesh"]
    assert set(registered) == {service.full_name}
    assert set(registered[service.full_name]) == {m.name for m in service.methods}


def test_a_call_racing_close_is_unreachable_not_a_value_error(node: Node) -> None:
    """Found in a run: a provider store in flight while its client closed raised grpc's ValueError (a traceback)."""
    from mesh.transport.peer import Unreachable

    c = PeerClient(node.address, SECRET)
    c.close()
    with pytest.raises(Unreachable, match="closed"):
        c.put("k", b"v")
    with pytest.raises(Unreachable, match="closed"):
        c.stats()

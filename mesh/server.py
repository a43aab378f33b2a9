"""The gRPC face of a node: translates RPCs into store (and cluster) calls and errors into status codes.

The servicer holds no state of its own beyond transfer slots and the counters sidecar clients report. A
request marked `local_only` (a peer asking this node as an owner) is answered from the local store; any other
request goes through the cluster, which routes it to the key's owners. Without a cluster (a lone node) everything is local.

Register the servicer with `add_to_server`, not the generated `add_MeshServicer_to_server`: it frames chunk
messages by hand (mesh/wire.py), which keeps the bulk bytes of a Get or Put out of protobuf objects and saves
two to three copies of every chunk.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Protocol

import grpc

import mesh
from mesh.pb import mesh_pb2 as pb
from mesh.pb import mesh_pb2_grpc as pb_grpc
from mesh.store import BlobStore, Entry, StoreFull
from mesh.wire import (SERVICE, Header, Limits, Receiver, TransferError, WireChunk, decode_chunk_message,
                       serialize_message)

log = logging.getLogger(__name__)

SLOT_WAIT = 5.0  # seconds a transfer waits for a free slot before RESOURCE_EXHAUSTED
REPORT_TTL = 60.0        # seconds a sidecar client's reported counters count after it last reported
MAX_REPORTERS = 256
MAX_REPORT_ITEMS = 256
MAX_REPORTER = 200       # characters in a reporter or counter name


class Cluster(Protocol):
    """What the servicer needs from the cluster layer (mesh/cluster.py)."""

    def get(self, key: str, timeout: float) -> Entry | None: ...
    def put(self, entry: Entry) -> int: ...
    def has(self, keys: list[str], timeout: float) -> list[bool]: ...
    def delete(self, keys: list[str], timeout: float) -> int: ...
    def ping(self, request: pb.PingRequest) -> pb.PingReply: ...
    def members(self) -> list[pb.Member]: ...
    def stats(self) -> dict[str, float]: ...
    @property
    def replicas(self) -> int: ...
    @property
    def cluster_name(self) -> str: ...


class MeshServicer(pb_grpc.MeshServicer):
    def __init__(self, node_id: str, address: str, store: BlobStore, limits: Limits,
                 cluster: Cluster | None = None) -> None:
        self.node_id = node_id
        self.address = address
        self.store = store
        self.limits = limits
        self.cluster = cluster
        self.on_drain: Callable[[], pb.DrainReply] | None = None
        self.stats_sources: list[Callable[[], dict[str, float]]] = []  # e.g. an embedded ComfyUI provider
        self._reports: dict[str, tuple[float, dict[str, float]]] = {}  # reporter -> (when, counters): sidecar clients
        self.started = time.time()
        self._slots = threading.BoundedSemaphore(limits.max_transfers)
        self._lock = threading.Lock()
        self.transfer_errors = 0
        self.busy_refusals = 0

    @contextmanager
    def _slot(self, context: grpc.ServicerContext) -> Iterator[None]:
        if not self._slots.acquire(timeout=SLOT_WAIT):
            with self._lock:
                self.busy_refusals += 1
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"node busy: {self.limits.max_transfers} transfers in progress")
        try:
            yield
        finally:
            self._slots.release()

    def _deadline(self, context: grpc.ServicerContext) -> float:
        remaining = context.time_remaining()
        return 30.0 if remaining is None else max(0.0, remaining - 0.05)

    def Get(self, request: pb.GetRequest, context: grpc.ServicerContext) -> Iterator[pb.GetReply]:
        if request.local_only or self.cluster is None:
            entry = self.store.get(request.key)
        else:
            entry = self.cluster.get(request.key, self._deadline(context))
        if entry is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no blob under key {request.key!r}")
        with self._slot(context):
            yield pb.GetReply(header=entry.header.to_pb())
            for i, chunk in enumerate(entry.chunks):
                yield chunk.message(i)  # type: ignore[misc]  # already serialized: see add_to_server

    def Put(self, request_iterator: Iterator[pb.PutRequest | WireChunk],
            context: grpc.ServicerContext) -> pb.PutReply:
        first = next(request_iterator, None)
        if first is None or isinstance(first, WireChunk) or not first.HasField("header"):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "a Put stream must start with a header")
        local_only = first.local_only or self.cluster is None
        try:
            header = Header.from_pb(first.header)
            if header.key in self.store:
                self.store.counters.duplicate_puts += 1
                return pb.PutReply(existed=True, replicas=1)
            with self._slot(context):
                entry = self._receive(header, request_iterator)
            if local_only:
                stored = self.store.put(entry)
                return pb.PutReply(stored=stored, existed=not stored, replicas=1)
            replicas = self.cluster.put(entry)
            held = self.store.peek(header.key)
            if held is not None and held is not entry:  # a concurrent put of the same key stored it first
                return pb.PutReply(existed=True, replicas=replicas)
            return pb.PutReply(stored=True, replicas=replicas)
        except TransferError as e:
            with self._lock:
                self.transfer_errors += 1
            log.info("put refused: %s", e)
            context.abort(e.code, str(e))
        except StoreFull as e:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        raise AssertionError("unreachable")

    def _receive(self, header: Header, requests: Iterator[pb.PutRequest | WireChunk]) -> Entry:
        if header.stored_size > self.store.max_memory:
            raise TransferError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"blob of {header.stored_size} bytes exceeds the store budget")
        receiver = Receiver(header, self.limits)
        for request in requests:
            if isinstance(request, WireChunk):
                receiver.add(request)
            elif request.HasField("chunk"):
                receiver.add(request.chunk)
            else:
                raise TransferError(grpc.StatusCode.INVALID_ARGUMENT, "only chunks may follow the header")
            if receiver.stored_size > self.store.max_memory:
                raise TransferError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                    f"blob exceeds the store budget of {self.store.max_memory} bytes")
        receiver.finish()
        header = replace(header, stored_size=receiver.stored_size, created_unix=header.created_unix or time.time())
        return Entry(header, tuple(receiver.chunks))

    def Has(self, request: pb.HasRequest, context: grpc.ServicerContext) -> pb.HasReply:
        keys = list(request.keys)
        if request.local_only or self.cluster is None:
            return pb.HasReply(present=[k in self.store for k in keys])
        return pb.HasReply(present=self.cluster.has(keys, self._deadline(context)))

    def Delete(self, request: pb.DeleteRequest, context: grpc.ServicerContext) -> pb.DeleteReply:
        keys = list(request.keys)
        if request.local_only or self.cluster is None:
            return pb.DeleteReply(deleted=self.store.delete(keys))
        return pb.DeleteReply(deleted=self.cluster.delete(keys, self._deadline(context)))

    def Stats(self, request: pb.StatsRequest, context: grpc.ServicerContext) -> pb.StatsReply:
        if request.reporter:
            self._take_report(request, context)
        counters = self.store.stats()
        counters.update(transfer_errors=self.transfer_errors, busy_refusals=self.busy_refusals)
        for source in self.stats_sources:
            counters.update(source())
        for name, value in self._reported().items():
            counters[name] = counters.get(name, 0.0) + value
        reply = pb.StatsReply(node_id=self.node_id, address=self.address, version=mesh.__version__,
                              uptime_seconds=time.time() - self.started, counters=counters, replicas=1)
        if self.cluster is not None:
            reply.counters.update(self.cluster.stats())
            reply.members.extend(self.cluster.members())
            reply.replicas = self.cluster.replicas
            reply.cluster = self.cluster.cluster_name
        return reply

    def _take_report(self, request: pb.StatsRequest, context: grpc.ServicerContext) -> None:
        """Keep a sidecar client's counters; bounded, since any holder of the secret may send them."""
        if len(request.reporter) > MAX_REPORTER or len(request.report) > MAX_REPORT_ITEMS or any(
                len(name) > MAX_REPORTER or not math.isfinite(v) for name, v in request.report.items()):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"a stats report has at most {MAX_REPORT_ITEMS} finite counters with names of at most "
                          f"{MAX_REPORTER} characters")
        with self._lock:
            if request.reporter not in self._reports and len(self._reports) >= MAX_REPORTERS:
                oldest = min(self._reports, key=lambda r: self._reports[r][0])
                del self._reports[oldest]
            self._reports[request.reporter] = (time.monotonic(), dict(request.report))

    def _reported(self) -> dict[str, float]:
        """The counters of the clients heard from within REPORT_TTL, summed by name."""
        now = time.monotonic()
        out: dict[str, float] = {}
        with self._lock:
            for reporter, (when, counters) in list(self._reports.items()):
                if now - when > REPORT_TTL:
                    del self._reports[reporter]
                    continue
                for name, value in counters.items():
                    out[name] = out.get(name, 0.0) + value
        return out

    def ListKeys(self, request: pb.ListKeysRequest, context: grpc.ServicerContext) -> Iterator[pb.KeyInfo]:
        now = time.time()
        for entry in self.store.items(request.prefix, request.limit):
            h = entry.header
            yield pb.KeyInfo(key=h.key, raw_size=h.raw_size, stored_size=h.stored_size,
                             age_seconds=now - entry.stored_at, meta=dict(h.meta))

    def Ping(self, request: pb.PingRequest, context: grpc.ServicerContext) -> pb.PingReply:
        if self.cluster is None:
            context.abort(grpc.StatusCode.UNIMPLEMENTED, "this node runs without a cluster")
        try:
            return self.cluster.ping(request)
        except ValueError as e:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
        raise AssertionError("unreachable")

    def Drain(self, request: pb.DrainRequest, context: grpc.ServicerContext) -> pb.DrainReply:
        if self.on_drain is None:
            context.abort(grpc.StatusCode.UNIMPLEMENTED, "this node cannot be drained")
        return self.on_drain()


def _parse_put_request(data: bytes) -> pb.PutRequest | WireChunk:
    return decode_chunk_message(data, pb.PutRequest)  # type: ignore[return-value]


def add_to_server(servicer: MeshServicer, server: grpc.Server) -> None:
    """Like the generated `add_MeshServicer_to_server`, with hand-framed chunks in Get replies and Put requests.

    Every other method keeps the generated protobuf (de)serializers.
    """
    unary = grpc.unary_unary_rpc_method_handler
    handlers = {
        "Get": grpc.unary_stream_rpc_method_handler(servicer.Get, request_deserializer=pb.GetRequest.FromString,
                                                    response_serializer=serialize_message),
        "Put": grpc.stream_unary_rpc_method_handler(servicer.Put, request_deserializer=_parse_put_request,
                                                    response_serializer=pb.PutReply.SerializeToString),
        "Has": unary(servicer.Has, request_deserializer=pb.HasRequest.FromString,
                     response_serializer=pb.HasReply.SerializeToString),
        "Delete": unary(servicer.Delete, request_deserializer=pb.DeleteRequest.FromString,
                        response_serializer=pb.DeleteReply.SerializeToString),
        "Stats": unary(servicer.Stats, request_deserializer=pb.StatsRequest.FromString,
                       response_serializer=pb.StatsReply.SerializeToString),
        "ListKeys": grpc.unary_stream_rpc_method_handler(servicer.ListKeys,
                                                         request_deserializer=pb.ListKeysRequest.FromString,
                                                         response_serializer=pb.KeyInfo.SerializeToString),
        "Ping": unary(servicer.Ping, request_deserializer=pb.PingRequest.FromString,
                      response_serializer=pb.PingReply.SerializeToString),
        "Drain": unary(servicer.Drain, request_deserializer=pb.DrainRequest.FromString,
                       response_serializer=pb.DrainReply.SerializeToString),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)

"""The gRPC face of a node: translates RPCs into store (and cluster) calls and errors into status codes.

The servicer holds no state of its own beyond transfer slots and the counters sidecar clients report. A
request marked `local_only` (a peer asking this node as an owner) is answered from the local store; any other
request goes through the cluster, which routes it to the key's owners. Without a cluster (a lone node) everything is local.

Register the servicer with `add_to_server`, not the generated `add_MeshServicer_to_server`: it frames chunk
messages by hand (mesh/transport/wire.py), which keeps the bulk bytes of a Get or Put out of protobuf objects and saves
two to three copies of every chunk.
"""

from __future__ import annotations

import itertools
import logging
import math
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any, Protocol

import grpc
from grpc_health.v1 import health_pb2
from grpc_health.v1.health import SERVICE_NAME as HEALTH_SERVICE
from grpc_health.v1.health import HealthServicer

import mesh
from mesh.transport.admission import Gate, peer_host
from mesh.transport.auth import HELLO_KEY, HELLO_METHOD, METADATA_KEY, AuthError, ServerAuth, parse_hello_header, \
    parse_proof
from mesh.cluster.leases import MAX_HOLDER, Answer
from mesh.pb import mesh_pb2 as pb
from mesh.pb import mesh_pb2_grpc as pb_grpc
from mesh.storage.budget import ByteBudget
from mesh.storage.store import BlobStore, Entry, StoreFull, fresh_write_id
from mesh.transport.peer import MeshError
from mesh.transport.tls import caller_name
from mesh.watchdog import Watch, Watchdog
from mesh.transport.wire import (MAX_KEY_BYTES, MAX_WRITER_BYTES, MAX_WRITERS, SERVICE, Header, Limits, RAW, Receiver, TransferError, WireChunk,
                       decode_chunk_message, serialize_message, repack, validate_header, without_planes)

log = logging.getLogger(__name__)

SLOT_WAIT = 5.0  # seconds a transfer waits for a free slot before RESOURCE_EXHAUSTED
ROUTED_CALLS = 16        # concurrent Has/Delete that may wait on other nodes
CONTROL_THREADS = 16     # server threads no stream or routed call can take: Ping, Stats, Drain, Digest
UNARY_CALLS = 16         # concurrent PutSmall/Has/Delete calls (a routed one also takes a ROUTED_CALLS place)
OPENINGS = 16            # Get/ListKeys calls waiting for their one request message
OPEN_CALLS = 8           # concurrent calls of each open method (Hello, health) that anyone may make
SPARE_THREADS = 16       # threads for refusals: a refused call runs for microseconds, but it runs on one
FIRST_MESSAGE = 2.0      # seconds a call may take to send its one request message
MAX_BATCH = 10_000       # keys in one Has or Delete
MAX_DIGEST_BUCKETS = 4096
REPORT_TTL = 60.0        # seconds a sidecar client's reported counters count after it last reported
MAX_REPORTERS = 256
MAX_REPORT_ITEMS = 256
MAX_REPORTER = 200       # characters in a reporter or counter name
_REPORTED_NAME = re.compile(r"^provider_[a-z0-9_]+$")  # a client's counters never shadow the node's own


class Cluster(Protocol):
    """What the servicer needs from the cluster layer (mesh/cluster/routing.py)."""

    def get(self, key: str, timeout: float) -> Entry | None: ...
    def put(self, entry: Entry, timeout: float | None = None) -> tuple[int, bool]: ...
    def purge(self, writer: str, timeout: float) -> tuple[int, list[str]]: ...
    def purge_local(self, writer: str) -> int: ...
    def has(self, keys: list[str], timeout: float) -> list[bool]: ...
    def delete(self, keys: list[str], timeout: float) -> list[bool]: ...
    def delete_local(self, keys: list[str]) -> list[bool]: ...
    def digest(self, requester: str, buckets: int) -> tuple[list[int], list[int]]: ...
    def lease(self, request: pb.LeaseRequest, timeout: float) -> Answer: ...
    def lease_local(self, request: pb.LeaseRequest) -> Answer: ...
    def stats(self) -> dict[str, float]: ...
    @property
    def replicas(self) -> int: ...
    @property
    def cluster_name(self) -> str: ...


class Roster(Protocol):
    """What the servicer needs from membership (mesh/membership/driver.py): answering pings and listing members."""

    def handle_ping(self, request: pb.PingRequest) -> pb.PingReply: ...
    def members_pb(self) -> list[pb.Member]: ...
    def warnings(self) -> list[str]: ...
    def stats(self) -> dict[str, float]: ...


class MeshServicer(pb_grpc.MeshServicer):
    def __init__(self, node_id: str, address: str, store: BlobStore, limits: Limits,
                 cluster: Cluster | None = None, auth: ServerAuth | None = None,
                 membership: Roster | None = None) -> None:
        self.node_id = node_id
        self.auth = auth
        self.address = address
        self.store = store
        self.limits = limits
        self.cluster = cluster
        self.membership = membership
        self.revoked: frozenset[str] = frozenset()  # member names refused: their calls and what they wrote
        self.on_drain: Callable[[], pb.DrainReply] | None = None
        self.stats_sources: list[Callable[[], dict[str, float]]] = []  # e.g. an embedded ComfyUI provider
        self._reports: dict[str, tuple[float, dict[str, float]]] = {}  # reporter -> (when, counters): sidecar clients
        self.started = time.time()
        # Every gate bounds its calls as a whole, per session and per source host (mesh/transport/admission.py):
        # what one member or one outsider holds, the others can still take.
        self._slots = Gate("transfers", limits.max_transfers)
        # Streams admitted at all (transferring, or waiting for a slot or a header): never more threads than this.
        self._streams = Gate("streams", 2 * limits.max_transfers)
        self._routed = Gate("routed calls", ROUTED_CALLS)
        self._unary = Gate("unary calls", UNARY_CALLS)
        self._control = Gate("control calls", CONTROL_THREADS)
        self._openings = Gate("calls waiting for their request", OPENINGS)
        # Hello: strangers who send their request as a message, strangers who send it in headers (answered at
        # once: nothing to wait for), and members renewing a session (their proof admits them apart).
        self._hellos = Gate("Hello calls", OPEN_CALLS)
        self._quick_hellos = Gate("Hello calls", OPEN_CALLS)
        self._renewals = Gate("session renewals", OPEN_CALLS)
        self._health_calls = Gate("health calls", OPEN_CALLS)
        self._reflections = Gate("reflection calls", OPEN_CALLS)
        self.inflight = ByteBudget(limits.max_inflight or store.max_memory)
        self.watchdog = Watchdog()
        self._lock = threading.Lock()
        self.transfer_errors = 0
        self.busy_refusals = 0
        self.session_renewals = 0
        self.accepting = True  # False while draining: puts go to other nodes
        self.rpc_seconds: Any = None  # a labelled prometheus Histogram (mesh/metrics.py), when the node has one

    @contextmanager
    def _timed(self, method: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            if self.rpc_seconds is not None:
                self.rpc_seconds.labels(method).observe(time.perf_counter() - started)

    @staticmethod
    def threads(limits: Limits) -> int:
        """Server threads: a place at every gate that a handler holds while it runs (transfer slots and routed
        calls nest inside streams and unary calls), and spares for refusals. Gates are taken first thing in every
        handler and never waited for (a transfer slot aside, inside its stream's place), so the pool never runs
        dry and each gate's room is really there: control calls and members' Hellos answer whatever streams,
        unary calls or strangers hold."""
        return (2 * limits.max_transfers + UNARY_CALLS + CONTROL_THREADS + OPENINGS + 5 * OPEN_CALLS
                + SPARE_THREADS)

    def _busy(self, context: grpc.ServicerContext, what: str) -> None:
        with self._lock:
            self.busy_refusals += 1
        context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"node busy: {what}")

    @staticmethod
    def _keys(context: grpc.ServicerContext) -> tuple[str, str]:
        """(session, source host) a call counts against at a gate. The session is that of the call's proof,
        which the interceptor checked ("" for open calls); the host is the peer's address without its port."""
        session = ""
        for key, value in context.invocation_metadata() or ():
            if key == METADATA_KEY:
                parsed = parse_proof(value)
                session = parsed[1] if parsed else ""
                break
        return session, peer_host(context.peer())

    @contextmanager
    def _admit(self, context: grpc.ServicerContext, gate: Gate, what: str) -> Iterator[None]:
        """Take a place at `gate` at once or refuse: a handler never waits for one, so threads stay free. One
        session, and one source host, get only their share of the gate (mesh/transport/admission.py)."""
        session, host = self._keys(context)
        why = gate.try_enter(session, host)
        if why:
            self._busy(context, f"{what} ({why})")
        try:
            yield
        finally:
            gate.leave(session, host)

    @contextmanager
    def _slot(self, context: grpc.ServicerContext) -> Iterator[None]:
        session, host = self._keys(context)
        why = self._slots.try_enter(session, host, timeout=SLOT_WAIT)
        if why:
            self._busy(context, why)
        try:
            yield
        finally:
            self._slots.leave(session, host)

    @staticmethod
    def _check_key(key: str, context: grpc.ServicerContext) -> None:
        if not key or len(key.encode()) > MAX_KEY_BYTES:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"a key has 1 to {MAX_KEY_BYTES} bytes")

    def _check_keys(self, keys: list[str], context: grpc.ServicerContext) -> None:
        if len(keys) > MAX_BATCH:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"at most {MAX_BATCH} keys per call")
        for key in keys:
            self._check_key(key, context)

    def _deadline(self, context: grpc.ServicerContext) -> float:
        remaining = context.time_remaining()
        return 30.0 if remaining is None else max(0.0, remaining - 0.05)

    def first_message(self, requests: Iterator[object], context: grpc.ServicerContext,
                      gate: Gate, what: str, whole_call: bool = False) -> Iterator[object]:
        """The one message of a call, read under a gate and a watchdog. gRPC's synchronous server would
        otherwise wait on a pool thread for a unary request that never comes: anyone could hold every thread.

        The place at `gate` is held until the caller's loop ends (the reply); the watchdog only while reading,
        unless `whole_call` (a health Watch, which would otherwise hold its place for as long as it likes)."""
        with self._admit(context, gate, f"too many {what} calls"):
            with self.watchdog.watch(context.cancel, FIRST_MESSAGE, f"{what} from {context.peer()}") as watch:
                try:
                    request = next(requests, None)
                except grpc.RpcError:
                    return
                if request is None:
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"a {what} call carries one message")
                if whole_call:
                    yield request
                    return
            if watch.expired:  # the message came as the watchdog cancelled the call: it is over
                return
            yield request

    def read_first(self, requests: Iterator[object], context: grpc.ServicerContext, gate: Gate,
                   what: str) -> object | None:
        """The one request message of a call, read under a place at `gate` and a watchdog, both given back once
        it came (None: the call ended or was cancelled first). For a call whose handler then takes places of
        its own (Get, ListKeys): reading is what a silent caller could stretch, so only reading is bounded here."""
        for request in self.first_message(requests, context, gate, what):
            return request
        return None

    def HelloStream(self, requests: Iterator[pb.HelloRequest], context: grpc.ServicerContext) -> pb.HelloReply:
        """Hello, admitted three ways so that no stranger can lock members out:

        - a renewal (the call carries a valid proof of a session of this node) takes a place of its own, which
          no caller without the secret can reach;
        - a stranger that sends its request in headers (HELLO_KEY) is answered at once, before any message:
          nothing to wait for, so squatting holds nothing (a stateless challenge: the node keeps no state
          between the caller's nonce and its answer);
        - any other (an older client) is read as before, under a gate and a first-message watchdog.
        """
        metadata = dict(context.invocation_metadata() or ())
        proof, quick = metadata.get(METADATA_KEY, ""), metadata.get(HELLO_KEY)
        gate, what = (self._quick_hellos if quick is not None else self._hellos), "too many Hello calls"
        if proof and self.auth is not None and self.auth.check(HELLO_METHOD, proof) is None:
            gate, what = self._renewals, "too many session renewals"
            with self._lock:
                self.session_renewals += 1
        if quick is not None:
            request = parse_hello_header(quick)
            if request is None:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed {HELLO_KEY} header")
            with self._admit(context, gate, what):
                return self.Hello(request, context)
        for request in self.first_message(requests, context, gate, "Hello"):
            return self.Hello(request, context)  # type: ignore[arg-type]
        return pb.HelloReply()  # cancelled: nobody reads it

    def Hello(self, request: pb.HelloRequest, context: grpc.ServicerContext) -> pb.HelloReply:
        if self.auth is None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          "this node runs without a cluster secret: it cannot prove one")
        try:
            return self.auth.hello(request)
        except AuthError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        raise AssertionError("unreachable")

    def Get(self, request: pb.GetRequest, context: grpc.ServicerContext) -> Iterator[pb.GetReply]:
        self._check_key(request.key, context)
        with self._timed("Get"), self._admit(context, self._streams, "too many streams"):
            if request.local_only or self.cluster is None:
                entry = self.store.get(request.key)
            else:
                entry = self.cluster.get(request.key, self._deadline(context))
            if entry is None:
                context.abort(grpc.StatusCode.NOT_FOUND, f"no blob under key {_short(request.key)}")
            header, chunks = entry.header, entry.chunks
            compress = request.compress and any(c.codec == RAW for c in chunks)
            if compress or not request.planes4:
                # The reader's link from here is slow (transport/link.py): pack raw chunks ahead of the wire.
                # A reader from before 4-byte planes (it does not say planes4) is sent no such chunk.
                header = replace(header, stored_size=0) if compress else without_planes(header, chunks)
                chunks = repack(chunks, compress, planes=request.planes4)  # type: ignore[assignment]
            with self._slot(context), self.watchdog.watch(context.cancel, self.limits.idle_timeout,
                                                          f"Get to {context.peer()}") as watch:
                yield pb.GetReply(header=header.to_pb())
                for i, chunk in enumerate(chunks):
                    watch.touch(self.limits.idle_timeout)
                    yield chunk.message(i)  # type: ignore[misc]  # already serialized: see add_to_server

    def PutSmall(self, request: pb.PutSmallRequest, context: grpc.ServicerContext) -> pb.PutReply:
        """The same put as a Put stream of the header and these chunks, with the same checks."""
        header = pb.PutRequest(header=request.header, local_only=request.local_only)
        # the chunks as received chunks (their data is not copied into new messages)
        chunks = (WireChunk(c.index, c.codec, c.raw_size, c.data) for c in request.chunks)
        return self.Put(itertools.chain((header,), chunks), context, "PutSmall")

    def Put(self, request_iterator: Iterator[pb.PutRequest | WireChunk],
            context: grpc.ServicerContext, method: str = "Put") -> pb.PutReply:
        with self._timed(method), self._admit(context, self._streams, "too many streams"), \
                self.watchdog.watch(context.cancel, self.limits.header_timeout, f"Put from {context.peer()}") as watch:
            try:
                return self._put(request_iterator, context, watch)
            except grpc.RpcError:  # the watchdog cancelled the call, or the caller went away
                with self._lock:
                    self.transfer_errors += 1
                return pb.PutReply()  # nobody reads it: the call is already over

    def _put(self, request_iterator: Iterator[pb.PutRequest | WireChunk], context: grpc.ServicerContext,
             watch: Watch) -> pb.PutReply:
        first = next(request_iterator, None)
        if first is None or isinstance(first, WireChunk) or not first.HasField("header"):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "a Put stream must start with a header")
        if not self.accepting and not first.local_only:
            context.abort(grpc.StatusCode.UNAVAILABLE, "this node is draining: put through another member")
        watch.touch(self.limits.idle_timeout)
        local_only = first.local_only or self.cluster is None
        taken = 0
        try:
            header = Header.from_pb(first.header)
            validate_header(header, self.limits)  # before anything is derived from it
            header = self._provenance(header, first.local_only, context)
            if self.revoked and self.revoked.intersection(header.writers):
                context.abort(grpc.StatusCode.PERMISSION_DENIED,
                              f"refused: written by a revoked member ({', '.join(sorted(self.revoked & set(header.writers)))})")
            if not self.store.would_take(header):
                self.store.counters.duplicate_puts += 1
                owners = self.cluster.owners(header.key) if self.cluster is not None and not local_only else []
                return pb.PutReply(existed=True, replicas=1, owners=owners)
            with self._slot(context):
                entry, taken = self._receive(header, request_iterator, watch)
            if local_only:
                stored = self.store.put(entry)
                return pb.PutReply(stored=stored, existed=not stored, replicas=1)
            owners, acked, hinted = self.cluster.put_detail(entry, timeout=self._deadline(context))
            held = self.store.header(header.key)
            if held is not None and held != entry.header and not hinted:  # a concurrent put stored it first
                return pb.PutReply(existed=True, replicas=len(acked), owners=owners, acked=acked)
            return pb.PutReply(stored=True, replicas=len(acked), hinted=hinted, owners=owners, acked=acked)
        except TransferError as e:
            with self._lock:
                self.transfer_errors += 1
            log.info("put refused: %s", e)
            context.abort(e.code, str(e))
        except StoreFull as e:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        finally:
            self.inflight.give(taken)  # stored now (the store counts it) or dropped
        raise AssertionError("unreachable")

    def _provenance(self, header: Header, replica: bool, context: grpc.ServicerContext) -> Header:
        """The header as this node stores it: who wrote it, and a write id given once.

        A new write (from a client) is given a fresh write id and this node's id as its first writer, whatever the
        caller sent: no caller picks an id or a provenance. A copy from another node keeps both and gains the
        authenticated name of the node that handed it on (its mTLS certificate), so a member that lies about
        where a value came from is still named in it; the newest names are kept when the list is full.
        """
        caller = caller_name(context)
        if not replica or not header.write_id:
            writers = tuple(dict.fromkeys(w for w in (caller, self.node_id) if w))
            return replace(header, write_id=fresh_write_id(), writers=writers, created_unix=time.time())
        writers = header.writers[-(MAX_WRITERS - 1):]
        if caller and (not writers or writers[-1] != caller):
            writers = (*writers, caller)
        return replace(header, writers=writers[-MAX_WRITERS:], created_unix=header.created_unix or time.time())

    def _receive(self, header: Header, requests: Iterator[pb.PutRequest | WireChunk],
                 watch: Watch) -> tuple[Entry, int]:
        """The verified entry, and the in-flight bytes it took (the caller gives them back)."""
        if header.stored_size > self.store.max_memory:
            raise TransferError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"blob of {header.stored_size} bytes exceeds the store budget")
        receiver = Receiver(header, self.limits)
        taken = 0
        try:
            for request in requests:
                watch.touch(self.limits.idle_timeout)
                if isinstance(request, WireChunk):
                    chunk: WireChunk | pb.Chunk = request
                elif request.HasField("chunk"):
                    chunk = request.chunk
                else:
                    raise TransferError(grpc.StatusCode.INVALID_ARGUMENT, "only chunks may follow the header")
                size = len(chunk.data)
                if not self.inflight.take(size):
                    raise TransferError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                        f"node busy: {self.inflight.limit} bytes of puts already in flight")
                taken += size
                receiver.add(chunk)
                if receiver.stored_size > self.store.max_memory:
                    raise TransferError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                        f"blob exceeds the store budget of {self.store.max_memory} bytes")
            receiver.finish()
        except BaseException:
            self.inflight.give(taken)
            raise
        header = replace(header, stored_size=receiver.stored_size)
        return Entry(header, tuple(receiver.chunks)), taken

    def Has(self, request: pb.HasRequest, context: grpc.ServicerContext) -> pb.HasReply:
        with self._timed("Has"):
            return self._has(request, context)

    def _has(self, request: pb.HasRequest, context: grpc.ServicerContext) -> pb.HasReply:
        keys = list(request.keys)
        self._check_keys(keys, context)
        if request.local_only or self.cluster is None:
            held = [self.store.header(k) for k in keys]
            reply = pb.HasReply(present=[h is not None for h in held])
            if request.versions:
                reply.checksums.extend(h.checksum if h else 0 for h in held)
                reply.created_unix.extend(h.created_unix if h else 0.0 for h in held)
                reply.deleted_unix.extend(0.0 for _ in keys)  # nodes before write ids read this; no clock decides
                reply.write_ids.extend(h.write_id if h else 0 for h in held)
                if len(request.write_ids) == len(keys):
                    reply.deleted.extend(self.store.deleted(Header(k, 0, 1, 0, 0, write_id=w))
                                         for k, w in zip(keys, request.write_ids))
            return reply
        with self._admit(context, self._routed, "too many routed calls"):
            return pb.HasReply(present=self.cluster.has(keys, self._deadline(context)))

    def Delete(self, request: pb.DeleteRequest, context: grpc.ServicerContext) -> pb.DeleteReply:
        if request.writer:
            return self._purge(request, context)
        keys = list(request.keys)
        self._check_keys(keys, context)
        if self.cluster is None:
            existed = [self.store.delete([k], tombstone=True) > 0 for k in keys]
        elif request.local_only:
            existed = self.cluster.delete_local(keys)
        else:
            with self._admit(context, self._routed, "too many routed calls"):
                existed = self.cluster.delete(keys, self._deadline(context))
        return pb.DeleteReply(deleted=sum(existed), existed=existed)

    def _purge(self, request: pb.DeleteRequest, context: grpc.ServicerContext) -> pb.DeleteReply:
        """Delete, with tombstones, every value whose provenance names `writer`: here, or on every member."""
        if request.keys or len(request.writer.encode()) > MAX_WRITER_BYTES:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"a purge names one writer of at most "
                                                            f"{MAX_WRITER_BYTES} bytes, and no keys")
        if request.local_only or self.cluster is None:
            if self.cluster is not None:
                deleted = self.cluster.purge_local(request.writer)  # the near cache too
            else:
                deleted = self.store.delete(self.store.written_by(request.writer), tombstone=True)
            log.warning("purged %d values written by %s", deleted, request.writer)
            return pb.DeleteReply(deleted=deleted)
        with self._admit(context, self._routed, "too many routed calls"):
            deleted, failed = self.cluster.purge(request.writer, self._deadline(context))
        if failed:
            context.abort(grpc.StatusCode.UNAVAILABLE, f"purged {deleted} values, but these members did not answer "
                                                       f"(run it again when they are back): {', '.join(failed)}")
        return pb.DeleteReply(deleted=deleted)

    def Lease(self, request: pb.LeaseRequest, context: grpc.ServicerContext) -> pb.LeaseReply:
        """A compute lease (in-flight dedupe): answered at once by the key's primary owner's table, never
        waited on here; a caller that is told HELD asks again (mesh/cluster/leases.py)."""
        with self._timed("Lease"):
            self._check_key(request.key, context)
            if not request.holder or len(request.holder.encode()) > MAX_HOLDER or not math.isfinite(request.ttl) \
                    or not math.isfinite(request.expected_seconds):
                context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                              f"a lease call names a holder of 1 to {MAX_HOLDER} bytes and finite seconds")
            if self.cluster is None:
                context.abort(grpc.StatusCode.UNIMPLEMENTED, "this node runs without a cluster")
            if request.local_only:
                answer = self.cluster.lease_local(request)
            else:
                with self._admit(context, self._routed, "too many routed calls"):
                    try:
                        answer = self.cluster.lease(request, self._deadline(context))
                    except MeshError as e:
                        context.abort(grpc.StatusCode.UNAVAILABLE, f"no owner answered: {e}")
            return pb.LeaseReply(state=_LEASE_STATES[answer.state], holder=answer.holder,
                                 held_seconds=answer.held_seconds, ttl_left=answer.ttl_left,
                                 expected_seconds=answer.expected_seconds, owner=answer.owner)

    def Digest(self, request: pb.DigestRequest, context: grpc.ServicerContext) -> pb.DigestReply:
        if self.cluster is None:
            context.abort(grpc.StatusCode.UNIMPLEMENTED, "this node runs without a cluster")
        if not 1 <= request.buckets <= MAX_DIGEST_BUCKETS or not request.requester:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"a digest has 1 to {MAX_DIGEST_BUCKETS} buckets")
        digests, counts = self.cluster.digest(request.requester, request.buckets)
        return pb.DigestReply(digests=digests, counts=counts)

    def Stats(self, request: pb.StatsRequest, context: grpc.ServicerContext) -> pb.StatsReply:
        if request.reporter:
            self._take_report(request, context)
        reply = pb.StatsReply(node_id=self.node_id, address=self.address, version=mesh.__version__,
                              uptime_seconds=time.time() - self.started, counters=self.counters(), replicas=1,
                              max_blob_size=self.limits.max_blob_size)
        if self.cluster is not None:
            reply.replicas = self.cluster.replicas
            reply.cluster = self.cluster.cluster_name
        if self.membership is not None:
            reply.members.extend(self.membership.members_pb())
            reply.warnings.extend(self.membership.warnings())
        reply.warnings.extend(self.store.warnings())
        return reply

    def counters(self) -> dict[str, float]:
        """Every counter of this node: store, transfers, cluster, an embedded provider's and its sidecar
        clients'. What `mesh stats` and the Prometheus endpoint (mesh/metrics.py) show."""
        counters = self.store.stats()
        counters.update(transfer_errors=self.transfer_errors, busy_refusals=self.busy_refusals,
                        session_renewals=self.session_renewals,
                        inflight_bytes=self.inflight.used, inflight_refusals=self.inflight.refusals,
                        stalled_streams=self.watchdog.cancelled)
        for source in self.stats_sources:
            counters.update(source())
        for name, value in self._reported().items():
            counters[name] = counters.get(name, 0.0) + value
        if self.cluster is not None:
            counters.update(self.cluster.stats())
        if self.membership is not None:
            counters.update(self.membership.stats())
        return counters

    def _take_report(self, request: pb.StatsRequest, context: grpc.ServicerContext) -> None:
        """Keep a sidecar client's counters; bounded, since any holder of the secret may send them."""
        if len(request.reporter) > MAX_REPORTER or len(request.report) > MAX_REPORT_ITEMS or any(
                len(name) > MAX_REPORTER or not math.isfinite(v) or not _REPORTED_NAME.match(name)
                for name, v in request.report.items()):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"a stats report has at most {MAX_REPORT_ITEMS} finite counters named provider_[a-z0-9_]+ "
                          f"of at most {MAX_REPORTER} characters")
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
        with self._admit(context, self._streams, "too many streams"), \
                self.watchdog.watch(context.cancel, self.limits.idle_timeout, f"ListKeys to {context.peer()}") as watch:
            listed = [(h, at) for h, at in self.store.catalog() if h.key.startswith(request.prefix)]
            for h, stored_at in listed[:request.limit] if request.limit else listed:
                watch.touch(self.limits.idle_timeout)
                yield pb.KeyInfo(key=h.key, raw_size=h.raw_size, stored_size=h.stored_size,
                                 age_seconds=now - stored_at, meta=dict(h.meta), writers=h.writers,
                                 compute_seconds=h.compute_seconds)

    def Ping(self, request: pb.PingRequest, context: grpc.ServicerContext) -> pb.PingReply:
        if self.membership is None:
            context.abort(grpc.StatusCode.UNIMPLEMENTED, "this node runs without a cluster")
        if self.auth is None:  # no secret: the node serves its host alone, and a Ping would make it a member
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "this node has no cluster secret: it joins no mesh")
        try:
            reply = self.membership.handle_ping(request)
        except ValueError as e:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
        if self.auth is not None:
            proof = next((v for k, v in context.invocation_metadata() if k == METADATA_KEY), "")
            reply.proof = self.auth.reply_tag(proof, f"/{SERVICE}/Ping", reply.SerializeToString(deterministic=True))
        return reply

    def Drain(self, request: pb.DrainRequest, context: grpc.ServicerContext) -> pb.DrainReply:
        if self.on_drain is None:
            context.abort(grpc.StatusCode.UNIMPLEMENTED, "this node cannot be drained")
        return self.on_drain()


_LEASE_STATES = {"granted": pb.LEASE_GRANTED, "held": pb.LEASE_HELD, "done": pb.LEASE_DONE,
                 "released": pb.LEASE_RELEASED, "compute": pb.LEASE_COMPUTE}


def _short(key: str, limit: int = 80) -> str:
    """A key for a status message: never echo a long one back."""
    return repr(key) if len(key) <= limit else f"{key[:limit]!r}... ({len(key)} characters)"


def _parse_put_request(data: bytes) -> pb.PutRequest | WireChunk:
    return decode_chunk_message(data, pb.PutRequest)  # type: ignore[return-value]


def _unary_as_stream(servicer: MeshServicer, method: Callable[[Any, grpc.ServicerContext], Any], gate: Gate,
                     what: str, empty: Callable[[], Any]) -> Callable[[Iterator[Any], grpc.ServicerContext], Any]:
    """A unary method served as request-streaming. gRPC's synchronous server reads a unary request on a pool
    thread before the handler runs, with no bound but the caller's deadline: 120 calls with valid proofs that never
    sent their message once held every thread of a node (health DEADLINE_EXCEEDED, peers saw it dead). Here the
    handler starts at once, takes a place at `gate` (bounded per session and per host) and reads the message
    under a watchdog; the place is held until the reply, so the gates bound the threads (MeshServicer.threads)."""

    def handler(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
        for request in servicer.first_message(requests, context, gate, what):
            return method(request, context)
        return empty()  # cancelled before its message: nobody reads it

    return handler


def _unary_stream_as_stream(servicer: MeshServicer, method: Callable[[Any, grpc.ServicerContext], Iterator[Any]]
                            ) -> Callable[[Iterator[Any], grpc.ServicerContext], Iterator[Any]]:
    """A unary-request stream (Get, ListKeys) served as request-streaming: its request is read under a place of
    its own and a watchdog; the method then takes its stream place as before."""

    def handler(requests: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
        request = servicer.read_first(requests, context, servicer._openings, "calls waiting for their request")
        if request is not None:
            yield from method(request, context)

    return handler


def add_to_server(servicer: MeshServicer, server: grpc.Server) -> None:
    """Like the generated `add_MeshServicer_to_server`, with hand-framed chunks in Get replies and Put requests,
    and every method read as a request stream (the wire is the same: a client sends one message either way).

    Every other method keeps the generated protobuf (de)serializers.
    """
    s = servicer
    stream_unary, stream_stream = grpc.stream_unary_rpc_method_handler, grpc.stream_stream_rpc_method_handler

    def unary(method: Callable[[Any, grpc.ServicerContext], Any], gate: Gate, request: Any, reply: Any,
              what: str) -> grpc.RpcMethodHandler:
        return stream_unary(_unary_as_stream(s, method, gate, what, reply), request_deserializer=request.FromString,
                            response_serializer=reply.SerializeToString)

    data, control = s._unary, s._control
    handlers = {
        # Open to anyone: read as a stream, so a caller that never sends its message holds no thread for long.
        "Hello": stream_unary(s.HelloStream, request_deserializer=pb.HelloRequest.FromString,
                              response_serializer=pb.HelloReply.SerializeToString),
        "Get": stream_stream(_unary_stream_as_stream(s, s.Get), request_deserializer=pb.GetRequest.FromString,
                             response_serializer=serialize_message),
        "Put": stream_unary(s.Put, request_deserializer=_parse_put_request,
                            response_serializer=pb.PutReply.SerializeToString),
        "PutSmall": unary(s.PutSmall, data, pb.PutSmallRequest, pb.PutReply, "PutSmall"),
        "Has": unary(s.Has, data, pb.HasRequest, pb.HasReply, "Has"),
        "Delete": unary(s.Delete, data, pb.DeleteRequest, pb.DeleteReply, "Delete"),
        "Lease": unary(s.Lease, data, pb.LeaseRequest, pb.LeaseReply, "Lease"),
        # Control: a gate of their own, which no transfer or data call can take.
        "Digest": unary(s.Digest, control, pb.DigestRequest, pb.DigestReply, "Digest"),
        "Stats": unary(s.Stats, control, pb.StatsRequest, pb.StatsReply, "Stats"),
        "ListKeys": stream_stream(_unary_stream_as_stream(s, s.ListKeys),
                                  request_deserializer=pb.ListKeysRequest.FromString,
                                  response_serializer=pb.KeyInfo.SerializeToString),
        "Ping": unary(s.Ping, control, pb.PingRequest, pb.PingReply, "Ping"),
        "Drain": unary(s.Drain, control, pb.DrainRequest, pb.DrainReply, "Drain"),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)


REFLECTION_SERVICES = ("grpc.reflection.v1alpha.ServerReflection", "grpc.reflection.v1.ServerReflection")


def add_reflection_to_server(servicer: MeshServicer, server: grpc.Server, services: tuple[str, ...]) -> None:
    """gRPC server reflection (`grpcurl -plaintext HOST:PORT list`), open like health: it describes only the
    public contract (proto/mesh.proto). A reflection stream is admitted OPEN_CALLS at a time and cancelled when
    its client stays silent, so it holds no thread for long."""
    from grpc_reflection.v1alpha import reflection, reflection_pb2

    inner = reflection.ReflectionServicer((*services, *REFLECTION_SERVICES))

    def info(requests: Iterator[reflection_pb2.ServerReflectionRequest], context: grpc.ServicerContext
             ) -> Iterator[reflection_pb2.ServerReflectionResponse]:
        with servicer._admit(context, servicer._reflections, "too many reflection calls"), \
                servicer.watchdog.watch(context.cancel, FIRST_MESSAGE * 5, f"reflection from {context.peer()}") as w:

            def watched() -> Iterator[reflection_pb2.ServerReflectionRequest]:
                try:
                    for request in requests:
                        w.touch(FIRST_MESSAGE * 5)
                        yield request
                except grpc.RpcError:
                    return

            yield from inner.ServerReflectionInfo(watched(), context)

    handler = grpc.stream_stream_rpc_method_handler(
        info, request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString)
    server.add_generic_rpc_handlers(tuple(grpc.method_handlers_generic_handler(name, {"ServerReflectionInfo": handler})
                                          for name in REFLECTION_SERVICES))


def add_health_to_server(servicer: MeshServicer, health: HealthServicer, server: grpc.Server) -> None:
    """grpc.health.v1, open to anyone like Hello, so read the same way (gate, first-message watchdog)."""

    def check(requests: Iterator[health_pb2.HealthCheckRequest], context: grpc.ServicerContext
              ) -> health_pb2.HealthCheckResponse:
        for request in servicer.first_message(requests, context, servicer._health_calls, "health"):
            return health.Check(request, context)
        return health_pb2.HealthCheckResponse()

    def watch(requests: Iterator[health_pb2.HealthCheckRequest], context: grpc.ServicerContext
              ) -> Iterator[health_pb2.HealthCheckResponse]:
        for request in servicer.first_message(requests, context, servicer._health_calls, "health", whole_call=True):
            yield from health.Watch(request, context)

    handlers = {
        "Check": grpc.stream_unary_rpc_method_handler(
            check, request_deserializer=health_pb2.HealthCheckRequest.FromString,
            response_serializer=health_pb2.HealthCheckResponse.SerializeToString),
        "Watch": grpc.stream_stream_rpc_method_handler(
            watch, request_deserializer=health_pb2.HealthCheckRequest.FromString,
            response_serializer=health_pb2.HealthCheckResponse.SerializeToString),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(HEALTH_SERVICE, handlers),))

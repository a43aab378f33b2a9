"""A client for one mesh node: deadlines, the cluster token, chunked transfers in and out.

Every call carries a deadline; gRPC failures become one of a few exceptions a caller can act on (and the CLI
can print as one line). The channel is a plain synchronous grpc channel: it is thread-safe and bound to no
event loop, so ComfyUI's per-prompt loops can use it from a worker thread.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import re
import time
from pathlib import Path
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, TypeVar

import grpc

from mesh.transport.auth import STALE, WRONG_SECRET, AuthError, ClientAuth, Secret, as_keyring
from mesh.transport.link import Links
from mesh.pb import mesh_pb2 as pb
from mesh.pb import mesh_pb2_grpc as pb_grpc
from mesh.transport.turns import Turns
from mesh.watchdog import Watchdog
from mesh.transport.wire import (LZ4_PLANES4, MAX_KEY_BYTES, RAW, SERVICE, Header, Limits, Receiver, StoredChunk,
                                 TransferError, WireChunk, decode_chunk_message, file_header, iter_chunks,
                                 iter_file_chunks, make_header, serialize_message, repack, without_planes, Tee)

if TYPE_CHECKING:
    from mesh.transport.tls import TlsConfig

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]  # called with (bytes moved so far, total bytes)
Metadata = tuple[tuple[str, str], ...]
R = TypeVar("R")

DEFAULT_TIMEOUT = 30.0
HELLO_TIMEOUT = 5.0  # the most a handshake may take of a call's deadline
MAX_TRANSFERS = 4    # bulk streams (Get, Put) at once to one node from one client: see PeerClient._transfer_slot
MIN_CALL_TIME = 0.1  # seconds a bulk call must have left after queueing for a slot, or it is not started
WATCHDOG = Watchdog()  # cancels reads whose node does not answer within their first-byte budget


class MeshError(Exception):
    """A mesh call failed; `code` is the gRPC status (None for local causes)."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.code = code


class Unreachable(MeshError):
    """The node did not answer in time or is not there."""


class Unauthenticated(MeshError):
    """The node refused our cluster secret."""


class Refused(MeshError):
    """The node understood and said no (too large, bad data, busy)."""


def channel_options(limits: Limits) -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", limits.max_message_size),
        ("grpc.max_receive_message_length", limits.max_message_size),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        # Fail fast when a peer is gone instead of sitting in backoff past our deadlines.
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", 2_000),
    ]


# What gRPC's connection errors say about TLS, and what that means for whoever reads our one-line error.
# The specific reasons first: OpenSSL reports most of them under CERTIFICATE_VERIFY_FAILED too.
TLS_REASONS = (
    ("certificate has expired", "its certificate has expired"),
    ("CERTIFICATE_EXPIRED", "a certificate has expired"),
    ("not yet valid", "its certificate is not valid yet (check the clocks, or when it was issued)"),
    ("unsupported certificate purpose", "its certificate is not for a server (serverAuth)"),
    ("Hostname Verification Check failed", "its certificate does not name --tls-server-name"),
    ("CERTIFICATE_VERIFY_FAILED", "its certificate is not signed by our CA (--tls-ca)"),
    ("WRONG_VERSION_NUMBER", "it does not speak TLS (a plaintext node: drop --tls-*)"),
    ("SSLV3_ALERT", "it refused our certificate (not signed by its CA, expired, or not for a client?)"),
    ("security handshaker", "our certificate or key cannot be used (--tls-cert, --tls-key)"),
)


def tls_failure(detail: str, tls: bool | None) -> str | None:
    """Why a connection failed, where it is TLS's doing; None where it is not (or cannot be told apart)."""
    if ("Tls handshake failed" in detail or "SSL_ERROR" in detail or "TSI_" in detail
            or "Hostname Verification" in detail or "security handshaker" in detail):
        reason = next((why for marker, why in TLS_REASONS if marker in detail), "the TLS handshake failed")
        return f"TLS: {reason}"
    if "Socket closed" in detail and "failed to connect" in detail:
        if tls:
            return ("TLS: the node closed the connection during the handshake: it may refuse our client "
                    "certificate (signed by another CA, expired, or not for a client?), or it is down")
        if tls is False:
            return ("the node closed the connection at once: it seems to serve TLS only, and this client speaks "
                    "plaintext: " + TLS_HINT)
    return None


# What to set, named for every way a setting is given (flag, environment, config file), since the same errors reach
# the CLI, `mesh serve` and ComfyUI's log.
TLS_HINT = ("give it --tls-cert, --tls-key and --tls-ca (MESH_TLS_CERT, MESH_TLS_KEY, MESH_TLS_CA, or tls_cert, "
            "tls_key, tls_ca in the config file)")
SECRET_HINT = "--secret-file FILE (MESH_SECRET_FILE, or secret_file in the config file)"


def translate(err: grpc.RpcError, address: str, tls: bool | None = None, secret: bool | None = None) -> MeshError:
    """A gRPC error as one line that says what happened and, where we can tell, what to do. `tls` and `secret`:
    whether this client dials TLS and holds a secret (None: unknown)."""
    code = err.code() if hasattr(err, "code") else None
    detail = err.details() if hasattr(err, "details") else str(err)
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED,
                grpc.StatusCode.UNKNOWN) and (why := tls_failure(detail or "", tls)):
        return Unreachable(f"node {address} unreachable: {why} ({detail})", code)
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED):
        return Unreachable(f"node {address} unreachable: {detail or code}", code)
    if code == grpc.StatusCode.UNAUTHENTICATED:
        if secret is False:
            return Unauthenticated(f"node {address} needs the cluster secret, and this client has none ({detail}): "
                                   f"give it {SECRET_HINT}", code)
        return Unauthenticated(f"node {address} refused the cluster secret: {detail}", code)
    return Refused(f"node {address}: {code.name if code else 'error'}: {detail}", code)


@dataclass(frozen=True)
class Blob:
    header: Header
    data: memoryview  # writable, fresh: mesh.codec.decode hands out tensors that view it


def _parse_get_reply(data: bytes) -> pb.GetReply | WireChunk:
    return decode_chunk_message(data, pb.GetReply)  # type: ignore[return-value]


class PeerClient:
    def __init__(self, address: str, secret: Secret = None, limits: Limits | None = None,
                 timeout: float = DEFAULT_TIMEOUT, tls: TlsConfig | None = None, links: Links | None = None) -> None:
        """`links`: the measured links that decide compression (shared by a pool's clients); default: this
        client's own, deciding automatically."""
        self.address = address
        self.limits = limits or Limits()
        self.links = links if links is not None else Links()
        # Small values go in one unary PutSmall (no client stream: grpc's sync client starts a thread for each),
        # until this node says it has none (a version from before it).
        self._put_small = True
        self._transfers = Turns(MAX_TRANSFERS)
        self.timeout = timeout
        self._auth = ClientAuth(as_keyring(secret))
        self._has_secret = as_keyring(secret) is not None  # what an UNAUTHENTICATED error says to do (translate)
        self._closed = False
        self._tls_on = tls is not None  # what a failed connection's error says about TLS (translate)
        options: list[tuple[str, Any]] = list(channel_options(self.limits))
        if tls is None:
            self._channel = grpc.insecure_channel(address, options=options)
        else:
            self._channel = grpc.secure_channel(address, tls.channel_credentials(),
                                                options=options + tls.channel_options())
        self._stub = pb_grpc.MeshStub(self._channel)
        # Get and Put move the bulk bytes: their chunk messages are framed by hand (see mesh/transport/wire.py).
        self._get = self._channel.unary_stream(f"/{SERVICE}/Get",
                                               request_serializer=pb.GetRequest.SerializeToString,
                                               response_deserializer=_parse_get_reply, _registered_method=True)
        self._put = self._channel.stream_unary(f"/{SERVICE}/Put", request_serializer=serialize_message,
                                               response_deserializer=pb.PutReply.FromString, _registered_method=True)

    def close(self) -> None:
        self._closed = True
        self._channel.close()

    def __enter__(self) -> PeerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def proven_node_id(self) -> str | None:
        """The node id the node proved in the handshake (None before one, or without a secret)."""
        return self._auth.node_id

    @property
    def proven_address(self) -> str | None:
        """The address the node proved it advertises (None before a handshake, or without a secret)."""
        return self._auth.address

    def _hello(self, request: pb.HelloRequest, timeout: float, metadata: Metadata = ()) -> pb.HelloReply:
        try:
            return self._stub.Hello(request, timeout=min(timeout, HELLO_TIMEOUT), metadata=metadata)
        except grpc.RpcError as e:
            if e.code() in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.UNIMPLEMENTED):
                raise Unauthenticated(f"node {self.address} cannot prove the cluster secret: {e.details()}",
                                      grpc.StatusCode.UNAUTHENTICATED) from None
            raise translate(e, self.address, self._tls_on, self._has_secret) from None

    def _md(self, method: str, timeout: float) -> Metadata:
        """This call's proof; says Hello first when there is no session yet (the node proves the secret then)."""
        try:
            return self._auth.metadata(f"/{SERVICE}/{method}", lambda r, md=(): self._hello(r, timeout, md))
        except AuthError as e:
            if WRONG_SECRET in str(e):
                raise Unauthenticated(f"node {self.address} holds another cluster secret than this client (a wrong "
                                      f"secret: {e}): give the secret file every node uses, {SECRET_HINT}",
                                      grpc.StatusCode.UNAUTHENTICATED) from None
            raise Unauthenticated(f"node {self.address} is not trusted: {e}", grpc.StatusCode.UNAUTHENTICATED) from None

    def _stale(self, err: grpc.RpcError) -> bool:
        """The node no longer knows our session (it restarted): say Hello again and retry once."""
        if err.code() == grpc.StatusCode.UNAUTHENTICATED and err.details() == STALE:
            self._auth.reset()
            return True
        return False

    def _in_session(self, name: str, timeout: float, call: Callable[[Metadata], R], retry: bool = True) -> R:
        """`call(proof metadata)` for method `name`; once more with a fresh session if the node restarted.

        gRPC errors are left to the caller (a missing key is an answer to some). `retry` is False where the
        request cannot be sent twice (a one-shot stream of chunks). A call racing `close()` is Unreachable, not
        grpc's ValueError, so that callers which contain MeshError (the provider's store thread) contain it too.
        """
        try:
            try:
                return call(self._md(name, timeout))
            except grpc.RpcError as e:
                if not (self._stale(e) and retry):
                    raise
                return call(self._md(name, timeout))
        except ValueError:
            if self._closed:  # grpc's "Cannot invoke RPC on closed channel": a call racing close()
                raise Unreachable(f"the client of node {self.address} was closed") from None
            raise

    def _t(self, timeout: float | None) -> float:
        return self.timeout if timeout is None else timeout

    # -- blobs ---------------------------------------------------------------------------------------------

    def get(self, key: str, timeout: float | None = None, local_only: bool = False,
            progress: Progress | None = None) -> Blob | None:
        """The verified bytes of `key`, decoded into one buffer, or None if the node does not have it."""
        receiver = self._receive(key, timeout, local_only, into=True, progress=progress)
        if receiver is None:
            return None
        assert receiver.buffer is not None
        return Blob(receiver.header, receiver.buffer)

    def _receive(self, key: str, timeout: float | None, local_only: bool, **how: Any) -> Receiver | None:
        """The finished Receiver of a whole Get stream (`how`: as _get_stream takes), or None on NOT_FOUND."""
        receiver: Receiver | None = None
        try:
            for receiver, _ in self._get_stream(key, timeout, local_only, **how):
                pass
        except _Missing:
            return None
        assert receiver is not None
        return receiver

    def get_into(self, key: str, tee: Tee, timeout: float | None = None, local_only: bool = False) -> Header | None:
        """Hand the verified bytes of `key` to `tee` chunk by chunk as they arrive (a decoder that works while
        the rest is on the wire), keeping nothing; the header once the whole stream checked out, or None."""
        receiver = self._receive(key, timeout, local_only, tee=tee, keep=False)
        return None if receiver is None else receiver.header

    def get_chunks(self, key: str, timeout: float | None = None, local_only: bool = True,
                   first_byte: float | None = None, on_first_byte: Callable[[float], None] | None = None,
                   tee: Tee | None = None) -> tuple[Header, list[StoredChunk]] | None:
        """The verified chunks of `key` as stored (no decompression kept): for node-to-node copies.

        `first_byte`: seconds the node may take to answer at all (header or NOT_FOUND) before the call is
        cancelled as Unreachable, however long the transfer itself may then take: a frozen node (its port
        still accepts) costs that budget, not the whole deadline. `on_first_byte` gets the time it took.
        `tee` also gets each chunk's raw bytes as they are verified (see get_into).
        """
        receiver = self._receive(key, timeout, local_only, first_byte=first_byte, on_first_byte=on_first_byte,
                                 tee=tee)
        return None if receiver is None else (receiver.header, receiver.chunks)

    def get_to_file(self, key: str, path: str | os.PathLike[str], timeout: float | None = None,
                    progress: Progress | None = None) -> Header | None:
        """Write the verified bytes of `key` to `path` in constant memory; None (and no file) if it is missing.

        Chunks go to a temporary file beside `path`, renamed over it only once the checksum matched: a failed
        or corrupt transfer never leaves a partial file under the name asked for."""
        target = Path(path)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.partial")
        receiver: Receiver | None = None
        try:
            # O_EXCL | O_NOFOLLOW: a name planted in a shared folder (a link elsewhere) is never written through
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
            with open(fd, "wb") as f:
                for receiver, _ in self._get_stream(key, timeout, False, progress=progress, sink=f.write):
                    pass
            os.replace(tmp, target)
        except _Missing:
            return None
        finally:
            tmp.unlink(missing_ok=True)
        assert receiver is not None
        return receiver.header

    def put_file(self, key: str, path: str | os.PathLike[str], meta: Mapping[str, str] | None = None,
                 timeout: float | None = None, progress: Progress | None = None,
                 max_size: int | None = None) -> pb.PutReply:
        """Store a file's bytes in constant memory: read once for the checksum, once more as it is sent.
        `max_size`: the largest value the node said it accepts (StatsReply.max_blob_size), when the caller asked
        it; else this client's own limit."""
        size = os.stat(path).st_size
        limit = max_size or self.limits.max_blob_size
        if size > limit:  # refused before reading it (twice)
            raise Refused(f"{path} holds {size} bytes, more than the largest value ({limit})",
                          grpc.StatusCode.RESOURCE_EXHAUSTED)
        header = file_header(key, path, self.limits.chunk_size, meta)
        compress = self.links.compress(self.address)
        return self._put_made(header, lambda planes: iter_file_chunks(path, self.limits.chunk_size, compress, planes),
                              timeout, False, progress, compress)

    def _get_stream(self, key: str, timeout: float | None, local_only: bool, progress: Progress | None = None,
                    first_byte: float | None = None, on_first_byte: Callable[[float], None] | None = None,
                    **how: Any) -> Iterator[tuple[Receiver, StoredChunk | None]]:
        """The Get stream of `key`, each chunk through a Receiver made with `how` (into, sink, tee, keep)."""
        if len(key.encode()) > MAX_KEY_BYTES:
            raise _Missing()  # no node stores such a key
        t = self._t(timeout)
        with self._transfer_slot(t) as waited:
            yield from self._get_stream_in_slot(key, t - waited, local_only, progress, first_byte, on_first_byte,
                                                how)

    @contextlib.contextmanager
    def _transfer_slot(self, timeout: float) -> Iterator[float]:
        """At most MAX_TRANSFERS bulk streams to this node from this process at once; yields the seconds waited.

        More streams do not move more bytes: each adds Python threads parsing and hashing under one GIL and
        splits the connection's flow-control window, and 16 readers moved 0.87 GB/s where 4 moved 1.38 (one
        client on loopback, scripts/bench_concurrency.py). Readers beyond the limit wait their turn, in order."""
        started = time.monotonic()
        if not self._transfers.acquire(timeout):
            raise MeshError(f"{MAX_TRANSFERS} transfers to {self.address} already under way for {timeout:.1f} s",
                            grpc.StatusCode.DEADLINE_EXCEEDED)
        try:
            waited = time.monotonic() - started
            if waited and timeout - waited < MIN_CALL_TIME:
                # Too little left for a call: time spent queueing here must not read as the node being slow
                # (a deadline on the wire is Unreachable, and its owner would be skipped as down).
                raise MeshError(f"{MAX_TRANSFERS} transfers to {self.address} under way: {waited:.2f} s of "
                                f"{timeout:.2f} s spent waiting for one", grpc.StatusCode.DEADLINE_EXCEEDED)
            yield waited
        finally:
            self._transfers.release()

    def _get_stream_in_slot(self, key: str, t: float, local_only: bool, progress: Progress | None,
                            first_byte: float | None, on_first_byte: Callable[[float], None] | None,
                            how: dict[str, Any]) -> Iterator[tuple[Receiver, StoredChunk | None]]:
        compress = self.links.compress(self.address)
        request = pb.GetRequest(key=key, local_only=local_only, compress=compress, planes4=True)
        started = time.monotonic()

        def first_reply(metadata: Metadata) -> pb.GetReply | WireChunk | None:
            call = self._get(request, timeout=t, metadata=metadata)
            calls.append(call)
            if first_byte is None or first_byte >= t:
                return next(call, None)
            with WATCHDOG.watch(call.cancel, first_byte, f"first byte of {key!r} from {self.address}"):
                return next(call, None)

        calls: list[Any] = []
        receiver: Receiver | None = None
        moved = 0
        try:
            first = self._in_session("Get", t, first_reply)
            if on_first_byte is not None:
                on_first_byte(time.monotonic() - started)
            call = calls[-1]
            for reply in itertools.chain(() if first is None else (first,), call):
                if isinstance(reply, WireChunk):
                    if receiver is None:
                        raise TransferError(grpc.StatusCode.DATA_LOSS, "chunk before header")
                    chunk = receiver.add(reply)
                    moved += chunk.raw_size
                    if progress:
                        progress(moved, receiver.header.raw_size)
                    yield receiver, chunk
                elif reply.HasField("header"):
                    if receiver is not None:
                        raise TransferError(grpc.StatusCode.DATA_LOSS, "second header in one stream")
                    header = Header.from_pb(reply.header)
                    if header.key != key:
                        raise TransferError(grpc.StatusCode.DATA_LOSS, f"asked for {key!r}, got {header.key!r}")
                    # refuses raw_size > max_blob_size
                    receiver = Receiver(header, self.limits, **how)
                    yield receiver, None
            if receiver is None:
                raise TransferError(grpc.StatusCode.DATA_LOSS, "stream ended without a header")
            receiver.finish()
            self.links.observe(self.address, receiver.header.raw_size, time.monotonic() - started,
                               compressed=receiver.stored_size != receiver.header.raw_size or compress)
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.NOT_FOUND:
                if on_first_byte is not None:
                    on_first_byte(time.monotonic() - started)
                raise _Missing() from None
            if e.code() == grpc.StatusCode.CANCELLED and first_byte is not None and receiver is None:
                raise Unreachable(f"node {self.address} did not answer within {first_byte:.2f} s",
                                  grpc.StatusCode.DEADLINE_EXCEEDED) from None
            raise translate(e, self.address, self._tls_on, self._has_secret) from None
        except TransferError as e:
            calls[-1].cancel()
            raise Refused(f"node {self.address} sent a bad blob for {key!r}: {e}", e.code) from None

    def put(self, key: str, data: bytes | bytearray | memoryview, meta: Mapping[str, str] | None = None,
            timeout: float | None = None, compress: bool | None = None, local_only: bool = False,
            progress: Progress | None = None, compute_seconds: float = 0.0) -> pb.PutReply:
        """Store bytes under `key`. Raw chunks are framed straight from `data`; compressed ones (`compress`,
        by default: whether the link to this node is slow) are packed ahead while earlier ones are on the wire.
        `compute_seconds`: what computing the value cost (0: unknown), kept with it for eviction."""
        header = make_header(key, data, self.limits.chunk_size, meta, compute_seconds)
        if compress is None:
            compress = self.links.compress(self.address)
        return self._put_made(header, lambda planes: iter_chunks(data, self.limits.chunk_size, compress, copy=False,
                                                                 planes=planes),
                              timeout, local_only, progress, compress)

    def _put_made(self, header: Header, make: Callable[[bool], Iterable[StoredChunk]], timeout: float | None,
                  local_only: bool, progress: Progress | None, packed: bool) -> pb.PutReply:
        """Put the chunks `make(planes)` produces (a one-shot stream); made again, once, without 4-byte-plane
        chunks if the node refused them (a version from before them)."""
        planes = self.links.planes4(self.address)
        try:
            return self.put_chunks(header, make(planes), timeout, local_only, progress, compress=False,
                                   packed=packed)
        except Refused:
            if not planes or self.links.planes4(self.address):
                raise  # refused for another reason: put_chunks learns a planes refusal as it sees one
        return self.put_chunks(header, make(False), timeout, local_only, progress, compress=False, packed=packed)

    def _refused_planes4(self, error: Refused) -> bool:
        """Whether the node refused a 4-byte-plane chunk (a version from before them): then it is sent none again."""
        if error.code != grpc.StatusCode.INVALID_ARGUMENT or not re.search(
                rf"unknown chunk codec {LZ4_PLANES4}$", str(error)):
            return False
        log.info("node %s does not take 4-byte-plane chunks (an older version): sending it lz4 or raw", self.address)
        self.links.refused_planes4(self.address)
        return True

    def put_chunks(self, header: Header, chunks: Iterable[StoredChunk], timeout: float | None = None,
                   local_only: bool = False, progress: Progress | None = None,
                   wait_for_ready: bool = False, compress: bool | None = None, packed: bool = False) -> pb.PutReply:
        """`wait_for_ready`: wait (within the deadline) for a peer that is reconnecting, rather than fail at
        once: for background copies, which would otherwise be lost to a channel still in reconnect backoff.

        `compress`: pack raw chunks on the way (default: whether the link to this node is slow); `packed`: the
        chunks were already packed for this link (for the measurement only). A node that refuses 4-byte-plane
        chunks (an older version) is sent stored chunks again without them, once."""
        if compress is None:
            compress = self.links.compress(self.address)
        planes = self.links.planes4(self.address)
        try:
            return self._put_chunks(header, chunks, timeout, local_only, progress, wait_for_ready, compress, packed,
                                    planes)
        except Refused as e:
            # learnt even when these chunks cannot be sent again (a one-shot stream: its maker sends anew)
            if not (planes and self._refused_planes4(e) and isinstance(chunks, Sequence)):
                raise
        return self._put_chunks(header, chunks, timeout, local_only, progress, wait_for_ready, compress, packed,
                                False)

    def _put_chunks(self, header: Header, chunks: Iterable[StoredChunk], timeout: float | None, local_only: bool,
                    progress: Progress | None, wait_for_ready: bool, compress: bool, packed: bool,
                    planes: bool) -> pb.PutReply:
        if compress:
            header = replace(header, stored_size=0)  # known only once packed
        elif not planes and isinstance(chunks, Sequence):
            header = without_planes(header, chunks)

        if self._put_small and header.raw_size <= self.limits.chunk_size:
            small = list(repack(chunks, compress, planes))  # one chunk's worth: made at once
            try:
                reply = self._unary("PutSmall", pb.PutSmallRequest(
                    header=header.to_pb(), chunks=[c.to_pb(i) for i, c in enumerate(small)], local_only=local_only),
                    timeout, wait_for_ready)
            except Refused as e:
                if e.code != grpc.StatusCode.UNIMPLEMENTED:
                    raise
                log.info("node %s has no PutSmall (an older version): small values go as Put streams", self.address)
                self._put_small = False
                chunks, compress = small, False  # packed already: the stream below sends them as they are
            else:
                if progress:
                    progress(header.raw_size, header.raw_size)
                return reply  # type: ignore[return-value]

        sent_packed = False  # whether any chunk went compressed: such a transfer does not measure the link

        def requests() -> Iterator[pb.PutRequest | bytes]:
            nonlocal sent_packed
            yield pb.PutRequest(header=header.to_pb(), local_only=local_only)
            moved = 0
            for i, chunk in enumerate(repack(chunks, compress, planes)):
                sent_packed = sent_packed or chunk.codec != RAW
                yield chunk.message(i)  # a serialized PutRequest carrying the chunk
                moved += chunk.raw_size
                if progress:
                    progress(moved, header.raw_size)

        t = self._t(timeout)
        with self._transfer_slot(t) as waited:
            t -= waited
            started = time.monotonic()
            try:
                # A refused proof is answered before a chunk is read; the chunks can be sent again when they are
                # a sequence (a stored entry), not a one-shot generator.
                reply = self._in_session("Put", t, lambda md: self._put(requests(), timeout=t, metadata=md,
                                                                        wait_for_ready=wait_for_ready),
                                         retry=isinstance(chunks, Sequence))
            except grpc.RpcError as e:
                raise translate(e, self.address, self._tls_on, self._has_secret) from None
        if not reply.existed:
            self.links.observe(self.address, header.raw_size, time.monotonic() - started,
                               compressed=compress or packed or sent_packed)
        return reply

    # -- small calls -----------------------------------------------------------------------------------------

    def _unary(self, name: str, request: object, timeout: float | None, wait_for_ready: bool = False) -> object:
        method: Callable[..., object] = getattr(self._stub, name)
        t = self._t(timeout)
        try:
            return self._in_session(name, t, lambda md: method(request, timeout=t, metadata=md,
                                                               wait_for_ready=wait_for_ready))
        except grpc.RpcError as e:
            raise translate(e, self.address, self._tls_on, self._has_secret) from None

    def has(self, keys: list[str], timeout: float | None = None, local_only: bool = False) -> list[bool]:
        reply = self._unary("Has", pb.HasRequest(keys=keys, local_only=local_only), timeout)
        present = list(reply.present)  # type: ignore[attr-defined]
        if len(present) != len(keys):
            raise Refused(f"node {self.address} answered {len(present)} of {len(keys)} keys")
        return present

    def lease(self, request: pb.LeaseRequest, timeout: float | None = None, local_only: bool = False
              ) -> pb.LeaseReply:
        """A compute-lease call (in-flight dedupe, mesh/cluster/leases.py); `local_only`: this node's table."""
        if local_only != request.local_only:
            request = pb.LeaseRequest(key=request.key, holder=request.holder, op=request.op, ttl=request.ttl,
                                      done=request.done, local_only=local_only,
                                      expected_seconds=request.expected_seconds, uncached=request.uncached)
        return self._unary("Lease", request, timeout)  # type: ignore[return-value]

    def delete(self, keys: list[str], timeout: float | None = None, local_only: bool = False) -> int:
        """How many of `keys` existed (anywhere in the mesh, or with local_only on this node)."""
        return sum(self.delete_keys(keys, timeout, local_only))

    def delete_keys(self, keys: list[str], timeout: float | None = None, local_only: bool = False) -> list[bool]:
        """Per key: whether it existed. Every copy is removed and a tombstone keeps in-flight copies out."""
        reply = self._unary("Delete", pb.DeleteRequest(keys=keys, local_only=local_only), timeout)
        existed = list(reply.existed)  # type: ignore[attr-defined]
        if len(existed) != len(keys):
            raise Refused(f"node {self.address} answered {len(existed)} of {len(keys)} keys")
        return existed

    def versions(self, keys: list[str], write_ids: list[int], timeout: float | None = None
                 ) -> list[tuple[int, bool]]:
        """Per key: (the write id of the copy this node holds, 0 if none; whether it deleted the asker's copy,
        named by `write_ids`, recently: a tombstone)."""
        request = pb.HasRequest(keys=keys, local_only=True, versions=True, write_ids=write_ids)
        reply = self._unary("Has", request, timeout, wait_for_ready=True)
        held, deleted = list(reply.write_ids), list(reply.deleted)  # type: ignore[attr-defined]
        checksums = list(reply.checksums)  # type: ignore[attr-defined]
        if not held and len(checksums) == len(keys):
            # A node from before write ids (a rolling upgrade): it tells only whether it holds each key. Its
            # copies count as other writes (never deleted here), so repair fills what it lacks and no more.
            return [(1 if c else 0, False) for c in checksums]
        if not len(held) == len(deleted) == len(keys):
            raise Refused(f"node {self.address} answered versions of {len(held)} of {len(keys)} keys")
        return list(zip(held, deleted))

    def purge(self, writer: str, timeout: float | None = None, local_only: bool = False) -> int:
        """Delete every value whose provenance names `writer` (on every member, or with local_only on this node)."""
        reply = self._unary("Delete", pb.DeleteRequest(writer=writer, local_only=local_only), timeout)
        return int(reply.deleted)  # type: ignore[attr-defined]

    def digest(self, requester: str, buckets: int, timeout: float | None = None) -> tuple[list[int], list[int]]:
        """The node's anti-entropy summary of the keys it and `requester` both own (mesh/cluster/repair.py)."""
        reply = self._unary("Digest", pb.DigestRequest(requester=requester, buckets=buckets), timeout,
                            wait_for_ready=True)
        digests, counts = list(reply.digests), list(reply.counts)  # type: ignore[attr-defined]
        if len(digests) != buckets or len(counts) != buckets:
            raise Refused(f"node {self.address} answered a digest of {len(digests)} buckets, not {buckets}")
        return digests, counts

    def stats(self, timeout: float | None = None, reporter: str = "",
              report: Mapping[str, float] | None = None) -> pb.StatsReply:
        """The node's view; `reporter` and `report` hand this client's own counters to the node as well."""
        request = pb.StatsRequest(reporter=reporter, report=dict(report or {}))
        return self._unary("Stats", request, timeout)  # type: ignore[return-value]

    def ping(self, request: pb.PingRequest, timeout: float | None = None) -> pb.PingReply:
        """A heartbeat; with a secret, the reply must carry the node's tag for this very call (see auth.py):
        membership learns who is alive from it, so no host that merely relays the traffic may alter it."""
        t = self._t(timeout)

        def ping(md: Metadata) -> tuple[Metadata, pb.PingReply]:
            return md, self._stub.Ping(request, timeout=t, metadata=md)

        try:
            md, reply = self._in_session("Ping", t, ping)
        except grpc.RpcError as e:
            raise translate(e, self.address, self._tls_on, self._has_secret) from None
        if md:
            tag = reply.proof
            reply.ClearField("proof")
            if not self._auth.check_reply(md[0][1], f"/{SERVICE}/Ping", reply.SerializeToString(deterministic=True),
                                          tag):
                raise Unauthenticated(f"node {self.address} sent a heartbeat reply that its session does not prove",
                                      grpc.StatusCode.UNAUTHENTICATED)
        return reply

    def drain(self, timeout: float | None = None) -> pb.DrainReply:
        return self._unary("Drain", pb.DrainRequest(), timeout)  # type: ignore[return-value]

    def list_keys(self, prefix: str = "", limit: int = 0, timeout: float | None = None) -> list[pb.KeyInfo]:
        request = pb.ListKeysRequest(prefix=prefix, limit=limit)
        t = self._t(timeout)
        try:
            return self._in_session("ListKeys", t,
                                    lambda md: list(self._stub.ListKeys(request, timeout=t, metadata=md)))
        except grpc.RpcError as e:
            raise translate(e, self.address, self._tls_on, self._has_secret) from None

    def health(self, timeout: float = 2.0) -> str:
        """The grpc.health.v1 status of the node's Mesh service (needs no secret)."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        stub = health_pb2_grpc.HealthStub(self._channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service="comfymesh.v1.Mesh"), timeout=timeout)
        except grpc.RpcError as e:
            raise translate(e, self.address, self._tls_on, self._has_secret) from None
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


class _Missing(Exception):
    pass

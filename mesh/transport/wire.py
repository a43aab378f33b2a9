"""Blobs on the wire: split into chunks (lz4 where the link is slow), checksum, and verified reassembly.

Why per-chunk lz4 blocks: a sender starts streaming before the whole blob is compressed (chunks are packed on
worker threads a few ahead of the wire), a receiver puts each decoded chunk in place (no second copy of the
blob), and a chunk that would not shrink is sent raw. Whether to compress at all is decided per link
(mesh/transport/link.py): over loopback or a fast LAN raw bytes arrive sooner than lz4 could make them. When compressing,
a probe of each chunk's start picks lz4 of the bytes or of their 4-byte planes (unquantised float32, a VAE
decode, shrinks only as planes). `lz4.block` with the raw size carried in the chunk decompresses ~3x faster
than `lz4.frame`.

Why xxh3_64 over the raw bytes: it runs at memory speed, and it is checked by every receiver (the storing
node on Put, the client on Get), so a corrupt or truncated transfer is never stored nor handed on.

Why chunk messages are framed by hand (`encode_chunk_message`, `decode_chunk_message`): building a protobuf
Chunk copies its payload, serializing copies it again, parsing copies it once more and reading `.data` once
more; at a few GB/s those copies, and the fresh page-faulted buffers behind them, cost more than the transfer.
The hand framing writes exactly the bytes protobuf would, the parser views the payload in place, and a chunk
keeps the message it arrived in (a GetReply and a PutRequest carrying a chunk are byte-identical), so a node
serves a stored chunk without framing or copying it. proto/mesh.proto stays the contract: every message sent
is valid protobuf, and anything the fast path does not recognise goes to the protobuf parser.
"""

from __future__ import annotations

import collections
import math
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent import futures
from dataclasses import dataclass, field, replace
from typing import Protocol

import grpc
import lz4.block
import xxhash

from mesh.buffers import fresh
from mesh.pb import mesh_pb2 as pb

CODEC = "lz4-chunks/1"
RAW = pb.CHUNK_RAW
LZ4 = pb.CHUNK_LZ4
LZ4_PLANES4 = pb.CHUNK_LZ4_PLANES4
KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

_PROBE = 64 * KiB      # bytes compressed to decide whether a whole chunk is worth compressing
_PROBE_KEEP = 0.90     # a probe must shrink below this ratio...
_CHUNK_KEEP = 0.95     # ...and the whole chunk below this one, or it goes raw
_MIN_COMPRESS = 4 * KiB
_PACK_AHEAD = 4        # chunks compressed ahead of the one on the wire, on the packing threads

MAX_KEY_BYTES = 1024     # UTF-8 bytes of a key, for every RPC (ComfyUI provider keys are ~100)
MAX_META_BYTES = 16 * KiB  # all names and values of a blob's meta together; counted against the store budget
MAX_META_ITEMS = 64
MAX_WRITERS = 16           # provenance names a copy carries; a receiver keeps the newest and adds its caller
MAX_WRITER_BYTES = 256
MAX_COMPUTE_SECONDS = 86400.0  # a claimed compute cost above a day counts as a day (it only weighs eviction)


@dataclass(frozen=True)
class Limits:
    """Safe defaults for what one node accepts; every one is a flag of `mesh serve`."""

    chunk_size: int = 1 * MiB           # raw bytes per chunk a sender produces
    max_blob_size: int = 2 * GiB        # raw bytes of one value
    max_chunk_size: int = 16 * MiB      # raw bytes one chunk may expand to (no decompression bombs)
    max_message_size: int = 20 * MiB    # gRPC message cap: a chunk plus its framing
    max_transfers: int = 16             # concurrent Get/Put streams served
    max_inflight: int = 0               # bytes all concurrent puts may hold before they are stored; 0: the store budget
    header_timeout: float = 10.0        # seconds a Put stream may take to send its header
    idle_timeout: float = 30.0          # seconds a stream may go without moving a chunk before it is cancelled

    def __post_init__(self) -> None:
        if not 0 < self.chunk_size <= self.max_chunk_size:
            raise ValueError("--chunk-size must be positive and at most --max-chunk-size")
        if self.header_timeout <= 0 or self.idle_timeout <= 0 or self.max_transfers <= 0 or self.max_inflight < 0:
            raise ValueError("--max-transfers, --header-timeout and --idle-timeout must be positive, "
                             "--max-inflight not negative")
        if self.max_message_size < self.max_chunk_size + 64 * KiB:
            raise ValueError("--max-message-size must exceed --max-chunk-size by the framing (64 KiB)")


class TransferError(Exception):
    """A transfer that must not be stored or handed on; `code` is the gRPC status to answer with."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def legacy_write_id(key: str, checksum: int) -> int:
    """The write id of a value stored before write ids (from a node or a disk tier of that time): named by its
    key and content, so every owner holding it agrees on its id, and its copies never pass for other writes."""
    return xxhash.xxh3_64_intdigest(f"{key}\0{checksum}".encode()) | 1


@dataclass(frozen=True)
class Header:
    key: str
    raw_size: int
    chunk_size: int
    chunk_count: int
    checksum: int
    stored_size: int = 0   # 0 when a sender streams before it knows (compression is lazy)
    meta: Mapping[str, str] = field(default_factory=dict)
    created_unix: float = 0.0   # for display (a value's age): no clock decides anything (mesh/storage/store.py)
    codec: str = CODEC
    write_id: int = 0           # given once by the node that took the write (0: see __post_init__)
    writers: tuple[str, ...] = ()  # provenance, oldest first (proto/mesh.proto BlobHeader.writers)
    compute_seconds: float = 0.0   # what computing it cost its writer; 0: unknown (BlobHeader.compute_seconds)

    def __post_init__(self) -> None:
        cost = self.compute_seconds
        if not (isinstance(cost, (int, float)) and math.isfinite(cost) and cost >= 0):
            object.__setattr__(self, "compute_seconds", 0.0)  # advisory: a nonsense claim counts as unknown
        elif cost > MAX_COMPUTE_SECONDS:
            object.__setattr__(self, "compute_seconds", MAX_COMPUTE_SECONDS)  # no writer pins a value forever
        if not self.write_id:  # a header from before write ids (a node, a disk tier, a client of that time)
            object.__setattr__(self, "write_id", legacy_write_id(self.key, self.checksum))

    def to_pb(self) -> pb.BlobHeader:
        return pb.BlobHeader(
            key=self.key, raw_size=self.raw_size, stored_size=self.stored_size, codec=self.codec,
            chunk_size=self.chunk_size, chunk_count=self.chunk_count, checksum=self.checksum,
            meta=dict(self.meta), created_unix=self.created_unix, write_id=self.write_id, writers=self.writers,
            compute_seconds=self.compute_seconds,
        )

    @classmethod
    def from_pb(cls, h: pb.BlobHeader) -> Header:
        return cls(
            key=h.key, raw_size=h.raw_size, chunk_size=h.chunk_size, chunk_count=h.chunk_count,
            checksum=h.checksum, stored_size=h.stored_size, meta=dict(h.meta), created_unix=h.created_unix,
            codec=h.codec, write_id=h.write_id, writers=tuple(h.writers), compute_seconds=h.compute_seconds,
        )


@dataclass(frozen=True, slots=True)
class StoredChunk:
    codec: int
    raw_size: int
    data: bytes | memoryview  # a view into `frame` when the chunk came off the wire
    # The serialized chunk message this chunk arrived in, and its index there: sent on as it is, a stored chunk
    # needs no framing (and no copy) when it is read back or handed to another node.
    frame: bytes | None = field(default=None, compare=False, repr=False)
    frame_index: int = field(default=-1, compare=False, repr=False)

    def to_pb(self, index: int) -> pb.Chunk:
        data = self.data if type(self.data) is bytes else bytes(self.data)
        return pb.Chunk(index=index, codec=self.codec, raw_size=self.raw_size, data=data)

    def message(self, index: int) -> bytes:
        """This chunk at position `index`, serialized as a GetReply (byte-identical to the PutRequest)."""
        if self.frame is not None and self.frame_index == index:
            return self.frame
        return encode_chunk_message(index, self.codec, self.raw_size, self.data)


@dataclass(frozen=True, slots=True)
class WireChunk:
    """A Chunk message as received; `data` views the payload inside `frame`, the whole message, when it can."""

    index: int
    codec: int
    raw_size: int
    data: bytes | memoryview
    frame: bytes | None = None


# -- hand framing of chunk messages ---------------------------------------------------------------------------
SERVICE = pb.DESCRIPTOR.services_by_name["Mesh"].full_name  # whose Get and Put carry hand-framed chunks
# Tags (field number << 3 | wire type) of the fields framed by hand; see proto/mesh.proto.
_TAG_BODY_CHUNK = 0x12    # GetReply.chunk and PutRequest.chunk: field 2, length-delimited
_TAG_INDEX = 0x08         # Chunk.index: field 1, varint
_TAG_CODEC = 0x10         # Chunk.codec: field 2, varint
_TAG_RAW_SIZE = 0x18      # Chunk.raw_size: field 3, varint
_TAG_DATA = 0x22          # Chunk.data: field 4, length-delimited
_VARINT_LIMIT = {_TAG_INDEX: 1 << 32, _TAG_RAW_SIZE: 1 << 32, _TAG_CODEC: 1 << 31}  # uint32, uint32, enum


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _read_varint(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    """(value, position after it); IndexError when it runs past `end`, ValueError when longer than 10 bytes."""
    value = shift = 0
    while True:
        if pos >= end:
            raise IndexError("truncated varint")
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7
        if shift >= 70:
            raise ValueError("varint longer than 10 bytes")


def encode_chunk_message(index: int, codec: int, raw_size: int, data: bytes | memoryview) -> bytes:
    """A GetReply (equally, a PutRequest) carrying one chunk, byte for byte as protobuf serializes it.

    One copy of the payload, where building and serializing the message makes three.
    """
    body = bytearray()
    for tag, value in ((_TAG_INDEX, index), (_TAG_CODEC, codec), (_TAG_RAW_SIZE, raw_size)):
        if value:  # proto3 leaves fields at their default out
            body.append(tag)
            body += _varint(value)
    if len(data):
        body.append(_TAG_DATA)
        body += _varint(len(data))
    head = bytes((_TAG_BODY_CHUNK,)) + _varint(len(body) + len(data)) + body
    return b"".join((head, data))


def _parse_plain_chunk(buf: bytes) -> WireChunk | None:
    """The chunk of a message that is nothing but one chunk with known fields, else None."""
    end = len(buf)
    if end < 2 or buf[0] != _TAG_BODY_CHUNK:
        return None
    size, pos = _read_varint(buf, 1, end)
    if pos + size != end:
        return None
    fields = {_TAG_INDEX: 0, _TAG_CODEC: 0, _TAG_RAW_SIZE: 0}
    data: bytes | memoryview = b""
    while pos < end:
        tag = buf[pos]
        if tag == _TAG_DATA:
            n, pos = _read_varint(buf, pos + 1, end)
            if pos + n > end:
                return None
            data = memoryview(buf)[pos:pos + n]
            pos += n
        elif tag in fields:
            value, pos = _read_varint(buf, pos + 1, end)
            if value >= _VARINT_LIMIT[tag]:
                return None  # protobuf would truncate or sign-extend it; let protobuf decide
            fields[tag] = value  # a repeated field: the last one wins, as in protobuf
        else:
            return None
    return WireChunk(fields[_TAG_INDEX], fields[_TAG_CODEC], fields[_TAG_RAW_SIZE], data, frame=buf)


def decode_chunk_message(buf: bytes, message_type: type[pb.GetReply] | type[pb.PutRequest]
                         ) -> WireChunk | pb.GetReply | pb.PutRequest:
    """A received GetReply or PutRequest: a WireChunk if it carries a chunk, else the protobuf message.

    A message that is one plainly encoded chunk (what every sender here writes) is read in place, its payload a
    view into `buf`. Anything else (a header, other or unknown fields, odd encodings, garbage) goes to the
    protobuf parser, so the result is what protobuf itself makes of the bytes.
    """
    try:
        chunk = _parse_plain_chunk(buf)
    except (IndexError, ValueError):
        chunk = None  # malformed: the protobuf parser below raises the proper error
    if chunk is not None:
        return chunk
    message = message_type.FromString(buf)
    if message.WhichOneof("body") == "chunk":
        c = message.chunk
        return WireChunk(c.index, c.codec, c.raw_size, c.data)
    return message


def serialize_message(message: pb.GetReply | pb.PutRequest | bytes) -> bytes:
    """The serializer of Get replies and Put requests: a chunk arrives already framed (`StoredChunk.message`)."""
    return message if type(message) is bytes else message.SerializeToString()  # type: ignore[union-attr]


def checksum(data: bytes | bytearray | memoryview) -> int:
    return xxhash.xxh3_64_intdigest(data)


def chunk_count(raw_size: int, chunk_size: int) -> int:
    return math.ceil(raw_size / chunk_size)


def planes4(data: bytes | memoryview) -> bytes:
    """4-byte items -> 4 byte planes. The exponent bytes of neighbouring float32 values are alike, so lz4 finds
    runs in the planes that it misses in the items. Extended slices are C loops: ~1.6 GB/s, no numpy needed."""
    whole = data if type(data) is bytes else bytes(data)  # strided slices of bytes are C loops; of a view, not
    return b"".join(whole[i::4] for i in range(4))


def unplanes4(data: bytes | memoryview) -> bytearray:
    q = len(data) // 4
    out = bytearray(len(data))
    for i in range(4):
        out[i::4] = data[i * q: (i + 1) * q]
    return out


def pack_chunk(raw: memoryview, compress: bool = True, copy: bool = True, index: int = -1,
               planes: bool = True) -> StoredChunk:
    """One chunk, compressed only where that shrinks it enough to pay for the decompression: lz4 of the bytes
    or (`planes`: where the receiver decodes them) of their 4-byte planes, whichever did better on a probe of the
    chunk's start.

    `copy=False` keeps a raw chunk as a view of the caller's memory (sent at once, never stored). A copy made to
    be stored is framed (with `index`, its position) as the message that carries it: every read of the stored
    entry, and every copy to another node, then sends that frame as it is instead of framing (copying) again."""
    n = len(raw)
    if compress and n >= _MIN_COMPRESS:
        probe = raw[:_PROBE]
        plain = len(lz4.block.compress(probe, store_size=False))
        planar = len(lz4.block.compress(planes4(probe), store_size=False)) if planes and n % 4 == 0 else len(probe)
        if min(plain, planar) < len(probe) * _PROBE_KEEP:
            codec = LZ4_PLANES4 if planar < plain else LZ4
            packed = lz4.block.compress(planes4(raw) if codec == LZ4_PLANES4 else raw, store_size=False)
            if len(packed) < n * _CHUNK_KEEP:
                return _framed(index, codec, n, packed) if copy and index >= 0 else StoredChunk(codec, n, packed)
    if not copy:
        return StoredChunk(RAW, n, raw)
    return _framed(index, RAW, n, raw) if index >= 0 else StoredChunk(RAW, n, bytes(raw))


def _framed(index: int, codec: int, raw_size: int, data: bytes | memoryview) -> StoredChunk:
    frame = encode_chunk_message(index, codec, raw_size, data)
    return StoredChunk(codec, raw_size, memoryview(frame)[len(frame) - len(data):], frame, index)


_packers: futures.ThreadPoolExecutor | None = None
_packers_lock = threading.Lock()


def _pool() -> futures.ThreadPoolExecutor:
    """Threads that compress chunks ahead of the sender (lz4 releases the GIL while it works)."""
    global _packers
    with _packers_lock:
        if _packers is None:
            _packers = futures.ThreadPoolExecutor(max_workers=max(2, min(4, os.cpu_count() or 2)),
                                                  thread_name_prefix="mesh-pack")
        return _packers


def packed_ahead(raws: Iterable[memoryview], compress: bool, copy: bool, planes: bool = True) -> Iterator[StoredChunk]:
    """pack_chunk over `raws`, in order; when compressing, up to _PACK_AHEAD chunks are packed on the packing
    threads while earlier ones are on the wire, so lz4 runs at several cores' pace, in step with the link."""
    if not compress:
        for index, raw in enumerate(raws):
            yield pack_chunk(raw, False, copy, index, planes)
        return
    pending: collections.deque[futures.Future[StoredChunk]] = collections.deque()
    pool = _pool()
    try:
        for index, raw in enumerate(raws):
            pending.append(pool.submit(pack_chunk, raw, True, copy, index, planes))
            if len(pending) > _PACK_AHEAD:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for f in pending:
            f.cancel()


def repack(chunks: Iterable[StoredChunk], compress: bool, planes: bool = True) -> Iterator[StoredChunk]:
    """Stored chunks as they should travel: raw ones compressed (ahead, in order) when the link is slow, the
    others as they are; for a receiver that does not decode 4-byte planes (`planes` False: a node from before
    CHUNK_LZ4_PLANES4), chunks stored so are unpacked and sent as lz4 of their bytes (or raw) instead."""
    if not compress and planes:
        yield from chunks
        return
    stored = list(chunks)
    packed = packed_ahead((memoryview(c.data) for c in stored if c.codec == RAW), True, False, planes) \
        if compress else iter(())
    for i, c in enumerate(stored):
        if c.codec == RAW and compress:
            yield next(packed)
        elif c.codec == LZ4_PLANES4 and not planes:
            yield pack_chunk(memoryview(unpack_chunk(i, c.codec, c.raw_size, c.data)), True, False, planes=False)
        else:
            yield c


def without_planes(header: Header, chunks: Sequence[StoredChunk]) -> Header:
    """The header to send with `repack(chunks, ..., planes=False)`: its stored size is known only once sent."""
    return replace(header, stored_size=0) if any(c.codec == LZ4_PLANES4 for c in chunks) else header


def make_header(key: str, data: bytes | bytearray | memoryview, chunk_size: int,
                meta: Mapping[str, str] | None = None, compute_seconds: float = 0.0) -> Header:
    size = len(data)
    return Header(key=key, raw_size=size, chunk_size=chunk_size, chunk_count=chunk_count(size, chunk_size),
                  checksum=checksum(data), meta=dict(meta or {}), compute_seconds=compute_seconds)


def file_header(key: str, path: str | os.PathLike[str], chunk_size: int,
                meta: Mapping[str, str] | None = None) -> Header:
    """The header of a file's bytes, read once in pieces (never the whole file in memory)."""
    h = xxhash.xxh3_64()
    size = 0
    with open(path, "rb") as f:
        while piece := f.read(8 * MiB):
            h.update(piece)
            size += len(piece)
    return Header(key=key, raw_size=size, chunk_size=chunk_size, chunk_count=chunk_count(size, chunk_size),
                  checksum=h.intdigest(), meta=dict(meta or {}))


def iter_file_chunks(path: str | os.PathLike[str], chunk_size: int, compress: bool = True,
                     planes: bool = True) -> Iterator[StoredChunk]:
    """A file's chunks, read one at a time as they are sent."""
    def pieces() -> Iterator[memoryview]:
        with open(path, "rb") as f:
            while piece := f.read(chunk_size):
                yield memoryview(piece)
    return packed_ahead(pieces(), compress, copy=False, planes=planes)


def iter_chunks(data: bytes | bytearray | memoryview, chunk_size: int, compress: bool = True,
                copy: bool = True, planes: bool = True) -> Iterator[StoredChunk]:
    """Chunks produced lazily, so the first is on the wire while later ones are still being compressed.

    `copy=False`: raw chunks are views of `data` (framed straight from it when sent): only for chunks that are
    sent and dropped while the caller holds `data` unchanged, never for chunks that are stored."""
    view = memoryview(data).cast("B")
    return packed_ahead((view[offset:offset + chunk_size] for offset in range(0, len(view), chunk_size)),
                        compress, copy, planes)


def unpack_chunk(index: int, codec: int, expect: int, data: bytes | memoryview) -> bytes | bytearray:
    """The raw bytes of a compressed chunk, or TransferError: never more than `expect` bytes are made."""
    if len(data) >= expect + expect // 255 + 16:  # more than lz4's worst-case expansion
        raise TransferError(grpc.StatusCode.DATA_LOSS, f"lz4 chunk {index} is larger than possible")
    if codec == LZ4_PLANES4 and expect % 4:
        raise TransferError(grpc.StatusCode.DATA_LOSS, f"chunk {index} of {expect} bytes cannot be 4-byte planes")
    try:
        raw = lz4.block.decompress(data, uncompressed_size=expect)
    except lz4.block.LZ4BlockError as e:
        raise TransferError(grpc.StatusCode.DATA_LOSS, f"chunk {index} does not decompress: {e}") from e
    if len(raw) != expect:
        raise TransferError(grpc.StatusCode.DATA_LOSS,
                            f"chunk {index} decompressed to {len(raw)} bytes, {expect} expected")
    return unplanes4(raw) if codec == LZ4_PLANES4 else raw


def raw_parts(chunks: Iterable[StoredChunk]) -> list[bytes | bytearray | memoryview]:
    """The raw bytes of chunks already verified when they were stored: raw ones as they are (no copy),
    compressed ones unpacked. For a reader in the storing process, which need not hash them a second time."""
    return [c.data if c.codec == RAW else unpack_chunk(i, c.codec, c.raw_size, c.data)
            for i, c in enumerate(chunks)]


def meta_size(meta: Mapping[str, str]) -> int:
    return sum(len(k.encode()) + len(v.encode()) for k, v in meta.items())


def validate_header(h: Header, limits: Limits) -> None:
    """Reject a header before a single chunk is read, with the status a caller can act on."""
    bad = grpc.StatusCode.INVALID_ARGUMENT
    if not h.key:
        raise TransferError(bad, "empty key")
    if len(h.key.encode()) > MAX_KEY_BYTES:
        raise TransferError(bad, f"key longer than {MAX_KEY_BYTES} bytes")
    # Any finite time after 1970, with no upper bound: it is only shown (a value's age), and a bound read from
    # this host's clock would refuse the copies of a member whose clock runs ahead.
    if not (math.isfinite(h.created_unix) and h.created_unix >= 0):
        raise TransferError(bad, "created_unix must be a finite time after 1970")
    if len(h.writers) > 4 * MAX_WRITERS or any(len(w.encode()) > MAX_WRITER_BYTES for w in h.writers):
        raise TransferError(bad, f"more than {4 * MAX_WRITERS} writers, or one longer than {MAX_WRITER_BYTES} bytes")
    if len(h.meta) > MAX_META_ITEMS or meta_size(h.meta) > MAX_META_BYTES:
        raise TransferError(bad, f"meta larger than {MAX_META_ITEMS} items or {MAX_META_BYTES} bytes")
    if h.codec != CODEC:
        raise TransferError(bad, f"unknown codec {h.codec!r} (this node speaks {CODEC!r})")
    if h.raw_size > limits.max_blob_size:
        raise TransferError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                            f"blob of {h.raw_size} bytes exceeds max blob size {limits.max_blob_size}")
    if not 0 < h.chunk_size <= limits.max_chunk_size:
        raise TransferError(bad, f"chunk size {h.chunk_size} outside 1..{limits.max_chunk_size}")
    if h.chunk_count != chunk_count(h.raw_size, h.chunk_size):
        raise TransferError(bad, f"chunk count {h.chunk_count} does not match raw size {h.raw_size} "
                                 f"in chunks of {h.chunk_size}")


class Tee(Protocol):
    """A reader that takes each chunk's raw bytes as the Receiver verifies them, to decode while the rest
    arrives (mesh.codec.StreamDecoder). It may use them only once the stream's checksum matched: `start` comes
    with the header of every new stream, so a stream that fails and another that follows never mix."""

    def start(self, size: int, header: object) -> None: ...
    def feed(self, raw: bytes | memoryview) -> None: ...


class Receiver:
    """Checks a stream of chunks against its header; optionally decodes them into one buffer.

    The storing node keeps the chunks as they came (`into=False`): it decompresses each only to verify the
    checksum. A reading client decodes into `buffer` (a memoryview), whose bytes are the value once `finish()`
    returns.
    """

    def __init__(self, header: Header, limits: Limits, into: bool = False,
                 sink: Callable[[bytes | memoryview], object] | None = None, tee: Tee | None = None,
                 keep: bool | None = None) -> None:
        """`into`: decode into `buffer`; `sink`: hand each decoded chunk to it instead (a file: constant memory;
        the caller must discard what it wrote unless `finish()` returns); neither: keep the chunks as stored
        (`keep` says whether explicitly). `tee` also gets each chunk's raw bytes; if it raises,
        it gets no more (its owner sees an incomplete stream) and the transfer goes on."""
        validate_header(header, limits)
        self.header = header
        self._sink = sink
        # Fresh memory on huge pages where the kernel offers them (mesh/buffers.py): nothing is zero-filled up
        # front, and the chunks land in place as they arrive.
        self.buffer: memoryview | None = memoryview(fresh(header.raw_size)) if into else None
        self.chunks: list[StoredChunk] = []
        self.stored_size = 0
        self._hash = xxhash.xxh3_64()
        self._next = 0
        self._offset = 0
        self._keep = (not into and sink is None) if keep is None else keep
        self._tee = tee
        if tee is not None:
            tee.start(header.raw_size, header)

    def add(self, chunk: WireChunk | pb.Chunk) -> StoredChunk:
        h = self.header
        if chunk.index != self._next:
            raise TransferError(grpc.StatusCode.DATA_LOSS, f"chunk {chunk.index} arrived where {self._next} was due")
        if self._next >= h.chunk_count:
            raise TransferError(grpc.StatusCode.INVALID_ARGUMENT, f"more than the {h.chunk_count} chunks announced")
        expect = min(h.chunk_size, h.raw_size - self._offset)
        if chunk.raw_size != expect:
            raise TransferError(grpc.StatusCode.DATA_LOSS,
                                f"chunk {chunk.index} claims {chunk.raw_size} raw bytes, {expect} expected")
        data = chunk.data
        if chunk.codec == RAW:
            if len(data) != expect:
                raise TransferError(grpc.StatusCode.DATA_LOSS,
                                    f"raw chunk {chunk.index} has {len(data)} bytes, {expect} expected")
            raw: bytes | memoryview = data
        elif chunk.codec == LZ4 or chunk.codec == LZ4_PLANES4:
            raw = unpack_chunk(chunk.index, chunk.codec, expect, data)
        else:
            raise TransferError(grpc.StatusCode.INVALID_ARGUMENT, f"unknown chunk codec {chunk.codec}")
        self._hash.update(raw)
        if self.buffer is not None:
            self.buffer[self._offset: self._offset + expect] = raw
        elif self._sink is not None:
            self._sink(raw)
        if self._tee is not None:
            try:
                self._tee.feed(raw)
            except Exception:  # a value that will not decode: the bytes still arrive (and are verified, stored)
                self._tee = None
        frame = getattr(chunk, "frame", None)  # a pb.Chunk (built in process) has none
        stored = StoredChunk(chunk.codec, expect, data, frame, chunk.index if frame is not None else -1)
        if self._keep:
            self.chunks.append(stored)
        self.stored_size += len(data)
        self._offset += expect
        self._next += 1
        return stored

    def finish(self) -> None:
        h = self.header
        if self._next != h.chunk_count:
            raise TransferError(grpc.StatusCode.DATA_LOSS,
                                f"stream ended after {self._next} of {h.chunk_count} chunks")
        if self._hash.intdigest() != h.checksum:
            raise TransferError(grpc.StatusCode.DATA_LOSS, "checksum of the received bytes does not match the header")
        if h.stored_size and h.stored_size != self.stored_size:
            raise TransferError(grpc.StatusCode.DATA_LOSS,
                                f"received {self.stored_size} stored bytes, header announced {h.stored_size}")


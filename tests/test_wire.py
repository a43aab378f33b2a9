"""Unit tests of the pure modules: mesh/transport/wire.py (chunking, lz4, checksum, framing, Receiver), mesh/units.py and
mesh/transport/auth.py (tokens, expiry and clock skew)."""

from __future__ import annotations

import os
import random

import grpc
import lz4.block
import pytest
from google.protobuf.message import DecodeError
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.pb import mesh_pb2 as pb
from mesh.units import format_size, parse_size
from mesh.transport.wire import (CODEC, LZ4, LZ4_PLANES4, RAW, KiB, MiB, Header, Limits, Receiver, StoredChunk, TransferError,
                       WireChunk, checksum, chunk_count, decode_chunk_message, encode_chunk_message, iter_chunks,
                       make_header, pack_chunk, planes4, raw_parts, repack, unplanes4, validate_header)

LIMITS = Limits()


def receive(header: Header, chunks: list, limits: Limits = LIMITS, into: bool = True) -> Receiver:
    r = Receiver(header, limits, into=into)
    for c in chunks:
        r.add(c)
    r.finish()
    return r


def pb_chunks(data: bytes, chunk_size: int, compress: bool = True) -> list[pb.Chunk]:
    return [c.to_pb(i) for i, c in enumerate(iter_chunks(data, chunk_size, compress))]


def status_of(excinfo: pytest.ExceptionInfo[TransferError]) -> grpc.StatusCode:
    return excinfo.value.code


# -- pack_chunk: compress only where it pays ---------------------------------------------------------------------

def test_random_chunk_goes_raw() -> None:
    data = os.urandom(MiB)
    c = pack_chunk(memoryview(data))
    assert c.codec == RAW and c.raw_size == MiB and bytes(c.data) == data


def test_zero_chunk_goes_lz4_and_shrinks() -> None:
    c = pack_chunk(memoryview(bytes(MiB)))
    assert c.codec == LZ4 and c.raw_size == MiB
    assert len(c.data) < MiB // 100
    assert lz4.block.decompress(c.data, uncompressed_size=MiB) == bytes(MiB)


@pytest.mark.parametrize("compress", [False, True])
def test_stored_chunks_are_framed_once_and_sent_as_they_are(compress: bool) -> None:
    """A value put through this node is framed as it is stored: every read sends that frame, copying nothing."""
    data = bytes(MiB) + os.urandom(MiB) + bytes(100)
    chunks = list(iter_chunks(data, MiB, compress))
    assert [c.codec for c in chunks] == ([LZ4, RAW, RAW] if compress else [RAW, RAW, RAW])
    for i, c in enumerate(chunks):
        assert c.message(i) is c.frame  # the same object: no copy
        parsed = decode_chunk_message(c.frame, pb.GetReply)
        assert isinstance(parsed, WireChunk) and (parsed.index, parsed.codec, parsed.raw_size) == (i, c.codec, c.raw_size)
        assert bytes(parsed.data) == bytes(c.data)
        assert c.message(i + 1) != c.frame  # at another position it is framed anew, with that index
    assert b"".join(raw_parts(chunks)) == data


def test_small_or_uncompressed_chunks_go_raw() -> None:
    assert pack_chunk(memoryview(bytes(4 * KiB - 1))).codec == RAW  # below the size worth compressing
    assert pack_chunk(memoryview(bytes(MiB)), compress=False).codec == RAW


def test_probe_skips_chunk_whose_start_is_incompressible() -> None:
    # The sender decides from the first 64 KiB: random there means raw, even if the rest would shrink.
    data = os.urandom(64 * KiB) + bytes(MiB - 64 * KiB)
    assert pack_chunk(memoryview(data)).codec == RAW
    # A compressible start passes the probe, but the whole chunk must still shrink enough (below 95 %).
    assert pack_chunk(memoryview(bytes(64 * KiB) + os.urandom(2 * MiB - 64 * KiB))).codec == RAW
    assert pack_chunk(memoryview(bytes(256 * KiB) + os.urandom(MiB - 256 * KiB))).codec == LZ4


def smooth_floats(n: int, seed: int = 0) -> bytes:
    """float32 like a VAE decode: a slow random walk plus a little noise, full mantissas."""
    import numpy as np
    rng = np.random.default_rng(seed)
    x = np.cumsum(rng.standard_normal(n // 4).astype(np.float32) * np.float32(0.01))
    return (np.abs(np.mod(x, 2) - 1) + rng.standard_normal(n // 4).astype(np.float32) * 0.003).astype(np.float32).tobytes()


def test_float32_chunks_go_as_byte_planes_and_round_trip() -> None:
    data = smooth_floats(4 * MiB)
    chunks = list(iter_chunks(data, MiB))
    assert {c.codec for c in chunks} == {LZ4_PLANES4}
    assert sum(len(c.data) for c in chunks) < 0.9 * len(data)  # plain lz4 barely shrinks such floats
    assert len(lz4.block.compress(data[:MiB], store_size=False)) > 0.95 * MiB
    r = receive(make_header("k", data, MiB), [c.to_pb(i) for i, c in enumerate(chunks)])
    assert r.buffer == data
    assert b"".join(raw_parts(chunks)) == data


@given(st.binary(max_size=4096).map(lambda b: b[: len(b) - len(b) % 4]))
def test_planes_round_trip(data: bytes) -> None:
    assert bytes(unplanes4(planes4(data))) == data and bytes(unplanes4(planes4(memoryview(data)))) == data


def test_planes_chunk_of_odd_size_is_refused() -> None:
    h = make_header("k", bytes(6), MiB)
    packed = lz4.block.compress(bytes(6), store_size=False)
    with pytest.raises(TransferError, match="4-byte planes") as e:
        receive(h, [pb.Chunk(index=0, codec=LZ4_PLANES4, raw_size=6, data=packed)])
    assert e.value.code == grpc.StatusCode.DATA_LOSS


def test_repack_compresses_raw_chunks_in_order_and_keeps_packed_ones() -> None:
    data = smooth_floats(3 * MiB, seed=1) + bytes(MiB) + os.urandom(MiB)
    stored = list(iter_chunks(data, MiB, compress=False))
    assert {c.codec for c in stored} == {RAW}
    assert list(repack(stored, False)) == stored
    sent = list(repack(stored, True))
    assert [c.codec for c in sent] == [LZ4_PLANES4] * 3 + [LZ4, RAW]
    assert b"".join(raw_parts(sent)) == data
    mixed_in = [sent[0], stored[1], sent[3]]
    again = list(repack(mixed_in, True))
    assert again[0] is sent[0] and again[2] is sent[3] and again[1].codec == LZ4_PLANES4


def test_raw_chunks_can_view_the_callers_buffer() -> None:
    data = bytearray(os.urandom(3 * MiB))
    views = list(iter_chunks(data, MiB, compress=False, copy=False))
    data[0] ^= 0xFF
    assert bytes(views[0].data)[0] == data[0]  # a view, framed straight from the buffer: no copy
    copies = list(iter_chunks(data, MiB, compress=False))
    data[0] ^= 0xFF
    assert bytes(copies[0].data)[0] != data[0]  # stored chunks own their bytes


def test_mixed_blob_uses_both_codecs_and_round_trips() -> None:
    data = os.urandom(MiB) + bytes(MiB) + os.urandom(100)
    chunks = list(iter_chunks(data, MiB))
    assert [c.codec for c in chunks] == [RAW, LZ4, RAW]
    header = make_header("k", data, MiB)
    assert header.chunk_count == 3 and header.raw_size == len(data) and header.checksum == checksum(data)
    assert bytes(receive(header, [c.to_pb(i) for i, c in enumerate(chunks)]).buffer) == data


@settings(max_examples=40, deadline=None)
@given(size=st.integers(0, 5000), chunk_size=st.integers(1, 1500), zeros=st.booleans())
def test_round_trip_any_size(size: int, chunk_size: int, zeros: bool) -> None:
    data = bytes(size) if zeros else random.Random(size).randbytes(size)
    header = make_header("k", data, chunk_size)
    assert header.chunk_count == chunk_count(size, chunk_size)
    r = receive(header, pb_chunks(data, chunk_size))
    assert bytes(r.buffer) == data
    kept = receive(header, pb_chunks(data, chunk_size), into=False)
    assert kept.buffer is None and len(kept.chunks) == header.chunk_count
    assert kept.stored_size == sum(len(c.data) for c in kept.chunks)


# -- Receiver rejections -----------------------------------------------------------------------------------------

DATA = os.urandom(2 * MiB + 10)


@pytest.fixture
def good() -> tuple[Header, list[pb.Chunk]]:
    return make_header("k", DATA, MiB), pb_chunks(DATA, MiB)


def test_receiver_rejects_chunk_out_of_order(good: tuple[Header, list[pb.Chunk]]) -> None:
    header, chunks = good
    r = Receiver(header, LIMITS, into=True)
    with pytest.raises(TransferError) as e:
        r.add(chunks[1])
    assert status_of(e) == grpc.StatusCode.DATA_LOSS


def test_receiver_rejects_more_chunks_than_announced(good: tuple[Header, list[pb.Chunk]]) -> None:
    header, chunks = good
    r = Receiver(header, LIMITS)
    for c in chunks:
        r.add(c)
    with pytest.raises(TransferError) as e:
        r.add(pb.Chunk(index=3, codec=RAW, raw_size=1, data=b"x"))
    assert status_of(e) == grpc.StatusCode.INVALID_ARGUMENT


def test_receiver_rejects_truncated_stream(good: tuple[Header, list[pb.Chunk]]) -> None:
    header, chunks = good
    r = Receiver(header, LIMITS)
    r.add(chunks[0])
    with pytest.raises(TransferError, match="1 of 3 chunks") as e:
        r.finish()
    assert status_of(e) == grpc.StatusCode.DATA_LOSS


def test_receiver_rejects_wrong_checksum(good: tuple[Header, list[pb.Chunk]]) -> None:
    header, chunks = good
    wrong = Header(**{**vars(header), "checksum": header.checksum ^ 1})
    r = Receiver(wrong, LIMITS, into=True)
    for c in chunks:
        r.add(c)
    with pytest.raises(TransferError, match="checksum") as e:
        r.finish()
    assert status_of(e) == grpc.StatusCode.DATA_LOSS


def test_receiver_rejects_flipped_byte(good: tuple[Header, list[pb.Chunk]]) -> None:
    header, chunks = good
    data = bytearray(chunks[1].data)
    data[12345] ^= 0xFF
    chunks[1] = pb.Chunk(index=1, codec=RAW, raw_size=MiB, data=bytes(data))
    with pytest.raises(TransferError, match="checksum") as e:
        receive(header, chunks)
    assert status_of(e) == grpc.StatusCode.DATA_LOSS


@pytest.mark.parametrize("chunk, status", [
    (pb.Chunk(index=0, codec=RAW, raw_size=MiB - 1, data=bytes(MiB - 1)), grpc.StatusCode.DATA_LOSS),  # raw size
    (pb.Chunk(index=0, codec=RAW, raw_size=MiB, data=bytes(MiB - 1)), grpc.StatusCode.DATA_LOSS),  # short data
    (pb.Chunk(index=0, codec=LZ4, raw_size=MiB, data=b"\xff" * 100), grpc.StatusCode.DATA_LOSS),  # corrupt lz4
    (pb.Chunk(index=0, codec=LZ4, raw_size=MiB, data=bytes(MiB + MiB // 255 + 16)), grpc.StatusCode.DATA_LOSS),
    (pb.Chunk(index=0, codec=7, raw_size=MiB, data=bytes(MiB)), grpc.StatusCode.INVALID_ARGUMENT),  # codec
], ids=["raw-size-mismatch", "short-raw-data", "corrupt-lz4", "lz4-larger-than-possible", "unknown-chunk-codec"])
def test_receiver_rejects_bad_chunk(good: tuple[Header, list[pb.Chunk]], chunk: pb.Chunk,
                                    status: grpc.StatusCode) -> None:
    r = Receiver(good[0], LIMITS, into=True)
    with pytest.raises(TransferError) as e:
        r.add(chunk)
    assert status_of(e) == status


def test_receiver_rejects_lz4_chunk_expanding_past_its_raw_size() -> None:
    # A decompression bomb: a small lz4 block that would expand to 2 MiB, announced as 1 MiB.
    bomb = lz4.block.compress(bytes(2 * MiB), store_size=False)
    header = make_header("k", bytes(MiB), MiB)
    r = Receiver(header, LIMITS, into=True)
    with pytest.raises(TransferError) as e:
        r.add(pb.Chunk(index=0, codec=LZ4, raw_size=MiB, data=bomb))
    assert status_of(e) == grpc.StatusCode.DATA_LOSS


def test_receiver_rejects_stored_size_mismatch() -> None:
    data = bytes(MiB)
    chunks = pb_chunks(data, MiB)
    header = Header(**{**vars(make_header("k", data, MiB)), "stored_size": len(chunks[0].data) + 1})
    with pytest.raises(TransferError, match="stored bytes") as e:
        receive(header, chunks)
    assert status_of(e) == grpc.StatusCode.DATA_LOSS


def test_receiver_buffer_is_exactly_the_value_and_stored_chunks_keep_codec() -> None:
    data = bytes(MiB) + os.urandom(MiB // 2)
    header = make_header("k", data, MiB)
    r = receive(header, pb_chunks(data, MiB), into=False)
    assert [c.codec for c in r.chunks] == [LZ4, RAW]
    assert [c.raw_size for c in r.chunks] == [MiB, MiB // 2]


# -- header validation and limits --------------------------------------------------------------------------------

def header(**changes: object) -> Header:
    base = dict(key="k", raw_size=10 * MiB, chunk_size=MiB, chunk_count=10, checksum=0)
    base.update(changes)
    return Header(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize("h, status", [
    (header(key=""), grpc.StatusCode.INVALID_ARGUMENT),
    (header(key="x" * 1025), grpc.StatusCode.INVALID_ARGUMENT),
    (header(codec="zstd-chunks/9"), grpc.StatusCode.INVALID_ARGUMENT),
    (header(raw_size=LIMITS.max_blob_size + 1, chunk_size=16 * MiB, chunk_count=129),
     grpc.StatusCode.RESOURCE_EXHAUSTED),
    (header(chunk_size=0), grpc.StatusCode.INVALID_ARGUMENT),
    (header(chunk_size=LIMITS.max_chunk_size + 1, chunk_count=1), grpc.StatusCode.INVALID_ARGUMENT),
    (header(chunk_count=9), grpc.StatusCode.INVALID_ARGUMENT),
], ids=["empty-key", "long-key", "unknown-codec", "oversize-blob", "zero-chunk-size", "oversize-chunk",
        "wrong-chunk-count"])
def test_validate_header_rejects(h: Header, status: grpc.StatusCode) -> None:
    with pytest.raises(TransferError) as e:
        validate_header(h, LIMITS)
    assert status_of(e) == status
    with pytest.raises(TransferError):
        Receiver(h, LIMITS)  # a receiver checks its header before anything else


def test_validate_header_accepts_empty_blob() -> None:
    validate_header(header(raw_size=0, chunk_count=0), LIMITS)
    r = receive(make_header("empty", b"", MiB), [])
    assert r.buffer == bytearray()


def test_header_pb_round_trip() -> None:
    h = Header(key="k", raw_size=5, chunk_size=4, chunk_count=2, checksum=2**64 - 1, stored_size=3,
               meta={"content": "bytes"}, created_unix=12.5, write_id=2**64 - 3, writers=("a", "cn b"))
    assert Header.from_pb(h.to_pb()) == h
    assert h.codec == CODEC


def test_limits_are_validated() -> None:
    with pytest.raises(ValueError):
        Limits(chunk_size=0)
    with pytest.raises(ValueError):
        Limits(chunk_size=32 * MiB)  # above max_chunk_size
    with pytest.raises(ValueError):
        Limits(max_message_size=16 * MiB)  # no room for framing


# -- hand framing: byte-identical to protobuf, zero-copy parse ---------------------------------------------------

uint32 = st.integers(0, 2**32 - 1)


@settings(max_examples=200, deadline=None)
@given(index=uint32, codec=st.sampled_from([0, 1, 5]), raw_size=uint32, data=st.binary(max_size=600))
def test_encode_matches_protobuf_for_both_messages(index: int, codec: int, raw_size: int, data: bytes) -> None:
    chunk = pb.Chunk(index=index, codec=codec, raw_size=raw_size, data=data)
    mine = encode_chunk_message(index, codec, raw_size, data)
    assert mine == pb.GetReply(chunk=chunk).SerializeToString()
    assert mine == pb.PutRequest(chunk=chunk).SerializeToString()
    for message_type in (pb.GetReply, pb.PutRequest):
        got = decode_chunk_message(mine, message_type)
        assert isinstance(got, WireChunk)
        assert (got.index, got.codec, got.raw_size, bytes(got.data)) == (index, codec, raw_size, data)
        assert got.frame is mine  # the whole message is kept, the payload is a view into it


def test_decoded_payload_is_a_view_not_a_copy() -> None:
    msg = encode_chunk_message(3, RAW, MiB, bytes(MiB))
    got = decode_chunk_message(msg, pb.GetReply)
    assert isinstance(got.data, memoryview) and got.data.obj is msg


def _tag(field: int, wire: int) -> bytes:
    return bytes([field << 3 | wire])


@pytest.mark.parametrize("body", [
    # fields out of order, defaults written explicitly, a repeated field (last wins), an unknown field
    _tag(4, 2) + b"\x03abc" + _tag(1, 0) + b"\x07" + _tag(3, 0) + b"\x03",
    _tag(1, 0) + b"\x00" + _tag(2, 0) + b"\x00" + _tag(3, 0) + b"\x03" + _tag(4, 2) + b"\x03abc",
    _tag(1, 0) + b"\x01" + _tag(1, 0) + b"\x02" + _tag(4, 2) + b"\x01a" + _tag(4, 2) + b"\x03abc",
    _tag(1, 0) + b"\x01" + _tag(9, 0) + b"\x05" + _tag(4, 2) + b"\x03abc",
    _tag(1, 0) + b"\xff\xff\xff\xff\x7f",  # index beyond uint32: protobuf truncates
    _tag(2, 0) + b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01",  # negative enum value
], ids=["reordered", "explicit-defaults", "repeated", "unknown-field", "index-overflow", "negative-codec"])
def test_decode_agrees_with_protobuf_on_unusual_encodings(body: bytes) -> None:
    msg = _tag(2, 2) + bytes([len(body)]) + body
    expect = pb.GetReply.FromString(msg).chunk
    got = decode_chunk_message(msg, pb.GetReply)
    assert isinstance(got, WireChunk)
    assert (got.index, got.codec, got.raw_size, bytes(got.data)) == (expect.index, expect.codec, expect.raw_size,
                                                                     expect.data)


def test_decode_hands_headers_and_other_fields_to_protobuf() -> None:
    h = pb.PutRequest(header=pb.BlobHeader(key="k", raw_size=1), local_only=True).SerializeToString()
    got = decode_chunk_message(h, pb.PutRequest)
    assert isinstance(got, pb.PutRequest) and got.header.key == "k" and got.local_only
    # a chunk together with local_only: not the plain form, but still a chunk
    both = pb.PutRequest(chunk=pb.Chunk(index=1, raw_size=1, data=b"x"), local_only=True).SerializeToString()
    got = decode_chunk_message(both, pb.PutRequest)
    assert isinstance(got, WireChunk) and (got.index, bytes(got.data)) == (1, b"x") and got.frame is None
    assert isinstance(decode_chunk_message(b"", pb.GetReply), pb.GetReply)  # an empty message


@pytest.mark.parametrize("garbage", [
    b"\x12\x05\x08", b"\x12\x85", b"\x12\x04\x22\x10ab", b"\x12\x0b\x08\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff",
    b"\xff\xff\xff",
], ids=["short-body", "truncated-length", "data-overruns", "over-long-varint", "junk"])
def test_decode_rejects_malformed_like_protobuf(garbage: bytes) -> None:
    with pytest.raises(DecodeError):
        pb.GetReply.FromString(garbage)
    with pytest.raises(DecodeError):
        decode_chunk_message(garbage, pb.GetReply)


def test_stored_chunk_reuses_its_frame_only_at_its_index() -> None:
    msg = encode_chunk_message(4, RAW, 3, b"abc")
    wire = decode_chunk_message(msg, pb.GetReply)
    stored = StoredChunk(wire.codec, wire.raw_size, wire.data, wire.frame, wire.index)
    assert stored.message(4) is msg
    assert stored.message(5) == encode_chunk_message(5, RAW, 3, b"abc")
    assert stored.to_pb(4).data == b"abc"  # a view converts to bytes for protobuf
    assert stored == StoredChunk(RAW, 3, b"abc")  # the frame is transport detail, not part of the value


def test_receiver_keeps_frames_of_chunks_it_receives_in_place() -> None:
    data = os.urandom(3000)
    header = make_header("k", data, 1000)
    frames = [c.message(i) for i, c in enumerate(iter_chunks(data, 1000))]
    r = Receiver(header, LIMITS)
    for f in frames:
        r.add(decode_chunk_message(f, pb.PutRequest))
    r.finish()
    assert [c.message(i) for i, c in enumerate(r.chunks)] == frames
    assert all(c.message(i) is f for i, (c, f) in enumerate(zip(r.chunks, frames)))


# -- units ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, value", [
    ("0", 0), ("1048576", MiB), ("512MiB", 512 * MiB), ("4GiB", 4 << 30), ("4 gib", 4 << 30), ("1KB", 1000),
    ("1.5KiB", 1536), ("2mb", 2_000_000), ("7b", 7), (" 3 KiB ", 3 * KiB), ("1TiB", 1 << 40), (42, 42),
])
def test_parse_size(text: str | int, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "abc", "-1", "1XB", "1.2.3MiB", "MiB", "1 Mi B"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="not a size"):
        parse_size(text)


@pytest.mark.parametrize("n, text", [
    (0, "0 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (1536, "1.5 KiB"), (48 * MiB, "48.0 MiB"),
    (3 << 30, "3.0 GiB"), (5 << 40, "5.0 TiB"), (5000 << 40, "5000.0 TiB"),
])
def test_format_size(n: int, text: str) -> None:
    assert format_size(n) == text


def test_checksum_is_xxh3_of_the_raw_bytes() -> None:
    data = os.urandom(1000)
    assert checksum(data) == checksum(bytearray(data)) == checksum(memoryview(data))
    assert checksum(data) != checksum(data[:-1])

"""Decoding while the chunks arrive: each leaf's bytes go into their final, fresh memory as they come.

A hit from another node used to arrive whole and then be decoded: the widening of an 8-bit image (12 MiB of
codes into 48 MiB of float32) followed the transfer instead of overlapping it. A StreamDecoder is handed each
chunk as the receiver verifies it, writes the part of every leaf that chunk covers (levels widened to float32
in cache-sized blocks), and leaves only the last steps to finish(): the un-shuffling of byte planes, the bool
checks, and building the tree. Nothing it made is handed out before finish(), which the caller runs only once
the whole blob's checksum matched, so a corrupt or truncated transfer never becomes a value.

The manifest is parsed as soon as its bytes are in (the first chunk, for any real value), with the same reader
and the same checks as decode(); a blob that fails them fails here, at the first chunk.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mesh.codec.layout import (
    HEADER, MAX_DEPTH, MAX_MANIFEST, NUMPY_CODES, TENSOR_DTYPES, BlobFormatError, KeyPath, ManifestReader,
    Section, bad, manifest_end, read_manifest,
)
from mesh.codec.levels import codes_view, widen_into
from mesh.codec.shuffle import unshuffle_into
from mesh.buffers import fresh


@dataclass
class _Leaf:
    """Where one section's bytes go while they arrive, and what it becomes at the end."""

    section: Section
    path: KeyPath
    start: int                      # offset of its first byte in the blob
    dest: Any = None                # a memoryview of fresh memory, or (levels) a float32 tensor
    buffer: Any = None              # the fresh memory behind `dest`
    torch: Any = field(default=None, repr=False)

    @property
    def end(self) -> int:
        return self.start + self.section.nbytes


class StreamDecoder:
    """Feed a blob's bytes in order with `feed`, then `finish()` for the value (or BlobFormatError).

    `start(size)` (re)starts it for a stream of `size` bytes, dropping whatever an earlier, abandoned stream
    wrote: a reader that fails over to another node starts again."""

    def __init__(self) -> None:
        self.size = -1
        self.received = 0
        self.header: object = None  # what the caller started it for (it compares, it is not read here)
        self._head = bytearray()
        self._leaves: list[_Leaf] = []
        self._next = 0              # index of the first leaf not yet complete
        self._tree: object = None
        self._parsed = False
        self._failed: Exception | None = None  # what a feed raised: the stream cannot become a value any more
        self._finished = False

    def start(self, size: int, header: object = None) -> None:
        self.__init__()  # type: ignore[misc]
        self.size, self.header = size, header

    def feed(self, piece: bytes | bytearray | memoryview) -> None:
        if self._failed is not None or self._finished:
            raise BlobFormatError("this stream already failed or finished")
        try:
            self._feed(piece)
        except Exception as e:
            self._failed = e
            raise

    def _feed(self, piece: bytes | bytearray | memoryview) -> None:
        mv = memoryview(piece).cast("B")
        at = self.received
        self.received += len(mv)
        if self.received > self.size:
            raise BlobFormatError(f"more than the {self.size} bytes announced")
        if not self._parsed:
            # The first chunk of any real value holds the whole manifest: parse it in place. Only a manifest
            # that spans chunks is gathered first.
            head: bytearray | memoryview = mv if not self._head else self._head + mv
            end = manifest_end(head)
            if end is None or (len(head) < end <= HEADER.size + MAX_MANIFEST):
                self._head = bytearray(head)  # read_manifest refuses an over-long length without waiting for it
                return
            self._head = bytearray()
            self._parse(head)
            return
        self._write(at, mv)

    def _parse(self, head: bytearray | memoryview) -> None:
        """Parse the manifest from the blob's first bytes, `head`, then write the data bytes among them."""
        manifest, base = read_manifest(lambda at, n: bytes(head[at: at + n]), self.size)
        self._tree = ManifestReader(self.size - base, lambda s, path: self._leaf(s, path, base)).read(manifest)
        self._parsed = True
        if len(head) > base:
            self._write(base, memoryview(head)[base:])

    def _leaf(self, s: Section, path: KeyPath, base: int) -> _Leaf:
        leaf = _Leaf(s, path, base + s.off)
        if s.kind == "tensor" and s.levels and s.nbytes:
            import torch

            leaf.torch = torch
            leaf.buffer = fresh(4 * s.nbytes)
            leaf.dest = torch.frombuffer(leaf.buffer, dtype=torch.float32)
        elif s.nbytes:
            leaf.buffer = fresh(s.nbytes)
            leaf.dest = memoryview(leaf.buffer)
        if s.nbytes:
            self._leaves.append(leaf)
        return leaf

    def _write(self, at: int, mv: memoryview) -> None:
        """Copy bytes at..at+len(mv) of the blob into every leaf they cover (leaves are in blob order)."""
        end = at + len(mv)
        i = self._next
        while i < len(self._leaves) and self._leaves[i].start < end:
            leaf = self._leaves[i]
            lo, hi = max(at, leaf.start), min(end, leaf.end)
            if lo < hi:
                piece = mv[lo - at: hi - at]
                off = lo - leaf.start
                if leaf.torch is not None:  # 8-bit levels: the float32 they stand for
                    widen_into(leaf.torch, leaf.dest[off: off + len(piece)], codes_view(leaf.torch, piece))
                else:
                    leaf.dest[off: off + len(piece)] = piece
            if leaf.end <= end:
                self._next = i + 1  # complete: later chunks start past it
            i += 1

    def finish(self) -> object:
        """The value, once: its tensors are the decoder's own memory (levels are divided in place here)."""
        if self._failed is not None:
            raise BlobFormatError(f"the stream did not decode: {self._failed}")
        if self._finished:
            raise BlobFormatError("finish() was already called: the value was handed out")
        self._finished = True
        if self.received != self.size:
            raise BlobFormatError(f"truncated: {self.received} of {self.size} bytes arrived")
        if not self._parsed:
            self._parse(self._head)  # a blob too short for its own header or manifest: read_manifest says which
        return _build(self._tree, 0)


def _build(v: object, depth: int) -> object:
    """The tree with every leaf made into its value (containers rebuilt; depth already bounded by the reader)."""
    if isinstance(v, _Leaf):
        return _value(v)
    if depth > MAX_DEPTH:
        raise BlobFormatError(f"nested deeper than {MAX_DEPTH}")
    if type(v) is list:
        return [_build(x, depth + 1) for x in v]
    if type(v) is tuple:
        return tuple(_build(x, depth + 1) for x in v)
    if type(v) is dict:
        return {k: _build(x, depth + 1) for k, x in v.items()}
    return v


def _value(leaf: _Leaf) -> object:
    s, path = leaf.section, leaf.path
    if s.kind == "bytes":
        return bytes(leaf.dest) if s.nbytes else b""
    if s.kind == "ndarray":
        import numpy as np

        dtype = np.dtype((">" if s.bigendian else "<") + NUMPY_CODES[s.dtype])
        if s.nbytes == 0:
            return np.empty(s.shape, dtype=dtype)
        a = np.frombuffer(leaf.buffer, dtype=dtype)
        if s.dtype == "bool" and a.view(np.uint8).max() > 1:
            raise bad(path, "bool array holds bytes other than 0 and 1")
        return a.reshape(s.shape)
    import torch

    dtype = getattr(torch, s.dtype, None)  # s.dtype is from the allowlist, so this only looks up a dtype
    if not isinstance(dtype, torch.dtype):
        raise bad(path, f"dtype {s.dtype} is not supported by torch {torch.__version__}")
    if s.nbytes == 0:
        return torch.empty(s.shape, dtype=dtype)
    if s.levels:
        return leaf.dest.view(s.shape)  # written as the codes arrived
    raw = torch.frombuffer(leaf.buffer, dtype=torch.uint8)
    if dtype is torch.bool and bool(raw.max() > 1):
        raise bad(path, "bool tensor holds bytes other than 0 and 1")
    if s.shuffle:
        out = torch.frombuffer(fresh(s.nbytes), dtype=torch.uint8)
        unshuffle_into(out, raw, TENSOR_DTYPES[s.dtype])
        raw = out
    return raw.view(dtype).view(s.shape)



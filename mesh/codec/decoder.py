"""Decoding: a blob (one buffer or its pieces) -> the value tree, and describe(), which reads the manifest alone.

decode() builds only the few types the format lists; describe() needs neither torch nor numpy, so the CLI can
show what a key holds on a machine without them.
"""

from __future__ import annotations

from typing import Any

from mesh.codec.layout import (
    LEVELS, NUMPY_CODES, TENSOR_DTYPES, Buffer, Bytes, KeyPath, ManifestReader, Pieces, Section, bad, format_path,
    open_blob, read_manifest,
)
from mesh.codec.levels import widen_into
from mesh.codec.shuffle import unshuffle_into
from mesh.codec.stream import StreamDecoder
from mesh.buffers import fresh


class _Views:
    """Turns sections of one writable buffer into tensors and arrays that are views of it (zero-copy); only the
    "levels" and "shuffle" forms are written into fresh memory of their own."""

    def __init__(self, whole: memoryview, data_start: int) -> None:
        self.whole = whole
        self.data_start = data_start

    def __call__(self, s: Section, path: KeyPath) -> object:
        at = self.data_start + s.off
        if s.kind == "bytes":
            return bytes(self.whole[at: at + s.nbytes])
        return (self.tensor if s.kind == "tensor" else self.ndarray)(s, at, path)

    def tensor(self, s: Section, at: int, path: KeyPath) -> object:
        import torch

        dtype = getattr(torch, s.dtype, None)  # s.dtype is from the allowlist, so this only looks up a dtype
        if not isinstance(dtype, torch.dtype):
            raise bad(path, f"dtype {s.dtype} is not supported by torch {torch.__version__}")
        if s.nbytes == 0:
            return torch.empty(s.shape, dtype=dtype)
        raw = torch.frombuffer(self.whole, dtype=torch.uint8, count=s.nbytes, offset=at)
        if s.levels:
            out = torch.frombuffer(fresh(4 * s.nbytes), dtype=torch.float32)
            widen_into(torch, out, raw)
            return out.view(s.shape)
        if dtype is torch.bool and bool(raw.max() > 1):
            raise bad(path, "bool tensor holds bytes other than 0 and 1")
        if s.shuffle:
            out = torch.frombuffer(fresh(s.nbytes), dtype=torch.uint8)
            unshuffle_into(out, raw, TENSOR_DTYPES[s.dtype])
            return out.view(dtype).view(s.shape)
        return raw.view(dtype).view(s.shape)

    def ndarray(self, s: Section, at: int, path: KeyPath) -> object:
        import numpy as np

        dtype = np.dtype((">" if s.bigendian else "<") + NUMPY_CODES[s.dtype])
        if s.nbytes == 0:
            return np.empty(s.shape, dtype=dtype)
        a = np.frombuffer(self.whole, dtype=dtype, count=s.nbytes // dtype.itemsize, offset=at)
        if s.dtype == "bool" and a.view(np.uint8).max() > 1:
            raise bad(path, "bool array holds bytes other than 0 and 1")
        return a.reshape(s.shape)


def decode(buf: Buffer | Pieces) -> object:
    """Decode a blob, given as one buffer or as its pieces in order; raises BlobFormatError for anything invalid.

    Plain tensors and arrays are views of buf when it is one writable buffer (zero-copy: they share its memory,
    so do not reuse the buffer while they live). From pieces or read-only bytes every leaf is written once, into
    fresh memory of its own, by the same StreamDecoder that decodes a transfer while it arrives; "levels"
    tensors are always fresh float32.
    """
    data = Bytes(buf)
    whole = None if isinstance(buf, (list, tuple)) else data.whole  # pieces are never aliased, even just one
    if whole is None:
        stream = StreamDecoder()
        stream.start(data.size)
        for piece in data.parts:
            stream.feed(piece)
        return stream.finish()
    manifest, data_start = read_manifest(data.read, data.size)
    return ManifestReader(data.size - data_start, _Views(whole, data_start)).read(manifest)


# ---------------------------------------------------------------------------------------------------- describe


def describe(buf: Buffer | Pieces) -> list[dict[str, Any]]:
    """One row per leaf (and per empty container), read from the manifest alone: works without torch or numpy."""
    data, manifest, data_start = open_blob(buf)
    tree = ManifestReader(data.size - data_start, lambda s, path: s).read(manifest)
    rows: list[dict[str, Any]] = []
    _rows(tree, None, rows)
    return rows


def _rows(v: object, path: KeyPath, rows: list[dict[str, Any]]) -> None:
    if isinstance(v, (list, tuple, dict)) and v:
        pairs = v.items() if isinstance(v, dict) else enumerate(v)
        for k, x in pairs:
            _rows(x, (path, k), rows)
        return
    row: dict[str, Any] = {"path": format_path(path)}
    if isinstance(v, Section):
        row["type"] = v.kind
        if v.kind != "bytes":
            row.update(dtype=v.dtype, shape=list(v.shape))
        row["bytes"] = v.nbytes
        if v.shuffle:
            row["shuffle"] = True
        if v.levels:
            row["levels"] = LEVELS
        if v.bigendian:
            row["byteorder"] = "big"
    elif isinstance(v, (list, tuple, dict)):
        row.update(type=type(v).__name__, len=0)
    else:
        row.update(type="none" if v is None else type(v).__name__, value=v)
    rows.append(row)


"""Decoding: a blob (one buffer or its pieces) -> the value tree, and describe(), which reads the manifest alone.

decode() builds only the few types the format lists; describe() needs neither torch nor numpy, so the CLI can
show what a key holds on a machine without them.
"""

from __future__ import annotations

import warnings
from typing import Any

from mesh.codec.layout import (
    LEVELS, NUMPY_CODES, TENSOR_DTYPES, Buffer, Bytes, KeyPath, ManifestReader, Pieces, Section, bad, format_path,
    open_blob,
)
from mesh.codec.levels import level_table, levels_exact
from mesh.codec.shuffle import unshuffle_into
from mesh.memory import fresh


class _Materializer:
    """Turns sections into tensors, arrays and bytes.

    From one writable buffer, plain tensors and arrays are views of it (zero-copy). From pieces or read-only
    bytes, each leaf is written once into fresh memory of its own, straight from the pieces: the pieces are
    never joined first, so a value costs one pass over its bytes, not two."""

    def __init__(self, data: Bytes, data_start: int) -> None:
        self.data = data
        self.whole = data.whole
        self.data_start = data_start

    def __call__(self, s: Section, path: KeyPath) -> object:
        at = self.data_start + s.off
        if s.kind == "bytes":
            return self.data.read(at, s.nbytes)
        return (self.tensor if s.kind == "tensor" else self.ndarray)(s, at, path)

    def _fresh_copy(self, at: int, n: int) -> Buffer:
        out = fresh(n)
        dst = memoryview(out)
        for off, piece in self.data.ranges(at, n):
            dst[off: off + len(piece)] = piece
        return out

    def tensor(self, s: Section, at: int, path: KeyPath) -> object:
        import torch

        dtype = getattr(torch, s.dtype, None)  # s.dtype is from the allowlist, so this only looks up a dtype
        if not isinstance(dtype, torch.dtype):
            raise bad(path, f"dtype {s.dtype} is not supported by torch {torch.__version__}")
        if s.nbytes == 0:
            return torch.empty(s.shape, dtype=dtype)
        if s.levels:
            return self.levels(torch, s, at)
        if self.whole is not None:
            raw = torch.frombuffer(self.whole, dtype=torch.uint8, count=s.nbytes, offset=at)
        else:
            raw = torch.frombuffer(self._fresh_copy(at, s.nbytes), dtype=torch.uint8)
        if dtype is torch.bool and bool(raw.max() > 1):
            raise bad(path, "bool tensor holds bytes other than 0 and 1")
        if s.shuffle:
            out = torch.frombuffer(fresh(s.nbytes), dtype=torch.uint8)
            unshuffle_into(out, raw, TENSOR_DTYPES[s.dtype])
            return out.view(dtype).view(s.shape)
        return raw.view(dtype).view(s.shape)

    def levels(self, torch: Any, s: Section, at: int) -> object:
        """uint8 codes -> float32, written once into fresh memory, piece by piece."""
        out = torch.frombuffer(fresh(4 * s.nbytes), dtype=torch.float32)
        exact = levels_exact(torch)
        table = None if exact else torch.frombuffer(bytearray(level_table()), dtype=torch.float32)
        for off, piece in self.data.ranges(at, s.nbytes):
            codes = _u8(torch, piece)
            if exact:  # widen here, divide once below: faster than a dividing copy (torch.div with out=)
                out[off: off + len(piece)].copy_(codes)
            else:
                torch.index_select(table, 0, codes.long(), out=out[off: off + len(piece)])
        if exact:
            out.div_(LEVELS)
        return out.view(s.shape)

    def ndarray(self, s: Section, at: int, path: KeyPath) -> object:
        import numpy as np

        dtype = np.dtype((">" if s.bigendian else "<") + NUMPY_CODES[s.dtype])
        if s.nbytes == 0:
            return np.empty(s.shape, dtype=dtype)
        source = self.whole if self.whole is not None else self._fresh_copy(at, s.nbytes)
        offset = at if self.whole is not None else 0
        a = np.frombuffer(source, dtype=dtype, count=s.nbytes // dtype.itemsize, offset=offset)
        if s.dtype == "bool" and a.view(np.uint8).max() > 1:
            raise bad(path, "bool array holds bytes other than 0 and 1")
        return a.reshape(s.shape)


_READONLY_QUIET = False


def _u8(torch: Any, piece: memoryview) -> Any:
    """A uint8 tensor reading `piece`, which may be read-only (a message as gRPC handed it over).

    torch warns once per process about tensors over read-only memory; these are only ever read, here, so that
    one warning is taken (and silenced) on the first call instead of reaching ComfyUI's log."""
    global _READONLY_QUIET
    if piece.readonly and not _READONLY_QUIET:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            torch.frombuffer(b"\0", dtype=torch.uint8)
        _READONLY_QUIET = True
    return torch.frombuffer(piece, dtype=torch.uint8)


def decode(buf: Buffer | Pieces) -> object:
    """Decode a blob, given as one buffer or as its pieces in order; raises BlobFormatError for anything invalid.

    Plain tensors and arrays are views of buf when it is one writable buffer (zero-copy: they share its memory,
    so do not reuse the buffer while they live). From pieces or read-only bytes every leaf is copied once, into
    fresh memory of its own; "levels" tensors are always fresh float32.
    """
    data, manifest, data_start = open_blob(buf)
    return ManifestReader(data.size - data_start, _Materializer(data, data_start)).read(manifest)


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


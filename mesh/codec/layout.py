"""The tensor-tree codec: a ComfyUI node output value <-> one contiguous byte buffer, exactly, without pickle.

A shared cache must never execute what a peer sends it, and a value written on one node must come back
bit-exactly on another. So instead of pickle or torch.save the format has an explicit schema: a small JSON
manifest describes the tree, the raw bytes of the arrays follow, and decoding only ever builds the few types
listed here. Nothing named by the input is imported or evaluated.

Layout (all integers little-endian)::

    0        b"CMB1"                     magic; the trailing digit is the format version
    4        u32 M                       manifest length in bytes
    8        manifest                    compact JSON, ASCII only (so valid UTF-8), at most MAX_MANIFEST bytes
    8+M      zero padding                up to the next multiple of ALIGN (64): the data region starts there
    data     section, padding, ...       the bytes of each tensor / ndarray / bytes leaf in manifest order, each
                                         at the next ALIGN boundary of the data region; nothing after the last

The layout is canonical: a section's "off" (relative to the data region) must be exactly where the previous
one ended, rounded up to ALIGN, and the buffer must end where the last section does. Decoding checks that, so
a truncated, padded or overlapping blob is refused instead of half-read. Alignment lets decode hand out
tensors that are views of the buffer (zero-copy) with every element naturally aligned.

The manifest is one node; a node is one of::

    {"t": "none"}                          {"t": "bool", "v": true}
    {"t": "int", "v": "-0x2a"}             {"t": "float", "v": "0x1.8p+1"}       hex text: any int, every float
    {"t": "str", "v": "a prompt"}          {"t": "bytes", "off": 0, "len": 5}
    {"t": "list", "items": [node, ...]}    {"t": "tuple", "items": [...]}
    {"t": "dict", "keys": ["samples", ...], "items": [node, ...]}               str keys, insertion order
    {"t": "tensor", "dtype": "float32", "shape": [1, 64, 64, 3], "off": 0, "len": 49152}  (+ "shuffle": true,
                                                                                   or "levels": 255)
    {"t": "ndarray", "dtype": "int16", "shape": [3], "off": 64, "len": 6}                 (+ "bigendian": true)

Array bytes are C-order in the host's byte order, which is assumed little-endian (every machine ComfyUI runs
on); numpy arrays keep their declared byte order. "shuffle" stores a tensor as byte planes (all first bytes,
then all second bytes, ...): the exponent bytes of neighbouring floats are alike, so lz4 finds runs it would
otherwise miss. "levels": 255 stores a float32 tensor whose every element is exactly float32(k / 255) for an integer
k in 0..255 (a decoded 8-bit image, as ComfyUI's image loaders make it) as one uint8 k per element: 4x smaller in
memory, on disk and on the wire, and bit-exact back, because the encoder keeps the form only after converting
every element back the way the decoder will and comparing bits. Python float NaNs decode as the canonical NaN (float.hex drops payloads); tensor and ndarray
NaNs keep every bit. Shared references are not preserved: an object reachable twice is stored twice.

This module is the format itself: its constants, its errors, the section records and the reader that validates
a manifest node by node. encoder.py writes this layout, decoder.py reads it; neither needs to know more.
"""

from __future__ import annotations

import bisect
import itertools
import json
import math
import mmap
import re
import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Optional

MAGIC = b"CMB1"
ALIGN = 64
MAX_DEPTH = 256                # containers nested deeper than this are refused both ways (and cycles with them)
MAX_MANIFEST = 64 * 1024**2
MAX_NDIM = 64                  # numpy's limit; torch has none worth reaching
MAX_ELEMENTS = 2**48           # bound on the product of a shape (zero dims counted as 1), far beyond any real array
LEVELS = 255                   # the only "levels" value: 8-bit images
HEADER = struct.Struct("<4sI")

# Element sizes by dtype name: the decoder's allowlist, and what describe() needs without torch.
TENSOR_DTYPES: dict[str, int] = {
    "bool": 1, "uint8": 1, "int8": 1, "int16": 2, "int32": 4, "int64": 8, "uint16": 2, "uint32": 4, "uint64": 8,
    "float16": 2, "bfloat16": 2, "float32": 4, "float64": 8, "float8_e4m3fn": 1, "float8_e5m2": 1,
    "complex64": 8, "complex128": 16,
}
# The subset numpy has, as numpy type codes (kind + itemsize).
NUMPY_CODES: dict[str, str] = {
    "bool": "b1", "uint8": "u1", "int8": "i1", "int16": "i2", "int32": "i4", "int64": "i8", "uint16": "u2",
    "uint32": "u4", "uint64": "u8", "float16": "f2", "float32": "f4", "float64": "f8", "complex64": "c8",
    "complex128": "c16",
}
NUMPY_NAMES = {code: name for name, code in NUMPY_CODES.items()}

_ARRAY_KEYS = frozenset({"t", "dtype", "shape", "off", "len"})
# node type -> (required keys, optional keys)
_NODE_KEYS: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "none": (frozenset({"t"}), frozenset()),
    "bool": (frozenset({"t", "v"}), frozenset()),
    "int": (frozenset({"t", "v"}), frozenset()),
    "float": (frozenset({"t", "v"}), frozenset()),
    "str": (frozenset({"t", "v"}), frozenset()),
    "bytes": (frozenset({"t", "off", "len"}), frozenset()),
    "list": (frozenset({"t", "items"}), frozenset()),
    "tuple": (frozenset({"t", "items"}), frozenset()),
    "dict": (frozenset({"t", "keys", "items"}), frozenset()),
    "tensor": (_ARRAY_KEYS, frozenset({"shuffle", "levels"})),
    "ndarray": (_ARRAY_KEYS, frozenset({"bigendian"})),
}
_HEX_INT = re.compile(r"-?0x[0-9a-f]+")

# A path is a linked list (parent, key), so descending costs nothing until an error message needs the text.
KeyPath = Optional[tuple]


class NotCacheable(TypeError):
    """The value holds something the format cannot represent exactly (or is over the size limit)."""


class BlobFormatError(ValueError):
    """The buffer is not a valid blob: wrong magic, truncated, corrupt or inconsistent manifest."""


@dataclass(slots=True)
class Section:
    """One leaf whose bytes live in the data region (a tensor, an ndarray or bytes)."""

    kind: str
    off: int
    nbytes: int
    dtype: str = ""
    shape: tuple[int, ...] = ()
    shuffle: bool = False
    levels: bool = False
    bigendian: bool = False
    source: Any = None  # encode only: the object the bytes are copied from


@dataclass(slots=True)
class Plan:
    """Everything encode() decides before touching array data; check() stops here."""

    manifest: bytes
    sections: list[Section]
    data_start: int
    size: int


def align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def format_path(path: KeyPath) -> str:
    keys: list[int | str] = []
    while path is not None:
        path, key = path
        keys.append(key)
    return "".join(f"[{k!r}]" for k in reversed(keys))


def location(path: KeyPath) -> str:
    return format_path(path) or "top level"


def short(v: object, limit: int = 40) -> str:
    text = repr(v)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def shape_elements(shape: tuple[int, ...]) -> int | None:
    """Element count, or None when the shape is beyond MAX_ELEMENTS / MAX_NDIM (torch/numpy would choke)."""
    if len(shape) > MAX_NDIM or math.prod(max(d, 1) for d in shape) > MAX_ELEMENTS:
        return None
    return math.prod(shape)


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


Buffer = bytes | bytearray | memoryview | mmap.mmap
Pieces = Sequence[Buffer]


class Bytes:
    """The blob's bytes: one buffer, or pieces in order (chunks as they came off the wire, never joined)."""

    def __init__(self, buf: Buffer | Pieces) -> None:
        if isinstance(buf, (list, tuple)):
            parts = [_byte_view(p) for p in buf]
        else:
            parts = [_byte_view(buf)]
        self.parts = [p for p in parts if len(p)] or [memoryview(b"")]
        self.starts = list(itertools.accumulate((len(p) for p in self.parts[:-1]), initial=0))
        self.size = self.starts[-1] + len(self.parts[-1])

    @property
    def whole(self) -> memoryview | None:
        """The one buffer, when the bytes are one and writable: decode then hands out views of it."""
        return self.parts[0] if len(self.parts) == 1 and not self.parts[0].readonly else None

    def ranges(self, at: int, n: int) -> Iterator[tuple[int, memoryview]]:
        """(offset within the range, bytes) for the pieces covering at..at+n, in order."""
        i = bisect.bisect_right(self.starts, at) - 1
        done = 0
        while done < n:
            part, off = self.parts[i], at + done - self.starts[i]
            piece = part[off: off + n - done]
            yield done, piece
            done += len(piece)
            i += 1

    def read(self, at: int, n: int) -> bytes:
        return b"".join(bytes(piece) for _, piece in self.ranges(at, n))


def _byte_view(buf: Buffer) -> memoryview:
    mv = memoryview(buf)
    if not mv.c_contiguous:
        mv = memoryview(bytearray(mv))
    return mv.cast("B")


def open_blob(buf: Buffer | Pieces) -> tuple[Bytes, Any, int]:
    """Check the header and parse the manifest: (the bytes, manifest, start of the data region)."""
    data = Bytes(buf)
    manifest, data_start = read_manifest(data.read, data.size)
    return data, manifest, data_start


def manifest_end(head: bytes | bytearray | memoryview) -> int | None:
    """How many bytes a blob's header and manifest take, from its first bytes; None until 8 have come."""
    if len(head) < HEADER.size:
        return None
    return HEADER.size + HEADER.unpack_from(head)[1]


def read_manifest(read: Callable[[int, int], bytes], size: int) -> tuple[Any, int]:
    """(manifest, start of the data region) of a blob of `size` bytes, reading its start through `read(at, n)`."""
    if size < HEADER.size:
        raise BlobFormatError(f"blob of {size} bytes is shorter than its {HEADER.size}-byte header")
    magic, length = HEADER.unpack(read(0, HEADER.size))
    if magic != MAGIC:
        raise BlobFormatError(f"bad magic {bytes(magic)!r}, expected {MAGIC!r}")
    if length > MAX_MANIFEST:
        raise BlobFormatError(f"manifest length {length} exceeds the limit of {MAX_MANIFEST}")
    if HEADER.size + length > size:
        raise BlobFormatError(f"truncated: manifest of {length} bytes but the blob has {size} bytes")
    try:
        text = str(read(HEADER.size, length), "utf-8")
        manifest = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise BlobFormatError(f"manifest is not valid JSON: {type(e).__name__}: {short(str(e), 120)}") from None
    data_start = align(HEADER.size + length)
    if data_start > size:
        raise BlobFormatError(f"truncated: the data region starts at {data_start} but the blob has {size} bytes")
    return manifest, data_start


class ManifestReader:
    """Validates the manifest node by node while building the value; every check names the path."""

    def __init__(self, data_len: int, leaf: Callable[[Section, KeyPath], object]) -> None:
        self.data_len = data_len
        self.end = 0  # end of the last section, relative to the data region
        self.leaf = leaf

    def read(self, manifest: Any) -> object:
        value = self.node(manifest, None, 0)
        if self.end != self.data_len:
            raise BlobFormatError(f"{self.data_len - self.end} bytes after the last data section")
        return value

    def node(self, n: Any, path: KeyPath, depth: int) -> object:
        if type(n) is not dict:
            raise bad(path, f"node is {type(n).__name__}, not an object")
        t = n.get("t")
        keys = _NODE_KEYS.get(t) if type(t) is str else None
        if keys is None:
            raise bad(path, f"unknown node type {short(t)}")
        required, optional = keys
        if not required <= n.keys() or not n.keys() <= required | optional:
            raise bad(path, f"{t} node has keys {sorted(n)}, expected {sorted(required)} (+ {sorted(optional)})")
        if t == "none":
            return None
        if t in ("bool", "int", "float", "str"):
            return _scalar(t, n["v"], path)
        if t in ("list", "tuple", "dict"):
            if depth >= MAX_DEPTH:
                raise bad(path, f"nested deeper than {MAX_DEPTH}")
            items = n["items"]
            if type(items) is not list:
                raise bad(path, f"{t} items is not a list")
            if t != "dict":
                values = [self.node(x, (path, i), depth + 1) for i, x in enumerate(items)]
                return values if t == "list" else tuple(values)
            dict_keys = n["keys"]
            if type(dict_keys) is not list or any(type(k) is not str for k in dict_keys):
                raise bad(path, "dict keys is not a list of strings")
            if len(dict_keys) != len(items) or len(set(dict_keys)) != len(dict_keys):
                raise bad(path, f"dict has {len(dict_keys)} keys ({len(set(dict_keys))} distinct), {len(items)} items")
            return {k: self.node(x, (path, k), depth + 1) for k, x in zip(dict_keys, items)}
        return self.leaf(self.section(t, n, path), path)

    def section(self, kind: str, n: dict[str, Any], path: KeyPath) -> Section:
        off, nbytes = n["off"], n["len"]
        if type(off) is not int or type(nbytes) is not int or nbytes < 0:
            raise bad(path, f"bad off/len {short(off)}/{short(nbytes)}")
        if off != align(self.end):
            raise bad(path, f"section at {off}, expected {align(self.end)} (sections follow each other, "
                             f"{ALIGN}-byte aligned)")
        if off + nbytes > self.data_len:
            raise bad(path, f"truncated: section {off}..{off + nbytes} beyond the {self.data_len}-byte data region")
        self.end = off + nbytes
        s = Section(kind, off, nbytes)
        if kind == "bytes":
            return s
        s.dtype, s.shape = n["dtype"], n["shape"]
        if type(s.dtype) is not str or s.dtype not in (TENSOR_DTYPES if kind == "tensor" else NUMPY_CODES):
            raise bad(path, f"unsupported {kind} dtype {short(s.dtype)}")
        if type(s.shape) is not list or any(type(d) is not int or d < 0 for d in s.shape):
            raise bad(path, f"shape {short(s.shape)} is not a list of non-negative ints")
        s.shape = tuple(s.shape)
        count = shape_elements(s.shape)
        if count is None:
            raise bad(path, f"shape {short(list(s.shape))} is too large")
        flag = "shuffle" if kind == "tensor" else "bigendian"
        if type(n.get(flag, False)) is not bool:
            raise bad(path, f"{flag} is not a bool")
        s.shuffle, s.bigendian = bool(n.get("shuffle")), bool(n.get("bigendian"))
        if "levels" in n:
            if n["levels"] != LEVELS or type(n["levels"]) is not int or s.dtype != "float32" or s.shuffle:
                raise bad(path, f"levels {short(n['levels'])} on a {s.dtype} tensor (only 255, float32, unshuffled)")
            if count != nbytes:
                raise bad(path, f"len {nbytes} does not match shape {list(s.shape)} at one byte per level")
            s.levels = True
        elif count * TENSOR_DTYPES[s.dtype] != nbytes:
            raise bad(path, f"len {nbytes} does not match shape {list(s.shape)} of {s.dtype}")
        return s


def bad(path: KeyPath, message: str) -> BlobFormatError:
    return BlobFormatError(f"{message} at {location(path)}")


def _scalar(t: str, v: Any, path: KeyPath) -> object:
    if t == "bool" and type(v) is bool:
        return v
    if t == "str" and type(v) is str:
        return v
    if t == "int" and type(v) is str and _HEX_INT.fullmatch(v):
        return int(v, 16)
    if t == "float" and type(v) is str and len(v) <= 64:
        try:
            return float.fromhex(v)
        except (ValueError, OverflowError):
            pass
    raise bad(path, f"bad {t} value {short(v)}")


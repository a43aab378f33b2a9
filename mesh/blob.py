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
"""

from __future__ import annotations

import bisect
import itertools
import json
import math
import mmap
import re
import struct
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Optional

from mesh.memory import fresh
from mesh.units import format_size

__all__ = [
    "ALIGN", "MAGIC", "MAX_DEPTH", "MAX_MANIFEST", "SHUFFLE_MIN_ELEMENTS", "TENSOR_DTYPES",
    "LEVELS_MIN_ELEMENTS", "BlobFormatError", "NotCacheable",
    "byte_shuffle", "byte_unshuffle", "check", "decode", "describe", "encode", "format_description",
]

MAGIC = b"CMB1"
ALIGN = 64
MAX_DEPTH = 256                # containers nested deeper than this are refused both ways (and cycles with them)
MAX_MANIFEST = 64 * 1024**2
MAX_NDIM = 64                  # numpy's limit; torch has none worth reaching
MAX_ELEMENTS = 2**48           # bound on the product of a shape (zero dims counted as 1), far beyond any real array
SHUFFLE_MIN_ELEMENTS = 4096    # below this the planes are too short for shuffling to pay
LEVELS_MIN_ELEMENTS = 4096     # below this the uint8 form saves too little to be worth the check
LEVELS = 255                   # the only "levels" value: 8-bit images
_LEVELS_BLOCK = 1 << 22        # elements checked at a time (bounded temporaries; an early block fails fast)
_HEADER = struct.Struct("<4sI")

# Element sizes by dtype name: the decoder's allowlist, and what describe() needs without torch.
TENSOR_DTYPES: dict[str, int] = {
    "bool": 1, "uint8": 1, "int8": 1, "int16": 2, "int32": 4, "int64": 8, "uint16": 2, "uint32": 4, "uint64": 8,
    "float16": 2, "bfloat16": 2, "float32": 4, "float64": 8, "float8_e4m3fn": 1, "float8_e5m2": 1,
    "complex64": 8, "complex128": 16,
}
# The subset numpy has, as numpy type codes (kind + itemsize).
_NUMPY_CODES: dict[str, str] = {
    "bool": "b1", "uint8": "u1", "int8": "i1", "int16": "i2", "int32": "i4", "int64": "i8", "uint16": "u2",
    "uint32": "u4", "uint64": "u8", "float16": "f2", "float32": "f4", "float64": "f8", "complex64": "c8",
    "complex128": "c16",
}
_NUMPY_NAMES = {code: name for name, code in _NUMPY_CODES.items()}

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
_Path = Optional[tuple]


class NotCacheable(TypeError):
    """The value holds something the format cannot represent exactly (or is over the size limit)."""


class BlobFormatError(ValueError):
    """The buffer is not a valid blob: wrong magic, truncated, corrupt or inconsistent manifest."""


@dataclass(slots=True)
class _Section:
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
class _Plan:
    """Everything encode() decides before touching array data; check() stops here."""

    manifest: bytes
    sections: list[_Section]
    data_start: int
    size: int


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _format_path(path: _Path) -> str:
    keys: list[int | str] = []
    while path is not None:
        path, key = path
        keys.append(key)
    return "".join(f"[{k!r}]" for k in reversed(keys))


def _where(path: _Path) -> str:
    return _format_path(path) or "top level"


def _short(v: object, limit: int = 40) -> str:
    text = repr(v)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _shape_elements(shape: tuple[int, ...]) -> int | None:
    """Element count, or None when the shape is beyond MAX_ELEMENTS / MAX_NDIM (torch/numpy would choke)."""
    if len(shape) > MAX_NDIM or math.prod(max(d, 1) for d in shape) > MAX_ELEMENTS:
        return None
    return math.prod(shape)


# ---------------------------------------------------------------------------------------------------- encode


class _Planner:
    """Walks a value once: validates every leaf, builds the manifest, assigns data offsets. Copies nothing."""

    def __init__(self, shuffle: bool, max_bytes: int | None, levels: bool = False) -> None:
        self.shuffle = shuffle
        self.levels = levels
        self.max_bytes = max_bytes
        self.sections: list[_Section] = []
        self.end = 0  # end of the data region so far

    def plan(self, value: object) -> _Plan:
        root = self.node(value, None, 0)
        manifest = json.dumps(root, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode("ascii")
        if len(manifest) > MAX_MANIFEST:
            raise NotCacheable(f"not cacheable: manifest of {len(manifest)} bytes exceeds {MAX_MANIFEST}")
        data_start = _align(_HEADER.size + len(manifest))
        plan = _Plan(manifest, self.sections, data_start, data_start + self.end)
        self._check_size(plan.size)
        return plan

    def _check_size(self, size: int) -> None:
        if self.max_bytes is not None and size > self.max_bytes:
            raise NotCacheable(f"not cacheable: encoded size {size} bytes exceeds max_bytes {self.max_bytes}")

    def section(self, kind: str, nbytes: int, **fields: Any) -> _Section:
        s = _Section(kind, _align(self.end), nbytes, **fields)
        self.end = s.off + nbytes
        self._check_size(self.end)  # data alone already too big: stop before walking the rest
        self.sections.append(s)
        return s

    def node(self, v: Any, path: _Path, depth: int) -> dict[str, Any]:
        tp = type(v)
        if v is None:
            return {"t": "none"}
        if tp is bool:
            return {"t": "bool", "v": v}
        if tp is int:
            return {"t": "int", "v": hex(v)}
        if tp is float:
            return {"t": "float", "v": v.hex()}
        if tp is str:
            return {"t": "str", "v": v}
        if tp is bytes or tp is bytearray:
            s = self.section("bytes", len(v), source=v)
            return {"t": "bytes", "off": s.off, "len": s.nbytes}
        if tp is list or tp is tuple or tp is dict:
            if depth >= MAX_DEPTH:
                raise NotCacheable(f"not cacheable: nested deeper than {MAX_DEPTH} (a cycle?) at {_where(path)}")
            if tp is dict:
                keys = list(v)
                for k in keys:
                    if type(k) is not str:
                        raise NotCacheable(f"not cacheable: dict key {_short(k)} of type {type(k).__qualname__} "
                                           f"(only str keys) at {_where(path)}")
                items = [self.node(x, (path, k), depth + 1) for k, x in v.items()]
                return {"t": "dict", "keys": keys, "items": items}
            items = [self.node(x, (path, i), depth + 1) for i, x in enumerate(v)]
            return {"t": "list" if tp is list else "tuple", "items": items}
        torch = sys.modules.get("torch")  # a value can only hold a tensor if torch is already imported
        if torch is not None and isinstance(v, torch.Tensor):
            return self.tensor(torch, v, path)
        np = sys.modules.get("numpy")
        if np is not None and isinstance(v, np.ndarray):
            return self.ndarray(np, v, path)
        raise NotCacheable(f"not cacheable: {tp.__qualname__} at {_where(path)}")

    def tensor(self, torch: Any, t: Any, path: _Path) -> dict[str, Any]:
        where = _where(path)
        if type(t) is not torch.Tensor and type(t) is not torch.nn.Parameter:
            raise NotCacheable(f"not cacheable: {type(t).__qualname__} (a tensor subclass) at {where}")
        if t.is_nested:
            raise NotCacheable(f"not cacheable: nested tensor at {where}")
        if t.layout != torch.strided:
            raise NotCacheable(f"not cacheable: sparse tensor ({t.layout}) at {where}")
        if t.is_quantized:
            raise NotCacheable(f"not cacheable: quantized tensor at {where}")
        if t.is_meta:
            raise NotCacheable(f"not cacheable: meta tensor (it has no data) at {where}")
        dtype = str(t.dtype).removeprefix("torch.")
        if dtype not in TENSOR_DTYPES:
            raise NotCacheable(f"not cacheable: tensor of dtype {t.dtype} at {where}")
        shape = tuple(t.shape)
        count = _shape_elements(shape)
        if count is None:
            raise NotCacheable(f"not cacheable: tensor of shape {list(shape)} at {where}")
        itemsize = TENSOR_DTYPES[dtype]
        if self.levels and dtype == "float32" and count >= LEVELS_MIN_ELEMENTS:
            codes = _levels_of(torch, t)  # reads the data: only encode() asks, check() stays a plan
            if codes is not None:
                s = self.section("tensor", count, dtype=dtype, shape=shape, levels=True, source=codes)
                return {"t": "tensor", "dtype": dtype, "shape": list(shape), "off": s.off, "len": s.nbytes,
                        "levels": LEVELS}
        shuffle = self.shuffle and t.is_floating_point() and itemsize > 1 and count >= SHUFFLE_MIN_ELEMENTS
        s = self.section("tensor", count * itemsize, dtype=dtype, shape=shape, shuffle=shuffle, source=t)
        node = {"t": "tensor", "dtype": dtype, "shape": list(shape), "off": s.off, "len": s.nbytes}
        if shuffle:
            node["shuffle"] = True
        return node

    def ndarray(self, np: Any, a: Any, path: _Path) -> dict[str, Any]:
        where = _where(path)
        if type(a) is not np.ndarray:
            raise NotCacheable(f"not cacheable: {type(a).__qualname__} (an ndarray subclass) at {where}")
        dtype = _NUMPY_NAMES.get(f"{a.dtype.kind}{a.dtype.itemsize}")
        if dtype is None or a.dtype.fields is not None:
            raise NotCacheable(f"not cacheable: ndarray of dtype {a.dtype} at {where}")
        shape = tuple(a.shape)
        count = _shape_elements(shape)
        if count is None:
            raise NotCacheable(f"not cacheable: ndarray of shape {list(shape)} at {where}")
        bigendian = a.dtype.byteorder == ">"
        s = self.section("ndarray", a.nbytes, dtype=dtype, shape=shape, bigendian=bigendian, source=a)
        node = {"t": "ndarray", "dtype": dtype, "shape": list(shape), "off": s.off, "len": s.nbytes}
        if bigendian:
            node["bigendian"] = True
        return node


def _level_table() -> bytes:
    """float32(k / 255) for k in 0..255, correctly rounded, as little-endian bytes: what "levels" means,
    independent of any library (rounding k/255 from a double to float32 is exact-safe: 53 >= 2*24 + 2 bits)."""
    return struct.pack("<256f", *(k / LEVELS for k in range(256)))


_LEVELS_OK: bool | None = None


def _levels_exact(torch: Any) -> bool:
    """Whether widening uint8 to float32 and dividing by 255 in place gives exactly the table on this host, for every k,
    in vector bodies and scalar tails alike. Checked once; without it, no "levels" form is written and
    decoding falls back to a table lookup."""
    global _LEVELS_OK
    if _LEVELS_OK is None:
        table = torch.frombuffer(bytearray(_level_table()), dtype=torch.float32)
        ok = True
        for n in (256, 263, 256 * 17 + 5, 4099):
            k = torch.arange(n, dtype=torch.int64).remainder_(256).to(torch.uint8)
            out = torch.empty(n, dtype=torch.float32).copy_(k).div_(LEVELS)
            ok = ok and torch.equal(out.view(torch.int32), table[k.long()].view(torch.int32))
        _LEVELS_OK = ok
    return _LEVELS_OK


def _levels_of(torch: Any, t: Any) -> Any:
    """The uint8 codes of a float32 tensor on 8-bit levels (on the CPU), or None if any element is not one.

    Every element is converted back exactly as the decoder will and compared as bits, so -0.0, NaN, values
    outside [0, 1] and anything between levels all refuse the form; a non-image fails in the first block."""
    if not _levels_exact(torch):
        return None
    flat = t.detach().resolve_conj().resolve_neg().reshape(-1)
    if flat.device.type != "cpu":
        flat = flat.cpu()  # checked with the very division the decoder runs (CPU), not the device's
    codes = torch.empty(flat.numel(), dtype=torch.uint8)
    back = torch.empty(min(flat.numel(), _LEVELS_BLOCK), dtype=torch.float32)
    start, block = 0, 1 << 16
    while start < flat.numel():
        x = flat[start: start + block]
        k = codes[start: start + x.numel()]
        k.copy_((x * LEVELS).round_())  # out-of-range values wrap; the comparison below catches them
        b = back[: x.numel()].copy_(k).div_(LEVELS)  # exactly the decoder's two steps
        if not torch.equal(b.view(torch.int32), x.view(torch.int32)):
            return None
        start += x.numel()
        block = _LEVELS_BLOCK
    return codes


def _shuffle_into(dst: Any, src: Any, itemsize: int) -> None:
    """Byte planes: plane i of dst (uint8) <- byte i of every item of src (uint8).

    One strided copy per plane: about 8x faster than copying the transposed n x itemsize matrix in one go,
    which torch does element by element.
    """
    planes, items = dst.view(itemsize, -1), src.view(-1, itemsize)
    for i in range(itemsize):
        planes[i].copy_(items[:, i])


def _unshuffle_into(dst: Any, src: Any, itemsize: int) -> None:
    planes, items = src.view(itemsize, -1), dst.view(-1, itemsize)
    for i in range(itemsize):
        items[:, i].copy_(planes[i])


def _write(out: bytearray, at: int, s: _Section) -> None:
    """Copy one leaf's bytes straight into the output buffer: one pass, no intermediate objects."""
    if s.nbytes == 0:
        return
    if s.kind == "bytes":
        out[at: at + s.nbytes] = s.source
    elif s.kind == "ndarray":
        np = sys.modules["numpy"]
        a = s.source
        np.copyto(np.frombuffer(out, dtype=a.dtype, count=a.size, offset=at).reshape(a.shape), a, casting="no")
    else:
        torch = sys.modules["torch"]
        t = s.source.detach().resolve_conj().resolve_neg()  # no-ops unless the lazy bits are set
        dst = torch.frombuffer(out, dtype=torch.uint8, count=s.nbytes, offset=at)
        if s.levels:  # the uint8 codes, already made (and checked) on the CPU by the planner
            dst.copy_(s.source)
        elif s.shuffle:  # the transpose runs where the tensor lives; copy_ then moves it (GPU -> CPU included)
            _shuffle_into(dst, t.contiguous().reshape(-1).view(torch.uint8), t.element_size())
        else:  # copy_ handles strides and devices, so a non-contiguous or CUDA tensor is still one pass
            dst.view(t.dtype).view(t.shape).copy_(t)


def encode(value: object, *, shuffle: bool = False, levels: bool = False) -> bytearray:
    """Encode a value tree. Raises NotCacheable (before copying anything) if a leaf cannot be represented.

    `shuffle`: byte planes for float tensors (pays only when the blob is then compressed); `levels`: the uint8
    form for float32 tensors on 8-bit levels (pays everywhere; costs a few passes over such tensors here)."""
    plan = _Planner(shuffle, None, levels).plan(value)
    out = bytearray(plan.size)
    _HEADER.pack_into(out, 0, MAGIC, len(plan.manifest))
    out[_HEADER.size: _HEADER.size + len(plan.manifest)] = plan.manifest
    for s in plan.sections:
        _write(out, plan.data_start + s.off, s)
    return out


def check(value: object, max_bytes: int | None = None) -> int:
    """The exact encoded size of value without "levels" (an upper bound with it), found without reading any
    array data (cheap enough for an event loop).

    Raises NotCacheable if a leaf cannot be represented, or as soon as the size is known to exceed max_bytes.
    """
    return _Planner(False, max_bytes).plan(value).size


# ---------------------------------------------------------------------------------------------------- decode


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


Buffer = bytes | bytearray | memoryview | mmap.mmap
Pieces = Sequence[Buffer]


class _Bytes:
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


def _open(buf: Buffer | Pieces) -> tuple[_Bytes, Any, int]:
    """Check the header and parse the manifest: (the bytes, manifest, start of the data region)."""
    data = _Bytes(buf)
    if data.size < _HEADER.size:
        raise BlobFormatError(f"blob of {data.size} bytes is shorter than its {_HEADER.size}-byte header")
    magic, length = _HEADER.unpack(data.read(0, _HEADER.size))
    if magic != MAGIC:
        raise BlobFormatError(f"bad magic {bytes(magic)!r}, expected {MAGIC!r}")
    if length > MAX_MANIFEST:
        raise BlobFormatError(f"manifest length {length} exceeds the limit of {MAX_MANIFEST}")
    if _HEADER.size + length > data.size:
        raise BlobFormatError(f"truncated: manifest of {length} bytes but the blob has {data.size} bytes")
    try:
        text = str(data.read(_HEADER.size, length), "utf-8")
        manifest = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise BlobFormatError(f"manifest is not valid JSON: {type(e).__name__}: {_short(str(e), 120)}") from None
    data_start = _align(_HEADER.size + length)
    if data_start > data.size:
        raise BlobFormatError(f"truncated: the data region starts at {data_start} but the blob has {data.size} bytes")
    return data, manifest, data_start


class _Reader:
    """Validates the manifest node by node while building the value; every check names the path."""

    def __init__(self, data_len: int, leaf: Callable[[_Section, _Path], object]) -> None:
        self.data_len = data_len
        self.end = 0  # end of the last section, relative to the data region
        self.leaf = leaf

    def read(self, manifest: Any) -> object:
        value = self.node(manifest, None, 0)
        if self.end != self.data_len:
            raise BlobFormatError(f"{self.data_len - self.end} bytes after the last data section")
        return value

    def node(self, n: Any, path: _Path, depth: int) -> object:
        if type(n) is not dict:
            raise _bad(path, f"node is {type(n).__name__}, not an object")
        t = n.get("t")
        keys = _NODE_KEYS.get(t) if type(t) is str else None
        if keys is None:
            raise _bad(path, f"unknown node type {_short(t)}")
        required, optional = keys
        if not required <= n.keys() or not n.keys() <= required | optional:
            raise _bad(path, f"{t} node has keys {sorted(n)}, expected {sorted(required)} (+ {sorted(optional)})")
        if t == "none":
            return None
        if t in ("bool", "int", "float", "str"):
            return _scalar(t, n["v"], path)
        if t in ("list", "tuple", "dict"):
            if depth >= MAX_DEPTH:
                raise _bad(path, f"nested deeper than {MAX_DEPTH}")
            items = n["items"]
            if type(items) is not list:
                raise _bad(path, f"{t} items is not a list")
            if t != "dict":
                values = [self.node(x, (path, i), depth + 1) for i, x in enumerate(items)]
                return values if t == "list" else tuple(values)
            dict_keys = n["keys"]
            if type(dict_keys) is not list or any(type(k) is not str for k in dict_keys):
                raise _bad(path, "dict keys is not a list of strings")
            if len(dict_keys) != len(items) or len(set(dict_keys)) != len(dict_keys):
                raise _bad(path, f"dict has {len(dict_keys)} keys ({len(set(dict_keys))} distinct), {len(items)} items")
            return {k: self.node(x, (path, k), depth + 1) for k, x in zip(dict_keys, items)}
        return self.leaf(self.section(t, n, path), path)

    def section(self, kind: str, n: dict[str, Any], path: _Path) -> _Section:
        off, nbytes = n["off"], n["len"]
        if type(off) is not int or type(nbytes) is not int or nbytes < 0:
            raise _bad(path, f"bad off/len {_short(off)}/{_short(nbytes)}")
        if off != _align(self.end):
            raise _bad(path, f"section at {off}, expected {_align(self.end)} (sections follow each other, "
                             f"{ALIGN}-byte aligned)")
        if off + nbytes > self.data_len:
            raise _bad(path, f"truncated: section {off}..{off + nbytes} beyond the {self.data_len}-byte data region")
        self.end = off + nbytes
        s = _Section(kind, off, nbytes)
        if kind == "bytes":
            return s
        s.dtype, s.shape = n["dtype"], n["shape"]
        if type(s.dtype) is not str or s.dtype not in (TENSOR_DTYPES if kind == "tensor" else _NUMPY_CODES):
            raise _bad(path, f"unsupported {kind} dtype {_short(s.dtype)}")
        if type(s.shape) is not list or any(type(d) is not int or d < 0 for d in s.shape):
            raise _bad(path, f"shape {_short(s.shape)} is not a list of non-negative ints")
        s.shape = tuple(s.shape)
        count = _shape_elements(s.shape)
        if count is None:
            raise _bad(path, f"shape {_short(list(s.shape))} is too large")
        flag = "shuffle" if kind == "tensor" else "bigendian"
        if type(n.get(flag, False)) is not bool:
            raise _bad(path, f"{flag} is not a bool")
        s.shuffle, s.bigendian = bool(n.get("shuffle")), bool(n.get("bigendian"))
        if "levels" in n:
            if n["levels"] != LEVELS or type(n["levels"]) is not int or s.dtype != "float32" or s.shuffle:
                raise _bad(path, f"levels {_short(n['levels'])} on a {s.dtype} tensor (only 255, float32, unshuffled)")
            if count != nbytes:
                raise _bad(path, f"len {nbytes} does not match shape {list(s.shape)} at one byte per level")
            s.levels = True
        elif count * TENSOR_DTYPES[s.dtype] != nbytes:
            raise _bad(path, f"len {nbytes} does not match shape {list(s.shape)} of {s.dtype}")
        return s


def _bad(path: _Path, message: str) -> BlobFormatError:
    return BlobFormatError(f"{message} at {_where(path)}")


def _scalar(t: str, v: Any, path: _Path) -> object:
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
    raise _bad(path, f"bad {t} value {_short(v)}")


class _Materializer:
    """Turns sections into tensors, arrays and bytes.

    From one writable buffer, plain tensors and arrays are views of it (zero-copy). From pieces or read-only
    bytes, each leaf is written once into fresh memory of its own, straight from the pieces: the pieces are
    never joined first, so a value costs one pass over its bytes, not two."""

    def __init__(self, data: _Bytes, data_start: int) -> None:
        self.data = data
        self.whole = data.whole
        self.data_start = data_start

    def __call__(self, s: _Section, path: _Path) -> object:
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

    def tensor(self, s: _Section, at: int, path: _Path) -> object:
        import torch

        dtype = getattr(torch, s.dtype, None)  # s.dtype is from the allowlist, so this only looks up a dtype
        if not isinstance(dtype, torch.dtype):
            raise _bad(path, f"dtype {s.dtype} is not supported by torch {torch.__version__}")
        if s.nbytes == 0:
            return torch.empty(s.shape, dtype=dtype)
        if s.levels:
            return self.levels(torch, s, at)
        if self.whole is not None:
            raw = torch.frombuffer(self.whole, dtype=torch.uint8, count=s.nbytes, offset=at)
        else:
            raw = torch.frombuffer(self._fresh_copy(at, s.nbytes), dtype=torch.uint8)
        if dtype is torch.bool and bool(raw.max() > 1):
            raise _bad(path, "bool tensor holds bytes other than 0 and 1")
        if s.shuffle:
            out = torch.frombuffer(fresh(s.nbytes), dtype=torch.uint8)
            _unshuffle_into(out, raw, TENSOR_DTYPES[s.dtype])
            return out.view(dtype).view(s.shape)
        return raw.view(dtype).view(s.shape)

    def levels(self, torch: Any, s: _Section, at: int) -> object:
        """uint8 codes -> float32, written once into fresh memory, piece by piece."""
        out = torch.frombuffer(fresh(4 * s.nbytes), dtype=torch.float32)
        exact = _levels_exact(torch)
        table = None if exact else torch.frombuffer(bytearray(_level_table()), dtype=torch.float32)
        for off, piece in self.data.ranges(at, s.nbytes):
            codes = _u8(torch, piece)
            if exact:  # widen here, divide once below: faster than a dividing copy (torch.div with out=)
                out[off: off + len(piece)].copy_(codes)
            else:
                torch.index_select(table, 0, codes.long(), out=out[off: off + len(piece)])
        if exact:
            out.div_(LEVELS)
        return out.view(s.shape)

    def ndarray(self, s: _Section, at: int, path: _Path) -> object:
        import numpy as np

        dtype = np.dtype((">" if s.bigendian else "<") + _NUMPY_CODES[s.dtype])
        if s.nbytes == 0:
            return np.empty(s.shape, dtype=dtype)
        source = self.whole if self.whole is not None else self._fresh_copy(at, s.nbytes)
        offset = at if self.whole is not None else 0
        a = np.frombuffer(source, dtype=dtype, count=s.nbytes // dtype.itemsize, offset=offset)
        if s.dtype == "bool" and a.view(np.uint8).max() > 1:
            raise _bad(path, "bool array holds bytes other than 0 and 1")
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
    data, manifest, data_start = _open(buf)
    return _Reader(data.size - data_start, _Materializer(data, data_start)).read(manifest)


# ---------------------------------------------------------------------------------------------------- describe


def describe(buf: Buffer | Pieces) -> list[dict[str, Any]]:
    """One row per leaf (and per empty container), read from the manifest alone: works without torch or numpy."""
    data, manifest, data_start = _open(buf)
    tree = _Reader(data.size - data_start, lambda s, path: s).read(manifest)
    rows: list[dict[str, Any]] = []
    _rows(tree, None, rows)
    return rows


def _rows(v: object, path: _Path, rows: list[dict[str, Any]]) -> None:
    if isinstance(v, (list, tuple, dict)) and v:
        pairs = v.items() if isinstance(v, dict) else enumerate(v)
        for k, x in pairs:
            _rows(x, (path, k), rows)
        return
    row: dict[str, Any] = {"path": _format_path(path)}
    if isinstance(v, _Section):
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


def format_description(rows: list[dict[str, Any]]) -> str:
    """Rows from describe() as aligned text, one line per leaf."""
    paths = [r["path"] or "(value)" for r in rows]
    width = max(map(len, paths), default=0)
    lines = []
    for path, r in zip(paths, rows):
        if "dtype" in r:
            detail = f"{r['dtype']}{r['shape']}  {format_size(r['bytes'])}"
            detail += "  shuffled" if r.get("shuffle") else ""
            detail += "  as 8-bit levels" if r.get("levels") else ""
            detail += "  big-endian" if r.get("byteorder") == "big" else ""
        elif r["type"] == "bytes":
            detail = format_size(r["bytes"])
        elif "len" in r:
            detail = "empty"
        else:
            detail = _short_value(r["value"])
        lines.append(f"{path:<{width}}  {r['type']:<7}  {detail}")
    return "\n".join(lines)


def _short_value(v: object) -> str:
    if type(v) is int and v.bit_length() > 128:  # str() of a huge int is slow, and capped by Python anyway
        return f"<{v.bit_length()}-bit int>"
    return _short(v, 80)


# ---------------------------------------------------------------------------------------------------- shuffle


def _planes(buf: bytes | bytearray | memoryview, itemsize: int, move: Callable[[Any, Any, int], None]) -> bytes:
    import torch

    mv = memoryview(buf)
    if mv.readonly or not mv.c_contiguous:  # torch.frombuffer wants writable, contiguous memory
        mv = memoryview(bytearray(mv))
    mv = mv.cast("B")
    if itemsize < 1 or len(mv) % itemsize:
        raise ValueError(f"buffer of {len(mv)} bytes is not a whole number of {itemsize}-byte items")
    out = bytearray(len(mv))
    if out:
        move(torch.frombuffer(out, dtype=torch.uint8), torch.frombuffer(mv, dtype=torch.uint8), itemsize)
    return bytes(out)


def byte_shuffle(buf: bytes | bytearray | memoryview, itemsize: int) -> bytes:
    """Items of itemsize bytes -> byte planes (every item's byte 0, then every byte 1, ...), as encode stores them."""
    return _planes(buf, itemsize, _shuffle_into)


def byte_unshuffle(buf: bytes | bytearray | memoryview, itemsize: int) -> bytes:
    """The inverse of byte_shuffle."""
    return _planes(buf, itemsize, _unshuffle_into)

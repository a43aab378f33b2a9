"""Encoding: a value tree -> one blob. Plans everything (and refuses what it cannot represent) before copying."""

from __future__ import annotations

import json
import sys
from typing import Any

from mesh.codec.layout import (
    HEADER, LEVELS, MAGIC, MAX_DEPTH, MAX_MANIFEST, TENSOR_DTYPES, NotCacheable, Plan, KeyPath, Section, align,
    NUMPY_NAMES, shape_elements, short, location,
)
from mesh.codec.levels import levels_of
from mesh.codec.shuffle import shuffle_into

SHUFFLE_MIN_ELEMENTS = 4096    # below this the planes are too short for shuffling to pay
LEVELS_MIN_ELEMENTS = 1 << 16  # below this (256 KiB of float32) the uint8 form saves too little to pay for the check


class _Planner:
    """Walks a value once: validates every leaf, builds the manifest, assigns data offsets. Copies nothing."""

    def __init__(self, shuffle: bool, max_bytes: int | None, levels: bool = False) -> None:
        self.shuffle = shuffle
        self.levels = levels
        self.max_bytes = max_bytes
        self.sections: list[Section] = []
        self.end = 0  # end of the data region so far

    def plan(self, value: object) -> Plan:
        root = self.node(value, None, 0)
        manifest = json.dumps(root, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode("ascii")
        if len(manifest) > MAX_MANIFEST:
            raise NotCacheable(f"not cacheable: manifest of {len(manifest)} bytes exceeds {MAX_MANIFEST}")
        data_start = align(HEADER.size + len(manifest))
        plan = Plan(manifest, self.sections, data_start, data_start + self.end)
        self._check_size(plan.size)
        return plan

    def _check_size(self, size: int) -> None:
        if self.max_bytes is not None and size > self.max_bytes:
            raise NotCacheable(f"not cacheable: encoded size {size} bytes exceeds max_bytes {self.max_bytes}")

    def section(self, kind: str, nbytes: int, **fields: Any) -> Section:
        s = Section(kind, align(self.end), nbytes, **fields)
        self.end = s.off + nbytes
        self._check_size(self.end)  # data alone already too big: stop before walking the rest
        self.sections.append(s)
        return s

    def node(self, v: Any, path: KeyPath, depth: int) -> dict[str, Any]:
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
                raise NotCacheable(f"not cacheable: nested deeper than {MAX_DEPTH} (a cycle?) at {location(path)}")
            if tp is dict:
                keys = list(v)
                for k in keys:
                    if type(k) is not str:
                        raise NotCacheable(f"not cacheable: dict key {short(k)} of type {type(k).__qualname__} "
                                           f"(only str keys) at {location(path)}")
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
        raise NotCacheable(f"not cacheable: {tp.__qualname__} at {location(path)}")

    def tensor(self, torch: Any, t: Any, path: KeyPath) -> dict[str, Any]:
        where = location(path)
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
        count = shape_elements(shape)
        if count is None:
            raise NotCacheable(f"not cacheable: tensor of shape {list(shape)} at {where}")
        itemsize = TENSOR_DTYPES[dtype]
        if self.levels and dtype == "float32" and count >= LEVELS_MIN_ELEMENTS:
            codes = levels_of(torch, t)  # reads the data: only encode() asks, check() stays a plan
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

    def ndarray(self, np: Any, a: Any, path: KeyPath) -> dict[str, Any]:
        where = location(path)
        if type(a) is not np.ndarray:
            raise NotCacheable(f"not cacheable: {type(a).__qualname__} (an ndarray subclass) at {where}")
        dtype = NUMPY_NAMES.get(f"{a.dtype.kind}{a.dtype.itemsize}")
        if dtype is None or a.dtype.fields is not None:
            raise NotCacheable(f"not cacheable: ndarray of dtype {a.dtype} at {where}")
        shape = tuple(a.shape)
        count = shape_elements(shape)
        if count is None:
            raise NotCacheable(f"not cacheable: ndarray of shape {list(shape)} at {where}")
        bigendian = a.dtype.byteorder == ">"
        s = self.section("ndarray", a.nbytes, dtype=dtype, shape=shape, bigendian=bigendian, source=a)
        node = {"t": "ndarray", "dtype": dtype, "shape": list(shape), "off": s.off, "len": s.nbytes}
        if bigendian:
            node["bigendian"] = True
        return node


def _write(out: bytearray, at: int, s: Section) -> None:
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
            shuffle_into(dst, t.contiguous().reshape(-1).view(torch.uint8), t.element_size())
        else:  # copy_ handles strides and devices, so a non-contiguous or CUDA tensor is still one pass
            dst.view(t.dtype).view(t.shape).copy_(t)


def encode(value: object, *, shuffle: bool = False, levels: bool = False) -> bytearray:
    """Encode a value tree. Raises NotCacheable (before copying anything) if a leaf cannot be represented.

    `shuffle`: byte planes for float tensors (pays only when the blob is then compressed); `levels`: the uint8
    form for float32 tensors on 8-bit levels (pays everywhere; costs a few passes over such tensors here)."""
    plan = _Planner(shuffle, None, levels).plan(value)
    out = bytearray(plan.size)
    HEADER.pack_into(out, 0, MAGIC, len(plan.manifest))
    out[HEADER.size: HEADER.size + len(plan.manifest)] = plan.manifest
    for s in plan.sections:
        _write(out, plan.data_start + s.off, s)
    return out


def check(value: object, max_bytes: int | None = None) -> int:
    """The exact encoded size of value without "levels" (an upper bound with it), found without reading any
    array data (cheap enough for an event loop).

    Raises NotCacheable if a leaf cannot be represented, or as soon as the size is known to exceed max_bytes.
    """
    return _Planner(False, max_bytes).plan(value).size


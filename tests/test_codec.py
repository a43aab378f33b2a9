"""The tensor-tree codec: exact round trips, refusals with a path, and corrupt input that only ever fails cleanly."""

from __future__ import annotations

import json
import math
import os
import struct
import subprocess
import sys
import warnings
from collections import OrderedDict, namedtuple
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from mesh import codec
from mesh.cli import format_description
from mesh.codec import BlobFormatError, NotCacheable

ROOT = Path(__file__).resolve().parent.parent
TORCH_DTYPES = [getattr(torch, name) for name in codec.TENSOR_DTYPES if hasattr(torch, name)]
FLOAT_DTYPES = [d for d in TORCH_DTYPES if d.is_floating_point]
NUMPY_DTYPES = [np.dtype(c) for c in ("?", "u1", "i1", "<i2", ">i2", "<u2", "<i4", ">u4", "<i8", "<u8", "<f2",
                                     "<f4", ">f4", "<f8", ">f8", "<c8", ">c16")]
FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ------------------------------------------------------------------------------------------------ helpers


def raw(t: torch.Tensor) -> bytes:
    """The bytes of a tensor in C order, so NaN payloads and -0.0 count."""
    dense = torch.empty(t.shape, dtype=t.dtype).copy_(t.detach())  # canonical strides; resolves conj/neg views
    return bytes(dense.reshape(-1).view(torch.uint8).numpy()) if t.numel() else b""


def assert_same(a: Any, b: Any, path: str = "") -> None:
    """Exact structural equality: same container types, same dtypes and shapes, same bits."""
    assert type(a) is type(b) or (isinstance(a, torch.Tensor) and type(b) is torch.Tensor) \
        or (type(a) is bytearray and type(b) is bytes), f"{path}: {type(a)} != {type(b)}"
    if isinstance(a, torch.Tensor):
        assert (a.dtype, a.shape) == (b.dtype, b.shape), path
        assert b.device.type == "cpu" and not b.requires_grad, path
        assert raw(a) == raw(b), path
    elif isinstance(a, np.ndarray):
        assert (a.dtype, a.shape) == (b.dtype, b.shape), path
        assert a.tobytes() == b.tobytes(), path
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    elif isinstance(a, dict):
        assert list(a) == list(b), path
        for k in a:
            assert_same(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, float):
        assert (math.isnan(a) and math.isnan(b)) or struct.pack("<d", a) == struct.pack("<d", b), path
    else:
        assert a == b, path


def roundtrip(value: Any, *, shuffle: bool = False, levels: bool = False) -> Any:
    buf = codec.encode(value, shuffle=shuffle, levels=levels)
    if levels:
        assert len(buf) <= codec.check(value)  # check() is the size without the uint8 form: an upper bound
    else:
        assert codec.check(value) == len(buf)
    assert buf[:4] == codec.MAGIC
    out = codec.decode(buf)
    assert_same(value, out)
    assert_same(value, codec.decode(bytes(buf)))  # read-only input takes the copying path
    assert_same(value, codec.decode(pieces(bytes(buf))))  # chunks as they came off the wire, never joined
    return out


def pieces(buf: bytes, sizes: tuple[int, ...] = (1, 3, 61, 4099)) -> list[bytes]:
    """buf cut into read-only pieces of awkward sizes, so sections and the manifest straddle them."""
    out, at, i = [], 0, 0
    while at < len(buf):
        out.append(buf[at: at + sizes[i % len(sizes)]])
        at += len(out[-1])
        i += 1
    return out


def forge(manifest: Any, data: bytes = b"", *, length: int | None = None) -> bytes:
    """A blob with a hand-written manifest, laid out the way the format says."""
    text = json.dumps(manifest).encode()
    head = struct.pack("<4sI", codec.MAGIC, len(text) if length is None else length) + text
    return head + bytes(-len(head) % codec.ALIGN) + data


def tensor_node(dtype: str = "float32", shape: list[int] | None = None, **extra: Any) -> dict[str, Any]:
    shape = [2, 3] if shape is None else shape
    node = {"t": "tensor", "dtype": dtype, "shape": shape, "off": 0,
            "len": math.prod(shape) * codec.TENSOR_DTYPES.get(dtype, 4)}
    node.update(extra)
    return node


# ------------------------------------------------------------------------------------------------ strategies


@st.composite
def tensors(draw: st.DrawFn) -> torch.Tensor:
    dtype = draw(st.sampled_from(TORCH_DTYPES))
    shape = draw(st.lists(st.integers(0, 4), max_size=3))
    layout = draw(st.sampled_from(["plain", "transposed", "stepped", "grad"]))
    stored = [2 * shape[0], *shape[1:]] if layout == "stepped" and shape else shape
    count, size = math.prod(stored), torch.empty(0, dtype=dtype).element_size()
    if dtype is torch.bool:
        data = bytes(draw(st.lists(st.booleans(), min_size=count, max_size=count)))
    else:  # arbitrary bits: NaNs with payloads, signalling NaNs, -0.0, subnormals
        data = draw(st.binary(min_size=count * size, max_size=count * size))
    t = (torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8))
    t = t.view(dtype).reshape(stored)
    if layout == "stepped" and shape:
        t = t[::2]
    elif layout == "transposed" and t.dim() >= 2:
        t = t.transpose(0, -1)
    elif layout == "grad" and dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        t = t.clone().requires_grad_(True)
    return t


@st.composite
def ndarrays(draw: st.DrawFn) -> np.ndarray:
    dtype = draw(st.sampled_from(NUMPY_DTYPES))
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4))
    a = draw(hnp.arrays(dtype, shape))
    return a.T if draw(st.booleans()) else a


scalars = (st.none() | st.booleans() | st.integers() | st.integers(min_value=-2**300, max_value=2**300)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=8) | st.binary(max_size=8))
leaves = scalars | tensors() | ndarrays()
trees = st.recursive(
    leaves,
    lambda inner: (st.lists(inner, max_size=4) | st.lists(inner, max_size=4).map(tuple)
                   | st.dictionaries(st.text(max_size=5), inner, max_size=4)),
    max_leaves=12,
)


# ------------------------------------------------------------------------------------------------ round trips


@FAST
@given(trees, st.booleans(), st.booleans())
def test_roundtrip_random_trees(value: Any, shuffle: bool, levels: bool) -> None:
    roundtrip(value, shuffle=shuffle, levels=levels)


# ------------------------------------------------------------------------------------------------ 8-bit levels


def image_levels(shape: tuple[int, ...] = (1, 256, 256, 3), seed: int = 0) -> torch.Tensor:
    """A decoded 8-bit image exactly as ComfyUI's LoadImage makes it: numpy float32 division by 255.0."""
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.integers(0, 256, size=shape, dtype=np.uint8).astype(np.float32) / 255.0)


def test_levels_image_is_4x_smaller_and_bit_exact() -> None:
    for img in (image_levels(), torch.randint(0, 256, (2, 128, 96, 3)).float() / 255,
                torch.arange(256).float().div(255).repeat(300)):
        buf = codec.encode([img], levels=True)
        assert codec.describe(buf)[0]["levels"] == 255
        assert len(buf) < img.numel() + 200
        roundtrip([img], levels=True)
        roundtrip([img], levels=True, shuffle=True)  # levels wins over shuffle for such a tensor


@pytest.mark.parametrize("poison", ["ulp", "-0.0", "nan", "above", "256/255", "float64-then-down"])
def test_levels_refused_for_anything_not_exactly_a_level(poison: str) -> None:
    img = image_levels((1, 160, 160, 3), seed=1)
    flat = img.view(-1)
    at = flat.numel() - 7  # late in the tensor: past the first block check
    if poison == "ulp":
        flat[at] = float(np.nextafter(np.float32(flat[at]), np.float32(2)))
    elif poison == "-0.0":
        flat[at] = -0.0
    elif poison == "nan":
        flat[at] = float("nan")
    elif poison == "above":
        flat[at] = 1.5
    elif poison == "256/255":
        flat[at] = 256 / 255
    else:  # a value that rounds to a level code but is not that level's float32
        flat[at] = float(np.float32(100 / 255)) + 2e-8
    buf = codec.encode([img], levels=True)
    assert "levels" not in codec.describe(buf)[0]
    roundtrip([img], levels=True)


def test_levels_only_for_large_float32() -> None:
    for t in (image_levels((1, 8, 8, 3)), image_levels().double(), image_levels().half()):
        assert "levels" not in codec.describe(codec.encode([t], levels=True))[0]


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(codec.LEVELS_MIN_ELEMENTS, 140_000), st.none() | st.floats(width=32),
       st.integers(0, 139_999))
def test_levels_roundtrip_property(seed: int, n: int, stray: float | None, where: int) -> None:
    codes = np.random.default_rng(seed).integers(0, 256, size=n, dtype=np.uint8)
    t = torch.from_numpy(codes).float() / 255
    if stray is not None:
        t[where % n] = stray
    roundtrip({"image": t}, levels=True)


@pytest.mark.parametrize("extra, message", [
    ({"levels": 254}, "levels 254"),
    ({"levels": True}, "levels True"),
    ({"levels": 255, "shuffle": True}, "unshuffled"),
])
def test_levels_manifest_refusals(extra: dict[str, Any], message: str) -> None:
    node = {"t": "tensor", "dtype": "float32", "shape": [4], "off": 0, "len": 4, **extra}
    with pytest.raises(BlobFormatError, match=message):
        codec.decode(forge(node, bytes(4)))
    node = {"t": "tensor", "dtype": "float16", "shape": [4], "off": 0, "len": 4, "levels": 255}
    with pytest.raises(BlobFormatError, match="float16"):
        codec.decode(forge(node, bytes(4)))
    node = {"t": "tensor", "dtype": "float32", "shape": [4], "off": 0, "len": 16, "levels": 255}
    with pytest.raises(BlobFormatError, match="one byte per level"):
        codec.decode(forge(node, bytes(16)))


def test_stream_decoder_restarts_and_refuses_too_much_or_too_little() -> None:
    value = {"img": image_levels(), "latent": torch.randn(1, 4, 16, 16), "b": b"xyz"}
    buf = bytes(codec.encode(value, levels=True))
    stream = codec.StreamDecoder()
    stream.start(len(buf))
    for piece in pieces(buf)[:5]:  # a transfer that broke off early...
        stream.feed(piece)
    stream.start(len(buf))  # ...and the next owner's, from the start
    for piece in pieces(buf, (4096, 1 << 20)):
        stream.feed(piece)
    assert_same(value, stream.finish())
    with pytest.raises(BlobFormatError, match="already called"):
        stream.finish()  # the value's tensors are the decoder's memory: handed out once
    with pytest.raises(BlobFormatError, match="finished"):
        stream.feed(b"x")
    stream.start(len(buf))
    with pytest.raises(BlobFormatError, match="more than"):
        stream.feed(buf + b"x")
    stream.start(len(buf))
    stream.feed(buf[:-1])
    with pytest.raises(BlobFormatError, match="truncated"):
        stream.finish()
    stream.start(len(buf) + 64)  # announced larger than the blob's own layout: refused at the manifest
    with pytest.raises(BlobFormatError, match="after the last"):
        stream.feed(buf + bytes(64))


def test_stream_decoder_refuses_a_bad_manifest_at_the_first_chunk() -> None:
    stream = codec.StreamDecoder()
    stream.start(104)
    with pytest.raises(BlobFormatError, match="bad magic"):
        stream.feed(b"PKL1" + bytes(100))
    with pytest.raises(BlobFormatError, match="did not decode: bad magic"):
        stream.finish()  # all bytes arrived, but the stream failed: never a value, always BlobFormatError
    stream.start(1 << 20)
    with pytest.raises(BlobFormatError, match="exceeds the limit"):
        stream.feed(struct.pack("<4sI", codec.MAGIC, codec.MAX_MANIFEST + 1))  # refused before its bytes come


def test_a_list_of_one_writable_piece_is_pieces_too() -> None:
    value = [torch.arange(10.0)]
    for parts in ([bytearray(codec.encode(value))], [b"", bytearray(codec.encode(value))]):
        out = codec.decode(parts)
        parts[-1][-1] ^= 0xFF
        assert_same(value, out)  # decoding pieces never aliases them


def test_decode_from_pieces_writes_fresh_memory() -> None:
    value = {"img": image_levels(), "latent": torch.randn(1, 4, 16, 16), "arr": np.arange(10), "b": b"xyz"}
    parts = [bytearray(p) for p in pieces(bytes(codec.encode(value, levels=True)))]
    before = [bytes(p) for p in parts]
    out = codec.decode(parts)
    assert_same(value, out)
    out["latent"].fill_(7)
    out["img"].fill_(7)
    assert [bytes(p) for p in parts] == before  # nothing handed out aliases the pieces


@settings(max_examples=80, deadline=None)
@given(tensors())
def test_roundtrip_every_dtype(t: torch.Tensor) -> None:
    out = roundtrip([t])[0]
    assert out.is_contiguous()


@pytest.mark.parametrize("dtype", TORCH_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(), (0,), (3, 0, 2), (1,), (2, 3, 5)], ids=str)
def test_every_dtype_and_edge_shapes(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    t = torch.arange(math.prod(shape)).reshape(shape).to(dtype)
    out = roundtrip({"t": t})["t"]
    assert out.shape == torch.Size(shape)


def test_comfyui_values() -> None:
    image = torch.rand(2, 64, 48, 3)
    mask = torch.rand(2, 64, 48)
    latent = {"samples": torch.randn(2, 4, 8, 6), "batch_index": [0, 1], "noise_mask": None}
    conditioning = [[torch.randn(1, 77, 768), {"pooled_output": torch.randn(1, 1280), "strength": 0.75,
                                               "area": (64, 64, 0, 0), "set_area_to_bounds": False}]]
    outputs = [[image], [mask], [latent], [conditioning], [12345, 7.5, "euler", True]]
    ui = {"images": [{"filename": "x_00001_.png", "subfolder": "", "type": "output"}]}
    out = roundtrip([outputs, ui])
    assert type(out[0][2][0]["batch_index"]) is list
    assert type(out[0][3][0][0][1]["area"]) is tuple
    assert out[0][4][3] is True


def test_non_contiguous_tensors() -> None:
    base = torch.arange(4 * 6 * 5, dtype=torch.float32).reshape(4, 6, 5)
    views = [base.transpose(0, 2), base[::2, 1::3], base.permute(2, 0, 1),
             base[:, :, 2], torch.randn(3, 4, dtype=torch.complex64).conj(), -torch.randn(5, 5)[::2]]
    for v in views:
        assert_same(v, codec.decode(codec.encode(v)))


def test_expanded_tensor_is_materialized() -> None:
    t = torch.tensor([1.0, 2.0]).expand(3, 2)
    out = roundtrip(t)
    assert out.stride() == (2, 1)


def test_requires_grad_and_parameter() -> None:
    t = torch.randn(3, 4, requires_grad=True) * 2  # non-leaf with a grad_fn
    p = torch.nn.Parameter(torch.randn(2, 2))
    out = codec.decode(codec.encode([t, p]))
    assert type(out[1]) is torch.Tensor and not out[0].requires_grad
    assert raw(out[0]) == raw(t) and raw(out[1]) == raw(p)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_shuffle_roundtrip(dtype: torch.dtype) -> None:
    t = (torch.randn(3, 40, 50) * 100).to(dtype)
    strided = t.transpose(1, 2)[:, ::2]  # fewer than SHUFFLE_MIN_ELEMENTS: stored plain
    buf = codec.encode([t, t.transpose(0, 2), strided], shuffle=True)
    shuffled = [r.get("shuffle", False) for r in codec.describe(buf)]
    assert shuffled == [t.element_size() > 1] * 2 + [False]
    assert_same([t, t.transpose(0, 2), strided], codec.decode(buf))


def test_shuffle_helpers() -> None:
    data = bytes(range(12))
    assert codec.byte_shuffle(data, 4) == bytes([0, 4, 8, 1, 5, 9, 2, 6, 10, 3, 7, 11])
    assert codec.byte_unshuffle(codec.byte_shuffle(data, 4), 4) == data
    assert codec.byte_shuffle(memoryview(bytearray(data)), 3) == bytes([0, 3, 6, 9, 1, 4, 7, 10, 2, 5, 8, 11])
    assert codec.byte_shuffle(b"", 8) == b""
    with pytest.raises(ValueError):
        codec.byte_shuffle(b"abc", 2)
    t = torch.randn(4096)
    assert codec.encode(t, shuffle=True)[-4 * 4096:] == codec.byte_shuffle(raw(t), 4)


def test_python_scalars_exact() -> None:
    values = [float("nan"), float("inf"), float("-inf"), -0.0, 0.0, 5e-324, 1.7976931348623157e308, 0.1,
              2**64, -(2**64) - 1, 10**5000, -(3**7000), 0, True, False, None, "", "naïve ✓ \ud800", b"", b"\x00\xff"]
    out = roundtrip(values)
    assert math.copysign(1, out[3]) == -1
    assert out[13] is True and out[14] is False
    assert out[10] == 10**5000


def test_numpy_arrays() -> None:
    arrays = [np.arange(12, dtype=np.float32).reshape(3, 4), np.array(3.5), np.zeros((0, 2), dtype=np.int16),
              np.arange(6, dtype=">u4")[::2], np.array([True, False]), np.full((2, 2), np.nan, dtype=np.float16),
              np.arange(4, dtype=np.complex128).reshape(2, 2).T]
    out = roundtrip(arrays)
    assert out[3].dtype == np.dtype(">u4")
    assert all(a.flags.writeable for a in codec.decode(codec.encode(arrays)))


def test_dict_order_and_tuple_kept() -> None:
    value = {"z": 1, "a": (2, [3]), "m": {}}
    out = roundtrip(value)
    assert list(out) == ["z", "a", "m"] and type(out["a"]) is tuple


def test_decode_is_zero_copy_for_writable_buffers() -> None:
    t = torch.randn(4, 8, 8, 3)
    buf = codec.encode({"x": t})
    out = codec.decode(buf)["x"]
    out[0, 0, 0, 0] = 42.0
    assert codec.decode(buf)["x"][0, 0, 0, 0] == 42.0  # the tensor is a view of buf
    frozen = bytes(buf)
    copied = codec.decode(frozen)["x"]
    copied[0, 0, 0, 0] = 7.0  # safe: read-only input was copied first
    assert codec.decode(frozen)["x"][0, 0, 0, 0] == 42.0


def test_sections_are_aligned() -> None:
    value = [b"x", torch.ones(3, dtype=torch.float64), np.ones(5, dtype=np.int8), torch.ones(2, dtype=torch.int64)]
    buf = codec.encode(value)
    out = codec.decode(buf)
    header = struct.unpack_from("<I", buf, 4)[0]
    start = -(-(8 + header) // codec.ALIGN) * codec.ALIGN
    addr = np.frombuffer(buf, dtype=np.uint8).ctypes.data
    for t in (out[1], out[3]):
        assert (t.data_ptr() - addr - start) % codec.ALIGN == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_tensors_come_back_on_cpu() -> None:
    t = torch.randn(2, 64, 64, 3, device="cuda")
    for shuffle in (False, True):
        out = codec.decode(codec.encode([t, t.transpose(1, 2)], shuffle=shuffle))
        assert out[0].device.type == "cpu" and torch.equal(out[0], t.cpu()) and torch.equal(out[1], t.transpose(1, 2).cpu())


# ------------------------------------------------------------------------------------------------ not cacheable


class Patcher:
    pass


def quantized() -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # deprecated in torch, but ComfyUI values may still hold one
        return torch.quantize_per_tensor(torch.rand(3), 0.1, 0, torch.quint8)


Point = namedtuple("Point", "x y")


class MyDict(dict):
    pass


@pytest.mark.parametrize("value, where, what", [
    (object(), "top level", "object"),
    ([[lambda: 1]], "[0][0]", "function"),
    ([[Patcher()]], "[0][0]", "Patcher"),
    ({"a": {1: "x"}}, "['a']", "dict key 1"),
    ([Point(1, 2)], "[0]", "Point"),
    ([MyDict()], "[0]", "MyDict"),
    ([OrderedDict()], "[0]", "OrderedDict"),
    ([{1, 2}], "[0]", "set"),
    ([1j], "[0]", "complex"),
    ([np.float64(1.0)], "[0]", "float64"),
    ([[torch.randn(3, 3).to_sparse()]], "[0][0]", "sparse"),
    ([torch.empty(2, device="meta")], "[0]", "meta"),
    ([quantized()], "[0]", "quantized"),
    ([np.array([object()])], "[0]", "object"),
    ([np.array(["a"])], "[0]", "<U1"),
    ([np.ma.masked_array([1, 2])], "[0]", "MaskedArray"),
], ids=lambda v: None)
def test_not_cacheable_names_type_and_path(value: Any, where: str, what: str) -> None:
    for fn in (codec.encode, codec.check):
        with pytest.raises(NotCacheable) as e:
            fn(value)
        assert isinstance(e.value, TypeError)
        message = str(e.value)
        assert message.startswith("not cacheable:") and what in message and message.endswith(f"at {where}")


def test_cycles_and_deep_nesting_are_refused() -> None:
    cyclic: list[Any] = []
    cyclic.append(cyclic)
    with pytest.raises(NotCacheable, match="nested deeper"):
        codec.encode(cyclic)
    deep: Any = 1
    for _ in range(codec.MAX_DEPTH):
        deep = [deep]
    roundtrip(deep)
    with pytest.raises(NotCacheable, match="nested deeper"):
        codec.check([deep])


def test_check_is_exact_and_enforces_max_bytes() -> None:
    value = [[torch.zeros(4, 64, 64, 3)], {"s": "x" * 100, "b": b"12345"}]
    size = codec.check(value)
    assert size == len(codec.encode(value))
    assert codec.check(value, max_bytes=size) == size
    with pytest.raises(NotCacheable, match=f"exceeds max_bytes {size - 1}"):
        codec.check(value, max_bytes=size - 1)


def test_check_never_touches_data() -> None:
    huge = torch.zeros(1).expand(2**40)  # 4 TiB if it were ever materialized
    assert codec.check([huge]) > 4 * 2**40
    with pytest.raises(NotCacheable, match="max_bytes"):
        codec.check([huge, object()], max_bytes=2**31)  # stops at the size, before the unsupported leaf


# ------------------------------------------------------------------------------------------------ corrupt input


def sample_blob() -> bytearray:
    return codec.encode([{"samples": torch.arange(6, dtype=torch.float32).reshape(2, 3)}, 7, "s", b"xy",
                        np.arange(3, dtype=np.int16), (True, None, 1.5)])


def test_bad_magic() -> None:
    buf = sample_blob()
    buf[:4] = b"PK\x03\x04"
    with pytest.raises(BlobFormatError, match="bad magic"):
        codec.decode(buf)


def test_every_truncation_fails_cleanly() -> None:
    buf = bytes(sample_blob())
    for n in range(len(buf)):
        for fn in (codec.decode, codec.describe):
            with pytest.raises(BlobFormatError):
                fn(buf[:n])


def test_trailing_bytes_refused() -> None:
    with pytest.raises(BlobFormatError, match="after the last"):
        codec.decode(bytes(sample_blob()) + b"\x00")


@pytest.mark.parametrize("manifest, data, message", [
    (tensor_node(len=20), bytes(24), "does not match shape"),
    (tensor_node(shape=[2, 4]), bytes(24), "truncated"),
    (tensor_node(shape=[2, -3], len=24), bytes(24), "non-negative"),
    (tensor_node(shape=[2, 3.0], len=24), bytes(24), "non-negative"),
    (tensor_node() | {"shape": "23"}, bytes(24), "non-negative"),
    (tensor_node(shape=[0, 2**40, 2**40], len=0), b"", "too large"),
    (tensor_node(shape=[1] * 65, len=4), bytes(4), "too large"),
    (tensor_node(dtype="float128", len=24), bytes(24), "unsupported tensor dtype"),
    (tensor_node(dtype="__import__('os')", len=24), bytes(24), "unsupported tensor dtype"),
    (tensor_node(dtype="bfloat16", len=12) | {"t": "ndarray"}, bytes(12), "unsupported ndarray dtype"),
    (tensor_node(off=64), bytes(88), "expected 0"),
    (tensor_node(off=-64), bytes(24), "expected 0"),
    (tensor_node(off=2**70), bytes(24), "expected 0"),
    (tensor_node(shuffle=1), bytes(24), "shuffle is not a bool"),
    (tensor_node(extra=1), bytes(24), "keys"),
    ({"t": "list", "items": [tensor_node(), tensor_node(off=0)]}, bytes(88), "expected 64"),
    ({"t": "pickle", "v": "cos\nsystem\n"}, b"", "unknown node type"),
    ({"v": 1}, b"", "unknown node type"),
    ([1, 2], b"", "not an object"),
    ({"t": "int", "v": 5}, b"", "bad int"),
    ({"t": "int", "v": "0x_1"}, b"", "bad int"),
    ({"t": "int", "v": " 0x1"}, b"", "bad int"),
    ({"t": "float", "v": 1.5}, b"", "bad float"),
    ({"t": "float", "v": "0x1p99999"}, b"", "bad float"),
    ({"t": "float", "v": "pi"}, b"", "bad float"),
    ({"t": "bool", "v": 1}, b"", "bad bool"),
    ({"t": "str", "v": None}, b"", "bad str"),
    ({"t": "none", "v": None}, b"", "keys"),
    ({"t": "list", "items": {}}, b"", "not a list"),
    ({"t": "dict", "keys": ["a"], "items": []}, b"", "1 keys"),
    ({"t": "dict", "keys": ["a", "a"], "items": [{"t": "none"}, {"t": "none"}]}, b"", "distinct"),
    ({"t": "dict", "keys": [1], "items": [{"t": "none"}]}, b"", "strings"),
    ({"t": "bytes", "off": 0, "len": 10}, bytes(4), "truncated"),
    ({"t": "bytes", "off": 0, "len": -1}, b"", "bad off/len"),
    ({"t": "none"}, b"\x00", "after the last"),
], ids=lambda v: None)
def test_inconsistent_manifests(manifest: Any, data: bytes, message: str) -> None:
    buf = forge(manifest, data)
    for fn in (codec.decode, codec.describe):
        with pytest.raises(BlobFormatError, match=message):
            fn(buf)


def test_depth_limit_on_decode() -> None:
    node: dict[str, Any] = {"t": "none"}
    for _ in range(codec.MAX_DEPTH + 1):
        node = {"t": "list", "items": [node]}
    with pytest.raises(BlobFormatError, match="nested deeper"):
        codec.decode(forge(node))
    text = b"[" * 100_000 + b"]" * 100_000  # deeper than the JSON parser itself will go
    with pytest.raises(BlobFormatError, match="not valid JSON"):
        codec.decode(struct.pack("<4sI", codec.MAGIC, len(text)) + text)


@pytest.mark.parametrize("manifest, data", [
    (tensor_node(dtype="bool", shape=[3]), b"\x00\x01\x02"),
    ({"t": "ndarray", "dtype": "bool", "shape": [2], "off": 0, "len": 2}, b"\x01\x05"),
], ids=["tensor", "ndarray"])
def test_bool_data_must_be_0_or_1(manifest: Any, data: bytes) -> None:
    buf = forge(manifest, data)
    assert codec.describe(buf)[0]["dtype"] == "bool"  # describe reads the manifest alone
    with pytest.raises(BlobFormatError, match="0 and 1"):
        codec.decode(buf)


@pytest.mark.parametrize("body, message", [
    (struct.pack("<4sI", codec.MAGIC, 0xFFFFFFFF), "exceeds the limit"),
    (struct.pack("<4sI", codec.MAGIC, 1000) + b"{}", "truncated"),
    (struct.pack("<4sI", codec.MAGIC, 2) + b"\xff\xfe", "not valid JSON"),
    (struct.pack("<4sI", codec.MAGIC, 3) + b"NaN", "not valid JSON"),
    (struct.pack("<4sI", codec.MAGIC, 5) + b'{"t":', "not valid JSON"),
    (b"CMB", "shorter than"),
    (b"", "shorter than"),
], ids=lambda v: None)
def test_bad_headers(body: bytes, message: str) -> None:
    with pytest.raises(BlobFormatError, match=message):
        codec.decode(body)


def test_manifest_never_imports_anything() -> None:
    for dtype in ("os", "__builtins__", "nn", "Tensor"):
        with pytest.raises(BlobFormatError):
            codec.decode(forge(tensor_node(dtype=dtype, len=24), bytes(24)))


@settings(max_examples=400, deadline=None)
@given(st.data())
def test_fuzz_byte_flips(data: st.DataObject) -> None:
    buf = bytearray(SAMPLE)
    manifest_end = 8 + struct.unpack_from("<I", SAMPLE, 4)[0]
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, manifest_end + 8) | st.integers(0, len(buf) - 1))
        buf[min(at, len(buf) - 1)] = data.draw(st.integers(0, 255))
    for fn in (codec.decode, codec.describe):
        try:
            fn(bytes(buf))
        except BlobFormatError:
            pass


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(["t", "v", "off", "len", "items",
                                                                                  "keys", "shape", "dtype"]),
                                                                 inner, max_size=3),
    max_leaves=6,
)


@settings(max_examples=400, deadline=None)
@given(st.data())
def test_fuzz_manifest_fields(data: st.DataObject) -> None:
    """Replace one field anywhere in a real manifest with arbitrary JSON: decoding returns or says why not."""
    manifest = json.loads(SAMPLE[8: 8 + struct.unpack_from("<I", SAMPLE, 4)[0]])
    containers: list[Any] = []

    def collect(node: Any) -> None:
        if isinstance(node, (dict, list)) and node:
            containers.append(node)
            for child in (node.values() if isinstance(node, dict) else node):
                collect(child)

    collect(manifest)
    target = data.draw(st.sampled_from(containers))
    key = data.draw(st.sampled_from(list(target) if isinstance(target, dict) else range(len(target))))
    target[key] = data.draw(json_values | st.sampled_from(list(codec.TENSOR_DTYPES) + ["tensor", "ndarray", "dict"]))
    buf = forge(manifest, SAMPLE[SAMPLE_DATA_START:])
    for fn in (codec.decode, codec.describe):
        try:
            fn(buf)
        except BlobFormatError:
            pass


SAMPLE = bytes(sample_blob())
SAMPLE_DATA_START = -(-(8 + struct.unpack_from("<I", SAMPLE, 4)[0]) // codec.ALIGN) * codec.ALIGN


# ------------------------------------------------------------------------------------------------ describe


def latent_blob() -> bytearray:
    return codec.encode([[{"samples": torch.zeros(1, 4, 64, 64), "batch_index": [0]}], (1.5, "euler", None, True)])


def test_describe_latent() -> None:
    rows = codec.describe(latent_blob())
    assert rows == [
        {"path": "[0][0]['samples']", "type": "tensor", "dtype": "float32", "shape": [1, 4, 64, 64], "bytes": 65536},
        {"path": "[0][0]['batch_index'][0]", "type": "int", "value": 0},
        {"path": "[1][0]", "type": "float", "value": 1.5},
        {"path": "[1][1]", "type": "str", "value": "euler"},
        {"path": "[1][2]", "type": "none", "value": None},
        {"path": "[1][3]", "type": "bool", "value": True},
    ]
    json.dumps(rows)  # the CLI prints them as JSON
    text = format_description(rows)
    lines = text.splitlines()
    assert len(lines) == len(rows)
    assert "[0][0]['samples']" in lines[0] and "float32" in lines[0] and "64.0 KiB" in lines[0]
    assert "'euler'" in lines[3]


def test_describe_odd_leaves() -> None:
    rows = codec.describe(codec.encode([[], {}, (), b"abc", np.zeros(2, dtype=">f8"), 7]))
    assert [r["type"] for r in rows] == ["list", "dict", "tuple", "bytes", "ndarray", "int"]
    assert rows[0] == {"path": "[0]", "type": "list", "len": 0}
    assert rows[4]["byteorder"] == "big"
    assert format_description(codec.describe(codec.encode(10**400)))
    assert format_description(codec.describe(codec.encode("x"))).startswith("(value)")
    assert format_description([]) == ""


def test_describe_works_without_torch_or_numpy(tmp_path: Path) -> None:
    path = tmp_path / "latent.blob"
    path.write_bytes(latent_blob())
    code = ("import sys; sys.modules['torch'] = None; sys.modules['numpy'] = None; from mesh import codec; "
            "from mesh.cli import format_description; "
            f"rows = codec.describe(open({str(path)!r}, 'rb').read()); print(rows); print(format_description(rows))")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "'shape': [1, 4, 64, 64]" in result.stdout and "64.0 KiB" in result.stdout


def test_encode_without_torch_loaded_needs_no_torch() -> None:
    code = ("import sys; sys.modules['torch'] = None; sys.modules['numpy'] = None; from mesh import codec; "
            "v = [{'a': (1, 2.5, 'x', b'y', None, True)}]; assert codec.decode(codec.encode(v)) == v; print('ok')")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr

"""The "levels" form: a float32 tensor whose every element is exactly float32(k / 255) stored as one uint8 k each.

Decoded 8-bit images (what ComfyUI's image loaders make) are 4x smaller this way in memory, on disk and on the
wire, and come back bit-exact because the encoder keeps the form only after converting every element back the way
the decoder will and comparing bits. Everything here that touches data needs torch; callers pass it in.
"""

from __future__ import annotations

import struct
import warnings
from typing import Any

from mesh.codec.layout import LEVELS

_LEVELS_BLOCK = 1 << 22        # elements checked at a time (bounded temporaries; an early block fails fast)
_WIDEN_BLOCK = 1 << 18         # codes widened then divided at a time: their 1 MiB of float32 stays in cache


def level_table() -> bytes:
    """float32(k / 255) for k in 0..255, correctly rounded, as little-endian bytes: what "levels" means,
    independent of any library (rounding k/255 from a double to float32 is exact-safe: 53 >= 2*24 + 2 bits)."""
    return struct.pack("<256f", *(k / LEVELS for k in range(256)))


_LEVELS_OK: bool | None = None


def levels_exact(torch: Any) -> bool:
    """Whether widening uint8 to float32 and dividing by 255 in place gives exactly the table on this host, for every k,
    in vector bodies and scalar tails alike. Checked once; without it, no "levels" form is written and
    decoding falls back to a table lookup."""
    global _LEVELS_OK
    if _LEVELS_OK is None:
        table = torch.frombuffer(bytearray(level_table()), dtype=torch.float32)
        ok = True
        for n in (256, 263, 256 * 17 + 5, 4099):
            k = torch.arange(n, dtype=torch.int64).remainder_(256).to(torch.uint8)
            out = torch.empty(n, dtype=torch.float32).copy_(k).div_(LEVELS)
            ok = ok and torch.equal(out.view(torch.int32), table[k.long()].view(torch.int32))
        _LEVELS_OK = ok
    return _LEVELS_OK


def levels_of(torch: Any, t: Any) -> Any:
    """The uint8 codes of a float32 tensor on 8-bit levels (on the CPU), or None if any element is not one.

    Every element is converted back exactly as the decoder will and compared as bits, so -0.0, NaN, values
    outside [0, 1] and anything between levels all refuse the form; a non-image fails in the first block."""
    if not levels_exact(torch):
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


def widen_into(torch: Any, dest: Any, codes: Any) -> None:
    """Write into `dest` (float32, contiguous) the levels that `codes` (uint8, as many) stand for.

    Block by block, each widened and divided while it is in cache: the two steps levels_exact checked (so the
    bits are the encoder's), in one pass over memory instead of two. Where the check failed, a table lookup."""
    if not levels_exact(torch):
        table = torch.frombuffer(bytearray(level_table()), dtype=torch.float32)
        torch.index_select(table, 0, codes.long(), out=dest)
        return
    for start in range(0, codes.numel(), _WIDEN_BLOCK):
        dest[start: start + _WIDEN_BLOCK].copy_(codes[start: start + _WIDEN_BLOCK]).div_(LEVELS)


_READONLY_QUIET = False


def codes_view(torch: Any, piece: memoryview) -> Any:
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

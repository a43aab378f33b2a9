"""Byte planes: items of n bytes stored as every item's byte 0, then every byte 1, ...

The exponent bytes of neighbouring floats are alike, so after shuffling lz4 finds runs it would otherwise miss.
The blob format stores shuffled tensors this way ("shuffle": true), and the link compresses chunks of planes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def shuffle_into(dst: Any, src: Any, itemsize: int) -> None:
    """Byte planes: plane i of dst (uint8) <- byte i of every item of src (uint8).

    One strided copy per plane: about 8x faster than copying the transposed n x itemsize matrix in one go,
    which torch does element by element.
    """
    planes, items = dst.view(itemsize, -1), src.view(-1, itemsize)
    for i in range(itemsize):
        planes[i].copy_(items[:, i])


def unshuffle_into(dst: Any, src: Any, itemsize: int) -> None:
    planes, items = src.view(itemsize, -1), dst.view(-1, itemsize)
    for i in range(itemsize):
        items[:, i].copy_(planes[i])


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
    return _planes(buf, itemsize, shuffle_into)


def byte_unshuffle(buf: bytes | bytearray | memoryview, itemsize: int) -> bytes:
    """The inverse of byte_shuffle."""
    return _planes(buf, itemsize, unshuffle_into)

"""Many packets in one bus frame: each prefixed by its length (u16, big endian).

A batch stays under MAX_BYTES (a single larger packet travels alone): the
data path's messages are then small enough for the kernel to carry without
large contiguous allocations (actors.bus.datapath).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

from meshsup.actors.bus.codec import DecodeError

_LENGTH = struct.Struct(">H").pack
MAX_BYTES = 60_000


def pack(packets: Iterable[bytes]) -> bytes:
    parts = []
    for p in packets:
        parts += (_LENGTH(len(p)), p)
    return b"".join(parts)


def split(packets: list[bytes], max_bytes: int = MAX_BYTES) -> list[list[bytes]]:
    """``packets`` in order, in as few runs as keep each run's batch under ``max_bytes``."""
    runs = []
    start = size = 0
    for i, p in enumerate(packets):
        n = len(p) + 2
        if size + n > max_bytes and i > start:
            runs.append(packets[start:i])
            start, size = i, 0
        size += n
    if start < len(packets):
        runs.append(packets[start:])
    return runs


def pack_split(packets: list[bytes], max_bytes: int = MAX_BYTES) -> list[bytes]:
    """``packets`` packed into as many batches as it takes, in order."""
    return [pack(run) for run in split(packets, max_bytes)]


def unpack(blob: bytes) -> list[bytes]:
    """The packets of a batch; DecodeError if a length runs past the end."""
    out = []
    append = out.append
    i, end = 0, len(blob)
    while i < end:
        if i + 2 > end:
            raise DecodeError("bad_batch", "truncated length")
        j = i + 2 + (blob[i] << 8 | blob[i + 1])
        if j > end:
            raise DecodeError("bad_batch", "truncated packet")
        append(blob[i + 2 : j])
        i = j
    return out

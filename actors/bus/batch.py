"""Many packets in one bus frame: each prefixed by its length (u16, big endian)."""
from __future__ import annotations

from collections.abc import Iterable

from actors.bus.codec import DecodeError


def pack(packets: Iterable[bytes]) -> bytes:
    parts = []
    for p in packets:
        parts.append(len(p).to_bytes(2, "big"))
        parts.append(p)
    return b"".join(parts)


def unpack(blob: bytes) -> list[bytes]:
    """The packets of a batch; DecodeError if a length runs past the end."""
    out = []
    view = memoryview(blob)
    i, end = 0, len(blob)
    while i < end:
        if i + 2 > end:
            raise DecodeError("bad_batch", "truncated length")
        n = (view[i] << 8) | view[i + 1]
        i += 2
        if i + n > end:
            raise DecodeError("bad_batch", "truncated packet")
        out.append(bytes(view[i:i + n]))
        i += n
    return out

"""TAI64N timestamps as carried in WireGuard handshake initiations.

12 bytes, big-endian: seconds since 1970 plus 2^62 + 10 (the TAI label and the
TAI-UTC offset wireguard-go uses), then nanoseconds. Byte order makes later
timestamps compare greater as plain ``bytes``.
"""

from __future__ import annotations

import math
import struct

TAI64N_SIZE = 12
_BASE = 0x400000000000000A
# wireguard-go rounds nanoseconds down to ~16.7 ms so the timestamp does not
# leak a fine-grained clock to anyone who can decrypt it.
_WHITENER_MASK = 0x1000000 - 1
_FORMAT = struct.Struct(">QI")


def tai64n(unix_seconds: float) -> bytes:
    """Encode a wall-clock unix time as a whitened TAI64N label."""
    frac, whole = math.modf(max(unix_seconds, 0.0))
    nanos = int(frac * 1_000_000_000) & ~_WHITENER_MASK
    return _FORMAT.pack(_BASE + int(whole), nanos)


def is_after(a: bytes, b: bytes) -> bool:
    """True when timestamp ``a`` is strictly later than ``b``."""
    return a > b


def successor(stamp: bytes) -> bytes:
    """The next whitened label after ``stamp``: for when the wall clock stepped back
    and a new initiation must still carry a later timestamp than the last one."""
    seconds, nanos = _FORMAT.unpack(stamp)
    nanos = (nanos & ~_WHITENER_MASK) + _WHITENER_MASK + 1
    if nanos >= 1_000_000_000:
        seconds, nanos = seconds + 1, 0
    return _FORMAT.pack(seconds, nanos)

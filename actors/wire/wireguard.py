"""Sort an underlay datagram by WireGuard message type (sans-IO).

Every WireGuard message starts with a little-endian u32 type whose upper
three bytes are reserved zero; the handshake messages have fixed sizes. A
datagram that fits none of them returns None: the caller counts it as a
drop and goes on.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Final

from meshsup.actors.kernel.types import Buffer


class MessageType(IntEnum):
    INITIATION = 1
    RESPONSE = 2
    COOKIE_REPLY = 3
    TRANSPORT = 4


_FIXED_SIZES: Final = {
    MessageType.INITIATION: 148,
    MessageType.RESPONSE: 92,
    MessageType.COOKIE_REPLY: 64,
}
# type(4) + receiver(4) + counter(8), then at least the 16-byte Poly1305 tag
# (an empty payload is a keepalive).
TRANSPORT_MIN_SIZE: Final = 32


def classify(datagram: Buffer) -> MessageType | None:
    """The WireGuard message type of ``datagram``, or None if it is not one."""
    if len(datagram) < 4 or datagram[1] or datagram[2] or datagram[3]:
        return None
    kind = datagram[0]
    if kind == MessageType.TRANSPORT:
        return MessageType.TRANSPORT if len(datagram) >= TRANSPORT_MIN_SIZE else None
    if kind in _FIXED_SIZES:
        mtype = MessageType(kind)
        return mtype if len(datagram) == _FIXED_SIZES[mtype] else None
    return None


def receiver_index(datagram: Buffer) -> int | None:
    """The receiver index of a response, cookie reply or transport message,
    which names the session the sender chose for us; None for an initiation
    (it has no receiver yet) or anything invalid."""
    mtype = classify(datagram)
    if mtype is None or mtype is MessageType.INITIATION:
        return None
    # A response carries its own sender index first; ours follows it.
    offset = 8 if mtype is MessageType.RESPONSE else 4
    return int.from_bytes(datagram[offset : offset + 4], "little")

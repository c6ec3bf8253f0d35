"""Wire formats of WireGuard's four message types (all integers little-endian).

The first four bytes are the type as a little-endian u32, so the three
reserved bytes must be zero. ``parse_*`` return ``None`` for a wrong length or
type instead of raising.
"""

from __future__ import annotations

import struct
from typing import NamedTuple, TypeVar

MESSAGE_INITIATION = 1
MESSAGE_RESPONSE = 2
MESSAGE_COOKIE_REPLY = 3
MESSAGE_TRANSPORT = 4

_INITIATION = struct.Struct("<II32s48s28s16s16s")
_RESPONSE = struct.Struct("<III32s16s16s16s")
_COOKIE_REPLY = struct.Struct("<II24s32s")
TRANSPORT_HEADER = struct.Struct("<IIQ")
_TYPE = struct.Struct("<I")

INITIATION_SIZE = _INITIATION.size  # 148
RESPONSE_SIZE = _RESPONSE.size  # 92
COOKIE_REPLY_SIZE = _COOKIE_REPLY.size  # 64
TRANSPORT_HEADER_SIZE = TRANSPORT_HEADER.size  # 16
TRANSPORT_MIN_SIZE = TRANSPORT_HEADER_SIZE + 16  # header + Poly1305 tag: a keepalive
MAC_SIZE = 16


class Initiation(NamedTuple):
    sender: int
    ephemeral: bytes
    static: bytes  # encrypted initiator static key (32 + tag)
    timestamp: bytes  # encrypted TAI64N (12 + tag)
    mac1: bytes
    mac2: bytes


class Response(NamedTuple):
    sender: int
    receiver: int
    ephemeral: bytes
    empty: bytes  # encrypted empty payload (tag only)
    mac1: bytes
    mac2: bytes


class CookieReply(NamedTuple):
    receiver: int
    nonce: bytes
    cookie: bytes  # encrypted cookie (16 + tag)


class TransportHeader(NamedTuple):
    receiver: int
    counter: int


def message_type(data: bytes) -> int | None:
    """The message type, or None when fewer than four bytes arrived."""
    if len(data) < 4:
        return None
    return _TYPE.unpack_from(data)[0]


_Fixed = TypeVar("_Fixed", Initiation, Response, CookieReply)


def _parse(data: bytes, layout: struct.Struct, kind: int, fields: type[_Fixed]) -> _Fixed | None:
    """A message of fixed size ``layout.size``: its fields after the type, or None for a wrong length or type."""
    if len(data) != layout.size or message_type(data) != kind:
        return None
    return fields(*layout.unpack(data)[1:])


def pack_initiation(
    sender: int,
    ephemeral: bytes,
    static: bytes,
    timestamp: bytes,
    mac1: bytes = bytes(MAC_SIZE),
    mac2: bytes = bytes(MAC_SIZE),
) -> bytes:
    return _INITIATION.pack(MESSAGE_INITIATION, sender, ephemeral, static, timestamp, mac1, mac2)


def parse_initiation(data: bytes) -> Initiation | None:
    return _parse(data, _INITIATION, MESSAGE_INITIATION, Initiation)


def pack_response(
    sender: int,
    receiver: int,
    ephemeral: bytes,
    empty: bytes,
    mac1: bytes = bytes(MAC_SIZE),
    mac2: bytes = bytes(MAC_SIZE),
) -> bytes:
    return _RESPONSE.pack(MESSAGE_RESPONSE, sender, receiver, ephemeral, empty, mac1, mac2)


def parse_response(data: bytes) -> Response | None:
    return _parse(data, _RESPONSE, MESSAGE_RESPONSE, Response)


def pack_cookie_reply(receiver: int, nonce: bytes, cookie: bytes) -> bytes:
    return _COOKIE_REPLY.pack(MESSAGE_COOKIE_REPLY, receiver, nonce, cookie)


def parse_cookie_reply(data: bytes) -> CookieReply | None:
    return _parse(data, _COOKIE_REPLY, MESSAGE_COOKIE_REPLY, CookieReply)


def pack_transport_header(receiver: int, counter: int) -> bytes:
    return TRANSPORT_HEADER.pack(MESSAGE_TRANSPORT, receiver, counter)


def parse_transport_header(data: bytes) -> TransportHeader | None:
    """Header of a transport message; the payload (ciphertext + tag) follows at offset 16."""
    if len(data) < TRANSPORT_MIN_SIZE or message_type(data) != MESSAGE_TRANSPORT:
        return None
    return TransportHeader(*TRANSPORT_HEADER.unpack_from(data)[1:])

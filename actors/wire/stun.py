"""STUN Binding (RFC 8489) on the wire, sans-IO: what a relay answers and what a node asks.

As Tailscale's net/stun package lays it out: a request is the 20-byte header
(type, attributes' length, the magic cookie 0x2112A442, a 12-byte
transaction ID), SOFTWARE "tailnode" and FINGERPRINT; the answer is a
success response whose XOR-MAPPED-ADDRESS holds the address the request
came from, XORed with the cookie (and, for IPv6, the transaction ID).

Unlike Tailscale's server, ours answers any client's Binding request (RFC
8489 asks no SOFTWARE of it), and echoes FINGERPRINT when the request had one.
"""

from __future__ import annotations

import ipaddress
import os
import struct
import zlib
from dataclasses import dataclass
from typing import Final

from meshsup.actors.kernel.types import Buffer, Endpoint
from meshsup.actors.wire.errors import WireError

MAGIC_COOKIE: Final = 0x2112A442
_COOKIE: Final = MAGIC_COOKIE.to_bytes(4, "big")
HEADER_LEN: Final = 20
TXID_LEN: Final = 12
BINDING_REQUEST: Final = 0x0001
BINDING_SUCCESS: Final = 0x0101
ATTR_MAPPED_ADDRESS: Final = 0x0001
ATTR_XOR_MAPPED_ADDRESS: Final = 0x0020
ATTR_XOR_MAPPED_ADDRESS_ALT: Final = 0x8020  # the old draft's number; some servers still send it
ATTR_SOFTWARE: Final = 0x8022
ATTR_FINGERPRINT: Final = 0x8028
FINGERPRINT_XOR: Final = 0x5354554E  # "STUN"
SOFTWARE: Final = b"tailnode"  # Tailscale's; 8 bytes, so no padding
_FINGERPRINT_LEN: Final = 8  # type + length + CRC-32
_HDR = struct.Struct(">HH4s12s")
_ATTR = struct.Struct(">HH")


class StunError(WireError):
    """Not a usable STUN message."""


def is_stun(data: Buffer) -> bool:
    """A STUN message: the top two bits zero and the magic cookie in place."""
    return len(data) >= HEADER_LEN and data[0] & 0xC0 == 0 and bytes(data[4:8]) == _COOKIE


def new_txid() -> bytes:
    return os.urandom(TXID_LEN)


def fingerprint(data: Buffer) -> int:
    return zlib.crc32(data) ^ FINGERPRINT_XOR


def _message(mtype: int, txid: bytes, attrs: list[tuple[int, bytes]], with_fingerprint: bool) -> bytes:
    body = b"".join(_ATTR.pack(t, len(v)) + v + b"\0" * (-len(v) % 4) for t, v in attrs)
    length = len(body) + (_FINGERPRINT_LEN if with_fingerprint else 0)
    msg = _HDR.pack(mtype, length, _COOKIE, txid) + body
    if with_fingerprint:
        msg += _ATTR.pack(ATTR_FINGERPRINT, 4) + fingerprint(msg).to_bytes(4, "big")
    return msg


def request(txid: bytes, software: bytes = SOFTWARE) -> bytes:
    """A Binding request, byte for byte as Tailscale's stun.Request."""
    return _message(BINDING_REQUEST, txid, [(ATTR_SOFTWARE, software)], with_fingerprint=True)


def _attributes(body: Buffer) -> list[tuple[int, bytes]]:
    out, pos = [], 0
    while pos < len(body):
        if len(body) - pos < 4:
            raise StunError("malformed_attributes")
        atype, alen = _ATTR.unpack_from(body, pos)
        start, pos = pos + 4, pos + 4 + alen + (-alen % 4)
        if pos > len(body):
            raise StunError("malformed_attributes")
        out.append((atype, bytes(body[start : start + alen])))
    return out


def _split(data: Buffer) -> tuple[int, bytes, list[tuple[int, bytes]], int]:
    """(type, transaction ID, attributes, offset of a FINGERPRINT or -1)."""
    if not is_stun(data):
        raise StunError("not_stun")
    mtype, length, _, txid = _HDR.unpack_from(data, 0)
    if length % 4 or HEADER_LEN + length > len(data):
        raise StunError("bad_length")
    attrs = _attributes(data[HEADER_LEN : HEADER_LEN + length])
    fp_at = -1
    if attrs and attrs[-1][0] == ATTR_FINGERPRINT:
        fp_at = HEADER_LEN + length - _FINGERPRINT_LEN
        if len(attrs[-1][1]) != 4 or int.from_bytes(attrs[-1][1], "big") != fingerprint(data[:fp_at]):
            raise StunError("bad_fingerprint")
    return mtype, txid, attrs, fp_at


@dataclass(frozen=True)
class BindingRequest:
    txid: bytes
    fingerprint: bool  # the request had one, so the answer gets one


def parse_binding_request(data: Buffer) -> BindingRequest:
    mtype, txid, _, fp_at = _split(data)
    if mtype != BINDING_REQUEST:
        raise StunError("not_binding_request")
    return BindingRequest(txid, fp_at >= 0)


def _xor_address(txid: bytes, host: str, port: int) -> bytes:
    addr = ipaddress.ip_address(host)
    mask = _COOKIE + txid
    raw = bytes(b ^ m for b, m in zip(addr.packed, mask))
    return bytes([0, 1 if addr.version == 4 else 2]) + (port ^ (MAGIC_COOKIE >> 16)).to_bytes(2, "big") + raw


def response(txid: bytes, source: Endpoint, with_fingerprint: bool = False) -> bytes:
    """A Binding success response telling the client `source`, its address as seen here."""
    host, port = source
    mapped = ipaddress.ip_address(host)
    if isinstance(mapped, ipaddress.IPv6Address) and mapped.ipv4_mapped:
        host = str(mapped.ipv4_mapped)  # a dual-stack socket's view of an IPv4 client
    return _message(
        BINDING_SUCCESS, txid, [(ATTR_XOR_MAPPED_ADDRESS, _xor_address(txid, host, port))], with_fingerprint
    )


def _address(value: bytes, txid: bytes, xored: bool) -> Endpoint:
    if len(value) < 4 or value[1] not in (1, 2):
        raise StunError("malformed_attributes")
    size = 4 if value[1] == 1 else 16
    if len(value) < 4 + size:
        raise StunError("malformed_attributes")
    port = int.from_bytes(value[2:4], "big")
    raw = value[4 : 4 + size]
    if xored:
        port ^= MAGIC_COOKIE >> 16
        raw = bytes(b ^ m for b, m in zip(raw, _COOKIE + txid))
    addr = ipaddress.ip_address(raw)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
        addr = addr.ipv4_mapped
    return str(addr), port


def parse_response(data: Buffer) -> tuple[bytes, Endpoint]:
    """(transaction ID, mapped address) of a Binding success response: XOR-MAPPED-ADDRESS,
    else MAPPED-ADDRESS (servers of RFC 3489's time send only that)."""
    mtype, txid, attrs, _ = _split(data)
    if mtype != BINDING_SUCCESS:
        raise StunError("not_success_response")
    found: Endpoint | None = None
    fallback: Endpoint | None = None
    for atype, value in attrs:
        if atype in (ATTR_XOR_MAPPED_ADDRESS, ATTR_XOR_MAPPED_ADDRESS_ALT):
            found = _address(value, txid, xored=True)
        elif atype == ATTR_MAPPED_ADDRESS:
            fallback = _address(value, txid, xored=False)
    if found is None and fallback is None:
        raise StunError("no_mapped_address")
    return txid, found or fallback  # type: ignore[return-value]


class BindingClient:
    """One Binding transaction, sans-IO: the request to send, when to send it
    again (RFC 8489's doubling RTO, Rc tries), and the answer that matches it."""

    def __init__(self, rto: float = 0.5, tries: int = 7, txid: bytes | None = None) -> None:
        self.txid = txid or new_txid()
        self.packet = request(self.txid)
        self.rto, self.tries = rto, tries
        self.sent = 0
        self.next_send = 0.0
        self.result: Endpoint | None = None

    def due(self, now: float) -> bytes | None:
        """The request, if it is time to (re)send it; None when waiting or given up."""
        if self.result is not None or self.sent >= self.tries or now < self.next_send:
            return None
        self.next_send = now + self.rto * 2**self.sent
        self.sent += 1
        return self.packet

    def failed(self, now: float) -> bool:
        """Every try sent and the last one's wait is over."""
        return self.result is None and self.sent >= self.tries and now >= self.next_send

    def receive(self, datagram: Buffer) -> Endpoint | None:
        """The mapped address if `datagram` answers this transaction, else None."""
        try:
            txid, mapped = parse_response(datagram)
        except StunError:
            return None
        if txid != self.txid:
            return None
        self.result = mapped
        return mapped

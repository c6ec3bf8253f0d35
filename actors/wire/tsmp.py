"""TSMP, Tailscale's message protocol inside the tunnel, as whole IP packets (sans-IO).

TSMP rides IP protocol 99 ("any private encryption scheme") inside
WireGuard, between nodes, and never reaches the host's network stack. As
Tailscale's net/packet (tsmp.go, and the IP headers of ip4.go/ip6.go): the
IP header has no options, TTL/hop limit 64, no fragmentation, the IPv4
header checksum, and the IPv4 ID or IPv6 flow label given (0 for requests);
after it comes a type byte and the message:

    'p' ping        8 opaque bytes, echoed in the pong
    'o' pong        the ping's 8 bytes | the ponging node's PeerAPI port (u16; 0: none; old nodes omit it)
    'a' disco key   the sender's disco public key (32): an advertisement, which binds the
                    key to the WireGuard session it arrives in

Tailscale's rejected-connection message ('!') is not spoken here. A packet
that is no usable TSMP message is refused with TsmpError, whose `reason` is
a short label to count it by.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Final

from meshsup.actors.kernel.types import Buffer
from meshsup.actors.wire.errors import WireError
from meshsup.actors.wire.ip import (
    IPV4_CHECKSUM,
    IPV4_DST,
    IPV4_FRAGMENT,
    IPV4_HEADER_MIN,
    IPV4_IDENT,
    IPV4_PROTOCOL,
    IPV4_SRC,
    IPV4_TOTAL_LENGTH,
    IPV4_TTL,
    IPV6_DST,
    IPV6_FLOW,
    IPV6_HEADER,
    IPV6_HOP_LIMIT,
    IPV6_NEXT_HEADER,
    IPV6_PAYLOAD_LENGTH,
    IPV6_SRC,
    ipv4_header_checksum,
    total_length,
    version,
)

IPPROTO_TSMP: Final = 99
TTL: Final = 64
DATA_LEN: Final = 8  # a ping's opaque bytes
KEY_LEN: Final = 32
_U16: Final = struct.Struct("!H")
_U32: Final = struct.Struct("!I")
_FLOW_LABEL: Final = 0xFFFFF
_FRAGMENT_BITS: Final = 0x3FFF  # MF and the fragment offset (DF may be set)


class TsmpType(IntEnum):
    PING = ord("p")
    PONG = ord("o")
    DISCO_ADVERTISEMENT = ord("a")


class TsmpError(WireError):
    """A packet that is no usable TSMP message."""


@dataclass(frozen=True)
class Ping:
    src: str
    dst: str
    data: bytes
    ident: int = 0  # the IPv4 ID or IPv6 flow label, whose flipped bits the pong carries


@dataclass(frozen=True)
class Pong:
    src: str
    dst: str
    data: bytes
    peer_api_port: int = 0


@dataclass(frozen=True)
class DiscoAdvertisement:
    src: str
    dst: str
    key: bytes  # never all-zero: parse refuses that


Message = Ping | Pong | DiscoAdvertisement


def _packet(src: str, dst: str, body: bytes, ident: int) -> bytes:
    """`body` behind an IPv4 or IPv6 header from `src` to `dst`, as Tailscale's
    IP4Header/IP6Header.Marshal write it."""
    s, d = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    if s.version != d.version:
        raise ValueError(f"{src} and {dst} are not of one IP version")
    if s.version == 4:
        head = bytearray(IPV4_HEADER_MIN)
        head[0] = 0x40 | IPV4_HEADER_MIN // 4
        _U16.pack_into(head, IPV4_TOTAL_LENGTH, IPV4_HEADER_MIN + len(body))
        _U16.pack_into(head, IPV4_IDENT, ident)
        head[IPV4_TTL], head[IPV4_PROTOCOL] = TTL, IPPROTO_TSMP
        head[IPV4_SRC], head[IPV4_DST] = s.packed, d.packed
        _U16.pack_into(head, IPV4_CHECKSUM, ipv4_header_checksum(head))
    else:
        head = bytearray(IPV6_HEADER)
        _U32.pack_into(head, IPV6_FLOW, 6 << 28 | ident & _FLOW_LABEL)
        _U16.pack_into(head, IPV6_PAYLOAD_LENGTH, len(body))
        head[IPV6_NEXT_HEADER], head[IPV6_HOP_LIMIT] = IPPROTO_TSMP, TTL
        head[IPV6_SRC], head[IPV6_DST] = s.packed, d.packed
    return bytes(head) + body


def ping(src: str, dst: str, data: bytes) -> bytes:
    """A ping request, as Tailscale's userspaceEngine.sendTSMPPing builds it."""
    if len(data) != DATA_LEN:
        raise ValueError(f"a TSMP ping carries {DATA_LEN} bytes, not {len(data)}")
    return _packet(src, dst, bytes([TsmpType.PING]) + data, 0)


def pong(request: Ping, peer_api_port: int = 0) -> bytes:
    """The answer to `request`, as Tailscale's injectOutboundPong: the addresses
    swapped and the request's IPv4 ID (IPv6 flow label) with its bits flipped."""
    flipped = ~request.ident & (0xFFFF if ipaddress.ip_address(request.src).version == 4 else _FLOW_LABEL)
    body = bytes([TsmpType.PONG]) + request.data + _U16.pack(peer_api_port)
    return _packet(request.dst, request.src, body, flipped)


def disco_advertisement(src: str, dst: str, key: bytes) -> bytes:
    """Our disco public key, told to the peer at `dst` inside the tunnel (Tailscale's
    TSMPDiscoKeyAdvertisement.Marshal)."""
    if len(key) != KEY_LEN or not any(key):
        raise ValueError("a disco key is 32 bytes, not all zero")
    return _packet(src, dst, bytes([TsmpType.DISCO_ADVERTISEMENT]) + key, 0)


def _ip(pkt: Buffer) -> tuple[str, str, int, Buffer]:
    """(source, destination, IPv4 ID or IPv6 flow label, body) of a TSMP packet."""
    v = version(pkt)
    if v is None:
        raise TsmpError("not_ip")
    length = total_length(pkt)
    if length is None or len(pkt) < length:
        raise TsmpError("truncated", "shorter than its IP header says")
    if v == 4:
        ihl = (pkt[0] & 0x0F) * 4
        if not IPV4_HEADER_MIN <= ihl <= length:
            raise TsmpError("truncated", f"an IPv4 header of {ihl} bytes")
        if pkt[IPV4_PROTOCOL] != IPPROTO_TSMP:
            raise TsmpError("not_tsmp", f"IP protocol {pkt[IPV4_PROTOCOL]}")
        if _U16.unpack_from(pkt, IPV4_FRAGMENT)[0] & _FRAGMENT_BITS:
            raise TsmpError("fragment", "TSMP messages are never fragmented")
        if ipv4_header_checksum(pkt[:ihl]):
            raise TsmpError("bad_checksum")
        src, dst = ipaddress.IPv4Address(bytes(pkt[IPV4_SRC])), ipaddress.IPv4Address(bytes(pkt[IPV4_DST]))
        return str(src), str(dst), _U16.unpack_from(pkt, IPV4_IDENT)[0], pkt[ihl:length]
    # As Tailscale's decoder, no extension headers: TSMP follows the fixed header.
    if pkt[IPV6_NEXT_HEADER] != IPPROTO_TSMP:
        raise TsmpError("not_tsmp", f"next header {pkt[IPV6_NEXT_HEADER]}")
    src6, dst6 = ipaddress.IPv6Address(bytes(pkt[IPV6_SRC])), ipaddress.IPv6Address(bytes(pkt[IPV6_DST]))
    return str(src6), str(dst6), _U32.unpack_from(pkt, IPV6_FLOW)[0] & _FLOW_LABEL, pkt[IPV6_HEADER:length]


def parse(pkt: Buffer) -> Message:
    """The TSMP message in a whole IP packet. TsmpError "not_ip", "truncated",
    "not_tsmp", "fragment", "bad_checksum", "short" (a body too short for its
    type), "unknown_type", or "zero_key" (an advertisement of no key, which
    Tailscale ignores too). Bytes after what a type needs are ignored."""
    src, dst, ident, body = _ip(pkt)
    if not body:
        raise TsmpError("short", "no TSMP type")
    kind = body[0]
    if kind in (TsmpType.PING, TsmpType.PONG):
        if len(body) < 1 + DATA_LEN:
            raise TsmpError("short", f"a {chr(kind)!r} of {len(body)} bytes")
        data = bytes(body[1 : 1 + DATA_LEN])
        if kind == TsmpType.PING:
            return Ping(src, dst, data, ident)
        port = _U16.unpack_from(body, 1 + DATA_LEN)[0] if len(body) >= 3 + DATA_LEN else 0
        return Pong(src, dst, data, port)
    if kind == TsmpType.DISCO_ADVERTISEMENT:
        if len(body) < 1 + KEY_LEN:
            raise TsmpError("short", f"a disco key advertisement of {len(body)} bytes")
        key = bytes(body[1 : 1 + KEY_LEN])
        if not any(key):
            raise TsmpError("zero_key")
        return DiscoAdvertisement(src, dst, key)
    raise TsmpError("unknown_type", f"type {kind:#04x}")

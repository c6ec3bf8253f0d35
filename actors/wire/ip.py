"""Field accessors for raw IPv4/IPv6 packets as read from a TUN.

Plain functions over ``bytes``/``memoryview``: the hot path asks one or two
questions per packet (version, destination, ports for flow accounting) and
must not build an object per packet. Every accessor returns ``None`` for a
packet too short or malformed to answer, never raises.
"""

from __future__ import annotations

from meshsup.actors.kernel.types import Buffer

from typing import Final


IPPROTO_TCP: Final = 6
IPPROTO_UDP: Final = 17

_IPV4_MIN_HEADER: Final = 20
_IPV6_HEADER: Final = 40
# IPv6 extension headers that sit between the fixed header and the transport
# header and share the "next header, length in 8-octet units" layout.
_IPV6_EXTENSIONS: Final = frozenset({0, 43, 60})
_IPV6_FRAGMENT: Final = 44
_IPV6_MAX_EXTENSIONS: Final = 8


def version(pkt: Buffer) -> int | None:
    """IP version (4 or 6) of the packet, or None if empty or neither."""
    if not pkt:
        return None
    v = pkt[0] >> 4
    return v if v in (4, 6) else None


def _ipv4_header_length(pkt: Buffer) -> int | None:
    ihl = (pkt[0] & 0x0F) * 4
    if ihl < _IPV4_MIN_HEADER or len(pkt) < ihl:
        return None
    return ihl


def total_length(pkt: Buffer) -> int | None:
    """Length the IP header claims for the whole packet (header included)."""
    v = version(pkt)
    if v == 4 and len(pkt) >= _IPV4_MIN_HEADER:
        return int.from_bytes(pkt[2:4], "big")
    if v == 6 and len(pkt) >= _IPV6_HEADER:
        return _IPV6_HEADER + int.from_bytes(pkt[4:6], "big")
    return None


def src_addr(pkt: Buffer) -> bytes | None:
    """Source address: 4 bytes for IPv4, 16 for IPv6."""
    v = version(pkt)
    if v == 4 and len(pkt) >= _IPV4_MIN_HEADER:
        return bytes(pkt[12:16])
    if v == 6 and len(pkt) >= _IPV6_HEADER:
        return bytes(pkt[8:24])
    return None


def dst_addr(pkt: Buffer) -> bytes | None:
    """Destination address: 4 bytes for IPv4, 16 for IPv6."""
    v = version(pkt)
    if v == 4 and len(pkt) >= _IPV4_MIN_HEADER:
        return bytes(pkt[16:20])
    if v == 6 and len(pkt) >= _IPV6_HEADER:
        return bytes(pkt[24:40])
    return None


def _transport(pkt: Buffer) -> tuple[int, int | None] | None:
    """(protocol, offset of its header) — offset None when the packet is a
    non-first fragment, where the transport header is absent."""
    v = version(pkt)
    if v == 4:
        ihl = _ipv4_header_length(pkt)
        if ihl is None:
            return None
        fragment_offset = int.from_bytes(pkt[6:8], "big") & 0x1FFF
        return pkt[9], (ihl if fragment_offset == 0 else None)
    if v != 6 or len(pkt) < _IPV6_HEADER:
        return None
    proto, offset = pkt[6], _IPV6_HEADER
    for _ in range(_IPV6_MAX_EXTENSIONS):
        if proto in _IPV6_EXTENSIONS:
            if len(pkt) < offset + 2:
                return None
            proto, offset = pkt[offset], offset + (pkt[offset + 1] + 1) * 8
        elif proto == _IPV6_FRAGMENT:
            if len(pkt) < offset + 8:
                return None
            first = int.from_bytes(pkt[offset + 2 : offset + 4], "big") >> 3 == 0
            proto, offset = pkt[offset], offset + 8
            if not first:
                return proto, None
        else:
            return proto, offset
    return None  # an extension chain this long is not a packet we forward


def protocol(pkt: Buffer) -> int | None:
    """Transport protocol number (IPv6: after skipping extension headers)."""
    t = _transport(pkt)
    return None if t is None else t[0]


def ports(pkt: Buffer) -> tuple[int, int] | None:
    """(source port, destination port) of a TCP or UDP packet, else None."""
    t = _transport(pkt)
    if t is None:
        return None
    proto, offset = t
    if proto not in (IPPROTO_TCP, IPPROTO_UDP) or offset is None or len(pkt) < offset + 4:
        return None
    source = int.from_bytes(pkt[offset : offset + 2], "big")
    return source, int.from_bytes(pkt[offset + 2 : offset + 4], "big")

"""Field offsets and accessors for raw IPv4/IPv6 packets as read from a TUN.

The offsets are named here once, for every reader of IP headers: a slice
for a field cut out as bytes (``packet[IPV4_DST]``), an int for one read as
a number (a byte, or a big-endian u16 at that offset). Hot loops index with
them directly, which costs no more than a literal slice.

The accessors are plain functions over ``bytes``/``memoryview``: the hot
path asks one or two questions per packet (version, destination, ports for
flow accounting) and must not build an object per packet. Every accessor
returns ``None`` for a packet too short or malformed to answer, never raises.
"""

from __future__ import annotations

import ipaddress
from typing import Final

from meshsup.actors.kernel.types import Buffer

IPPROTO_TCP: Final = 6
IPPROTO_UDP: Final = 17

# IPv4 header (RFC 791), without options.
IPV4_HEADER_MIN: Final = 20
IPV4_TOTAL_LENGTH: Final = 2  # u16, header included
IPV4_IDENT: Final = 4  # u16
IPV4_FRAGMENT: Final = 6  # u16: 3 flag bits (reserved, DF, MF), 13 bits of fragment offset
IPV4_TTL: Final = 8
IPV4_PROTOCOL: Final = 9
IPV4_CHECKSUM: Final = 10  # u16
IPV4_SRC: Final = slice(12, 16)
IPV4_DST: Final = slice(16, 20)
IPV4_ADDRESSES: Final = slice(IPV4_SRC.start, IPV4_DST.stop)  # source then destination
# IPv6 fixed header (RFC 8200).
IPV6_HEADER: Final = 40
IPV6_FLOW: Final = 0  # u32: version (4 bits), traffic class (8), flow label (20)
IPV6_PAYLOAD_LENGTH: Final = 4  # u16, fixed header excluded
IPV6_NEXT_HEADER: Final = 6
IPV6_HOP_LIMIT: Final = 7
IPV6_SRC: Final = slice(8, 24)
IPV6_DST: Final = slice(24, 40)
IPV6_ADDRESSES: Final = slice(IPV6_SRC.start, IPV6_DST.stop)
# IPv6 extension headers that sit between the fixed header and the transport
# header and share the "next header, length in 8-octet units" layout.
_IPV6_EXTENSIONS: Final = frozenset({0, 43, 60})
_IPV6_FRAGMENT: Final = 44
_IPV6_MAX_EXTENSIONS: Final = 8


def packed16(host: str) -> bytes:
    """An IP address in 16 bytes, IPv4 as IPv4-mapped IPv6 (::ffff:a.b.c.d), as Tailscale's
    netip.Addr.As16 writes addresses into DERP frames and disco messages."""
    addr = ipaddress.ip_address(host)
    return addr.packed if addr.version == 6 else b"\0" * 10 + b"\xff\xff" + addr.packed


def unpacked16(raw: Buffer) -> str:
    """packed16's inverse: an IPv4-mapped address comes back as plain IPv4."""
    addr = ipaddress.IPv6Address(bytes(raw[:16]))
    return str(addr.ipv4_mapped or addr)


def ones_complement_sum(data: Buffer) -> int:
    """RFC 1071 sum of big-endian 16-bit words, folded to 16 bits (odd length: zero-padded).

    2**16 is 1 modulo 0xFFFF, so the sum of the words is the whole buffer as
    one integer modulo 0xFFFF: one C-level pass instead of a Python loop.
    """
    if len(data) % 2:
        data = bytes(data) + b"\0"
    total = int.from_bytes(data, "big") % 0xFFFF
    return total if total or not any(data) else 0xFFFF


def ipv4_header_checksum(header: Buffer) -> int:
    """The checksum field value for an IPv4 header whose own checksum field is zero
    (and 0 for a header whose field already holds its checksum)."""
    return ~ones_complement_sum(header) & 0xFFFF


def version(pkt: Buffer) -> int | None:
    """IP version (4 or 6) of the packet, or None if empty or neither."""
    if not pkt:
        return None
    v = pkt[0] >> 4
    return v if v in (4, 6) else None


def _ipv4_header_length(pkt: Buffer) -> int | None:
    ihl = (pkt[0] & 0x0F) * 4
    if ihl < IPV4_HEADER_MIN or len(pkt) < ihl:
        return None
    return ihl


def total_length(pkt: Buffer) -> int | None:
    """Length the IP header claims for the whole packet (header included)."""
    v = version(pkt)
    if v == 4 and len(pkt) >= IPV4_HEADER_MIN:
        return pkt[IPV4_TOTAL_LENGTH] << 8 | pkt[IPV4_TOTAL_LENGTH + 1]
    if v == 6 and len(pkt) >= IPV6_HEADER:
        return IPV6_HEADER + (pkt[IPV6_PAYLOAD_LENGTH] << 8 | pkt[IPV6_PAYLOAD_LENGTH + 1])
    return None


def src_addr(pkt: Buffer) -> bytes | None:
    """Source address: 4 bytes for IPv4, 16 for IPv6."""
    v = version(pkt)
    if v == 4 and len(pkt) >= IPV4_HEADER_MIN:
        return bytes(pkt[IPV4_SRC])
    if v == 6 and len(pkt) >= IPV6_HEADER:
        return bytes(pkt[IPV6_SRC])
    return None


def dst_addr(pkt: Buffer) -> bytes | None:
    """Destination address: 4 bytes for IPv4, 16 for IPv6."""
    v = version(pkt)
    if v == 4 and len(pkt) >= IPV4_HEADER_MIN:
        return bytes(pkt[IPV4_DST])
    if v == 6 and len(pkt) >= IPV6_HEADER:
        return bytes(pkt[IPV6_DST])
    return None


def _transport(pkt: Buffer) -> tuple[int, int | None] | None:
    """(protocol, offset of its header) — offset None when the packet is a
    non-first fragment, where the transport header is absent."""
    v = version(pkt)
    if v == 4:
        ihl = _ipv4_header_length(pkt)
        if ihl is None:
            return None
        fragment_offset = (pkt[IPV4_FRAGMENT] << 8 | pkt[IPV4_FRAGMENT + 1]) & 0x1FFF
        return pkt[IPV4_PROTOCOL], (ihl if fragment_offset == 0 else None)
    if v != 6 or len(pkt) < IPV6_HEADER:
        return None
    proto, offset = pkt[IPV6_NEXT_HEADER], IPV6_HEADER
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

"""What a reject sends back: a TCP RST for TCP, else ICMP (v6) destination unreachable,
administratively prohibited (type 3 code 13; ICMPv6 type 1 code 1), from the address the
packet was sent to.

RST as RFC 9293 3.10.7.1 answers a segment on no connection: with its ACK
number as sequence if it had an ACK, else acknowledging it. No reply to a
RST nor to an ICMP error (RFC 1122 3.2.2, RFC 4443 2.4): None.
"""

from __future__ import annotations

import struct

from meshsup.actors.filter.flowkey import ICMP, ICMP_ERRORS, ICMPV6, TCP
from meshsup.actors.wire.ip import ipv4_header_checksum, ones_complement_sum

TTL = 64
ICMP_UNREACHABLE, ICMP_ADMIN_PROHIBITED = 3, 13
ICMPV6_UNREACHABLE, ICMPV6_ADMIN_PROHIBITED = 1, 1
IPV4_MIN_MTU, IPV6_MIN_MTU = 576, 1280  # an ICMP error quotes as much as fits in these
_FIN, _SYN, _RST, _ACK = 0x01, 0x02, 0x04, 0x10
_IPV4 = struct.Struct("!BBHHHBBH4s4s")
_IPV6 = struct.Struct("!IHBB16s16s")
_TCP = struct.Struct("!HHIIBBHHH")
_ICMP = struct.Struct("!BBHI")


def reject_reply(p: bytes) -> bytes | None:
    """The reply to a rejected packet; None where none is due or the packet is too short."""
    version = p[0] >> 4
    if version == 4:
        t, proto = (p[0] & 15) * 4, p[9]
        src, dst = p[12:16], p[16:20]
        end = min(len(p), int.from_bytes(p[2:4], "big"))
    else:
        t, proto = 40, p[6]
        src, dst = p[8:24], p[24:40]
        end = min(len(p), 40 + int.from_bytes(p[4:6], "big"))
    if proto == TCP:
        return _rst(version, src, dst, p[t:end]) if end >= t + 20 else None
    if proto == ICMP and version == 4 and (end < t + 1 or p[t] in ICMP_ERRORS):
        return None
    if proto == ICMPV6 and version == 6 and (end < t + 1 or p[t] < 128):
        return None
    return _unreachable(version, src, dst, p[:end])


def _rst(version: int, src: bytes, dst: bytes, segment: bytes) -> bytes | None:
    sport, dport, seq, ack, offset, flags = struct.unpack_from("!HHIIBB", segment)
    if flags & _RST:
        return None
    if flags & _ACK:
        seq_out, ack_out, flags_out = ack, 0, _RST
    else:
        payload = len(segment) - (offset >> 4) * 4
        seq_out, flags_out = 0, _RST | _ACK
        ack_out = (seq + max(payload, 0) + bool(flags & _SYN) + bool(flags & _FIN)) & 0xFFFFFFFF
    header = _TCP.pack(dport, sport, seq_out, ack_out, 5 << 4, flags_out, 0, 0, 0)
    checksum = _checksum(_pseudo(version, dst, src, TCP, len(header)) + header)
    return _ip(version, dst, src, TCP, header[:16] + checksum.to_bytes(2, "big") + header[18:])


def _unreachable(version: int, src: bytes, dst: bytes, packet: bytes) -> bytes:
    if version == 4:
        body = _ICMP.pack(ICMP_UNREACHABLE, ICMP_ADMIN_PROHIBITED, 0, 0) + packet[: IPV4_MIN_MTU - 28]
        checksum = _checksum(body)
        proto = ICMP
    else:
        body = _ICMP.pack(ICMPV6_UNREACHABLE, ICMPV6_ADMIN_PROHIBITED, 0, 0) + packet[: IPV6_MIN_MTU - 48]
        checksum = _checksum(_pseudo(6, dst, src, ICMPV6, len(body)) + body)
        proto = ICMPV6
    return _ip(version, dst, src, proto, body[:2] + checksum.to_bytes(2, "big") + body[4:])


def _pseudo(version: int, src: bytes, dst: bytes, proto: int, length: int) -> bytes:
    if version == 4:
        return src + dst + bytes((0, proto)) + length.to_bytes(2, "big")
    return src + dst + length.to_bytes(4, "big") + bytes((0, 0, 0, proto))


def _checksum(data: bytes) -> int:
    return ~ones_complement_sum(data) & 0xFFFF


def _ip(version: int, src: bytes, dst: bytes, proto: int, payload: bytes) -> bytes:
    if version == 4:
        header = _IPV4.pack(0x45, 0, 20 + len(payload), 0, 0x4000, TTL, proto, 0, src, dst)
        checksum = ipv4_header_checksum(header)
        return header[:10] + checksum.to_bytes(2, "big") + header[12:] + payload
    return _IPV6.pack(6 << 28, len(payload), proto, TTL, src, dst) + payload

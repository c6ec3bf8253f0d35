"""The classic libpcap file format, as `meshsup capture` writes it: pure bytes, no files.

A file is one global header then a record per packet (a 16-byte header and
the packet). Fields are in the writer's byte order, which readers tell by
the magic; this module writes little-endian, as libpcap does on x86, so its
output matches libpcap's byte for byte. Timestamps are in microseconds
(magic 0xa1b2c3d4), version 2.4, thiszone and sigfigs 0.

The link type is LINKTYPE_RAW: every record is a bare IPv4 or IPv6 packet,
told apart by its version nibble. Captured WireGuard datagrams are wrapped in
an IP and UDP header of their underlay addresses (`udp_packet`), so tshark
dissects them as WireGuard.
"""

from __future__ import annotations

import ipaddress
import struct
from typing import Final

from meshsup.actors.kernel.types import Buffer, Endpoint
from meshsup.actors.wire.ip import IPPROTO_UDP, ipv4_header_checksum, ones_complement_sum

MAGIC_MICROSECONDS: Final = 0xA1B2C3D4
VERSION: Final = (2, 4)
LINKTYPE_RAW: Final = 101  # the file's number; libpcap's DLT_RAW differs by platform, this does not
SNAPLEN: Final = 262144  # libpcap's MAXIMUM_SNAPLEN: whole packets
FILE_HEADER: Final = struct.Struct("<IHHiIII")
RECORD_HEADER: Final = struct.Struct("<IIII")  # seconds, microseconds, bytes stored, original length
UDP_HEADER: Final = struct.Struct(">HHHH")
_IPV4_HEADER: Final = struct.Struct(">BBHHHBBH4s4s")
_IPV6_HEADER: Final = struct.Struct(">IHBB16s16s")
_TTL: Final = 64


def file_header(linktype: int = LINKTYPE_RAW, snaplen: int = SNAPLEN) -> bytes:
    return FILE_HEADER.pack(MAGIC_MICROSECONDS, *VERSION, 0, 0, snaplen, linktype)


def record(ts_ns: int, packet: Buffer, snaplen: int = SNAPLEN) -> bytes:
    """One packet seen at `ts_ns` (unix time in nanoseconds), cut to `snaplen` bytes."""
    seconds, ns = divmod(ts_ns, 1_000_000_000)
    stored = packet[:snaplen]
    return RECORD_HEADER.pack(seconds, ns // 1000, len(stored), len(packet)) + bytes(stored)


def records(ts_ns: int, packets: list[bytes], snaplen: int = SNAPLEN) -> bytes:
    """Packets seen together (one batch), each a record stamped `ts_ns`."""
    return b"".join(record(ts_ns, p, snaplen) for p in packets)


def udp_packet(src: Endpoint, dst: Endpoint, payload: Buffer) -> bytes:
    """`payload` as the UDP datagram from `src` to `dst` in an IPv4 or IPv6 packet, checksums
    filled in (so Wireshark flags nothing). ValueError for addresses of two families."""
    s, d = ipaddress.ip_address(src[0]), ipaddress.ip_address(dst[0])
    if s.version != d.version:
        raise ValueError(f"{s} and {d} are of different IP versions")
    length = UDP_HEADER.size + len(payload)
    if s.version == 6:
        pseudo = struct.pack(">16s16sIxxxB", s.packed, d.packed, length, IPPROTO_UDP)
    else:
        pseudo = struct.pack(">4s4sxBH", s.packed, d.packed, IPPROTO_UDP, length)
    udp = UDP_HEADER.pack(src[1], dst[1], length, 0) + bytes(payload)
    checksum = ~ones_complement_sum(pseudo + udp) & 0xFFFF or 0xFFFF  # a computed 0 is sent as all ones
    udp = udp[:6] + checksum.to_bytes(2, "big") + udp[8:]
    if s.version == 6:
        return _IPV6_HEADER.pack(6 << 28, length, IPPROTO_UDP, _TTL, s.packed, d.packed) + udp
    header = _IPV4_HEADER.pack(0x45, 0, 20 + length, 0, 0x4000, _TTL, IPPROTO_UDP, 0, s.packed, d.packed)
    return header[:10] + ipv4_header_checksum(header).to_bytes(2, "big") + header[12:] + udp

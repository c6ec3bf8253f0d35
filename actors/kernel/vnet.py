"""The virtio-net header of an IFF_VNET_HDR TUN, and TCP coalescing for writes (sans-IO).

With IFF_VNET_HDR every read and write on the TUN starts with a 10-byte
``struct virtio_net_hdr``. Reads carry an all-zero header here: the node
never turns on TUNSETOFFLOAD, so the kernel segments and checksums what it
hands over (in C, which is cheaper than checksumming in Python).

Writes are where the header pays: consecutive segments of one TCP flow are
glued into one GSO super-packet and written with a single syscall, and the
kernel's TCP receive path then handles one packet instead of dozens (what
GRO does for a NIC). The super-packet is marked NEEDS_CSUM with the
pseudo-header sum in the TCP checksum field, as wireguard-go's GRO does, so
the segments' own checksums are not checked again: every segment was
authenticated by WireGuard's Poly1305 tag, which is why the in-kernel
WireGuard marks its packets CHECKSUM_UNNECESSARY too.

Only consecutive packets are merged, so the order of packets is exactly the
order given.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Final

from meshsup.actors.kernel.types import Buffer
from meshsup.actors.wire.ip import (
    IPPROTO_TCP,
    IPV4_ADDRESSES,
    IPV4_CHECKSUM,
    IPV4_FRAGMENT,
    IPV4_HEADER_MIN,
    IPV4_PROTOCOL,
    IPV4_SRC,
    IPV4_TOTAL_LENGTH,
    IPV6_ADDRESSES,
    IPV6_HEADER,
    IPV6_NEXT_HEADER,
    IPV6_PAYLOAD_LENGTH,
    IPV6_SRC,
    ipv4_header_checksum,
    ones_complement_sum,
)

HEADER: Final = struct.Struct("<BBHHHH")  # flags, gso_type, hdr_len, gso_size, csum_start, csum_offset
HEADER_LEN: Final = HEADER.size
PLAIN: Final = bytes(HEADER_LEN)  # no offload: a packet exactly as given
F_NEEDS_CSUM: Final = 1
GSO_NONE: Final = 0
GSO_TCPV4: Final = 1
GSO_TCPV6: Final = 4

_TCP_CHECKSUM_OFFSET: Final = 16
_ACK: Final = 0x10
_PSH: Final = 0x08
_MAX_IP_PACKET: Final = 65535
_DF: Final = 0x4000
_FRAGMENT_BITS: Final = 0x3FFF  # MF and the fragment offset


_U16: Final = struct.Struct("!H")
_U32: Final = struct.Struct("!I")


class _Run:
    """Consecutive segments of one TCP flow, to be written as one super-packet.

    A segment joins when its header repeats the head's in all but the IPv4
    id and checksum, the sequence number (which must follow on), the TCP
    checksum, the lengths and PSH, and its payload is the head's size; a
    shorter one, or one with PSH, joins last. ``follows`` runs for every
    packet, so it is a handful of slice compares against templates cut from
    the head: ``fixed`` holds the parts that never change (with the lengths
    of a full segment), ``middle`` the addresses and first 16 TCP bytes with
    the expected sequence number written in.
    """

    __slots__ = (
        "segments",
        "ip_len",
        "header_len",
        "mss",
        "full",
        "next_seq",
        "size",
        "open",
        "fixed",
        "middle",
        "middle_at",
        "seq_at",
        "tail",
        "tail_at",
    )

    def __init__(self, head: bytes, ip_len: int, header_len: int) -> None:
        t = ip_len
        self.segments = [head]
        self.ip_len, self.header_len = ip_len, header_len
        self.full = len(head)
        self.mss = self.full - header_len
        self.next_seq = (_U32.unpack_from(head, t + 4)[0] + self.mss) & 0xFFFFFFFF
        self.size = self.full
        self.open = not head[t + 13] & _PSH
        if t == IPV4_HEADER_MIN:  # version..total length, flags..protocol; then addresses
            self.fixed = ((0, head[: IPV4_TOTAL_LENGTH + 2]), (IPV4_FRAGMENT, head[IPV4_FRAGMENT : IPV4_PROTOCOL + 1]))
            self.middle_at = IPV4_SRC.start
        else:  # version..hop limit; then addresses
            self.fixed = ((0, head[: IPV6_SRC.start]),)
            self.middle_at = IPV6_SRC.start
        self.middle = bytearray(head[self.middle_at : t + 16])
        self.seq_at = t + 4 - self.middle_at
        self.tail = head[t + 18 : header_len]  # urgent pointer and options
        self.tail_at = t + 18

    def follows(self, packet: bytes) -> bool:
        """Append ``packet`` if it continues the run."""
        if not self.open or self.size + self.mss > _MAX_IP_PACKET:
            return False
        middle = self.middle
        _U32.pack_into(middle, self.seq_at, self.next_seq)
        at = self.middle_at
        if (
            len(packet) == self.full
            and packet[at : at + len(middle)] == middle
            and packet.startswith(self.tail, self.tail_at)
            and all(packet.startswith(value, offset) for offset, value in self.fixed)
        ):
            self.segments.append(packet)
            self.size += self.mss
            self.next_seq = (self.next_seq + self.mss) & 0xFFFFFFFF
            return True
        return self._ends(packet)

    def _ends(self, packet: bytes) -> bool:
        """A shorter segment, or one with PSH, may join as the last."""
        t = self.ip_len
        n = len(packet)
        payload = n - self.header_len
        if not (
            0 < payload <= self.mss
            and self.size + payload <= _MAX_IP_PACKET
            and packet[t + 13] & ~_PSH == _ACK
            and (
                _U16.unpack_from(packet, IPV4_TOTAL_LENGTH)[0] == n
                if t == IPV4_HEADER_MIN
                else _U16.unpack_from(packet, IPV6_PAYLOAD_LENGTH)[0] == n - IPV6_HEADER
            )
        ):
            return False
        flags_at = t + 13 - self.middle_at
        middle = self.middle
        got = packet[self.middle_at : self.middle_at + len(middle)]
        if (
            got[:flags_at] != middle[:flags_at]
            or got[flags_at + 1 :] != middle[flags_at + 1 :]
            or not packet.startswith(self.tail, self.tail_at)
        ):
            return False
        # The fixed parts, but for the lengths of a shorter segment.
        head = self.segments[0]
        if t == IPV4_HEADER_MIN:
            same = packet[:IPV4_TOTAL_LENGTH] == head[:IPV4_TOTAL_LENGTH] and packet.startswith(
                head[IPV4_FRAGMENT : IPV4_PROTOCOL + 1], IPV4_FRAGMENT
            )
        else:
            same = packet[:IPV6_PAYLOAD_LENGTH] == head[:IPV6_PAYLOAD_LENGTH] and packet.startswith(
                head[IPV6_NEXT_HEADER : IPV6_SRC.start], IPV6_NEXT_HEADER
            )
        if not same:
            return False
        self.segments.append(packet)
        self.size += payload
        self.open = False
        return True

    def writes(self) -> list[Buffer]:
        """The run as one writev: virtio-net header, merged headers, payloads."""
        head = self.segments[0]
        if len(self.segments) == 1:
            return [PLAIN, head]
        ip_len, header_len = self.ip_len, self.header_len
        tcp_total = self.size - ip_len
        ip = bytearray(head[:ip_len])
        tcp = bytearray(head[ip_len:header_len])
        tcp[13] |= self.segments[-1][ip_len + 13] & _PSH
        if ip_len == IPV6_HEADER:
            _U16.pack_into(ip, IPV6_PAYLOAD_LENGTH, tcp_total)
            pseudo = ones_complement_sum(bytes(ip[IPV6_ADDRESSES]) + struct.pack("!IxxxB", tcp_total, IPPROTO_TCP))
            gso_type = GSO_TCPV6
        else:
            _U16.pack_into(ip, IPV4_TOTAL_LENGTH, self.size)
            _U16.pack_into(ip, IPV4_CHECKSUM, 0)
            _U16.pack_into(ip, IPV4_CHECKSUM, ipv4_header_checksum(ip))
            pseudo = ones_complement_sum(bytes(ip[IPV4_ADDRESSES]) + struct.pack("!xBH", IPPROTO_TCP, tcp_total))
            gso_type = GSO_TCPV4
        # CHECKSUM_PARTIAL convention: the folded pseudo-header sum, not inverted;
        # the kernel adds the header and payload when (if ever) it needs the sum.
        _U16.pack_into(tcp, _TCP_CHECKSUM_OFFSET, pseudo)
        header = HEADER.pack(F_NEEDS_CSUM, gso_type, header_len, self.mss, ip_len, _TCP_CHECKSUM_OFFSET)
        return [header, ip, tcp, *(memoryview(s)[header_len:] for s in self.segments)]


def _run(packet: bytes) -> _Run | None:
    """A run headed by ``packet`` if it is a TCP segment that may be merged
    (plain ACK or ACK+PSH, with payload, not a fragment), else None."""
    n = len(packet)
    if n < 41:
        return None
    first = packet[0]
    if first == 0x45:  # IPv4 without options
        frag = _U16.unpack_from(packet, IPV4_FRAGMENT)[0]
        if (
            packet[IPV4_PROTOCOL] != IPPROTO_TCP
            or _U16.unpack_from(packet, IPV4_TOTAL_LENGTH)[0] != n
            or frag & _FRAGMENT_BITS
            or not frag & _DF
        ):
            return None
        ip_len = IPV4_HEADER_MIN
    elif first >> 4 == 6:
        if (
            packet[IPV6_NEXT_HEADER] != IPPROTO_TCP
            or n < 61
            or _U16.unpack_from(packet, IPV6_PAYLOAD_LENGTH)[0] + IPV6_HEADER != n
        ):
            return None
        ip_len = IPV6_HEADER
    else:
        return None
    header_len = ip_len + (packet[ip_len + 12] >> 4) * 4
    if header_len < ip_len + 20 or header_len >= n or packet[ip_len + 13] & ~_PSH != _ACK:
        return None
    return _Run(packet, ip_len, header_len)


def coalesce(packets: Sequence[bytes]) -> list[list[Buffer]]:
    """Writes for an IFF_VNET_HDR TUN: each a list of buffers for one ``writev``,
    starting with its virtio-net header, in the order of ``packets``."""
    writes: list[list[Buffer]] = []
    run: _Run | None = None
    for packet in packets:
        if run is not None:
            if run.follows(packet):
                continue
            writes.append(run.writes())
        run = _run(packet)
        if run is None:
            writes.append([PLAIN, packet])
    if run is not None:
        writes.append(run.writes())
    return writes

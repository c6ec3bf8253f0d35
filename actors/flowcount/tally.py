"""Traffic counts taken where the packets are, sans-IO.

tun-io and the crypto workers tally inner IP packets per connection,
magicsock and the crypto workers underlay datagrams per endpoint. The hot
path does one dict update per packet, keyed on a slice of the raw header;
nothing is decoded until netlog reads the counts. A connection key is
proto(1) + src + dst + sport(2) + dport(2): 13 bytes for IPv4, 37 for IPv6,
in the packet's own direction. Protocols without ports (ICMP) and later
fragments have zero ports.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Hashable, Iterable
from typing import Any

from meshsup.actors.kernel.types import Buffer
from meshsup.actors.wire import ip
from meshsup.actors.wire.ip import (
    IPPROTO_TCP,
    IPPROTO_UDP,
    IPV4_DST,
    IPV4_FRAGMENT,
    IPV4_PROTOCOL,
    IPV4_SRC,
    IPV6_DST,
    IPV6_NEXT_HEADER,
    IPV6_SRC,
)

INNER = "inner"  # FlowCounts.layer of tallied IP packets
UNDERLAY = "underlay"  # FlowCounts.layer of tallied underlay datagrams
UNREADABLE = b""  # the key of packets whose IP header cannot be read
# Entries per FlowCounts: at most about 70 KiB of msgpack (an IPv6 endpoint with
# 64-bit counts), under the data path's message limit (actors.bus.datapath.MAX_MESSAGE).
MAX_ENTRIES_PER_MESSAGE = 1024
_NO_PORTS = bytes(4)
# The fast path's keys, cut from headers without options or extension headers: addresses, then ports.
_IPV4_FLOW = slice(IPV4_SRC.start, IPV4_DST.stop + 4)
_IPV6_FLOW = slice(IPV6_SRC.start, IPV6_DST.stop + 4)
_IPV4_FLOW_END, _IPV6_FLOW_END = _IPV4_FLOW.stop, _IPV6_FLOW.stop
_IPV4_FRAGMENT_LOW = IPV4_FRAGMENT + 1  # the fragment offset's low byte
_ADDRESS_LENGTHS = {13: 4, 37: 16}  # key length -> address length
Entry = list[Any]  # [key, packets, bytes]
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def _merge(counts: dict[Hashable, list[int]], key: Hashable, packets: int, nbytes: int) -> None:
    total = counts.get(key)
    if total is None:
        counts[key] = [packets, nbytes]
    else:
        total[0] += packets
        total[1] += nbytes


class Tally:
    """Packets and bytes per key since the last drain. Counts nothing while disabled."""

    def __init__(self) -> None:
        self.enabled = False
        self._counts: dict[Hashable, list[int]] = {}

    def add(self, key: Hashable, packets: int, nbytes: int) -> None:
        if self.enabled:
            _merge(self._counts, key, packets, nbytes)

    def drain(self) -> list[Entry]:
        counts, self._counts = self._counts, {}
        return [[key, total[0], total[1]] for key, total in counts.items()]

    def restore(self, entries: Iterable[Entry]) -> None:
        """Put back drained entries that could not be delivered; the next drain has them."""
        for key, packets, nbytes in entries:
            self.add(key, packets, nbytes)


class PacketTally(Tally):
    """Per-connection counts of raw IP packets."""

    def __init__(self) -> None:
        super().__init__()
        # The common case, TCP and UDP without IP options or extension
        # headers, is keyed on one slice (addresses and ports) per protocol.
        self._tcp: dict[bytes, list[int]] = {}
        self._udp: dict[bytes, list[int]] = {}

    def add_packets(self, packets: Iterable[Buffer]) -> None:
        if not self.enabled:
            return
        tcp, udp, other = self._tcp, self._udp, self._counts
        for p in packets:
            n = len(p)
            if (
                n >= _IPV4_FLOW_END and p[0] == 0x45 and not (p[IPV4_FRAGMENT] & 0x1F or p[_IPV4_FRAGMENT_LOW])
            ):  # IPv4, first fragment
                proto, key = p[IPV4_PROTOCOL], p[_IPV4_FLOW]
            elif n >= _IPV6_FLOW_END and p[0] >> 4 == 6:
                proto, key = p[IPV6_NEXT_HEADER], p[_IPV6_FLOW]
            else:
                proto = -1
            table = tcp if proto == IPPROTO_TCP else udp if proto == IPPROTO_UDP else None
            if table is None:
                table, key = other, connection_key(p)
            total = table.get(key)
            if total is None:
                table[key] = [1, n]
            else:
                total[0] += 1
                total[1] += n

    def drain(self) -> list[Entry]:
        for prefix, table in ((b"\x06", self._tcp), (b"\x11", self._udp)):
            for key, (packets, nbytes) in table.items():
                _merge(self._counts, prefix + key, packets, nbytes)
            table.clear()
        return super().drain()


def connection_key(pkt: Buffer) -> bytes:
    """The key of any packet (the slow path); UNREADABLE if it has no IP header."""
    src, dst = ip.src_addr(pkt), ip.dst_addr(pkt)
    if src is None or dst is None:
        return UNREADABLE
    proto = ip.protocol(pkt)
    if proto is None:  # an unreadable extension chain or bad IHL: the header's own field
        proto = pkt[IPV4_PROTOCOL] if len(src) == 4 else pkt[IPV6_NEXT_HEADER]
    ports = ip.ports(pkt)
    port_bytes = ports[0].to_bytes(2, "big") + ports[1].to_bytes(2, "big") if ports else _NO_PORTS
    return bytes((proto,)) + src + dst + port_bytes


def decode_key(key: bytes, turn_around: bool = False) -> tuple[int, tuple[Address, int], tuple[Address, int]] | None:
    """(proto, src, dst) of a connection key, src and dst swapped if asked; None if malformed."""
    size = _ADDRESS_LENGTHS.get(len(key))
    if size is None:
        return None
    src = (ipaddress.ip_address(key[1 : 1 + size]), int.from_bytes(key[-4:-2], "big"))
    dst = (ipaddress.ip_address(key[1 + size : 1 + 2 * size]), int.from_bytes(key[-2:], "big"))
    return (key[0], dst, src) if turn_around else (key[0], src, dst)


def chunks(tx: list[Entry], rx: list[Entry]) -> list[tuple[list[Entry], list[Entry]]]:
    """Drained entries in (tx, rx) parts for FlowCounts: one part unless there are very many."""
    out = []
    while tx or rx:
        first_tx, tx = tx[:MAX_ENTRIES_PER_MESSAGE], tx[MAX_ENTRIES_PER_MESSAGE:]
        room = MAX_ENTRIES_PER_MESSAGE - len(first_tx)
        first_rx, rx = rx[:room], rx[room:]
        out.append((first_tx, first_rx))
    return out

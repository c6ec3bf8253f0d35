"""Traffic counts taken where the packets are, and read back by netlog (sans-IO).

tun-io tallies inner IP packets per connection, magicsock underlay
datagrams per endpoint. The hot path does one dict update per packet, keyed
on a slice of the raw header; nothing is decoded until netlog reads the
counts. A connection key is proto(1) + src + dst + sport(2) + dport(2):
13 bytes for IPv4, 37 for IPv6, in the packet's own direction. Protocols
without ports (ICMP) and later fragments have zero ports.
"""

from __future__ import annotations

import ipaddress
from collections import deque
from collections.abc import Hashable, Iterable
from typing import Any

from actors.bus.messages import FlowCounts
from actors.netlog.flows import Classifier, Conn, Endpoint, FlowTable, Traffic, format_endpoint, parse_endpoint
from actors.tunio import packet

INNER = "inner"  # FlowCounts.layer from tun-io
UNDERLAY = "underlay"  # FlowCounts.layer from magicsock
UNREADABLE = b""  # the key of packets whose IP header cannot be read
# Entries per FlowCounts: at most about 70 KiB of msgpack (an IPv6 endpoint with
# 64-bit counts), under the data path's message limit (actors.bus.datapath.MAX_MESSAGE).
MAX_ENTRIES_PER_MESSAGE = 1024
_NO_PORTS = bytes(4)
_ADDRESS_LENGTHS = {13: 4, 37: 16}  # key length -> address length
_MAX_CACHED_ROUTES = 1 << 18
Entry = list[Any]  # [key, packets, bytes]


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

    def add_packets(self, packets: Iterable[packet.Buffer]) -> None:
        if not self.enabled:
            return
        tcp, udp, other = self._tcp, self._udp, self._counts
        for p in packets:
            n = len(p)
            if n >= 24 and p[0] == 0x45 and not (p[6] & 0x1F or p[7]):  # IPv4, first fragment
                proto, key = p[9], p[12:24]
            elif n >= 44 and p[0] >> 4 == 6:
                proto, key = p[6], p[8:44]
            else:
                proto = -1
            table = tcp if proto == 6 else udp if proto == 17 else None
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


def connection_key(pkt: packet.Buffer) -> bytes:
    """The key of any packet (the slow path); UNREADABLE if it has no IP header."""
    src, dst = packet.src_addr(pkt), packet.dst_addr(pkt)
    if src is None or dst is None:
        return UNREADABLE
    proto = packet.protocol(pkt)
    if proto is None:  # an unreadable extension chain or bad IHL: the header's own field
        proto = pkt[9] if len(src) == 4 else pkt[6]
    ports = packet.ports(pkt)
    port_bytes = ports[0].to_bytes(2, "big") + ports[1].to_bytes(2, "big") if ports else _NO_PORTS
    return bytes((proto,)) + src + dst + port_bytes


def decode_key(key: bytes, turn_around: bool = False) -> tuple[int, Endpoint, Endpoint] | None:
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


class Deliveries:
    """Which FlowCounts netlog has logged already, so one sent again is counted once.

    A sender resends only what was not acknowledged, within seconds, so the
    last SEEN_PER_SENDER sequence numbers of each sender's run are enough.
    """

    SEEN_PER_SENDER = 1024

    def __init__(self) -> None:
        self._seen: dict[tuple[str, int], deque[int]] = {}

    def fresh(self, msg: FlowCounts) -> bool:
        """True the first time a message is seen (and remember it)."""
        seen = self._seen.setdefault((msg.source, msg.epoch), deque(maxlen=self.SEEN_PER_SENDER))
        if msg.seq in seen:
            return False
        seen.append(msg.seq)
        return True


def _valid_entry(entry: object) -> bool:
    return (
        type(entry) is list
        and len(entry) == 3
        and type(entry[1]) is int
        and type(entry[2]) is int
        and entry[1] >= 0
        and entry[2] >= 0
    )


class CountsReader:
    """Adds FlowCounts to a FlowTable, oriented from this node's side.

    Inner traffic: a received packet's key is turned around, so both
    directions of a connection meet under (proto, local end, remote end);
    a key is decoded and classified once, not once a window. Underlay
    traffic: each endpoint is reported under its peer's mesh address
    (`peers`, from the config), or the unspecified address when no
    configured peer has that endpoint.
    """

    def __init__(self) -> None:
        self.peers: dict[str, str] = {}  # "host:port" endpoint -> "mesh address:0"
        self.bad_entries = 0
        self.unreadable_packets = 0
        self._routes: dict[tuple[bytes, bool], tuple[Traffic, Conn] | None] = {}
        self._routed_by: Classifier | None = None

    def apply(self, msg: FlowCounts, table: FlowTable) -> bool:
        """False if the message's layer is unknown (nothing counted)."""
        if msg.layer not in (INNER, UNDERLAY):
            return False
        for entries, received in ((msg.tx, False), (msg.rx, True)):
            for entry in entries:
                if not _valid_entry(entry):
                    self.bad_entries += 1
                elif msg.layer == INNER:
                    self._inner(table, entry, received)
                else:
                    self._underlay(table, entry, received)
        return True

    def _inner(self, table: FlowTable, entry: Entry, received: bool) -> None:
        key, packets, nbytes = entry
        if key == UNREADABLE:
            self.unreadable_packets += packets
            return
        route = self._route(table.classifier, key, received)
        if route is None:
            self.bad_entries += 1
        elif received:
            table.add_routed(*route, 0, 0, packets, nbytes)
        else:
            table.add_routed(*route, packets, nbytes, 0, 0)

    def _route(self, rules: Classifier, key: object, received: bool) -> tuple[Traffic, Conn] | None:
        if not isinstance(key, bytes):
            return None
        if rules is not self._routed_by or len(self._routes) >= _MAX_CACHED_ROUTES:
            self._routes.clear()  # new rules; or a crude bound, as live connections come back at once
            self._routed_by = rules
        try:
            return self._routes[(key, received)]
        except KeyError:
            pass
        conn = decode_key(key, turn_around=received)
        route = self._routes[(key, received)] = None if conn is None else rules.route_endpoints(*conn)
        return route

    def _underlay(self, table: FlowTable, entry: Entry, received: bool) -> None:
        endpoint, packets, nbytes = entry
        if not (type(endpoint) is list and len(endpoint) == 2 and isinstance(endpoint[0], str)
                and type(endpoint[1]) is int):
            self.bad_entries += 1
            return
        host, port = endpoint
        text = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        parsed = parse_endpoint(text)
        if parsed is None:
            self.bad_entries += 1
            return
        dst = format_endpoint(*parsed)
        src = self.peers.get(dst) or ("[::]:0" if parsed[0].version == 6 else "0.0.0.0:0")
        if received:
            table.add_physical(src, dst, 0, 0, packets, nbytes)
        else:
            table.add_physical(src, dst, packets, nbytes, 0, 0)

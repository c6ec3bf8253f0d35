"""Flow aggregation into per-window records, after Tailscale's wgengine/netlog.

Sans-IO: counter deltas and `now` go in, JSON-ready records come out. A
record looks like Tailscale's netlogtype.Message:

    {"nodeId", "start", "end", "virtualTraffic", "subnetTraffic",
     "exitTraffic", "physicalTraffic"[, "dropped"]}

with entries {proto, src, dst, txPkts, txBytes, rxPkts, rxBytes} whose zero
fields are left out, as Go's `omitempty` does, and `rule`, the index of the
[[filter.rules]] entry that accepted the connection, on entries a rule
decided (meshsup's own field).
"""

from __future__ import annotations

import enum
import functools
import ipaddress
import json
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeGuard

from meshsup.actors.routing.prefixes import Prefixes
from meshsup.actors.settings.netlog import DEFAULT_MAX_RECORD_BYTES, MIN_RECORD_BYTES

Record = dict[str, Any]
Conn = tuple[int, str, str]  # (IP protocol number, "ip:port", "ip:port")
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Endpoint = tuple[IPAddress, int]
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_MAX_COUNTER = 2**64  # counters travel as IPFIX unsigned64


class Traffic(enum.Enum):
    """Where a connection's counts go; the value is the record key."""

    VIRTUAL = "virtualTraffic"
    SUBNET = "subnetTraffic"
    EXIT = "exitTraffic"
    PHYSICAL = "physicalTraffic"
    SKIPPED = "skipped"  # never reported: the node's own services


RECORD_KINDS = (Traffic.VIRTUAL, Traffic.SUBNET, Traffic.EXIT, Traffic.PHYSICAL)
_COUNT_KEYS = ("txPkts", "txBytes", "rxPkts", "rxBytes")
# Encoded size of a typical IPv4 entry with large counters, for closing a window early.
_ENTRY_ESTIMATE = 128


def rfc3339(t: float) -> str:
    """UTC timestamp with microseconds, e.g. 2024-05-01T12:00:00.250000Z."""
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def encode_record(record: Record) -> bytes:
    """Compact JSON; the size cap is measured on exactly these bytes."""
    return json.dumps(record, separators=(",", ":")).encode()


def parse_endpoint(text: object) -> Endpoint | None:
    """'1.2.3.4:80' or '[::1]:53' to (address, port); None when malformed."""
    return _parse_endpoint(text) if isinstance(text, str) else None


@functools.lru_cache(maxsize=1 << 16)  # the same endpoints come back window after window
def _parse_endpoint(text: str) -> Endpoint | None:
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit() or len(port_text) > 5:
        return None
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    port = int(port_text)
    if port > 65535 or (address.version == 6) != text.startswith("["):
        return None
    return address, port


def format_endpoint(address: IPAddress, port: int) -> str:
    return f"[{address}]:{port}" if address.version == 6 else f"{address}:{port}"


class Classifier:
    """Decides which part of a record a connection belongs to.

    Both ends in the mesh: virtual. One end behind a peer's subnet route:
    subnet. Anything else went through an exit node: exit, anonymised by
    default (addresses and ports dropped, counts merged per protocol).
    Traffic to or from the node's own service addresses is skipped, as
    Tailscale skips its service IP; a service on an address that also
    carries other traffic (DNS on the node's mesh address) is named by
    address and port instead.
    """

    def __init__(
        self,
        mesh_prefixes: Iterable[str | IPNetwork],
        subnet_prefixes: Iterable[str | IPNetwork],
        service_addresses: Iterable[str],
        anonymize_exit: bool = True,
        service_endpoints: Iterable[tuple[str, int]] = (),
    ) -> None:
        self.mesh = Prefixes(map(_network, mesh_prefixes))
        self.subnets = Prefixes(map(_network, subnet_prefixes))
        self.services = frozenset(ipaddress.ip_address(a) for a in service_addresses)
        self.service_endpoints = frozenset((ipaddress.ip_address(a), port) for a, port in service_endpoints)
        self.anonymize_exit = anonymize_exit

    def classify(self, src: IPAddress, dst: IPAddress) -> Traffic:
        if src in self.services or dst in self.services:
            return Traffic.SKIPPED
        if src in self.mesh and dst in self.mesh:
            return Traffic.VIRTUAL
        if src in self.subnets or dst in self.subnets:
            return Traffic.SUBNET
        return Traffic.EXIT

    def add(self, mesh: Iterable[IPNetwork], subnets: Iterable[IPNetwork]) -> None:
        """More networks (a peer's): a change of one peer among thousands costs its networks alone."""
        for network in mesh:
            self.mesh.add(network)
        for network in subnets:
            self.subnets.add(network)

    def remove(self, mesh: Iterable[IPNetwork], subnets: Iterable[IPNetwork]) -> None:
        """What `add` (or the constructor) took, out: once each."""
        for network in mesh:
            self.mesh.remove(network)
        for network in subnets:
            self.subnets.remove(network)

    def route(self, conn: Conn) -> tuple[Traffic, Conn] | None:
        """The traffic kind and the key the counts are merged under; None if malformed."""
        proto, src_text, dst_text = conn
        src, dst = parse_endpoint(src_text), parse_endpoint(dst_text)
        if src is None or dst is None or not 0 <= proto <= 255:
            return None
        return self.route_endpoints(proto, src, dst)

    def route_endpoints(self, proto: int, src: Endpoint, dst: Endpoint) -> tuple[Traffic, Conn]:
        """`route` for a connection whose ends are parsed already."""
        if src in self.service_endpoints or dst in self.service_endpoints:
            return Traffic.SKIPPED, (proto, "", "")
        kind = self.classify(src[0], dst[0])
        if kind is Traffic.EXIT and self.anonymize_exit:
            return kind, (proto, "", "")
        return kind, (proto, format_endpoint(*src), format_endpoint(*dst))


def _network(prefix: str | IPNetwork) -> IPNetwork:
    """A prefix as given (a node's thousands of peers' are parsed already), or parsed."""
    return (
        prefix
        if isinstance(prefix, (ipaddress.IPv4Network, ipaddress.IPv6Network))
        else ipaddress.ip_network(prefix, strict=False)
    )


@dataclass
class FlowCounters:
    """What the table refused or set aside, for the actor's metrics."""

    bad_input: int = 0  # malformed connection or counts: dropped
    skipped: int = 0  # deltas to/from the node's own services
    records: int = 0  # records produced
    split_records: int = 0  # extra records because a window exceeded the size cap


def _valid_counts(counts: tuple[object, object, object, object]) -> bool:
    a, b, c, d = counts  # spelled out: this runs for every delta
    if type(a) is not int or type(b) is not int or type(c) is not int or type(d) is not int:
        return False
    return 0 <= min(a, b, c, d) and max(a, b, c, d) < _MAX_COUNTER


def _is_conn(conn: object) -> TypeGuard[Conn]:
    return (
        type(conn) is tuple
        and len(conn) == 3
        and type(conn[0]) is int
        and isinstance(conn[1], str)
        and isinstance(conn[2], str)
    )


def _has_traffic(record: Record) -> bool:
    return any(kind.value in record for kind in RECORD_KINDS)


def _entry(key: Conn, counts: list[int], rule: int | None) -> Record:
    proto, src, dst = key
    entry: Record = {}
    if proto:
        entry["proto"] = proto
    if src:
        entry["src"] = src
    if dst:
        entry["dst"] = dst
    entry.update((k, v) for k, v in zip(_COUNT_KEYS, counts) if v)
    if rule is not None:
        entry["rule"] = rule
    return entry


class FlowTable:
    """Accumulates deltas for one window at a time; `close_window` emits records."""

    def __init__(
        self,
        node_id: str,
        classifier: Classifier,
        start: float,
        max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
    ) -> None:
        if max_record_bytes < MIN_RECORD_BYTES:
            raise ValueError(f"max_record_bytes must be at least {MIN_RECORD_BYTES}")
        self.node_id = node_id
        self.classifier = classifier
        self.max_record_bytes = max_record_bytes
        self.counters = FlowCounters()
        self._start = start
        self._pending_dropped = 0
        # Per-window cache so a connection is parsed and classified once.
        self._routes: dict[Conn, tuple[Traffic, Conn]] = {}
        self._counts: dict[Traffic, dict[Conn, list[int]]] = {k: {} for k in RECORD_KINDS}
        # The filter rule that accepted each connection, said once, when it did: kept while the
        # connection has traffic in every window, so no more than a window's entries.
        self._rules: dict[Conn, int] = {}

    def __len__(self) -> int:
        """Entries in the current window."""
        return sum(len(entries) for entries in self._counts.values())

    def full(self) -> bool:
        """The window holds about a record's worth of entries: time to close it early."""
        return len(self) * _ENTRY_ESTIMATE >= self.max_record_bytes

    def set_classifier(self, classifier: Classifier) -> None:
        """New rules (a reload) for the deltas still to come in this window."""
        self.classifier = classifier
        self._routes.clear()

    def add(self, conn: Conn, tx_pkts: int, tx_bytes: int, rx_pkts: int, rx_bytes: int) -> None:
        """Add one connection's deltas (tx = src to dst) to the current window."""
        route = self._route(conn)
        if route is None:
            self.counters.bad_input += 1
            return
        self.add_routed(*route, tx_pkts, tx_bytes, rx_pkts, rx_bytes)

    def add_routed(self, kind: Traffic, key: Conn, tx_pkts: int, tx_bytes: int, rx_pkts: int, rx_bytes: int) -> None:
        """Add deltas already routed by this table's classifier (`Classifier.route`)."""
        counts = (tx_pkts, tx_bytes, rx_pkts, rx_bytes)
        if not _valid_counts(counts):
            self.counters.bad_input += 1
        elif kind is Traffic.SKIPPED:
            self.counters.skipped += 1
        else:
            self._accumulate(kind, key, counts)

    def note_rule(self, kind: Traffic, key: Conn, rule: int) -> None:
        """The filter rule that accepted a connection routed by this table's classifier. Not for
        anonymised exit traffic, whose entries merge many connections."""
        if kind is not Traffic.SKIPPED and key[1]:
            self._rules[key] = rule

    def add_physical(self, src: str, dst: str, tx_pkts: int, tx_bytes: int, rx_pkts: int, rx_bytes: int) -> None:
        """Underlay counts: src is the peer's mesh address ("ip:0"), dst its endpoint."""
        ends = parse_endpoint(src), parse_endpoint(dst)
        counts = (tx_pkts, tx_bytes, rx_pkts, rx_bytes)
        if ends[0] is None or ends[1] is None or not _valid_counts(counts):
            self.counters.bad_input += 1
            return
        self._accumulate(Traffic.PHYSICAL, (0, format_endpoint(*ends[0]), format_endpoint(*ends[1])), counts)

    def note_dropped(self, count: int) -> None:
        """Records were lost downstream; the next record carries the count."""
        if type(count) is int and count > 0:
            self._pending_dropped += count

    def close_window(self, now: float) -> list[Record]:
        """End the window at `now`: its records (none if idle), split to fit the size cap."""
        header: Record = {"nodeId": self.node_id, "start": rfc3339(self._start), "end": rfc3339(now)}
        self._start = now
        counts, self._counts = self._counts, {k: {} for k in RECORD_KINDS}
        self._routes.clear()
        rules = self._rules
        self._rules = {key: rule for key, rule in rules.items() if any(key in counts[k] for k in RECORD_KINDS)}
        if not self._pending_dropped and not any(counts.values()):
            return []  # an idle window has nothing to report
        records = [dict(header, dropped=self._pending_dropped) if self._pending_dropped else dict(header)]
        self._pending_dropped = 0
        size = len(encode_record(records[0]))
        for kind in RECORD_KINDS:
            for key in sorted(counts[kind]):
                entry = _entry(key, counts[kind][key], rules.get(key))
                entry_size = len(encode_record(entry))
                record = records[-1]
                # A new list costs ,"kind":[] around the entry; a further entry a comma.
                cost = entry_size + (1 if kind.value in record else len(kind.value) + 6)
                if size + cost > self.max_record_bytes and _has_traffic(record):
                    record = dict(header)
                    records.append(record)
                    size = len(encode_record(record))
                    cost = entry_size + len(kind.value) + 6
                    self.counters.split_records += 1
                record.setdefault(kind.value, []).append(entry)
                size += cost
        self.counters.records += len(records)
        return records

    def _route(self, conn: object) -> tuple[Traffic, Conn] | None:
        if not _is_conn(conn):
            return None
        route = self._routes.get(conn)
        if route is None:
            route = self.classifier.route(conn)
            if route is not None:
                self._routes[conn] = route
        return route

    def _accumulate(self, kind: Traffic, key: Conn, counts: tuple[int, int, int, int]) -> None:
        table = self._counts[kind]
        total = table.get(key)
        if total is None:
            table[key] = list(counts)
            return
        total[0] += counts[0]
        total[1] += counts[1]
        total[2] += counts[2]
        total[3] += counts[3]
        if max(total) >= _MAX_COUNTER:  # saturate rather than wrap
            total[:] = [min(t, _MAX_COUNTER - 1) for t in total]

"""Reading back the counts the data path tallied (sans-IO): netlog's side of
actors.flowcount. Inner keys are decoded and classified once; underlay
endpoints are reported under their peer's mesh address."""

from __future__ import annotations

from collections import deque

from meshsup.actors.bus.messages import FlowCounts
from meshsup.actors.flowcount.tally import INNER, UNDERLAY, UNREADABLE, Entry, decode_key
from meshsup.actors.netlog.flows import Classifier, Conn, FlowTable, Traffic, format_endpoint, parse_endpoint

_MAX_CACHED_ROUTES = 1 << 18
_ICMP_ECHO = (b"\x01", b"\x3a")  # ICMP, ICMPv6: the filter keys echo by its identifier, tallies by no ports


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
    configured peer has that endpoint; what a relay carried comes keyed
    [relay address, relay number, peer key] and is reported under that
    peer's address (`key_peers`), the relay as the endpoint.
    """

    def __init__(self) -> None:
        self.peers: dict[str, str] = {}  # "host:port" endpoint -> "mesh address:0"
        self.key_peers: dict[bytes, str] = {}  # peer key -> "mesh address:0"
        self.bad_entries = 0
        self.unreadable_packets = 0
        self._routes: dict[tuple[bytes, bool], tuple[Traffic, Conn] | None] = {}
        self._routed_by: Classifier | None = None

    def apply(self, msg: FlowCounts, table: FlowTable) -> bool:
        """False if the message's layer is unknown (nothing counted)."""
        if msg.layer not in (INNER, UNDERLAY):
            return False
        if msg.layer == INNER:
            for decided in msg.rules:
                self._rule(table, decided)
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

    def _rule(self, table: FlowTable, decided: object) -> None:
        if not (
            type(decided) is list
            and len(decided) == 2
            and isinstance(decided[0], bytes)
            and type(decided[1]) is int
            and decided[1] >= 0
        ):
            self.bad_entries += 1
            return
        key, rule = decided
        if key[:1] in _ICMP_ECHO and len(key) in (13, 37):  # the filter's echo identifier: no ports here
            key = key[:-4] + bytes(4)
        route = self._route(table.classifier, key, False)
        if route is None:
            self.bad_entries += 1
        else:
            table.note_rule(*route, rule)

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

    def forget_routes(self) -> None:
        """The rules changed in place (a change of peers): what they routed before is not kept."""
        self._routes.clear()

    def _underlay(self, table: FlowTable, entry: Entry, received: bool) -> None:
        endpoint, packets, nbytes = entry
        if not (
            type(endpoint) is list
            and (len(endpoint) == 2 or len(endpoint) == 3 and isinstance(endpoint[2], bytes))
            and isinstance(endpoint[0], str)
            and type(endpoint[1]) is int
        ):
            self.bad_entries += 1
            return
        host, port = endpoint[0], endpoint[1]
        text = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        parsed = parse_endpoint(text)
        if parsed is None:
            self.bad_entries += 1
            return
        dst = format_endpoint(*parsed)
        peer = self.key_peers.get(endpoint[2]) if len(endpoint) == 3 else self.peers.get(dst)
        src = peer or ("[::]:0" if parsed[0].version == 6 else "0.0.0.0:0")
        if received:
            table.add_physical(src, dst, 0, 0, packets, nbytes)
        else:
            table.add_physical(src, dst, packets, nbytes, 0, 0)

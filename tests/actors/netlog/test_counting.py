"""Counting where the packets are, and netlog reading the counts back: unit tests of the sans-IO parts."""

from __future__ import annotations

import dataclasses
import ipaddress
import struct
from pathlib import Path
from typing import Any

import pytest

from meshsup.actors.bus import datapath
from meshsup.actors.bus.codec import decode, encode
from meshsup.actors.bus.messages import FlowCounts, FlowCountsAck
from meshsup.actors.flowcount.feed import FlowFeed
from meshsup.actors.flowcount.tally import (
    INNER,
    MAX_ENTRIES_PER_MESSAGE,
    UNDERLAY,
    UNREADABLE,
    PacketTally,
    Tally,
    chunks,
    connection_key,
    decode_key,
)
from meshsup.actors.netlog.counting import CountsReader, Deliveries
from meshsup.actors.netlog.flows import FlowTable
from meshsup.actors.netlog.mesh import classifier, endpoint_peers, key_peers
from meshsup.actors.netlog.wal import WindowLog
from meshsup.actors.settings import Settings, parse
from meshsup.actors.settings.keys import b64, generate_private, public_of
from meshsup.actors.settings.netlog import netlog_settings

T0 = 1_700_000_000.0
A4, B4 = "100.64.0.1", "100.64.0.2"
A6, B6 = "fd7a:115c:a1e0::1", "fd7a:115c:a1e0::2"


def ipv4(src: str, dst: str, proto: int, payload: bytes, frag: int = 0, options: bytes = b"") -> bytes:
    ihl = (20 + len(options)) // 4
    total = 20 + len(options) + len(payload)
    header = struct.pack(
        "!BBHHHBBH4s4s",
        0x40 | ihl,
        0,
        total,
        1,
        frag,
        64,
        proto,
        0,
        ipaddress.ip_address(src).packed,
        ipaddress.ip_address(dst).packed,
    )
    return header + options + payload


def ipv6(src: str, dst: str, next_header: int, payload: bytes) -> bytes:
    return (
        struct.pack(
            "!IHBB16s16s",
            6 << 28,
            len(payload),
            next_header,
            64,
            ipaddress.ip_address(src).packed,
            ipaddress.ip_address(dst).packed,
        )
        + payload
    )


def ports(sport: int, dport: int, rest: int = 16) -> bytes:
    return struct.pack("!HH", sport, dport) + bytes(rest)


def config(collectors: bool = True, **netlog: Any) -> Settings:
    return parse(
        "test.toml",
        {
            "node": {"name": "alpha", "private_key": b64(generate_private()), "addresses": [f"{A4}/32", f"{A6}/128"]},
            "peers": [
                {
                    "name": "bravo",
                    "public_key": b64(public_of(generate_private())),
                    "allowed_ips": [f"{B4}/32", f"{B6}/128", "10.20.0.0/16", "0.0.0.0/0"],
                    "endpoints": ["198.51.100.2:51820"],
                }
            ],
            "dns": {"listen": [f"{A4}:53"]},
            "netlog": {
                "collectors": [{"kind": "ipfix", "address": "udp://127.0.0.1:4739"}] if collectors else [],
                **netlog,
            },
        },
        Path("."),
        Path("."),
    )


def tallied(tally: Tally) -> dict[Any, tuple[int, int]]:
    return {key: (packets, nbytes) for key, packets, nbytes in tally.drain()}


# --- the hot path -------------------------------------------------------------


def test_packets_are_tallied_per_connection_in_their_own_direction() -> None:
    tally = PacketTally()
    tally.enabled = True
    tcp = ipv4(A4, B4, 6, ports(40000, 5201, 1000))
    tally.add_packets([tcp, tcp, ipv4(A4, B4, 17, ports(5353, 53)), ipv4(A4, B4, 1, b"\x08\0\x12\x34" + bytes(60))])
    tally.add_packets([ipv4(A4, B4, 1, b"\x08\0\x56\x78" + bytes(60))])  # another checksum: the same flow
    tally.add_packets([ipv6(A6, B6, 6, ports(40001, 443, 100))])
    key4 = ipaddress.ip_address(A4).packed + ipaddress.ip_address(B4).packed
    key6 = ipaddress.ip_address(A6).packed + ipaddress.ip_address(B6).packed
    assert tallied(tally) == {
        b"\x06" + key4 + ports(40000, 5201, 0): (2, 2 * 1024),
        b"\x11" + key4 + ports(5353, 53, 0): (1, 40),
        b"\x01" + key4 + bytes(4): (2, 2 * 84),
        b"\x06" + key6 + ports(40001, 443, 0): (1, 40 + 104),
    }
    assert tally.drain() == []  # drained means gone


def test_options_fragments_and_extension_headers_take_the_slow_path_to_the_same_keys() -> None:
    payload = ports(1000, 80, 8)
    fast = ipv4(A4, B4, 6, payload)
    with_options = ipv4(A4, B4, 6, payload, options=b"\x01" * 4)  # NOPs: IHL 6
    later_fragment = ipv4(A4, B4, 6, b"\xde\xad\xbe\xef" + bytes(20), frag=0x0010)
    hop_by_hop = b"\x06\x00" + bytes(6)  # next header TCP, 8 bytes
    v6_ext = ipv6(A6, B6, 0, hop_by_hop + payload)
    for pkt, expected in [
        (with_options, connection_key(fast)),
        (v6_ext, connection_key(ipv6(A6, B6, 6, payload))),
        (later_fragment, b"\x06" + connection_key(fast)[1:9] + bytes(4)),
    ]:
        tally = PacketTally()
        tally.enabled = True
        tally.add_packets([pkt, fast])
        counts = tallied(tally)
        assert expected in counts, (pkt.hex(), counts)
    assert connection_key(b"") == connection_key(b"\x45\x00") == UNREADABLE


def test_a_disabled_tally_counts_nothing_and_undelivered_counts_come_back() -> None:
    tally = PacketTally()
    tally.add_packets([ipv4(A4, B4, 17, ports(1, 2))])
    tally.add(b"k", 1, 1)
    assert tally.drain() == []
    tally.enabled = True
    tally.add_packets([ipv4(A4, B4, 17, ports(1, 2))])
    drained = tally.drain()
    tally.restore(drained)
    tally.restore(drained)
    [(key, packets, nbytes)] = tally.drain()
    assert (packets, nbytes) == (2, 2 * 40)


def test_keys_decode_to_connections_turned_around_for_received_packets() -> None:
    a, b = ipaddress.ip_address(A4), ipaddress.ip_address(B4)
    key = connection_key(ipv4(A4, B4, 6, ports(40000, 5201)))
    assert decode_key(key) == (6, (a, 40000), (b, 5201))
    assert decode_key(key, turn_around=True) == (6, (b, 5201), (a, 40000))
    key6 = connection_key(ipv6(A6, B6, 17, ports(5353, 53)))
    assert decode_key(key6) == (17, (ipaddress.ip_address(A6), 5353), (ipaddress.ip_address(B6), 53))
    assert decode_key(b"\x06" + bytes(11)) is None


def counts(layer: str, tx: list[Any], rx: list[Any], seq: int = 1, source: str = "tun-io") -> FlowCounts:
    return FlowCounts(source=source, epoch=7, seq=seq, layer=layer, tx=tx, rx=rx)


def test_many_connections_are_split_over_several_messages() -> None:
    tx = [[i.to_bytes(13, "big"), 1, 100] for i in range(MAX_ENTRIES_PER_MESSAGE + 10)]
    rx = [[b"r" * 13, 2, 200]]
    parts = chunks(tx, rx)
    assert [(len(t), len(r)) for t, r in parts] == [(MAX_ENTRIES_PER_MESSAGE, 0), (10, 1)]
    assert chunks([], []) == []
    msg = counts(INNER, *parts[0])
    assert decode(encode(msg)) == msg and len(encode(msg)) < datapath.MAX_MESSAGE


def test_a_message_sent_again_is_counted_once() -> None:
    deliveries = Deliveries()
    assert deliveries.fresh(counts(INNER, [], [], seq=1))
    assert not deliveries.fresh(counts(INNER, [], [], seq=1))
    assert deliveries.fresh(counts(INNER, [], [], seq=1, source="magicsock"))
    assert deliveries.fresh(FlowCounts(source="tun-io", epoch=8, seq=1, layer=INNER, tx=[], rx=[]))  # restarted


# --- netlog reading the counts -------------------------------------------------


def test_both_directions_meet_under_the_local_end_and_endpoints_name_their_peer() -> None:
    reader = CountsReader()
    reader.peers = endpoint_peers(config())
    table = FlowTable("node-a", classifier(config(), anonymize_exit=True), start=T0)
    out = connection_key(ipv4(A4, B4, 6, ports(40000, 22)))
    back = connection_key(ipv4(B4, A4, 6, ports(22, 40000)))
    dns = connection_key(ipv4(B4, A4, 17, ports(3333, 53)))  # bravo asking alpha's own DNS
    assert reader.apply(counts(INNER, [[out, 3, 300]], [[back, 2, 120], [dns, 1, 60]]), table)
    assert reader.apply(
        counts(UNDERLAY, [[["198.51.100.2", 51820], 5, 700]], [[["198.51.100.9", 4000], 1, 148]]), table
    )
    assert reader.apply(counts(INNER, [[UNREADABLE, 4, 80], ["bad"], [b"short", 1, 1]], []), table)
    assert not reader.apply(counts("other", [], []), table)
    [record] = table.close_window(T0 + 1)
    assert record["virtualTraffic"] == [
        {"proto": 6, "src": f"{A4}:40000", "dst": f"{B4}:22", "txPkts": 3, "txBytes": 300, "rxPkts": 2, "rxBytes": 120}
    ]
    assert record["physicalTraffic"] == [
        {"src": "0.0.0.0:0", "dst": "198.51.100.9:4000", "rxPkts": 1, "rxBytes": 148},  # no configured peer
        {"src": f"{B4}:0", "dst": "198.51.100.2:51820", "txPkts": 5, "txBytes": 700},
    ]
    assert table.counters.skipped == 1  # the DNS query
    assert (reader.unreadable_packets, reader.bad_entries) == (4, 2)


def test_what_a_relay_carried_is_the_peers_with_the_relay_as_its_endpoint() -> None:
    settings = config()
    reader = CountsReader()
    reader.peers, reader.key_peers = endpoint_peers(settings), key_peers(settings)
    table = FlowTable("node-a", classifier(settings, anonymize_exit=True), start=T0)
    bravo, stranger = settings.peers[0].public_key, bytes(32)
    assert reader.apply(
        counts(UNDERLAY, [[["127.3.3.40", 1, bravo], 4, 600]], [[["127.3.3.40", 1, bravo], 3, 400]]), table
    )
    odd = [[["127.3.3.40", 2, stranger], 1, 100], [["127.3.3.40", 1, 7], 1, 1]]
    assert reader.apply(counts(UNDERLAY, odd, []), table)
    [record] = table.close_window(T0 + 1)
    assert record["physicalTraffic"] == [
        {"src": "0.0.0.0:0", "dst": "127.3.3.40:2", "txPkts": 1, "txBytes": 100},  # no peer has that key
        {"src": f"{B4}:0", "dst": "127.3.3.40:1", "txPkts": 4, "txBytes": 600, "rxPkts": 3, "rxBytes": 400},
    ]
    assert reader.bad_entries == 1  # a third part that is no key


def icmp_echo(src: str, dst: str, ident: int) -> bytes:
    return ipv4(src, dst, 1, bytes((8, 0, 0, 0)) + struct.pack("!HH", ident, 1))


def test_the_rule_that_accepted_a_connection_is_on_its_entry() -> None:
    reader = CountsReader()
    table = FlowTable("node-a", classifier(config(), anonymize_exit=True), start=T0)
    ssh_in = connection_key(ipv4(B4, A4, 6, ports(40000, 22)))  # bravo opened it
    ssh_out = connection_key(ipv4(A4, B4, 6, ports(22, 40000)))
    ping_in = connection_key(icmp_echo(B4, A4, 77))  # the tally's key: no ports
    exit_out = connection_key(ipv4(A4, "203.0.113.5", 17, ports(5000, 53)))
    web = connection_key(ipv4(A4, B4, 6, ports(41000, 80)))  # opened here: no rule
    # The filter's keys, as the node sends: the ICMP echo identifier in both port places.
    decided = [[ssh_out, 1], [connection_key(icmp_echo(A4, B4, 0))[:-4] + struct.pack("!HH", 77, 77), 0]]
    bad = [["x"], [ssh_out, -1], [ssh_out, "1"], [b"short", 2]]
    tx, rx = [[ssh_out, 2, 200], [exit_out, 1, 60], [web, 1, 60]], [[ssh_in, 3, 300], [ping_in, 1, 84]]
    msg = FlowCounts(
        source="crypto-0", epoch=7, seq=1, layer=INNER, tx=tx, rx=rx, rules=[*decided, [exit_out, 2], *bad]
    )
    through_the_bus = decode(encode(msg))
    assert isinstance(through_the_bus, FlowCounts) and reader.apply(through_the_bus, table)
    [record] = table.close_window(T0 + 1)
    assert record["virtualTraffic"] == [
        {"proto": 1, "src": f"{A4}:0", "dst": f"{B4}:0", "rxPkts": 1, "rxBytes": 84, "rule": 0},
        {
            "proto": 6,
            "src": f"{A4}:22",
            "dst": f"{B4}:40000",
            "txPkts": 2,
            "txBytes": 200,
            "rxPkts": 3,
            "rxBytes": 300,
            "rule": 1,
        },
        {"proto": 6, "src": f"{A4}:41000", "dst": f"{B4}:80", "txPkts": 1, "txBytes": 60},
    ]
    assert record["exitTraffic"] == [{"proto": 17, "txPkts": 1, "txBytes": 60}]  # merged: no one rule
    assert reader.bad_entries == 4


def test_a_connections_rule_stays_while_it_has_traffic_in_every_window() -> None:
    reader = CountsReader()
    table = FlowTable("node-a", classifier(config(), anonymize_exit=True), start=T0)
    ssh = connection_key(ipv4(A4, B4, 6, ports(22, 40000)))
    web = connection_key(ipv4(A4, B4, 6, ports(80, 40001)))
    seq = iter(range(1, 100))

    def window(tx: list[Any], rules: list[Any], end: float) -> list[Any]:
        msg = FlowCounts(source="crypto-0", epoch=7, seq=next(seq), layer=INNER, tx=tx, rx=[], rules=rules)
        assert reader.apply(msg, table)
        return [r.get("virtualTraffic") for r in table.close_window(end)]

    assert window([[ssh, 1, 60]], [[ssh, 4], [web, 5]], T0 + 1) == [
        [{"proto": 6, "src": f"{A4}:22", "dst": f"{B4}:40000", "txPkts": 1, "txBytes": 60, "rule": 4}]
    ]
    both = [[ssh, 1, 60], [web, 1, 60]]  # web's rule came in a window it had no traffic: forgotten
    assert window(both, [], T0 + 2) == [
        [
            {"proto": 6, "src": f"{A4}:22", "dst": f"{B4}:40000", "txPkts": 1, "txBytes": 60, "rule": 4},
            {"proto": 6, "src": f"{A4}:80", "dst": f"{B4}:40001", "txPkts": 1, "txBytes": 60},
        ]
    ]
    assert window([], [], T0 + 3) == []  # idle: ssh's rule goes with it
    assert window([[ssh, 1, 60]], [], T0 + 4) == [
        [{"proto": 6, "src": f"{A4}:22", "dst": f"{B4}:40000", "txPkts": 1, "txBytes": 60}]
    ]


def test_the_config_says_what_is_virtual_subnet_exit_or_the_nodes_own_service() -> None:
    rules = classifier(config(), anonymize_exit=True)
    table = FlowTable("node-a", rules, start=T0)
    table.add((1, f"{A4}:0", f"{B4}:0"), 1, 84, 1, 84)
    table.add((1, f"{A4}:0", "10.20.0.1:0"), 1, 84, 0, 0)
    table.add((1, f"{A4}:0", "203.0.113.5:0"), 1, 84, 0, 0)
    table.add((17, f"{A4}:53", f"{B4}:3333"), 0, 0, 1, 60)
    [record] = table.close_window(T0 + 1)
    assert [e["dst"] for e in record["virtualTraffic"]] == [f"{B4}:0"]
    assert [e["dst"] for e in record["subnetTraffic"]] == ["10.20.0.1:0"]
    assert record["exitTraffic"] == [{"proto": 1, "txPkts": 1, "txBytes": 84}]
    assert table.counters.skipped == 1


@pytest.mark.parametrize(
    "netlog, logging, message",
    [
        ({"interval": 0}, {}, r"^netlog\.interval: "),
        ({"anonymize_exit": "yes"}, {}, r"^netlog\.anonymize_exit: "),
        ({"max_record_bytes": 10}, {}, r"^netlog\.max_record_bytes: "),
        ({"colour": 1}, {}, r"^netlog\.colour: unknown key"),
        ({}, {"level": "loud"}, r"^logging\.level: "),
        ({}, {"collectors": [{"kind": "ipfix", "address": "udp://127.0.0.1:1"}]}, r"^logging\.collectors\[0\]\.kind: "),
    ],
)
def test_wrong_netlog_and_logging_tables_are_refused_naming_the_key(
    netlog: dict[str, Any], logging: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        netlog_settings(netlog, logging, None)


# --- tun-io's and magicsock's feed -------------------------------------------------


class FakeOutbox:
    def __init__(self) -> None:
        self.sent: list[FlowCounts] = []
        self.refuse = False

    def connect(self, names: list[str]) -> None:
        pass

    def send(self, to: str, msg: FlowCounts) -> bool:
        if self.refuse:
            return False
        self.sent.append(msg)
        return True


class FakeActor:
    name = "magicsock"

    def __init__(self) -> None:
        self.outbox = FakeOutbox()

    def accept_from_unprivileged(self, *types: type) -> None:
        pass


def test_the_feed_flushes_once_per_period_and_loses_nothing_netlog_did_not_take() -> None:
    actor = FakeActor()
    sent = actor.outbox.sent
    feed = FlowFeed(actor, UNDERLAY)  # type: ignore[arg-type]
    feed.configure(config(interval=2))
    assert feed.period == 0.5
    feed.rx.add(("198.51.100.2", 51820), 2, 300)
    actor.outbox.refuse = True
    feed.tick(10.0)  # netlog restarting: nothing left, it goes back into the tally
    feed.tx.add(("198.51.100.2", 51820), 1, 100)
    actor.outbox.refuse = False
    feed.tick(10.2)  # not yet due
    assert sent == []
    feed.tick(10.5)
    [msg] = sent
    assert (msg.source, msg.layer, msg.tx, msg.rx) == (
        "magicsock",
        UNDERLAY,
        [[("198.51.100.2", 51820), 1, 100]],
        [[("198.51.100.2", 51820), 2, 300]],
    )
    feed.tick(11.0)  # no acknowledgement yet, but not for long enough
    assert sent == [msg]
    feed.tick(11.5)  # netlog died before logging it: the same message again
    assert sent == [msg, msg]
    assert feed.take(FlowCountsAck(epoch=msg.epoch + 1, seq=msg.seq))  # a previous run's: ignored
    assert feed.take(FlowCountsAck(epoch=msg.epoch, seq=msg.seq)) and not feed.take(msg)
    feed.tick(13.0)
    assert sent == [msg, msg]
    feed.configure(config(collectors=False))  # no collectors: no counting at all
    feed.rx.add(("198.51.100.2", 51820), 2, 300)
    feed.tick(20.0)
    assert len(sent) == 2


def test_the_filter_rules_that_accepted_connections_go_with_the_counts_and_come_back_if_refused() -> None:
    actor = FakeActor()
    feed = FlowFeed(actor, INNER)  # type: ignore[arg-type]
    feed.configure(config(interval=2))
    key = b"\x06" + bytes(8) + b"\x0f\xa0\x00\x16"
    feed.rules[key] = 3
    actor.outbox.refuse = True
    feed.tick(10.0)  # no traffic counted here (tun-io wrote it), yet the rule is sent: refused, kept
    actor.outbox.refuse = False
    feed.tick(10.5)
    msg = decode(encode(actor.outbox.sent[0]))  # through the bus codec
    assert isinstance(msg, FlowCounts) and (msg.tx, msg.rx, msg.rules) == ([], [], [[key, 3]])
    feed.tick(11.0)
    assert len(actor.outbox.sent) == 1  # nothing new


# --- the open window's log -------------------------------------------------------------


def test_the_window_log_gives_back_its_window_and_ignores_a_torn_tail(tmp_path: Path) -> None:
    path = tmp_path / "netlog" / "window.wal"
    log = WindowLog(path)
    assert log.recover(T0) == (T0, [])
    frames = [encode(counts(INNER, [[b"k" * 13, i, i]], [], seq=i)) for i in range(3)]
    for frame in frames:
        log.append(frame)
    log.close()
    path.write_bytes(path.read_bytes() + b"\x00\x00\x01\x00partial")  # a kill mid-write
    again = WindowLog(path)
    assert again.recover(T0 + 9) == (T0, frames)
    assert again.torn == 1
    again.append(frames[0])  # appends after the cut, not after the torn bytes
    assert WindowLog(path).recover(T0 + 9) == (T0, [*frames, frames[0]])
    again.reset(T0 + 5)
    assert WindowLog(path).recover(T0 + 9) == (T0 + 5, [])
    again.remove()
    assert WindowLog(path).recover(T0 + 9) == (T0 + 9, [])


def test_a_node_serving_counts_its_own_routes_as_subnet_and_the_rest_as_anonymised_exit() -> None:
    settings = config()
    serving = dataclasses.replace(
        settings,
        node=dataclasses.replace(
            settings.node, advertise_routes=(ipaddress.ip_network("10.30.0.0/16"),), advertise_exit_node=True
        ),
    )
    table = FlowTable("node-a", classifier(serving, anonymize_exit=True), start=T0)
    table.add((6, f"{B4}:40000", "10.30.0.7:22"), 0, 0, 5, 500)  # a peer reaching the LAN behind this node
    table.add((6, f"{B4}:40001", "203.0.113.5:443"), 0, 0, 4, 400)  # and the internet through it
    [record] = table.close_window(T0 + 1)
    assert [e["dst"] for e in record["subnetTraffic"]] == ["10.30.0.7:22"]
    assert record["exitTraffic"] == [{"proto": 6, "rxPkts": 4, "rxBytes": 400}]

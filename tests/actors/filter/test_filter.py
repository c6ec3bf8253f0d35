"""The sans-IO filter: verdicts by rule and default, state both ways, timeouts, eviction,
the bytes of reject replies, and rule changes over live flows."""

from __future__ import annotations

import ipaddress
import random
import struct
import time
from typing import Any

import pytest

from meshsup.actors.filter.conntrack import TIMEOUTS
from meshsup.actors.filter.flowkey import flow_key
from meshsup.actors.filter.packetfilter import Filter
from meshsup.actors.settings import parse
from meshsup.actors.settings.filter import FilterSettings
from meshsup.actors.settings.keys import b64, generate_private, public_of
from meshsup.actors.wire.ip import ones_complement_sum

NODE, BRAVO, CHARLIE, OTHER = "100.64.0.1", "100.64.0.2", "100.64.0.3", "100.64.0.9"
NODE6, BRAVO6 = "fd7a:115c:a1e0::1", "fd7a:115c:a1e0::2"
TCP, UDP, ICMP, ICMPV6 = 6, 17, 1, 58
SYN, ACK, RST = 0x02, 0x10, 0x04


def settings(filter_table: dict[str, Any], tmp_path: Any) -> FilterSettings:
    doc = {
        "node": {"name": "alpha", "private_key": b64(generate_private()), "addresses": [f"{NODE}/10", f"{NODE6}/48"]},
        "peers": [
            {"name": "bravo", "public_key": b64(public_of(generate_private())), "allowed_ips": [BRAVO, BRAVO6]},
            {"name": "charlie", "public_key": b64(public_of(generate_private())), "allowed_ips": [CHARLIE]},
        ],
        "filter": filter_table,
    }
    return parse("n.toml", doc, tmp_path, tmp_path).filter


def ip_packet(src: str, dst: str, proto: int, payload: bytes) -> bytes:
    s, d = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    if s.version == 4:
        header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 1, 0, 64, proto, 0, s.packed, d.packed)
        return header + payload
    return struct.pack("!IHBB16s16s", 6 << 28, len(payload), proto, 64, s.packed, d.packed) + payload


def tcp(
    src: str, dst: str, sport: int, dport: int, flags: int = SYN, seq: int = 1000, ack: int = 0, data: bytes = b""
) -> bytes:
    return ip_packet(
        src, dst, TCP, struct.pack("!HHIIBBHHH", sport, dport, seq, ack, 5 << 4, flags, 65535, 0, 0) + data
    )


def udp(src: str, dst: str, sport: int, dport: int, data: bytes = b"x") -> bytes:
    return ip_packet(src, dst, UDP, struct.pack("!HHHH", sport, dport, 8 + len(data), 0) + data)


def ping(src: str, dst: str, ident: int = 7, reply: bool = False) -> bytes:
    v6 = ":" in src
    kind = (129 if reply else 128) if v6 else (0 if reply else 8)
    return ip_packet(src, dst, ICMPV6 if v6 else ICMP, struct.pack("!BBHHH", kind, 0, 0, ident, 1) + b"ping")


RULES = {
    "default": "deny",
    "groups": {"ops": ["bravo"]},
    "rules": [
        {"action": "reject", "src": ["*"], "dst": ["*:23"], "proto": "tcp"},
        {"action": "accept", "src": ["group:ops"], "dst": ["alpha:22"], "proto": "tcp"},
        {"action": "accept", "src": ["*"], "dst": [f"{NODE}:80-89"]},
        {"action": "reject", "src": ["charlie"], "dst": ["*:53"], "proto": "udp"},
        {"action": "accept", "src": ["bravo"], "dst": ["*:*"], "proto": "icmp"},
        {"action": "accept", "src": ["bravo"], "dst": ["*:*"], "proto": "icmpv6"},
    ],
}


@pytest.mark.parametrize(
    "packet, verdict, rule",
    [
        (tcp(BRAVO, NODE, 4000, 22), "accept", 1),
        (tcp(BRAVO6, NODE6, 4000, 22), "accept", 1),
        (tcp(CHARLIE, NODE, 4000, 22), "default_deny", None),
        (tcp(BRAVO, NODE, 4000, 23), "reject", 0),
        (tcp(CHARLIE, NODE, 4000, 85), "accept", 2),
        (udp(CHARLIE, NODE, 4000, 85), "accept", 2),
        (udp(CHARLIE, NODE, 4000, 90), "default_deny", None),
        (tcp(CHARLIE, "100.64.0.4", 4000, 85), "default_deny", None),
        (udp(CHARLIE, NODE, 4000, 53), "reject", 3),
        (udp(BRAVO, NODE, 4000, 53), "default_deny", None),
        (ping(BRAVO, NODE), "accept", 2),  # ICMP matches on addresses alone: rule 2's ports do not count
        (ping(CHARLIE, NODE), "accept", 2),
        (ping(BRAVO, "100.64.0.4"), "accept", 4),
        (ping(CHARLIE, "100.64.0.4"), "default_deny", None),
        (ping(BRAVO6, NODE6), "accept", 5),
        (ip_packet(OTHER, NODE, 47, b"gre!"), "accept", 2),
        (ip_packet(OTHER, "100.64.0.4", 47, b"gre!"), "default_deny", None),
    ],
)
def test_filter(tmp_path: Any, packet: bytes, verdict: str, rule: int | None) -> None:
    f = Filter(settings(RULES, tmp_path))
    passed, _ = f.inbound([packet], 0.0)
    assert (passed == [packet]) == (verdict == "accept")
    assert dict(f.drops) == ({} if verdict == "accept" else {verdict: 1})
    assert f.hits == [int(i == rule) for i in range(len(RULES["rules"]))]


def test_no_filter_table_and_an_empty_one_with_default_accept_pass_everything(tmp_path: Any) -> None:
    for table in (FilterSettings(), settings({}, tmp_path)):
        f = Filter(table)
        packets = [tcp(OTHER, NODE, 1, 2), udp(CHARLIE, NODE, 3, 4), ping(BRAVO6, NODE6)]
        assert f.inbound(packets, 0.0) == (packets, [])


def test_accepted_flows_pass_both_ways_and_opened_flows_come_back_under_default_deny(tmp_path: Any) -> None:
    f = Filter(
        settings(
            {"default": "deny", "rules": [{"action": "accept", "src": ["*"], "dst": ["*:22"], "proto": "tcp"}]},
            tmp_path,
        )
    )
    inbound = tcp(BRAVO, NODE, 4000, 22)
    assert f.inbound([inbound], 0.0)[0] == [inbound]
    answer = tcp(NODE, BRAVO, 22, 4000, SYN | ACK)
    assert f.outbound([answer], 1.0)[0] == [answer]  # not judged (outbound off), and known anyway
    assert f.inbound([tcp(BRAVO, NODE, 4000, 22, ACK)], 2.0)[0]
    # Opened by the node: its answers pass though no rule accepts them.
    for out, back in [
        (tcp(NODE, BRAVO, 5000, 443), tcp(BRAVO, NODE, 443, 5000, SYN | ACK)),
        (udp(NODE, CHARLIE, 5001, 53), udp(CHARLIE, NODE, 53, 5001)),
        (ping(NODE, BRAVO, 9), ping(BRAVO, NODE, 9, reply=True)),
        (ping(NODE6, BRAVO6, 9), ping(BRAVO6, NODE6, 9, reply=True)),
    ]:
        assert f.outbound([out], 3.0) == ([out], [])
        assert f.inbound([back], 4.0) == ([back], [])
    # Not the same flow: another port, another ping identifier.
    assert f.inbound([tcp(BRAVO, NODE, 443, 5002, SYN | ACK), ping(BRAVO, NODE, 10, reply=True)], 5.0) == ([], [])
    assert f.drops == {"default_deny": 2} and f.hits == [1]


def test_an_icmp_error_about_a_flow_of_ours_passes(tmp_path: Any) -> None:
    f = Filter(settings({"default": "deny"}, tmp_path))
    sent = udp(NODE, CHARLIE, 5001, 53)
    f.outbound([sent], 0.0)
    unreachable = ip_packet(CHARLIE, NODE, ICMP, struct.pack("!BBHI", 3, 3, 0, 0) + sent)
    stray = ip_packet(CHARLIE, NODE, ICMP, struct.pack("!BBHI", 3, 3, 0, 0) + udp(NODE, CHARLIE, 5002, 53))
    assert f.inbound([unreachable, stray], 1.0) == ([unreachable], [])


def test_outbound_true_judges_what_the_node_sends(tmp_path: Any) -> None:
    table = {
        "default": "reject",
        "outbound": True,
        "rules": [{"action": "accept", "src": ["alpha"], "dst": ["bravo:443"]}],
    }
    f = Filter(settings(table, tmp_path))
    ok, refused = tcp(NODE, BRAVO, 5000, 443), tcp(NODE, BRAVO, 5000, 444)
    passed, replies = f.outbound([ok, refused], 0.0)
    assert passed == [ok] and len(replies) == 1 and flow_key(replies[0]) == flow_key(tcp(BRAVO, NODE, 444, 5000))
    assert f.inbound([tcp(BRAVO, NODE, 443, 5000, SYN | ACK)], 1.0)[0]


@pytest.mark.parametrize("proto, timeout", [(TCP, 720.0), (UDP, 180.0), (ICMP, 600.0)])
def test_flows_expire_after_nebulas_timeouts_since_their_last_packet(tmp_path: Any, proto: int, timeout: float) -> None:
    assert TIMEOUTS[TCP] == 720.0 and TIMEOUTS[UDP] == 180.0
    f = Filter(settings({"default": "deny"}, tmp_path))
    out, back = {
        TCP: (tcp(NODE, BRAVO, 5000, 80), tcp(BRAVO, NODE, 80, 5000, ACK)),
        UDP: (udp(NODE, BRAVO, 5000, 80), udp(BRAVO, NODE, 80, 5000)),
        ICMP: (ping(NODE, BRAVO), ping(BRAVO, NODE, reply=True)),
    }[proto]
    f.outbound([out], 0.0)
    assert f.inbound([back], timeout - 1)[0]  # renews
    assert f.inbound([back], 2 * timeout - 2)[0]
    assert not f.inbound([back], 3 * timeout)[0]
    f.tick(3 * timeout)
    assert len(f.table) == 0


def test_the_table_is_bounded_and_evicts_the_oldest_counting_them(tmp_path: Any) -> None:
    f = Filter(settings({"default": "deny"}, tmp_path), max_flows=100)
    f.outbound([udp(NODE, BRAVO, 1000 + i, 53) for i in range(150)], 0.0)
    assert len(f.table) == 100 and f.table.evictions == 50
    assert not f.inbound([udp(BRAVO, NODE, 53, 1000)], 1.0)[0]  # evicted
    assert f.inbound([udp(BRAVO, NODE, 53, 1149)], 1.0)[0]
    # Expired flows make room before live ones are evicted.
    f.outbound([udp(NODE, CHARLIE, 7, 53)], 500.0)
    assert len(f.table) == 1 and f.table.evictions == 50


def checksum_ok(data: bytes) -> bool:
    return ones_complement_sum(data) == 0xFFFF


def pseudo(packet: bytes) -> bytes:
    if packet[0] >> 4 == 4:
        return packet[12:20] + bytes((0, packet[9])) + (len(packet) - 20).to_bytes(2, "big")
    return packet[8:40] + (len(packet) - 40).to_bytes(4, "big") + bytes((0, 0, 0, packet[6]))


def test_reject_answers_tcp_with_a_rst_that_the_sender_takes(tmp_path: Any) -> None:
    f = Filter(settings({"default": "reject"}, tmp_path))
    syn = tcp(BRAVO, NODE, 4000, 22, SYN, seq=1000)
    data = tcp(BRAVO, NODE, 4001, 22, ACK, seq=5, ack=777, data=b"hello")
    _, (rst_syn, rst_data) = f.inbound([syn, data], 0.0)
    assert checksum_ok(rst_syn[:20]) and checksum_ok(pseudo(rst_syn) + rst_syn[20:])
    assert (rst_syn[12:16], rst_syn[16:20], rst_syn[9], len(rst_syn)) == (syn[16:20], syn[12:16], TCP, 40)
    sport, dport, seq, ack, _, flags = struct.unpack_from("!HHIIBB", rst_syn, 20)
    assert (sport, dport, seq, ack, flags) == (22, 4000, 0, 1001, RST | ACK)  # the SYN counts one
    sport, dport, seq, ack, _, flags = struct.unpack_from("!HHIIBB", rst_data, 20)
    assert (sport, dport, seq, ack, flags) == (22, 4001, 777, 0, RST)  # its ACK number as sequence
    # Never a RST for a RST.
    assert f.inbound([tcp(BRAVO, NODE, 4002, 22, RST)], 0.0) == ([], [])
    assert f.drops == {"default_reject": 3}


def test_reject_answers_the_rest_with_administratively_prohibited(tmp_path: Any) -> None:
    f = Filter(settings({"default": "reject"}, tmp_path))
    v4, v6 = udp(BRAVO, NODE, 4000, 53, b"q" * 1000), ping(BRAVO6, NODE6)
    _, (icmp, icmp6) = f.inbound([v4, v6], 0.0)
    assert checksum_ok(icmp[:20]) and checksum_ok(icmp[20:])
    assert (icmp[9], icmp[20], icmp[21], icmp[12:16], icmp[16:20]) == (ICMP, 3, 13, v4[16:20], v4[12:16])
    assert len(icmp) == 576 and icmp[28:] == v4[:548]  # as much of the packet as fits in 576 bytes
    assert (icmp6[6], icmp6[40], icmp6[41], icmp6[8:24], icmp6[24:40]) == (ICMPV6, 1, 1, v6[24:40], v6[8:24])
    assert checksum_ok(pseudo(icmp6) + icmp6[40:]) and icmp6[48:] == v6
    # No error about an error.
    error = ip_packet(BRAVO, NODE, ICMP, struct.pack("!BBHI", 3, 1, 0, 0) + v4[:28])
    assert f.inbound([error], 0.0) == ([], [])


def test_a_rule_change_cuts_the_flows_it_no_longer_allows_and_keeps_the_rest(tmp_path: Any) -> None:
    both = {"default": "deny", "rules": [{"action": "accept", "src": ["*"], "dst": ["*:22", "*:80"]}]}
    f = Filter(settings(both, tmp_path))
    ssh, web = tcp(BRAVO, NODE, 4000, 22), tcp(BRAVO, NODE, 4001, 80)
    opened = tcp(NODE, CHARLIE, 5000, 443)
    f.inbound([ssh, web], 0.0)
    f.outbound([opened], 0.0)
    f.configure(
        settings({"default": "deny", "rules": [{"action": "accept", "src": ["*"], "dst": ["*:80"]}]}, tmp_path), 1.0
    )
    assert f.cut == 1 and f.hits == [0]
    assert f.inbound([tcp(BRAVO, NODE, 4000, 22, ACK), tcp(BRAVO, NODE, 4001, 80, ACK)], 2.0)[0] == [
        tcp(BRAVO, NODE, 4001, 80, ACK)
    ]
    assert f.inbound([tcp(CHARLIE, NODE, 443, 5000, ACK)], 2.0)[0]  # opened here: not the rules' to cut
    assert f.drops == {"default_deny": 1}


def test_a_thousand_rules_cost_established_flows_nothing() -> None:
    """A flow accepted by the last of 1,000 rules: after its first packet, as fast as with none."""
    from meshsup.actors.settings.filter import Destination, FilterRule

    def rule(i: int) -> FilterRule:
        net = ipaddress.ip_network(f"10.{i // 256}.{i % 256}.0/24")
        return FilterRule("accept", (net,), (Destination(ipaddress.ip_network(NODE), 1000 + i, 1000 + i),), TCP)

    last = FilterRule(
        "accept", (ipaddress.ip_network(BRAVO),), (Destination(ipaddress.ip_network(NODE), 5201, 5201),), TCP
    )
    many = Filter(FilterSettings(True, "deny", False, tuple(rule(i) for i in range(999)) + (last,)))
    none = Filter(FilterSettings())
    batch = [tcp(BRAVO, NODE, 4000, 5201, ACK, seq=i) for i in range(256)]

    def cost(f: Filter) -> float:
        start = time.perf_counter()
        for i in range(40):
            assert len(f.inbound(batch, float(i))[0]) == 256
        return time.perf_counter() - start

    cost(many), cost(none)  # warm
    assert many.hits[999] == 1
    assert min(cost(many) for _ in range(3)) < 2 * min(cost(none) for _ in range(3)) + 0.005


def test_random_bytes_are_counted_drops_never_exceptions(tmp_path: Any) -> None:
    f = Filter(settings(RULES | {"default": "reject", "outbound": True}, tmp_path))
    rng = random.Random(15)
    packets = [rng.randbytes(rng.randrange(0, 80)) for _ in range(5000)]
    packets += [bytes([0x45 if i % 2 else 0x60]) + rng.randbytes(rng.randrange(0, 80)) for i in range(5000)]
    f.inbound(packets, 0.0)
    f.outbound(packets, 0.0)
    assert f.drops["malformed"] > 0


def test_a_run_of_one_flow_passes_on_one_lookup_but_nothing_else_rides_along(tmp_path: Any) -> None:
    f = Filter(
        settings(
            {"default": "deny", "rules": [{"action": "accept", "src": ["*"], "dst": ["*:22"], "proto": "tcp"}]},
            tmp_path,
        )
    )
    run = [tcp(BRAVO, NODE, 4000, 22, ACK, seq=i) for i in range(5)]
    same_ports_udp = udp(BRAVO, NODE, 4000, 22)
    other_port = tcp(BRAVO, NODE, 4001, 22, ACK)  # judged anew: no flow, but the rule accepts it
    short = run[0][:20]
    passed, _ = f.inbound([*run, same_ports_udp, short, *run, other_port], 0.0)
    assert passed == [*run, *run, other_port]
    assert f.drops == {"default_deny": 1, "malformed": 1} and f.hits == [2]


def test_flows_a_rule_accepted_are_kept_for_flow_logs_while_recording(tmp_path: Any) -> None:
    f = Filter(settings(RULES, tmp_path))
    f.inbound([tcp(BRAVO, NODE, 4000, 22)], 0.0)
    assert f.take_decided() == {}  # flow logs off
    f.recording = True
    first = tcp(BRAVO, NODE, 4001, 22)
    f.inbound([first, tcp(BRAVO, NODE, 4001, 22, ACK), tcp(CHARLIE, NODE, 4000, 85)], 1.0)
    f.outbound([tcp(NODE, BRAVO, 6000, 22)], 1.0)  # opened here: no rule decided it
    # keyed as the node sends, as flow logs key a connection
    assert f.take_decided() == {flow_key(tcp(NODE, BRAVO, 22, 4001)): 1, flow_key(tcp(NODE, CHARLIE, 85, 4000)): 2}
    assert f.take_decided() == {}

"""Interception's parts that need no namespace: the `intercept` setting, the
`dst:` rule match and what the resolver keeps of a decision by destination,
and the interception socket's ancillary data."""

from __future__ import annotations

import socket
import struct

import dns.rcode
import pytest

from meshsup.actors.dns.interception import IP_ORIGDSTADDR, IPV6_ORIGDSTADDR, original_destination, reply_from
from meshsup.actors.dns.resolver import Resolver
from meshsup.actors.dns.rules import ForwardTo, Reject, Router, matches
from meshsup.actors.settings.dns import INTERCEPT_V4, DnsSettings
from meshsup.actors.settings.dnstypes import Matcher, Rule, UpstreamGroup, parse_upstream
from tests.actors.dns.helpers import CLIENT, only_forward, query_wire, reply_of, settings, upstream_answer

U1, U2 = parse_upstream("udp://198.51.100.1"), parse_upstream("udp://198.51.100.2")


def test_intercept_setting():
    assert DnsSettings.from_config({"intercept": ["wg0", "eth1", "wg0"]}, {}).intercept == ("wg0", "eth1")
    assert DnsSettings.from_config({}, {}).intercept == ()


@pytest.mark.parametrize(
    ("table", "key"),
    [
        ({"intercept": "wg0"}, "dns.intercept"),
        ({"intercept": ["a/b"]}, "dns.intercept[0]"),
        ({"intercept": ["sixteen-letters!"]}, "dns.intercept[0]"),
        ({"intercept": [""]}, "dns.intercept[0]"),
        ({"listen": [f"{INTERCEPT_V4}:53"]}, "dns.listen[0]"),
        ({"rules": [{"match": "dst:not-an-address", "action": "reject"}]}, "dns.rules[0].match"),
    ],
)
def test_intercept_errors_name_the_key(table, key):
    with pytest.raises(ValueError) as error:
        DnsSettings.from_config(table, {})
    assert key in str(error.value)


@pytest.mark.parametrize(
    ("match", "destination", "hit"),
    [
        ("dst:203.0.113.53", "203.0.113.53", True),
        ("dst:203.0.113.53", "203.0.113.54", False),
        ("dst:203.0.113.0/24", "203.0.113.54", True),
        ("dst:2001:db8::/32", "2001:db8::53", True),
        ("dst:2001:db8::/32", "203.0.113.53", False),
        ("dst:203.0.113.53", "", False),  # not intercepted: no destination to match
    ],
)
def test_dst_matcher(match, destination, hit):
    assert matches(Matcher.parse(match), "www.example", 1, destination) is hit


def test_decisions_by_destination_are_cached_apart():
    rules = [Rule(Matcher.parse("dst:203.0.113.53"), "other"), Rule(Matcher.parse("dst:203.0.113.54"), "reject")]
    router = Router(rules=rules, routes=[], groups={"other": UpstreamGroup((U2,))}, default=UpstreamGroup((U1,)))
    assert router.by_destination
    grouped = router.route("www.example", 1, "198.51.100.9", "203.0.113.53")
    assert isinstance(grouped, ForwardTo) and grouped.upstreams == (U2,) and grouped.view == "group other"
    assert isinstance(router.route("www.example", 1, "198.51.100.9", "203.0.113.54"), Reject)
    straight = router.route("www.example", 1, "198.51.100.9")
    assert isinstance(straight, ForwardTo) and straight.upstreams == (U1,) and straight.view == ""
    by_name = Router(
        rules=[Rule(Matcher.parse("suffix:example"), "other")],
        routes=[],
        groups={"other": UpstreamGroup((U2,))},
        default=UpstreamGroup((U1,)),
    )
    assert not by_name.by_destination and by_name.route("www.example", 1, "198.51.100.9").view == ""


def test_what_a_destination_decided_is_not_given_to_other_clients():
    resolver = Resolver(
        settings(
            reject_rcode="nxdomain",
            groups={"other": ["udp://127.0.0.21"]},
            rules=[
                {"match": "dst:203.0.113.54", "action": "reject"},
                {"match": "dst:203.0.113.55", "action": "other"},
            ],
        )
    )
    query = query_wire("www.example")
    rejected = resolver.handle(query, CLIENT, "udp", 0.0, destination="203.0.113.54")
    assert reply_of(rejected).rcode() == dns.rcode.NXDOMAIN
    assert resolver.fast(query, "udp", 0.1) is None  # the fast path knows only the question
    grouped = only_forward(resolver.handle(query, CLIENT, "udp", 0.2, destination="203.0.113.55"))
    assert grouped.upstream.host == "127.0.0.21"
    resolver.on_upstream_answer(grouped.key, grouped.upstream, upstream_answer(grouped), 0.3)
    # Asked straight, the same question goes to the default upstreams, not to the group's cached answer.
    straight = only_forward(resolver.handle(query, CLIENT, "udp", 0.4))
    assert straight.upstream.host != "127.0.0.21"
    assert resolver.fast(query, "udp", 0.5) is None


def test_original_destination_and_reply_source():
    v4 = struct.pack("=H", socket.AF_INET) + struct.pack("!H", 53) + socket.inet_aton("203.0.113.53") + b"\0" * 8
    assert original_destination([(socket.IPPROTO_IP, IP_ORIGDSTADDR, v4)]) == "203.0.113.53"
    v6 = struct.pack("=H", socket.AF_INET6) + struct.pack("!HI", 53, 0)
    v6 += socket.inet_pton(socket.AF_INET6, "2001:db8::53") + b"\0" * 4
    assert original_destination([(socket.IPPROTO_IPV6, IPV6_ORIGDSTADDR, v6)]) == "2001:db8::53"
    assert original_destination([(socket.IPPROTO_IP, IP_ORIGDSTADDR, b"\x02\x00")]) is None  # short: ignored
    level, kind, data = reply_from("203.0.113.53")
    assert (level, kind) == (socket.IPPROTO_IP, 8) and data[4:8] == socket.inet_aton("203.0.113.53")
    level, kind, data = reply_from("2001:db8::53")
    assert level == socket.IPPROTO_IPV6 and data[:16] == socket.inet_pton(socket.AF_INET6, "2001:db8::53")

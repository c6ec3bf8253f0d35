"""Upstream URLs, the failover plan, and the node's own addresses kept out of the upstreams."""

from __future__ import annotations

import pytest

from meshsup.actors.dns.upstream import MAX_ATTEMPTS, FailoverPlan, without_own
from meshsup.actors.settings.dnstypes import Upstream, parse_upstream


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("udp://198.51.100.53", Upstream("udp", "198.51.100.53", 53)),
        ("tcp://198.51.100.53", Upstream("tcp", "198.51.100.53", 53)),
        ("tls://198.51.100.53", Upstream("tls", "198.51.100.53", 853)),
        ("https://198.51.100.53", Upstream("https", "198.51.100.53", 443, "/dns-query")),
        ("https://[2001:db8::1]:8443/q#doh.example", Upstream("https", "2001:db8::1", 8443, "/q", "doh.example")),
        ("UDP://198.51.100.53:5353", Upstream("udp", "198.51.100.53", 5353)),
    ],
)
def test_upstream_urls(url, expected):
    assert parse_upstream(url) == expected
    assert parse_upstream(str(expected)) == expected


@pytest.mark.parametrize(
    "url", ["198.51.100.53", "quic://198.51.100.53", "udp://dns.example", "udp://1.2.3.4/x", "udp://1.2.3.4:0x1"]
)
def test_upstream_bad_urls(url):
    with pytest.raises(ValueError):
        parse_upstream(url)


def test_failover_plan_tries_at_most_three_in_order():
    ups = [parse_upstream(f"udp://198.51.100.{i}") for i in range(1, 6)]
    plan = FailoverPlan(ups)
    tried = [plan.next(float(now)) for now in range(5)]
    assert tried[:MAX_ATTEMPTS] == ups[:3] and tried[3:] == [None, None]
    assert plan.sent == 2.0  # when the last one was asked


def test_own_listen_addresses_are_never_upstreams():
    urls = ["udp://127.0.0.1:5300", "tcp://127.0.0.1:5300", "udp://127.0.0.1:53", "udp://127.0.0.9:5301"]
    ups = [parse_upstream(u) for u in urls]
    assert without_own(ups, [("127.0.0.1", 5300)]) == (ups[2], ups[3])
    assert without_own(ups, [("0.0.0.0", 5301)]) == tuple(ups[:3])

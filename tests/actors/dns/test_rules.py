"""Rules, routes, groups and source overrides choosing where a name goes."""

from __future__ import annotations

import ipaddress

import pytest

from meshsup.actors.dns.rules import ForwardTo, Reject, Router, matches
from meshsup.actors.settings.dnstypes import Matcher, Route, Rule, SourceOverride, UpstreamGroup, parse_upstream

U1, U2, U3, U4 = (parse_upstream(f"udp://198.51.100.{i}") for i in range(1, 5))


@pytest.mark.parametrize(
    ("match", "name", "qtype", "hit"),
    [
        ("full:ads.example", "ads.example", 1, True),
        ("full:ads.example", "x.ads.example", 1, False),
        ("suffix:ads.example", "x.ads.example", 1, True),
        ("suffix:ads.example", "ads.example", 1, True),
        ("suffix:ads.example", "badads.example", 1, False),
        ("keyword:track", "www.tracker.example", 1, True),
        ("keyword:track", "www.example", 1, False),
        (r"regex:^ad[0-9]+\.", "ad42.example", 1, True),
        (r"regex:^ad[0-9]+\.", "add.example", 1, False),
        ("qtype:AAAA", "x.example", 28, True),
        ("qtype:28", "x.example", 1, False),
    ],
)
def test_matchers(match, name, qtype, hit):
    assert matches(Matcher.parse(match), name, qtype) is hit


def test_router_order_and_actions():
    router = Router(
        rules=[
            Rule(Matcher.parse("full:ok.ads.example"), "asis"),
            Rule(Matcher.parse("suffix:ads.example"), "reject"),
            Rule(Matcher.parse("keyword:video"), "fast"),
            Rule(Matcher.parse("suffix:video.example"), "reject"),  # never reached: keyword wins first
        ],
        routes=[Route("example", (U2,)), Route("corp.example", (U3,))],
        groups={"fast": UpstreamGroup((U4,), "min_latency")},
        default=UpstreamGroup((U1,), "random"),
        overrides=[SourceOverride(ipaddress.ip_network("10.0.0.0/8"), (U4,))],
    )
    assert isinstance(router.route("x.ads.example.", 1, "127.0.0.1"), Reject)
    assert router.route("ok.ads.example.", 1, "127.0.0.1").upstreams == (U2,)  # asis: normal routing
    assert router.route("a.video.example.", 1, "127.0.0.1") == ForwardTo((U4,), "", "group fast", "min_latency")
    assert router.route("a.corp.example.", 1, "127.0.0.1").upstreams == (U3,)  # most specific route
    assert router.route("a.example.", 1, "127.0.0.1").upstreams == (U2,)
    assert router.route("a.test.", 1, "127.0.0.1") == ForwardTo((U1,), "", "default", "random")
    overridden = router.route("a.test.", 1, "10.1.2.3")
    assert overridden.upstreams == (U4,) and overridden.view == "10.0.0.0/8" and overridden.policy == "failover"


def test_router_refuses_unknown_group():
    with pytest.raises(ValueError):
        Router(rules=[Rule(Matcher.parse("keyword:x"), "nope")], routes=[], groups={}, default=UpstreamGroup(()))

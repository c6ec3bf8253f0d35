"""The resolver: local names, forwarding, failover, serve-stale, caps and reconfiguration."""

from __future__ import annotations

import dns.flags
import dns.message
import dns.name
import dns.rcode
import pytest

from meshsup.actors.dns.cache import STALE_ANSWER_TTL
from meshsup.actors.dns.resolver import Drop, Forward, Learned, Log, Reply, Resolver
from meshsup.actors.dns.upstream import MAX_ATTEMPTS
from meshsup.actors.settings.dnstypes import parse_upstream
from tests.actors.dns.helpers import (
    CLIENT,
    big_answer,
    header,
    only_forward,
    query_wire,
    reply_of,
    settings,
    upstream_answer,
)


def test_local_names_answered_not_forwarded():
    resolver = Resolver(settings())
    local = [("alpha.mesh", "A"), ("bravo.mesh", "AAAA"), ("nobody.mesh", "A"), ("2.0.64.100.in-addr.arpa", "PTR")]
    for name, rdtype in local:
        actions = resolver.handle(query_wire(name, rdtype), CLIENT, "udp", 0.0)
        assert not any(isinstance(a, Forward) for a in actions)
        reply_of(actions)
    assert resolver.counters["local_answers"] == 4


def test_forward_merge_reply_learn_and_cache():
    resolver = Resolver(settings())
    first = dns.message.make_query("www.example.com", "A")
    second = dns.message.make_query("WWW.example.com", "A")
    forward = only_forward(resolver.handle(first.to_wire(), CLIENT, "udp", 0.0, ctx="a"))
    assert forward.upstream == parse_upstream("udp://127.0.0.11")
    assert resolver.handle(second.to_wire(), ("127.0.0.2", 5), "tcp", 0.1, ctx="b") == []
    actions = resolver.on_upstream_answer(forward.key, forward.upstream, upstream_answer(forward), 0.2)
    assert Learned("www.example.com", ("203.0.113.7",)) in actions
    replies = {a.ctx: a for a in actions if isinstance(a, Reply)}
    assert dns.message.from_wire(replies["a"].wire).id == first.id
    assert dns.message.from_wire(replies["b"].wire).id == second.id and replies["b"].transport == "tcp"
    cached = reply_of(resolver.handle(query_wire("www.example.com"), CLIENT, "udp", 10.2))
    assert cached.answer[0].ttl == 290
    assert resolver.counters["merged"] == 1 and resolver.counters["forwarded"] == 1


def test_without_learning_answers_carry_no_learned_names():
    resolver = Resolver(settings())
    resolver.learning = False
    forward = only_forward(resolver.handle(query_wire("www.example.com"), CLIENT, "udp", 0.0))
    actions = resolver.on_upstream_answer(forward.key, forward.upstream, upstream_answer(forward), 0.1)
    assert not any(isinstance(a, Learned) for a in actions)
    assert [rrset.to_text() for rrset in reply_of(actions).answer] == ["www.example.com. 300 IN A 203.0.113.7"]


@pytest.mark.parametrize("failure", ["servfail", "refused", "timeout", "garbage"])
def test_failover_to_next_upstream(failure):
    resolver = Resolver(settings())
    forward = only_forward(resolver.handle(query_wire("www.example.com"), CLIENT, "udp", 0.0))
    if failure == "timeout":
        actions = resolver.on_upstream_failure(forward.key, forward.upstream, "timeout", 2.0)
    elif failure == "garbage":
        actions = resolver.on_upstream_answer(forward.key, forward.upstream, b"\x00garbage", 0.1)
    else:
        rcode = dns.rcode.from_text(failure.upper())
        actions = resolver.on_upstream_answer(forward.key, forward.upstream, upstream_answer(forward, rcode), 0.1)
    second = only_forward(actions)
    assert second.upstream == parse_upstream("udp://127.0.0.12")
    assert resolver.counters["failovers"] == 1
    assert reply_of(resolver.on_upstream_answer(second.key, second.upstream, upstream_answer(second), 0.3)).rcode() == 0


def test_nxdomain_is_an_answer_not_a_failure():
    resolver = Resolver(settings())
    forward = only_forward(resolver.handle(query_wire("nx.example.com"), CLIENT, "udp", 0.0))
    nxdomain = upstream_answer(forward, dns.rcode.NXDOMAIN)
    reply = reply_of(resolver.on_upstream_answer(forward.key, forward.upstream, nxdomain, 0.1))
    assert reply.rcode() == dns.rcode.NXDOMAIN and resolver.counters["failovers"] == 0


def test_three_attempts_then_servfail_or_stale():
    resolver = Resolver(settings(serve_stale=True, cache_max_ttl=10))
    forward = only_forward(resolver.handle(query_wire("www.example.com"), CLIENT, "udp", 0.0))
    resolver.on_upstream_answer(forward.key, forward.upstream, upstream_answer(forward), 0.0)
    for now, expect in [(20.0, "stale"), (20.0 + 86400 + 10, "servfail")]:
        actions = resolver.handle(query_wire("www.example.com"), CLIENT, "udp", now)
        tried = []
        for _ in range(MAX_ATTEMPTS):
            forward = only_forward(actions)
            tried.append(forward.upstream.host)
            actions = resolver.on_upstream_failure(forward.key, forward.upstream, "timeout", now)
        assert tried == ["127.0.0.11", "127.0.0.12", "127.0.0.13"]  # the fourth is never tried
        reply = reply_of(actions)
        if expect == "stale":
            assert reply.rcode() == 0 and reply.answer[0].ttl == STALE_ANSWER_TTL
        else:
            assert reply.rcode() == dns.rcode.SERVFAIL
    assert resolver.counters["stale_answers"] == 1 and resolver.counters["servfail_exhausted"] == 1


def test_inflight_cap_refuses_and_logs_rate_limited():
    resolver = Resolver(settings(max_inflight=2))
    for i in range(2):
        only_forward(resolver.handle(query_wire(f"n{i}.example.com"), CLIENT, "udp", 0.0))
    logs = []
    for i in range(2, 6):
        actions = resolver.handle(query_wire(f"n{i}.example.com"), CLIENT, "udp", 0.1 * i)
        assert reply_of(actions).rcode() == dns.rcode.REFUSED
        logs += [a for a in actions if isinstance(a, Log)]
    assert len(logs) == 1 and resolver.counters["refused_inflight_cap"] == 4
    assert reply_of(resolver.handle(query_wire("alpha.mesh"), CLIENT, "udp", 1.0)).answer  # local names still answer


@pytest.mark.parametrize(("rcode_name", "rcode"), [("noerror", dns.rcode.NOERROR), ("nxdomain", dns.rcode.NXDOMAIN)])
def test_reject_rule(rcode_name, rcode):
    resolver = Resolver(settings(reject_rcode=rcode_name, rules=[{"match": "suffix:ads.example", "action": "reject"}]))
    reply = reply_of(resolver.handle(query_wire("x.ads.example"), CLIENT, "udp", 0.0))
    assert reply.rcode() == rcode and not reply.answer


def test_ndots_keeps_single_labels_home():
    resolver = Resolver(settings(ndots=1))
    reply = reply_of(resolver.handle(query_wire("intranet"), CLIENT, "udp", 0.0))
    assert reply.rcode() == dns.rcode.NOERROR and not reply.answer
    only_forward(Resolver(settings()).handle(query_wire("intranet"), CLIENT, "udp", 0.0))


def test_own_address_is_skipped():
    resolver = Resolver(settings(upstreams=["udp://127.0.0.1:5300", "udp://127.0.0.11"]))
    assert only_forward(resolver.handle(query_wire("x.example"), CLIENT, "udp", 0.0)).upstream.host == "127.0.0.11"


def test_no_upstreams_is_servfail():
    resolver = Resolver(settings(upstreams=[]))
    assert reply_of(resolver.handle(query_wire("x.example"), CLIENT, "udp", 0.0)).rcode() == dns.rcode.SERVFAIL


def test_late_and_unknown_answers_are_ignored():
    resolver = Resolver(settings())
    forward = only_forward(resolver.handle(query_wire("x.example"), CLIENT, "udp", 0.0))
    resolver.on_upstream_failure(forward.key, forward.upstream, "timeout", 1.0)
    assert resolver.on_upstream_answer(forward.key, forward.upstream, upstream_answer(forward), 1.1) == []
    assert resolver.counters["upstream_late"] == 1


def test_bad_queries_are_counted():
    resolver = Resolver(settings())
    wire = bytearray(query_wire("x.example"))
    wire[2] |= 0x80
    assert isinstance(resolver.handle(bytes(wire), CLIENT, "udp", 0.0)[0], Drop)
    assert reply_of(resolver.handle(header(0x0100, qd=0), CLIENT, "udp", 0.0)).rcode() == dns.rcode.FORMERR
    assert resolver.counters["drop_response"] == 1 and resolver.counters["formerr"] == 1


def test_forwarded_answer_truncated_for_small_clients():
    resolver = Resolver(settings())
    forward = only_forward(resolver.handle(query_wire("big.example"), CLIENT, "udp", 0.0))
    big = dns.message.make_response(dns.message.from_wire(forward.query))
    big.answer.append(big_answer(dns.name.from_text("big.example.")).answer[0])
    reply = reply_of(resolver.on_upstream_answer(forward.key, forward.upstream, big.to_wire(), 0.1))
    assert reply.flags & dns.flags.TC
    assert len(reply_of(resolver.handle(query_wire("big.example"), CLIENT, "tcp", 0.2)).answer[0]) == 40


def test_reconfigure_keeps_cache_unless_forwarding_changes():
    resolver = Resolver(settings())
    forward = only_forward(resolver.handle(query_wire("x.example"), CLIENT, "udp", 0.0))
    resolver.on_upstream_answer(forward.key, forward.upstream, upstream_answer(forward), 0.0)
    resolver.reconfigure(settings(names={"carol": ["100.64.0.9"]}))
    assert reply_of(resolver.handle(query_wire("carol.mesh"), CLIENT, "udp", 1.0)).answer
    assert reply_of(resolver.handle(query_wire("x.example"), CLIENT, "udp", 1.0)).answer  # still cached
    resolver.reconfigure(settings(names={}, upstreams=["udp://127.0.0.20"]))
    assert only_forward(resolver.handle(query_wire("x.example"), CLIENT, "udp", 2.0)).upstream.host == "127.0.0.20"
    assert reply_of(resolver.handle(query_wire("carol.mesh"), CLIENT, "udp", 2.0)).rcode() == dns.rcode.NXDOMAIN


def test_upstream_latency_counted_in_buckets_from_first_forward_to_answer():
    resolver = Resolver(settings())
    forward = only_forward(resolver.handle(query_wire("www.example.com"), CLIENT, "udp", 10.0))
    resolver.on_upstream_answer(forward.key, forward.upstream, upstream_answer(forward), 10.03)
    snap = resolver.upstream_latency.snapshot()
    assert snap["count"] == 1 and snap["sum"] == pytest.approx(0.03)
    assert dict(zip(snap["bounds"], snap["cumulative"]))[0.025] == 0
    assert dict(zip(snap["bounds"], snap["cumulative"]))[0.05] == 1


def test_replies_counted_by_rcode_on_the_full_path_and_the_fast_path():
    resolver = Resolver(settings())
    for _ in range(3):  # the first through handle(), the others from the fast path
        wire = query_wire("nobody.mesh")
        if resolver.fast(wire, "udp", 0.0) is None:
            reply_of(resolver.handle(wire, CLIENT, "udp", 0.0))
    reply_of(resolver.handle(query_wire("alpha.mesh"), CLIENT, "udp", 0.0))
    stats = resolver.stats()
    assert stats["replies_nxdomain"] == 3 and stats["replies_noerror"] == 1
    assert stats["local_answers"] == 4 and stats["fast_answers"] == 2


def test_each_upstream_keeps_its_last_outcome_for_the_node_health():
    resolver = Resolver(settings())
    actions = resolver.handle(query_wire("www.example.com"), CLIENT, "udp", 0.0)
    for now in (1.0, 2.0):
        forward = only_forward(actions)
        actions = resolver.on_upstream_failure(forward.key, forward.upstream, "timeout", now)
    forward = only_forward(actions)
    servfail = upstream_answer(forward, dns.rcode.SERVFAIL)
    resolver.on_upstream_answer(forward.key, forward.upstream, servfail, 3.0)
    first, second, third, fourth = (f"udp://127.0.0.{n}:53" for n in (11, 12, 13, 14))
    failed = resolver.upstreams.status()
    assert {url: (s["ok"], s["at"], s["error"], s["failures"]) for url, s in failed.items()} == {
        first: (False, 1.0, "upstream_timeout", 1),
        second: (False, 2.0, "upstream_timeout", 1),
        third: (False, 3.0, "upstream_servfail", 1),
        fourth: (True, None, "", 0),  # never asked (three attempts at most)
    }
    forward = only_forward(resolver.handle(query_wire("www.example.org"), CLIENT, "udp", 4.0))
    resolver.on_upstream_answer(forward.key, forward.upstream, upstream_answer(forward), 4.5)
    assert resolver.upstreams.status()[first] == {
        "ok": True,
        "at": 4.5,
        "error": "upstream_timeout",
        "failures": 0,
        "state": "alive",  # one timeout is no death
        "latency_ms": 500.0,
        "chosen": 2,
        "probes": 0,
    }
    resolver.reconfigure(settings(upstreams=["udp://127.0.0.12"]))  # the others are forgotten
    assert list(resolver.upstreams.status()) == [second]


def test_forwarded_reply_carries_the_question_as_the_client_wrote_it():
    # Clients that randomise the case of their names (0x20) check it in the reply;
    # an upstream may echo the question in another case.
    resolver = Resolver(settings())
    query = query_wire("wWw.ExAmPle.CoM")
    forward = only_forward(resolver.handle(query, CLIENT, "udp", 0.0))
    answer = bytearray(upstream_answer(forward))
    answer[12 : 12 + 17] = answer[12 : 12 + 17].lower()
    actions = resolver.on_upstream_answer(forward.key, forward.upstream, bytes(answer), 0.1)
    reply = next(a for a in actions if isinstance(a, Reply)).wire
    assert reply[:2] == query[:2] and reply[12 : 12 + 21] == query[12 : 12 + 21]
    assert str(dns.message.from_wire(reply).answer[0]) == "wWw.ExAmPle.CoM. 300 IN A 203.0.113.7"

"""The fast path: prepared replies kept by query bytes, and the resolver answering through it."""

from __future__ import annotations

import os
import random

import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import pytest

from meshsup.actors.dns.fastpath import FastAnswers, prepare
from meshsup.actors.dns.message import Answer, parse_query, render
from meshsup.actors.dns.resolver import Forward, Resolver
from meshsup.actors.dns.wire import parse_answer
from meshsup.actors.dns.zone import Zone
from tests.actors.dns.helpers import (
    CLIENT,
    X,
    answer_wire,
    cookie_query,
    only_forward,
    query_wire,
    reply_of,
    settings,
    upstream_answer,
)


def test_prepared_replies_count_down_and_take_the_query_id():
    answer = parse_answer(answer_wire("answer x.example. 300 IN A 203.0.113.1"), X, 1, 1)
    query = parse_query(query_wire("x.example", use_edns=0))
    reply = render(query, answer, "udp")
    prepared = prepare(reply, random.Random(1), born=100.0, expires=400.0)
    fast = FastAnswers(size=2)
    fast.keep(query.wire, "udp", prepared)
    again = b"\x99\x99" + query.wire[2:]
    got = fast.lookup(again, "udp", 150.5)
    message = dns.message.from_wire(got)
    assert message.id == 0x9999 and message.answer[0].ttl == 249 and message.edns == 0
    assert fast.lookup(again, "tcp", 150.5) is None  # another size limit, another table
    assert fast.lookup(again, "udp", 400.0) is None and len(fast) == 0  # expired and gone


def test_prepared_local_replies_shuffle_every_order():
    zone_answer = Zone("mesh", {"bravo": ["100.64.0.2", "100.64.0.3", "100.64.0.4"]}).answer(
        dns.name.from_text("bravo.mesh."), dns.rdatatype.A, 1
    )
    query = parse_query(query_wire("bravo.mesh"))
    prepared = prepare(render(query, zone_answer, "udp"), random.Random(2))
    orders = {
        tuple(r.address for r in dns.message.from_wire(prepared.render(b"\x00\x01", 0.0)).answer[0]) for _ in range(300)
    }
    assert len(orders) == 6


def test_fast_answers_are_bounded():
    fast = FastAnswers(size=2)
    wires = [query_wire(f"n{i}.example") for i in range(3)]
    for wire in wires:
        fast.keep(wire, "udp", prepare(render(parse_query(wire), Answer(dns.rcode.NOERROR), "udp"), random.Random()))
    assert len(fast) == 2 and fast.lookup(wires[0], "udp", 0.0) is None and fast.lookup(wires[2], "udp", 0.0)


def test_resolver_fast_path_answers_as_the_full_path_and_counts_alike():
    resolver = Resolver(settings(rules=[{"match": "suffix:ads.example", "action": "reject"}]))
    for name in ("alpha.mesh", "x.ads.example", "nobody.mesh"):
        wire = query_wire(name)
        assert resolver.fast(wire, "udp", 0.0) is None
        slow = reply_of(resolver.handle(wire, CLIENT, "udp", 0.0))
        fast = dns.message.from_wire(resolver.fast(b"\x00\x07" + wire[2:], "udp", 1.0))
        assert fast.id == 7
        assert (fast.rcode(), fast.answer, fast.authority) == (slow.rcode(), slow.answer, slow.authority)
    forward = only_forward(resolver.handle(query_wire("www.example.com"), CLIENT, "udp", 0.0))
    resolver.on_upstream_answer(forward.key, forward.upstream, upstream_answer(forward), 0.0)
    assert resolver.fast(query_wire("www.example.com"), "udp", 10.2) is None  # asked once: nothing kept
    assert reply_of(resolver.handle(query_wire("www.example.com"), CLIENT, "udp", 10.2)).answer[0].ttl == 289
    cached = dns.message.from_wire(resolver.fast(query_wire("www.example.com"), "udp", 10.5))
    assert cached.answer[0].ttl == 289
    stats = resolver.stats()
    assert (stats["queries_udp"], stats["fast_answers"]) == (9, 4)
    assert (stats["local_answers"], stats["rejected_by_rule"], stats["cache_hits"]) == (4, 2, 2)


@pytest.mark.parametrize("name", ["alpha.mesh", "www.example.com"])
def test_a_query_with_a_cookie_gets_the_reply_the_full_path_gives_it(name):
    resolver = Resolver(settings())
    actions = resolver.handle(cookie_query(name, os.urandom(8)), CLIENT, "udp", 0.0)
    if any(isinstance(a, Forward) for a in actions):
        forward = only_forward(actions)
        resolver.on_upstream_answer(forward.key, forward.upstream, upstream_answer(forward), 0.0)
    full = reply_of(resolver.handle(cookie_query(name, os.urandom(8)), CLIENT, "udp", 0.0))  # local, or cached
    # RFC 7873 section 5.2.1: a server that does not do cookies answers as if the option were not there.
    assert full.edns == 0 and full.options == () and full.answer
    again = cookie_query(name, os.urandom(8))
    fast = resolver.fast(again, "udp", 0.0)
    assert fast is not None and fast[:2] == again[:2]
    fast_reply = dns.message.from_wire(fast)
    assert (fast_reply.edns, fast_reply.payload, fast_reply.options, fast_reply.flags) == (
        full.edns,
        full.payload,
        full.options,
        full.flags,
    )
    assert sorted(fast_reply.answer[0]) == sorted(full.answer[0])
    assert resolver.fast(cookie_query(name, os.urandom(8), want_dnssec=True), "udp", 0.0) is None  # DO: another key

"""The answer cache: TTLs, negative caching, LRU bound, serve-stale."""

from __future__ import annotations

import struct

import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from meshsup.actors.dns.cache import STALE_ANSWER_TTL, DnsCache, cache_key
from meshsup.actors.dns.wire import WireAnswer, parse_answer
from tests.actors.dns.helpers import sections

NAME = dns.name.from_text("www.example.")


QNAME = NAME.to_wire()


KEY = cache_key(QNAME, dns.rdatatype.A, 1, False)


def upstream(rcode: int = dns.rcode.NOERROR, answer=(), authority=()) -> WireAnswer:
    """An upstream's answer for NAME/A, as the resolver keeps it."""
    message = dns.message.make_response(dns.message.make_query(NAME, "A"))
    message.set_rcode(dns.rcode.Rcode.make(rcode))
    message.answer, message.authority = list(answer), list(authority)
    parsed = parse_answer(message.to_wire(), QNAME, dns.rdatatype.A, dns.rdataclass.IN)
    assert isinstance(parsed, WireAnswer), parsed
    return parsed


def positive(ttl: int = 300) -> WireAnswer:
    return upstream(answer=[dns.rrset.from_text(NAME, ttl, "IN", "A", "203.0.113.1")])


def negative(rcode: int, soa_ttl: int, minimum: int) -> WireAnswer:
    soa = dns.rrset.from_text("example.", soa_ttl, "IN", "SOA", f"ns.example. h.example. 1 2 3 4 {minimum}")
    return upstream(rcode, authority=[soa])


def test_cache_ttl_counts_down_and_expires():
    cache = DnsCache(size=10)
    cache.put(KEY, positive(300), now=1000.0)
    assert sections(cache.get(KEY, 1100.4), QNAME).answer[0].ttl == 199
    assert cache.get(cache_key(QNAME, 1, 1, True), 1100.0) is None  # the DO bit is part of the key
    assert cache.get(KEY, 1300.0) is None


def test_cache_clamps_ttl():
    cache = DnsCache(size=10, min_ttl=60, max_ttl=120)
    assert sections(cache.put(KEY, positive(5), 0.0), QNAME).answer[0].ttl == 60
    assert cache.get(KEY, 59.0) is not None
    assert sections(cache.put(KEY, positive(9999), 0.0), QNAME).answer[0].ttl == 120
    assert cache.get(KEY, 121.0) is None


def test_negative_caching_uses_soa_minimum():
    cache = DnsCache(size=10)
    stored = cache.put(KEY, negative(dns.rcode.NXDOMAIN, soa_ttl=900, minimum=30), 0.0)
    assert sections(stored, QNAME).authority[0].ttl == 30
    assert cache.get(KEY, 29.0).rcode == dns.rcode.NXDOMAIN
    assert cache.get(KEY, 31.0) is None
    cache.put(KEY, negative(dns.rcode.NOERROR, soa_ttl=20, minimum=300), 0.0)  # NODATA: min(TTL, MINIMUM)
    assert cache.get(KEY, 19.0) is not None and cache.get(KEY, 21.0) is None


def test_uncacheable_answers():
    cache = DnsCache(size=10)
    assert cache.put(KEY, upstream(dns.rcode.NXDOMAIN), 0.0) is None  # no SOA
    assert cache.put(KEY, upstream(dns.rcode.SERVFAIL), 0.0) is None
    assert cache.put(KEY, positive(0), 0.0) is None
    assert len(cache) == 0 and cache.counters.not_cacheable == 3


def test_cache_is_lru_bounded():
    cache = DnsCache(size=2)
    keys = [cache_key(dns.name.from_text(f"n{i}.example.").to_wire(), 1, 1, False) for i in range(3)]
    cache.put(keys[0], positive(), 0.0)
    cache.put(keys[1], positive(), 0.0)
    assert cache.get(keys[0], 1.0) is not None  # keys[0] is now the most recent
    cache.put(keys[2], positive(), 2.0)
    assert cache.get(keys[1], 3.0) is None and cache.get(keys[0], 3.0) is not None
    assert cache.counters.evictions == 1 and len(cache) == 2


def test_serve_stale_window():
    cache = DnsCache(size=10, stale_ttl=100)
    cache.put(KEY, positive(10), 0.0)
    assert cache.get(KEY, 20.0) is None  # expired: not fresh ...
    assert sections(cache.get_stale(KEY, 20.0), QNAME).answer[0].ttl == STALE_ANSWER_TTL  # ... but servable as stale
    assert cache.get_stale(KEY, 111.0) is None


def test_cache_flush():
    cache = DnsCache(size=10)
    cache.put(KEY, positive(), 0.0)
    cache.flush()
    assert cache.get(KEY, 1.0) is None


def test_an_answer_kept_as_bytes_is_served_as_read():
    """An answer with nothing to clamp is kept as bytes until asked for, then
    served as the answer read from the upstream's message was."""
    message = dns.message.make_response(dns.message.make_query(NAME, "A", use_edns=0))
    message.answer = [dns.rrset.from_text(NAME, 300, "IN", "A", "203.0.113.1", "203.0.113.2")]
    wire = message.to_wire()
    answer = parse_answer(wire, QNAME, dns.rdatatype.A, dns.rdataclass.IN)
    cache = DnsCache(size=10, min_ttl=60, max_ttl=600)
    assert cache.put(KEY, answer, 1000.0) is answer
    served = cache.get(KEY, 1100.5)
    assert [(r.ttl, sorted(map(str, r))) for r in sections(served, QNAME).answer] == [
        (199, ["203.0.113.1", "203.0.113.2"])
    ]
    kept = cache.fresh(KEY, 1100.5).answer  # as stored, before counting down
    assert (kept.records, kept.counts, kept.base, kept.ttls) == (answer.records, answer.counts, answer.base, (300, 300))
    assert cache.get(KEY, 1300.0) is None and cache.counters.expired == 1
    clamped = parse_answer(wire.replace(struct.pack("!I", 300), struct.pack("!I", 5)), QNAME, 1, 1)
    assert sections(cache.put(KEY, clamped, 0.0), QNAME).answer[0].ttl == 60  # clamped: kept as read
    assert sections(cache.get(KEY, 1.0), QNAME).answer[0].ttl == 59


def test_a_key_dropped_or_stored_again_is_evicted_once():
    cache = DnsCache(size=2)
    keys = [cache_key(dns.name.from_text(f"n{i}.example.").to_wire(), 1, 1, False) for i in range(4)]
    cache.put(keys[0], positive(10), 0.0)
    assert cache.get(keys[0], 20.0) is None  # expired: dropped
    for key in keys:
        cache.put(key, positive(), 20.0)
    assert len(cache) == 2 and cache.counters.evictions == 2
    assert [cache.get(key, 21.0) is not None for key in keys] == [False, False, True, True]

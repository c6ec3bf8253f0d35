"""Unit tests of the DNS controller's sans-IO modules."""

from __future__ import annotations

import ipaddress
import os
import random
import struct
import subprocess
import sys
from pathlib import Path

import dns.edns
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.reversename
import dns.rrset
import pytest

from meshsup.actors.dns.cache import STALE_ANSWER_TTL, CacheKey, DnsCache
from meshsup.actors.dns.fastpath import FastAnswers, prepare
from meshsup.actors.dns.inflight import Admission, Flight, InflightTable, RateLimiter
from meshsup.actors.dns.message import Answer, ErrorReply, Ignored, Query, parse_query, parse_response, render
from meshsup.actors.dns.resolver import Drop, Forward, Learned, Log, Reply, Resolver
from meshsup.actors.dns.rules import ForwardTo, Matcher, Reject, Route, Router, Rule, SourceOverride, normalize_name
from meshsup.actors.dns.settings import DNS_KEYS, DnsSettings
from meshsup.actors.dns.upstream import MAX_ATTEMPTS, FailoverPlan, Upstream, parse_upstream, without_own
from meshsup.actors.dns.wire import WireAnswer, parse_answer, query_key
from meshsup.actors.dns.zone import SrvRecord, Zone
from meshsup.actors.router.resolvconf import HEADER, ResolvConf

CLIENT = ("127.0.0.1", 40000)


def query_wire(name: str, rdtype: str = "A", **kwargs) -> bytes:
    return dns.message.make_query(name, rdtype, **kwargs).to_wire()


def settings(**table) -> DnsSettings:
    names = table.pop("names", {"alpha": ["100.64.0.1/32", "fd7a:115c:a1e0::1/128"], "bravo": ["100.64.0.2"]})
    table.setdefault("listen", ["127.0.0.1:5300"])
    table.setdefault("upstreams", ["udp://127.0.0.11", "udp://127.0.0.12", "udp://127.0.0.13", "udp://127.0.0.14"])
    return DnsSettings.from_config(table, names)


def reply_of(actions) -> dns.message.Message:
    replies = [a for a in actions if isinstance(a, Reply)]
    assert len(replies) == 1, actions
    return dns.message.from_wire(replies[0].wire)


def upstream_answer(forward: Forward, rcode: int = dns.rcode.NOERROR, ttl: int = 300) -> bytes:
    query = dns.message.from_wire(forward.query)
    answer = dns.message.make_response(query)
    answer.set_rcode(dns.rcode.Rcode.make(rcode))
    if rcode == dns.rcode.NOERROR:
        answer.answer.append(dns.rrset.from_text(query.question[0].name, ttl, "IN", "A", "203.0.113.7"))
    return answer.to_wire()


def only_forward(actions) -> Forward:
    forwards = [a for a in actions if isinstance(a, Forward)]
    assert len(forwards) == 1, actions
    return forwards[0]


# -- settings -------------------------------------------------------------


def test_settings_defaults_and_parsing():
    s = DnsSettings.from_config(
        {
            "listen": ["127.0.0.1:5353", "[::1]:53", "100.64.0.1"],
            "domain": "Mesh.",
            "upstreams": ["udp://198.51.100.53", "tls://198.51.100.54#dns.example"],
            "groups": {"corp": ["tcp://198.51.100.55:5353"]},
            "rules": [{"match": "suffix:ads.example", "action": "reject"}, {"match": "qtype:AAAA", "action": "corp"}],
            "routes": [{"suffix": "corp.example", "upstreams": ["tcp://198.51.100.53"]}],
            "srv": [{"name": "_http._tcp", "target": "alpha", "port": 80}],
            "source_overrides": [{"source": "10.0.0.0/8", "upstreams": ["udp://198.51.100.60"]}],
            "timeout": 1,
        },
        {"Alpha": ["100.64.0.1/32"]},
    )
    assert s.listen == (("127.0.0.1", 5353), ("::1", 53), ("100.64.0.1", 53))
    assert s.domain == "mesh"
    assert s.upstreams[1] == Upstream("tls", "198.51.100.54", 853, "", "dns.example")
    assert s.names == {"alpha": ("100.64.0.1",)}
    assert s.srv == (SrvRecord("_http._tcp.mesh", "alpha.mesh", 80),)
    assert (s.ttl, s.max_inflight, s.reject_rcode, s.timeout) == (600, 1024, "noerror", 1.0)
    assert {"listen", "domain", "upstreams", "set_os_resolver", "routes", "rules"} <= DNS_KEYS


@pytest.mark.parametrize(
    ("table", "names", "key"),
    [
        ({"upstreams": ["ftp://198.51.100.1"]}, {}, "dns.upstreams[0]"),
        ({"upstreams": ["udp://resolver.example"]}, {}, "dns.upstreams[0]"),
        ({"ttl": -1}, {}, "dns.ttl"),
        ({"ttl": True}, {}, "dns.ttl"),
        ({"serve_stale": 1}, {}, "dns.serve_stale"),
        ({"listen": ["127.0.0.1:99999"]}, {}, "dns.listen[0]"),
        ({"listen": []}, {}, "dns.listen"),
        ({"domain": "bad domain!"}, {}, "dns.domain"),
        ({"bogus": 1}, {}, "bogus"),
        ({"rules": [{"match": "suffix:x.example", "action": "nosuchgroup"}]}, {}, "dns.rules[0].action"),
        ({"rules": [{"match": "regex:([", "action": "reject"}]}, {}, "dns.rules[0].match"),
        ({"rules": [{"match": "glob:*", "action": "reject"}]}, {}, "dns.rules[0].match"),
        ({"rules": [{"match": "qtype:NOTATYPE", "action": "reject"}]}, {}, "dns.rules[0].match"),
        ({"reject_rcode": "servfail"}, {}, "dns.reject_rcode"),
        ({"srv": [{"name": "_x._tcp", "target": "alpha", "port": 70000}]}, {}, "dns.srv[0].port"),
        ({"srv": [{"name": "_x._tcp.elsewhere.", "target": "alpha", "port": 1}]}, {}, "dns.srv[0].name"),
        ({"routes": [{"suffix": "corp.example"}]}, {}, "dns.routes[0]"),
        ({"groups": {"reject": ["udp://198.51.100.1"]}}, {}, "dns.groups.reject"),
        ({"source_overrides": [{"source": "10.0.0.0/33", "upstreams": []}]}, {}, "dns.source_overrides[0].source"),
        ({"cache_min_ttl": 100, "cache_max_ttl": 10}, {}, "dns.cache_min_ttl"),
        ({"ca_file": "/nonexistent/ca.pem"}, {}, "dns.ca_file"),
        ({}, {"alpha": ["not-an-ip"]}, "names.alpha"),
        ({"set_os_resolver": True, "listen": ["127.0.0.1:5353"]}, {}, "dns.set_os_resolver"),
    ],
)
def test_settings_errors_name_the_key(table, names, key):
    with pytest.raises(ValueError) as error:
        DnsSettings.from_config(table, names)
    assert key in str(error.value)


def test_nameservers_for_resolv_conf():
    listen = ["127.0.0.53:53", "0.0.0.0:53", "[::]:53", "100.64.0.1:5353", "[fd7a::1]:53"]
    assert DnsSettings.from_config({"listen": listen, "set_os_resolver": True}, {}).nameservers == [
        "127.0.0.53", "127.0.0.1", "::1", "fd7a::1",
    ]  # fmt: skip


# -- upstreams ----------------------------------------------------------------


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
    tried = [plan.next() for _ in range(5)]
    assert tried[:MAX_ATTEMPTS] == ups[:3] and tried[3:] == [None, None]


def test_own_listen_addresses_are_never_upstreams():
    urls = ["udp://127.0.0.1:5300", "tcp://127.0.0.1:5300", "udp://127.0.0.1:53", "udp://127.0.0.9:5301"]
    ups = [parse_upstream(u) for u in urls]
    assert without_own(ups, [("127.0.0.1", 5300)]) == (ups[2], ups[3])
    assert without_own(ups, [("0.0.0.0", 5301)]) == tuple(ups[:3])


# -- message hygiene ------------------------------------------------------


def header(flags: int, qd: int = 1, an: int = 0, ns: int = 0, ar: int = 0, query_id: int = 0x1234) -> bytes:
    return struct.pack("!HHHHHH", query_id, flags, qd, an, ns, ar)


def test_query_with_qr_set_is_ignored():
    wire = bytearray(query_wire("x.example"))
    wire[2] |= 0x80
    assert parse_query(bytes(wire)) == Ignored("drop_response")
    assert parse_query(b"\x01\x02") == Ignored("drop_short")


def rcode_of(result) -> int:
    assert isinstance(result, ErrorReply), result
    message = dns.message.from_wire(result.wire)
    assert message.id == 0x1234 or message.flags & dns.flags.QR
    return int(message.rcode())


def test_qdcount_two_is_formerr():
    wire = header(0x0100, qd=2) + b"\x01a\x00\x00\x01\x00\x01" * 2
    assert rcode_of(parse_query(wire)) == dns.rcode.FORMERR


def test_unknown_opcode_is_notimp():
    wire = header(0x0100 | (5 << 11)) + b"\x01a\x00\x00\x01\x00\x01"
    result = parse_query(wire)
    assert rcode_of(result) == dns.rcode.NOTIMP
    assert dns.message.from_wire(result.wire).opcode() == 5


def test_edns_version_1_is_badvers_with_version_0():
    message = dns.message.make_query("x.example", "A", use_edns=1)
    result = parse_query(message.to_wire())
    assert rcode_of(result) == dns.rcode.BADVERS
    assert dns.message.from_wire(result.wire).edns == 0


def test_truncated_query_is_formerr():
    wire = query_wire("www.example.com")
    assert rcode_of(parse_query(wire[:20])) == dns.rcode.FORMERR


def test_compression_pointer_loop_is_formerr():
    # The question name is a pointer to itself (offset 12).
    wire = header(0x0100) + b"\xc0\x0c\x00\x01\x00\x01"
    assert rcode_of(parse_query(wire)) == dns.rcode.FORMERR
    # Two pointers pointing at each other.
    wire = header(0x0100) + b"\x01a\xc0\x0e\x00\x01\x00\x01"
    assert rcode_of(parse_query(wire)) == dns.rcode.FORMERR


def test_random_bytes_never_raise():
    rng = random.Random(1)
    seeds = [query_wire("a.example"), query_wire("b.example", "AAAA", use_edns=0)]
    for i in range(3000):
        if i % 2:
            wire = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 80)))
        else:
            wire = bytearray(rng.choice(seeds))
            for _ in range(rng.randrange(1, 4)):
                wire[rng.randrange(len(wire))] = rng.randrange(256)
            wire = bytes(wire)
        assert isinstance(parse_query(wire), (Query, ErrorReply, Ignored))


def big_answer(name: dns.name.Name, count: int = 40) -> Answer:
    rrset = dns.rrset.from_text_list(name, 60, "IN", "A", [f"203.0.113.{i}" for i in range(1, count + 1)])
    return Answer(dns.rcode.NOERROR, answer=(rrset,))


def test_truncation_to_client_limits():
    plain = parse_query(query_wire("big.example"))
    edns = parse_query(query_wire("big.example", use_edns=0, payload=4096))
    answer = big_answer(plain.qname)  # 40 A records: about 660 bytes
    udp = dns.message.from_wire(render(plain, answer, "udp"))
    assert len(render(plain, answer, "udp")) <= 512 and udp.flags & dns.flags.TC
    roomy = dns.message.from_wire(render(edns, answer, "udp"))
    assert not roomy.flags & dns.flags.TC and len(roomy.answer[0]) == 40
    tcp = dns.message.from_wire(render(plain, big_answer(plain.qname, 250), "tcp"))
    assert not tcp.flags & dns.flags.TC and len(tcp.answer[0]) == 250
    tiny = parse_query(query_wire("big.example", use_edns=0, payload=100))
    assert len(render(tiny, answer, "udp")) <= 512  # below 512 counts as 512


def test_ad_only_for_clients_asking_for_dnssec():
    answer = Answer(dns.rcode.NOERROR, authenticated=True)
    plain = dns.message.from_wire(render(parse_query(query_wire("x.example")), answer, "udp"))
    do = dns.message.from_wire(render(parse_query(query_wire("x.example", want_dnssec=True)), answer, "udp"))
    assert not plain.flags & dns.flags.AD
    assert do.flags & dns.flags.AD and do.ednsflags & dns.flags.DO


def test_parse_response_checks_question():
    query = parse_query(query_wire("x.example"))
    other = dns.message.make_response(dns.message.make_query("y.example", "A")).to_wire()
    assert parse_response(other, query) == "question_mismatch"
    assert parse_response(b"garbage", query) == "malformed"
    assert parse_response(query_wire("x.example"), query) == "not_response"
    same = dns.message.make_response(dns.message.make_query("X.Example", "A"))
    assert isinstance(parse_response(same.to_wire(), query), WireAnswer)  # names match in any case


# -- wire: plain queries and upstream answers by hand ------------------------


@pytest.mark.parametrize(
    "options",
    [{}, {"use_edns": 0}, {"use_edns": 0, "payload": 4096}, {"want_dnssec": True}, {"rdtype": "AAAA"},
     {"rdclass": "CH"}, {"name": "MiXeD.Case.Example"}, {"name": "."}, {"name": "a\\.b\\032c.example"}],
)
def test_plain_queries_are_read_by_hand_as_dnspython_reads_them(options):
    name, rdtype, rdclass = options.pop("name", "x.example"), options.pop("rdtype", "A"), options.pop("rdclass", "IN")
    message = dns.message.make_query(name, rdtype, rdclass, **options)
    message.flags |= dns.flags.CD
    wire = message.to_wire()
    by_hand, by_dnspython = parse_query(wire), Query.from_message(wire, dns.message.from_wire(wire))
    assert by_hand.plain and not by_dnspython.plain
    assert by_hand.fields == by_dnspython.fields
    assert by_hand.name_text == normalize_name(by_dnspython.qname.to_text())  # what rules used to match


def test_queries_with_edns_options_go_through_dnspython():
    cookie = dns.edns.GenericOption(dns.edns.OptionType.COOKIE, b"12345678")
    query = parse_query(dns.message.make_query("x.example", "A", use_edns=0, options=[cookie]).to_wire())
    assert isinstance(query, Query) and not query.plain and query.qname_key == b"\x01x\x07example\x00"


def answer_wire(*records: str, rcode: str = "NOERROR", name: str = "x.example", rdtype: str = "A", edns: bool = True,
                **flags: bool) -> bytes:
    message = dns.message.make_response(dns.message.make_query(name, rdtype, use_edns=0 if edns else None, id=1))
    message.set_rcode(dns.rcode.from_text(rcode))
    for record in records:
        section, text = record.split(" ", 1)
        getattr(message, section).append(dns.rrset.from_text(*text.split(" ", 4)))
    for flag, on in flags.items():
        if on:
            message.flags |= dns.flags.from_text(flag)
    return message.to_wire()


X = dns.name.from_text("x.example").to_wire()


def test_upstream_answer_records_kept_as_bytes():
    wire = answer_wire(
        "answer x.example. 300 IN CNAME y.example.", "answer y.example. 60 IN A 203.0.113.1",
        "answer y.example. 60 IN A 203.0.113.2", "authority example. 900 IN NS ns.example.",
        "additional ns.example. 30 IN AAAA 2001:db8::1", AD=True,
    )  # fmt: skip
    answer = parse_answer(wire, X.upper(), 1, 1)
    assert isinstance(answer, WireAnswer)
    assert answer.counts == (3, 1, 1) and answer.authenticated and answer.rcode == 0
    assert list(answer.ttls) == [300, 60, 60, 900, 30]
    assert answer.addresses == (("y.example", ("203.0.113.1", "203.0.113.2")),)
    assert [count for _, count in answer.set_ends] == [1, 3, 4, 5]  # RRset boundaries
    back = sections(answer, X)
    assert [r.to_text() for r in back.answer[1]] == ["203.0.113.1", "203.0.113.2"]


def test_negative_ttl_from_the_soa():
    answer = parse_answer(answer_wire("authority example. 900 IN SOA ns.example. h.example. 1 2 3 4 30",
                                      rcode="NXDOMAIN"), X, 1, 1)
    assert answer.negative_ttl == 30 and answer.rcode == dns.rcode.NXDOMAIN and answer.empty


def corrupt(wire: bytes, old: bytes, new: bytes) -> bytes:
    assert old in wire
    return wire.replace(old, new, 1)


GOOD = answer_wire("answer x.example. 60 IN A 203.0.113.1")


@pytest.mark.parametrize(
    ("wire", "reason"),
    [
        (GOOD[:11], "malformed"),
        (GOOD[:-3], "malformed"),  # the OPT cut short
        (GOOD + b"\x00", "malformed"),  # trailing junk
        (corrupt(GOOD, b"\xc0\x0c", b"\xc0\x02"), "malformed"),  # a pointer into the header
        (corrupt(GOOD, b"\xc0\x0c", b"\xc0\x1b"), "malformed"),  # a pointer forwards
        (corrupt(GOOD, b"\x00\x04\xcb\x00", b"\x00\x03\xcb\x00")[:-1], "malformed"),  # A of 3 bytes
        (answer_wire("answer x.example. 60 IN A 203.0.113.1", edns=False)[:-1], "malformed"),
        (corrupt(GOOD, b"\x00\x29\x20\x00\x00", b"\x00\x29\x20\x00\x01"), "extended_rcode"),
        (answer_wire(name="y.example"), "question_mismatch"),
        (answer_wire(rdtype="AAAA"), "question_mismatch"),
        (answer_wire(TC=True), "truncated"),
        (query_wire("x.example"), "not_response"),
    ],
    ids=["short", "cut", "trailing", "pointer-to-header", "pointer-forwards", "short-a", "cut-a", "ext-rcode",
         "other-name", "other-type", "tc", "query"],
)
def test_bad_upstream_answers_are_refused(wire, reason):
    assert parse_answer(wire, X, 1, 1) == reason


def test_pointer_loop_and_misplaced_opt_are_malformed():
    head = struct.pack("!HHHHHH", 0, 0x8180, 1, 1, 0, 0) + X + b"\x00\x01\x00\x01"
    loop = head + b"\x01a\xc0\x1b" + b"\x00\x01\x00\x01\x00\x00\x00\x3c\x00\x04\xcb\x00\x71\x01"
    assert parse_answer(loop, X, 1, 1) == "malformed"
    opt_first = struct.pack("!HHHHHH", 0, 0x8180, 1, 0, 0, 2) + X + b"\x00\x01\x00\x01" + wire_opt() * 1 + (
        b"\xc0\x0c\x00\x01\x00\x01\x00\x00\x00\x3c\x00\x04\xcb\x00\x71\x01")
    assert parse_answer(opt_first, X, 1, 1) == "malformed"  # records after the OPT would move
    two_opts = struct.pack("!HHHHHH", 0, 0x8180, 1, 0, 0, 2) + X + b"\x00\x01\x00\x01" + wire_opt() * 2
    assert parse_answer(two_opts, X, 1, 1) == "malformed"


def wire_opt() -> bytes:
    return b"\x00\x00\x29\x04\xd0\x00\x00\x00\x00\x00\x00"


def test_mangled_upstream_answers_never_raise():
    rng = random.Random(3)
    seeds = [GOOD, answer_wire("answer x.example. 300 IN CNAME y.example.", "answer y.example. 60 IN A 203.0.113.1",
                               "authority example. 900 IN SOA ns.example. h.example. 1 2 3 4 30")]
    for _ in range(3000):
        wire = bytearray(rng.choice(seeds))
        for _ in range(rng.randrange(1, 4)):
            wire[rng.randrange(len(wire))] = rng.randrange(256)
        result = parse_answer(bytes(wire[: rng.randrange(12, len(wire) + 1)]), X, 1, 1)
        assert isinstance(result, (WireAnswer, str))


@pytest.mark.parametrize("edns", [{}, {"use_edns": 0}, {"want_dnssec": True}])
def test_assembled_reply_says_what_the_rendered_one_says(edns):
    wire = dns.message.make_query("X.example", "A", **edns).to_wire()
    plain = parse_query(wire)
    rendered = Query.from_message(wire, dns.message.from_wire(wire))
    answer = parse_answer(answer_wire("answer x.example. 300 IN CNAME y.example.",
                                      "answer y.example. 60 IN A 203.0.113.1", AD=True), X, 1, 1)
    by_hand = dns.message.from_wire(render(plain, answer, "udp"))
    by_dnspython = dns.message.from_wire(render(rendered, answer, "udp"))
    for field in ("id", "flags", "edns", "payload", "ednsflags", "question", "answer", "authority", "additional"):
        assert getattr(by_hand, field) == getattr(by_dnspython, field), field


def test_assembled_reply_is_cut_like_a_rendered_one():
    many = [f"answer x.example. 60 IN A 203.0.113.{i}" for i in range(1, 41)]
    glue = [f"additional ns{i}.example. 60 IN A 198.51.100.{i}" for i in range(1, 41)]
    for records, tc in [(many, True), (["answer x.example. 60 IN A 203.0.113.1", *glue], False)]:
        answer = parse_answer(answer_wire(*records), X, 1, 1)
        wire = query_wire("x.example")
        by_hand = render(parse_query(wire), answer, "udp")
        by_dnspython = render(Query.from_message(wire, dns.message.from_wire(wire)), answer, "udp")
        assert len(by_hand) <= 512 and len(by_dnspython) <= 512
        hand, python = dns.message.from_wire(by_hand), dns.message.from_wire(by_dnspython)
        assert bool(hand.flags & dns.flags.TC) == bool(python.flags & dns.flags.TC) == tc
        assert hand.answer == python.answer and len(hand.additional) == len(python.additional)


# -- the fast path -------------------------------------------------------------------


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
        dns.name.from_text("bravo.mesh."), dns.rdatatype.A, 1)
    query = parse_query(query_wire("bravo.mesh"))
    prepared = prepare(render(query, zone_answer, "udp"), random.Random(2))
    orders = {tuple(r.address for r in dns.message.from_wire(prepared.render(b"\x00\x01", 0.0)).answer[0])
              for _ in range(300)}
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


def cookie_query(name: str, cookie: bytes, rdtype: str = "A", **kwargs) -> bytes:
    option = dns.edns.GenericOption(dns.edns.OptionType.COOKIE, cookie)
    kwargs.setdefault("use_edns", 0)
    return dns.message.make_query(name, rdtype, options=[option], **kwargs).to_wire()


def test_fast_key_ignores_the_cookie_but_not_what_changes_the_reply():
    first, second = cookie_query("x.example", b"\x01" * 8), cookie_query("x.example", b"\x02" * 8)
    assert first[2:] != second[2:] and query_key(first) == query_key(second)
    others = [
        cookie_query("x.example", b"\x01" * 24),  # another length: one of them may be a FORMERR
        cookie_query("x.example", b"\x01" * 8, want_dnssec=True),
        cookie_query("x.example", b"\x01" * 8, payload=4096),
        cookie_query("x.example", b"\x01" * 8, "AAAA"),
        cookie_query("y.example", b"\x01" * 8),
        query_wire("x.example", use_edns=0),
    ]
    assert len({query_key(first), *map(query_key, others)}) == len(others) + 1
    plain = query_wire("x.example")
    assert query_key(plain) == plain[2:]  # the common case: the bytes after the ID


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
        full.edns, full.payload, full.options, full.flags)
    assert sorted(fast_reply.answer[0]) == sorted(full.answer[0])
    assert resolver.fast(cookie_query(name, os.urandom(8), want_dnssec=True), "udp", 0.0) is None  # DO: another key


# -- zone ---------------------------------------------------------------------


@pytest.fixture
def zone() -> Zone:
    return Zone(
        "mesh",
        {"alpha": ["100.64.0.1", "fd7a:115c:a1e0::1"], "bravo": ["100.64.0.2", "100.64.0.3", "100.64.0.4"]},
        srv=[SrvRecord("_http._tcp.mesh", "alpha.mesh", 8080, 1, 5)],
        ttl=120,
        rng=random.Random(7),
    )


def ask(zone: Zone, name: str, rdtype: str) -> Answer | None:
    return zone.answer(dns.name.from_text(name), dns.rdatatype.from_text(rdtype), 1)


def texts(rrsets) -> list[str]:
    return sorted(r.to_text() for rrset in rrsets for r in rrset)


def test_zone_a_and_aaaa(zone):
    a = ask(zone, "ALPHA.mesh.", "A")
    assert a.rcode == dns.rcode.NOERROR and a.authoritative and texts(a.answer) == ["100.64.0.1"]
    assert a.answer[0].ttl == 120 and a.answer[0].name == dns.name.from_text("ALPHA.mesh.")
    assert texts(ask(zone, "alpha.mesh.", "AAAA").answer) == ["fd7a:115c:a1e0::1"]


def test_zone_shuffles_several_addresses(zone):
    orders = {tuple(r.to_text() for r in ask(zone, "bravo.mesh.", "A").answer[0]) for _ in range(40)}
    assert len(orders) > 1
    assert all(sorted(order) == ["100.64.0.2", "100.64.0.3", "100.64.0.4"] for order in orders)


def test_zone_name_without_ipv6_gets_empty_noerror_with_soa(zone):
    answer = ask(zone, "bravo.mesh.", "AAAA")
    assert answer.rcode == dns.rcode.NOERROR and answer.answer == ()
    assert answer.authority[0].rdtype == dns.rdatatype.SOA


def test_zone_mx_for_known_name_is_empty_noerror(zone):
    answer = ask(zone, "alpha.mesh.", "MX")
    assert answer.rcode == dns.rcode.NOERROR and answer.answer == ()


def test_zone_unknown_name_is_nxdomain_with_soa(zone):
    answer = ask(zone, "charlie.mesh.", "A")
    assert answer.rcode == dns.rcode.NXDOMAIN
    soa = answer.authority[0]
    assert soa.name == dns.name.from_text("mesh.") and soa[0].minimum == 120


def test_zone_ptr_v4_and_v6(zone):
    assert texts(ask(zone, "1.0.64.100.in-addr.arpa.", "PTR").answer) == ["alpha.mesh."]
    v6 = dns.reversename.from_address("fd7a:115c:a1e0::1").to_text()
    assert texts(ask(zone, v6, "PTR").answer) == ["alpha.mesh."]
    assert ask(zone, "9.9.64.100.in-addr.arpa.", "PTR") is None  # not ours: forwarded


def test_zone_srv_with_glue(zone):
    answer = ask(zone, "_http._tcp.mesh.", "SRV")
    assert texts(answer.answer) == ["1 5 8080 alpha.mesh."]
    assert texts(answer.additional) == ["100.64.0.1", "fd7a:115c:a1e0::1"]
    assert ask(zone, "_tcp.mesh.", "SRV").rcode == dns.rcode.NOERROR  # an empty non-terminal exists


def test_zone_leaves_other_names_alone(zone):
    assert ask(zone, "example.com.", "A") is None
    assert zone.answer(dns.name.from_text("alpha.mesh."), dns.rdatatype.A, dns.rdataclass.CH) is None


# -- cache --------------------------------------------------------------------

NAME = dns.name.from_text("www.example.")
QNAME = NAME.to_wire()
KEY = CacheKey(QNAME, dns.rdatatype.A, 1, False)


def upstream(rcode: int = dns.rcode.NOERROR, answer=(), authority=()) -> WireAnswer:
    """An upstream's answer for NAME/A, as the resolver keeps it."""
    message = dns.message.make_response(dns.message.make_query(NAME, "A"))
    message.set_rcode(dns.rcode.Rcode.make(rcode))
    message.answer, message.authority = list(answer), list(authority)
    parsed = parse_answer(message.to_wire(), QNAME, dns.rdatatype.A, dns.rdataclass.IN)
    assert isinstance(parsed, WireAnswer), parsed
    return parsed


def sections(answer: WireAnswer, qname: bytes = QNAME) -> dns.message.Message:
    """The answer's records read back with dnspython."""
    head = struct.pack("!HHHHHH", 0, 0x8000 | answer.rcode, 1, *answer.counts)
    return dns.message.from_wire(head + qname + struct.pack("!HH", 1, 1) + answer.records)


def positive(ttl: int = 300) -> WireAnswer:
    return upstream(answer=[dns.rrset.from_text(NAME, ttl, "IN", "A", "203.0.113.1")])


def negative(rcode: int, soa_ttl: int, minimum: int) -> WireAnswer:
    soa = dns.rrset.from_text("example.", soa_ttl, "IN", "SOA", f"ns.example. h.example. 1 2 3 4 {minimum}")
    return upstream(rcode, authority=[soa])


def test_cache_ttl_counts_down_and_expires():
    cache = DnsCache(size=10)
    cache.put(KEY, positive(300), now=1000.0)
    assert sections(cache.get(KEY, 1100.4)).answer[0].ttl == 199
    assert cache.get(CacheKey(QNAME, 1, 1, True), 1100.0) is None  # the DO bit is part of the key
    assert cache.get(KEY, 1300.0) is None


def test_cache_clamps_ttl():
    cache = DnsCache(size=10, min_ttl=60, max_ttl=120)
    assert sections(cache.put(KEY, positive(5), 0.0)).answer[0].ttl == 60
    assert cache.get(KEY, 59.0) is not None
    assert sections(cache.put(KEY, positive(9999), 0.0)).answer[0].ttl == 120
    assert cache.get(KEY, 121.0) is None


def test_negative_caching_uses_soa_minimum():
    cache = DnsCache(size=10)
    stored = cache.put(KEY, negative(dns.rcode.NXDOMAIN, soa_ttl=900, minimum=30), 0.0)
    assert sections(stored).authority[0].ttl == 30
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
    keys = [CacheKey(dns.name.from_text(f"n{i}.example.").to_wire(), 1, 1, False) for i in range(3)]
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
    assert sections(cache.get_stale(KEY, 20.0)).answer[0].ttl == STALE_ANSWER_TTL  # ... but servable as stale
    assert cache.get_stale(KEY, 111.0) is None


def test_cache_flush():
    cache = DnsCache(size=10)
    cache.put(KEY, positive(), 0.0)
    cache.flush()
    assert cache.get(KEY, 1.0) is None


# -- rules --------------------------------------------------------------------

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
    assert Matcher.parse(match).matches(name, qtype) is hit


def test_router_order_and_actions():
    router = Router(
        rules=[
            Rule(Matcher.parse("full:ok.ads.example"), "asis"),
            Rule(Matcher.parse("suffix:ads.example"), "reject"),
            Rule(Matcher.parse("keyword:video"), "fast"),
            Rule(Matcher.parse("suffix:video.example"), "reject"),  # never reached: keyword wins first
        ],
        routes=[Route("example", (U2,)), Route("corp.example", (U3,))],
        groups={"fast": (U4,)},
        default=(U1,),
        overrides=[SourceOverride(ipaddress.ip_network("10.0.0.0/8"), (U4,))],
    )
    assert isinstance(router.route("x.ads.example.", 1, "127.0.0.1"), Reject)
    assert router.route("ok.ads.example.", 1, "127.0.0.1").upstreams == (U2,)  # asis: normal routing
    assert router.route("a.video.example.", 1, "127.0.0.1").upstreams == (U4,)
    assert router.route("a.corp.example.", 1, "127.0.0.1").upstreams == (U3,)  # most specific route
    assert router.route("a.example.", 1, "127.0.0.1").upstreams == (U2,)
    assert router.route("a.test.", 1, "127.0.0.1") == ForwardTo((U1,), "", "default")
    overridden = router.route("a.test.", 1, "10.1.2.3")
    assert overridden.upstreams == (U4,) and overridden.view == "10.0.0.0/8"


def test_router_refuses_unknown_group():
    with pytest.raises(ValueError):
        Router(rules=[Rule(Matcher.parse("keyword:x"), "nope")], routes=[], groups={}, default=())


# -- in-flight ------------------------------------------------------------------


def test_inflight_merges_and_caps():
    table: InflightTable[str] = InflightTable(cap=2)
    make = lambda: Flight(b"q", FailoverPlan([U1]), 0.0)  # noqa: E731
    assert table.admit("k1", "w1", make) is Admission.STARTED
    assert table.admit("k1", "w2", make) is Admission.MERGED
    assert table.admit("k2", "w3", make) is Admission.STARTED
    assert table.admit("k3", "w4", make) is Admission.FULL
    assert table.finish("k1").waiters == ["w1", "w2"]
    assert table.admit("k3", "w4", make) is Admission.STARTED


def test_rate_limiter():
    limiter = RateLimiter(2.0)
    assert [limiter.allow(t) for t in (0.0, 0.5, 1.9, 2.0, 2.1)] == [True, False, False, True, False]
    assert limiter.suppressed == 3


# -- resolver -------------------------------------------------------------------


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


# -- the OS resolver (resolv.conf, written by the router actor) ---------------------


def test_resolv_conf_missing_before_a_crash_is_missing_after(tmp_path):
    path = tmp_path / "netns" / "resolv.conf"
    backup = tmp_path / "state" / "backup"
    backup.parent.mkdir()
    ResolvConf(path, backup=backup, in_place=True).apply(["127.0.0.1"], ["mesh"])  # this run "dies"
    assert path.read_text().startswith(HEADER) and not backup.exists()
    again = ResolvConf(path, backup=backup, in_place=True)
    again.apply(["127.0.0.1"])
    again.restore()
    assert not path.exists()


def test_resolv_conf_rewritten_in_place_keeps_its_inode(tmp_path):
    path = tmp_path / "resolv.conf"
    path.write_text("nameserver 198.51.100.53\n")
    inode = path.stat().st_ino
    resolv = ResolvConf(path, backup=tmp_path / "backup", in_place=True)
    resolv.apply(["127.0.0.1"], ["mesh"])
    assert path.stat().st_ino == inode and "nameserver 127.0.0.1\n" in path.read_text()
    assert (tmp_path / "backup").read_text() == "nameserver 198.51.100.53\n"
    resolv.restore()
    assert path.stat().st_ino == inode and path.read_text() == "nameserver 198.51.100.53\n"
    assert not (tmp_path / "backup").exists()


def test_resolv_conf_directories_made_for_it_are_removed_again(tmp_path):
    resolv = ResolvConf(tmp_path / "netns" / "ns1" / "resolv.conf", backup=tmp_path / "backup")
    resolv.apply(["127.0.0.1"])
    resolv.restore()
    assert list(tmp_path.iterdir()) == []
    resolv.apply(["127.0.0.1"])
    (tmp_path / "netns" / "ns2").mkdir()  # someone else's, made meanwhile
    resolv.restore()
    assert [p.relative_to(tmp_path) for p in tmp_path.rglob("*")] == [Path("netns"), Path("netns/ns2")]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")
def test_a_named_namespace_resolves_with_its_etc_netns_file():
    name = f"msrc{os.getpid() % 10000}{random.randrange(1000)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        probe = ("import pathlib; from actors.router.resolvconf import for_this_namespace as f; "
                 "print(f(pathlib.Path('/x')).path)")
        inside = subprocess.run(["ip", "netns", "exec", name, sys.executable, "-c", probe], capture_output=True,
                                text=True, check=True, cwd=Path(__file__).resolve().parent.parent).stdout.strip()
        assert inside == f"/etc/netns/{name}/resolv.conf"
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)

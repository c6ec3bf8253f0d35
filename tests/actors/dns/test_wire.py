"""Plain queries and upstream answers read by hand, replies assembled from their bytes, fast keys."""

from __future__ import annotations

import random
import struct

import dns.edns
import dns.flags
import dns.message
import dns.rcode
import pytest

from meshsup.actors.dns.message import Query, parse_query, render
from meshsup.actors.dns.wire import WireAnswer, parse_answer, query_key
from meshsup.actors.settings.dnstypes import normalize_name
from tests.actors.dns.helpers import X, answer_wire, cookie_query, query_wire, sections


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"use_edns": 0},
        {"use_edns": 0, "payload": 4096},
        {"want_dnssec": True},
        {"rdtype": "AAAA"},
        {"rdclass": "CH"},
        {"name": "MiXeD.Case.Example"},
        {"name": "."},
        {"name": "a\\.b\\032c.example"},
    ],
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
    answer = parse_answer(
        answer_wire("authority example. 900 IN SOA ns.example. h.example. 1 2 3 4 30", rcode="NXDOMAIN"), X, 1, 1
    )
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
    ids=[
        "short",
        "cut",
        "trailing",
        "pointer-to-header",
        "pointer-forwards",
        "short-a",
        "cut-a",
        "ext-rcode",
        "other-name",
        "other-type",
        "tc",
        "query",
    ],
)
def test_bad_upstream_answers_are_refused(wire, reason):
    assert parse_answer(wire, X, 1, 1) == reason


def test_pointer_loop_and_misplaced_opt_are_malformed():
    head = struct.pack("!HHHHHH", 0, 0x8180, 1, 1, 0, 0) + X + b"\x00\x01\x00\x01"
    loop = head + b"\x01a\xc0\x1b" + b"\x00\x01\x00\x01\x00\x00\x00\x3c\x00\x04\xcb\x00\x71\x01"
    assert parse_answer(loop, X, 1, 1) == "malformed"
    opt_first = (
        struct.pack("!HHHHHH", 0, 0x8180, 1, 0, 0, 2)
        + X
        + b"\x00\x01\x00\x01"
        + wire_opt() * 1
        + (b"\xc0\x0c\x00\x01\x00\x01\x00\x00\x00\x3c\x00\x04\xcb\x00\x71\x01")
    )
    assert parse_answer(opt_first, X, 1, 1) == "malformed"  # records after the OPT would move
    two_opts = struct.pack("!HHHHHH", 0, 0x8180, 1, 0, 0, 2) + X + b"\x00\x01\x00\x01" + wire_opt() * 2
    assert parse_answer(two_opts, X, 1, 1) == "malformed"


def wire_opt() -> bytes:
    return b"\x00\x00\x29\x04\xd0\x00\x00\x00\x00\x00\x00"


def test_mangled_upstream_answers_never_raise():
    rng = random.Random(3)
    seeds = [
        GOOD,
        answer_wire(
            "answer x.example. 300 IN CNAME y.example.",
            "answer y.example. 60 IN A 203.0.113.1",
            "authority example. 900 IN SOA ns.example. h.example. 1 2 3 4 30",
        ),
    ]
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
    answer = parse_answer(
        answer_wire("answer x.example. 300 IN CNAME y.example.", "answer y.example. 60 IN A 203.0.113.1", AD=True),
        X,
        1,
        1,
    )
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

"""Client queries parsed and refused (message hygiene), replies rendered to the client's limits."""

from __future__ import annotations

import random

import dns.flags
import dns.message
import dns.rcode

from meshsup.actors.dns.message import Answer, ErrorReply, Ignored, Query, parse_query, parse_response, render
from meshsup.actors.dns.wire import WireAnswer
from tests.actors.dns.helpers import big_answer, header, query_wire


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

"""scan.c, the reads of DNS messages in C: hand-built packets, then thousands of
mutated real queries and answers, each read as dnspython reads it or refused."""

from __future__ import annotations

import random
import socket
import struct

import dns.edns
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rdatatype
import pytest

from meshsup.actors.dns import scan
from meshsup.actors.dns.wire import WireAnswer, WireError, assemble, parse_answer
from tests.actors.dns.helpers import X, answer_wire, cookie_query, query_wire

A, SOA, AAAA, OPT, COOKIE = 1, 6, 28, 41, 10


def head(flags: int = 0x8180, qd: int = 1, an: int = 0, ns: int = 0, ar: int = 0) -> bytes:
    return struct.pack("!HHHHHH", 0x1234, flags, qd, an, ns, ar)


# --- names -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "why"),
    [
        (b"\x03abc", "name runs past its end"),
        (b"\x05ab", "label runs past its end"),
        (b"\x41" + b"a" * 65 + b"\x00", "bad label type"),  # 0x40: an extended label type
        (b"\xc0", "pointer runs past its end"),
        (b"\xc0\x0c", "bad compression pointer"),  # to itself
        (b"\xc0\x02", "bad compression pointer"),  # into the header
        (b"\xc0\x20", "bad compression pointer"),  # forwards
        ((b"\x3f" + b"a" * 63) * 4 + b"\x00", "name too long"),
    ],
)
def test_names_that_are_not_names_are_refused(name, why):
    with pytest.raises(WireError, match=why):
        scan.read_name(head() + name, 12)


def test_a_name_through_pointers_is_read_as_its_labels():
    wire = head() + b"\x01a\x07example\x00" + b"\x01b\xc0\x0c"  # b.a.example, a pointer back to a.example
    labels: list[bytes] = []
    assert scan.read_name(wire, 23, labels) == len(wire)  # the end is after the pointer, not where it went
    assert labels == [b"b", b"a", b"example"]
    assert scan.name_text(wire, 23) == "b.a.example"


def test_a_pointer_loop_is_refused_however_it_goes():
    # Each pointer must go strictly before the name that held it: two names pointing at each other cannot.
    wire = head() + b"\x01a\xc0\x10" + b"\x01b\xc0\x0c"
    with pytest.raises(WireError, match="bad compression pointer"):
        scan.read_name(wire, 16)


@pytest.mark.parametrize("text", ["MiXeD.example", "a\\.b.example", "sp\\032ace.example", 'q\\"\\$\\@.example', "."])
def test_name_text_is_what_dnspython_writes_lowercase(text):
    name = dns.name.from_text(text)
    expected = "" if name == dns.name.root else name.to_text(omit_final_dot=True).lower()
    assert scan.name_text(name.to_wire(), 0) == expected


# --- queries -----------------------------------------------------------------------------------------


def test_plain_query_fields():
    wire = query_wire("X.example", "AAAA", use_edns=0, payload=4096, want_dnssec=True)
    flags = struct.unpack_from("!H", wire, 2)[0]
    assert scan.plain_query(wire) == (flags, b"\x01X\x07example\x00", AAAA, 1, 0, 4096, True)
    assert scan.plain_query(query_wire("x.example"))[4:] == (-1, 0, False)


@pytest.mark.parametrize(
    "wire",
    [
        query_wire("x.example")[:-1],  # cut in the question
        query_wire("x.example") + b"\x00",  # trailing
        head(0x0100, an=1) + X + b"\x00\x01\x00\x01",  # an answer
        cookie_query("x.example", b"12345678"),  # an option
        query_wire("x.example", use_edns=1),  # EDNS version 1
        head(0x0100) + b"\x01x\xc0\x0c\x00\x01\x00\x01",  # compressed
        b"\x12\x34",
        head(0x8100) + X + b"\x00\x01\x00\x01",  # a response
        head(0x2100) + X + b"\x00\x01\x00\x01",  # opcode UPDATE
        head(0x0100, qd=2) + X + b"\x00\x01\x00\x01" + X + b"\x00\x01\x00\x01",  # two questions
        head(0x0100, qd=0),  # no question
    ],
    ids=["cut", "trailing", "answer", "option", "version", "compressed", "short", "response", "update", "qd2", "qd0"],
)
def test_queries_that_are_not_plain_are_left_to_dnspython(wire):
    assert scan.plain_query(wire) is None


def test_query_key_blanks_cookies_only():
    first, second = cookie_query("x.example", b"12345678"), cookie_query("x.example", b"abcdefgh")
    assert scan.query_key(first) == scan.query_key(second) == first[2:-8] + bytes(8)
    cut = bytearray(first)
    struct.pack_into("!H", cut, len(cut) - 10, 200)  # a cookie longer than what is left: blanked to the end
    assert scan.query_key(bytes(cut)) == bytes(cut[2:-8]) + bytes(8)
    assert scan.query_key(b"") == b"" and scan.query_key(b"\x01\x02\x03") == b"\x03"


# --- answers and replies -----------------------------------------------------------------------------


def test_answer_reasons_come_in_order():
    good = answer_wire("answer x.example. 60 IN A 203.0.113.1")
    assert scan.answer(good[:11], X, A, 1, False) == "malformed"
    assert scan.answer(bytes([0, 0, good[2] & 0x7F]) + good[3:], X, A, 1, False) == "not_response"
    assert scan.answer(good[:5] + b"\x02" + good[6:], X, A, 1, False) == "question_mismatch"
    assert scan.answer(good[:20], X, A, 1, False) == "malformed"  # the question cut short
    assert scan.answer(good, X, AAAA, 1, False) == "question_mismatch"
    assert scan.answer(good[:2] + bytes([good[2] | 0x02]) + good[3:], X, A, 1, False) == "truncated"
    assert isinstance(scan.answer(good, X.upper(), A, 1, False), tuple)


def test_an_extended_rcode_is_its_own_reason_even_before_missing_records():
    opt = b"\x00\x00\x29\x04\xd0\x01\x00\x00\x00\x00\x00"  # extended rcode 1
    wire = head(ar=3) + X + b"\x00\x01\x00\x01" + opt
    assert scan.answer(wire, X, A, 1, False) == "extended_rcode"


def test_many_records_claimed_few_there_is_malformed():
    assert scan.answer(head(an=65535, ns=65535, ar=65535) + X + b"\x00\x01\x00\x01", X, A, 1, True) == "malformed"


def test_assemble_refuses_a_question_of_another_length():
    answer = parse_answer(answer_wire("answer x.example. 60 IN A 203.0.113.1"), X, A, 1)
    assert isinstance(answer, WireAnswer)
    with pytest.raises(WireError):
        assemble(b"\x00\x01", 0x0100, b"\x00\x00\x01\x00\x01", answer, True, False)


# --- differential: mutated real messages, against dnspython -------------------------------------------

ANSWERS = [
    answer_wire("answer x.example. 60 IN A 203.0.113.1", "answer x.example. 60 IN A 203.0.113.2"),
    answer_wire(
        "answer x.example. 300 IN CNAME y.example.",
        "answer y.example. 60 IN A 203.0.113.1",
        "authority example. 900 IN NS ns.example.",
        "additional ns.example. 30 IN AAAA 2001:db8::1",
        AD=True,
    ),
    answer_wire("authority example. 900 IN SOA ns.example. h.example. 1 2 3 4 30", rcode="NXDOMAIN"),
    answer_wire(
        "answer x.example. 60 IN AAAA 2001:db8::7", "answer X.example. 60 IN AAAA ::ffff:1.2.3.4", rdtype="AAAA"
    ),
    answer_wire("answer x.example. 60 IN A 198.51.100.1", edns=False),
]
QUERIES = [
    query_wire("x.example"),
    query_wire("MiXeD.example", "AAAA", use_edns=0, want_dnssec=True),
    cookie_query("x.example", b"12345678"),
    query_wire("a.b.c.example", "TXT", use_edns=0, payload=512),
]
CHECKED = {A, AAAA, SOA}  # the record types whose data scan.c reads, and so checks as dnspython does


def mutated(rng: random.Random, seed: bytes) -> bytes:
    wire = bytearray(seed)
    for _ in range(rng.randrange(1, 4)):
        at = rng.randrange(2, len(wire))
        match rng.randrange(5):
            case 0:
                wire[at] = rng.randrange(256)
            case 1:
                wire[at] = rng.choice([0, 0xC0, 0x3F, 0x40, 1, 12])  # name bytes: ends, pointers, label types
            case 2:
                del wire[at]
            case 3:
                wire.insert(at, rng.randrange(256))
            case _:
                wire[4 + 2 * rng.randrange(4) + 1] = rng.randrange(4)  # a count
    return bytes(wire[: rng.randrange(12, len(wire) + 1)]) if rng.random() < 0.2 else bytes(wire)


def dnspython(wire: bytes) -> dns.message.Message | None:
    """The message as dnspython reads it, one record to an RRset (none merged or deduplicated)."""
    try:
        return dns.message.from_wire(wire, one_rr_per_rrset=True)
    except (dns.exception.DNSException, ValueError, IndexError, struct.error, UnicodeError):
        return None


def owner_text(name: dns.name.Name) -> str:
    return "" if name == dns.name.root else name.to_text(omit_final_dot=True).lower()


def check_against_dnspython(wire: bytes, fields: tuple, message: dns.message.Message | None) -> None:
    answer = WireAnswer(*fields)
    if set(answer.types) <= CHECKED:
        assert message is not None, "read, though dnspython refuses it"
    if message is None:
        return  # dnspython refused data we pass on unread (a CNAME's target, say)
    assert answer.rcode == message.rcode() and answer.authenticated == bool(message.flags & dns.flags.AD)
    assert answer.counts == tuple(map(len, message.sections[1:]))
    records = [rrset for section in message.sections[1:] for rrset in section]
    assert list(answer.types) == [rrset.rdtype for rrset in records]
    assert list(answer.ttls) == [rrset.ttl for rrset in records]
    for offset, ttl in zip(answer.ttl_offsets, answer.ttls):
        written = struct.unpack_from("!I", answer.records, offset)[0]
        assert ttl == (written if written < 1 << 31 else 0)  # RFC 2181 section 8, as dnspython reads it
    assert wire[answer.base :].startswith(answer.records)
    ends = [end for end, _ in answer.set_ends]
    assert ends == sorted(ends) and ends[-1] == len(answer.records) and answer.set_ends[-1][1] == len(answer.ttls)
    learned: dict[tuple[str, int], list[str]] = {}
    for rrset in message.answer:
        if rrset.rdtype in (A, AAAA):
            family = socket.AF_INET if rrset.rdtype == A else socket.AF_INET6  # any class: the data is read as IN's
            address = socket.inet_ntop(family, rrset[0].to_wire())
            learned.setdefault((owner_text(rrset.name), rrset.rdtype), []).append(address)
    assert answer.addresses == tuple((name, tuple(found)) for (name, _), found in learned.items())
    soa = next((rrset for rrset in message.authority if rrset.rdtype == SOA), None)
    assert answer.negative_ttl == (None if soa is None else min(soa.ttl, soa[0].minimum))


def refused_on_purpose(reason: str, wire: bytes, message: dns.message.Message, question: dns.message.Question) -> bool:
    """Whether an answer dnspython reads is one scan.answer refuses by design, for that reason."""
    flags = struct.unpack_from("!H", wire, 2)[0]
    if reason == "not_response":
        return not flags & 0x8000 or bool(flags & 0x7800)
    if reason == "question_mismatch":
        asked = (question.name, question.rdtype, question.rdclass)
        return len(message.question) != 1 or (lambda q: (q.name, q.rdtype, q.rdclass))(message.question[0]) != asked
    if reason == "truncated":
        return bool(flags & 0x0200)
    if reason == "extended_rcode":
        return message.opt is not None and bool(message.opt.ttl >> 24)
    assert reason == "malformed", reason
    opt_last = False
    if message.opt is not None:
        size = 11 + len(message.opt[0].to_wire())
        opt_last = wire[-size : 3 - size] == b"\x00\x00\x29"
    odd_address = any(
        rrset.rdtype in (A, AAAA) and rrset.rdclass != 1 and len(rrset[0].to_wire()) != (4 if rrset.rdtype == A else 16)
        for section in message.sections[1:]
        for rrset in section
    )
    # A pointer into the header, which dnspython follows: read_name refuses it.
    header_pointer = any(wire[i] >= 0xC0 and ((wire[i] & 0x3F) << 8 | wire[i + 1]) < 12 for i in range(len(wire) - 1))
    return (message.opt is not None and not opt_last) or odd_address or header_pointer


def test_mutated_answers_read_as_dnspython_reads_them_or_refused():
    rng = random.Random(17)
    read = refused = 0
    for _ in range(4000):
        seed = rng.choice(ANSWERS)
        wire = mutated(rng, seed)
        question = dns.message.from_wire(seed).question[0]
        qname = question.name.to_wire()
        result = scan.answer(wire, qname, int(question.rdtype), int(question.rdclass), True)
        message = dnspython(wire)
        if isinstance(result, tuple):
            read += 1
            check_against_dnspython(wire, result, message)
        else:
            refused += 1
            assert message is None or refused_on_purpose(result, wire, message, question), (result, wire)
    assert read > 300 and refused > 2000  # both ways were tried


def plain(message: dns.message.Message, wire: bytes) -> bool:
    """Whether dnspython reads the query as one question, uncompressed, and at most a bare OPT of version 0."""
    if len(message.question) != 1 or message.answer or message.authority or message.additional:
        return False
    name = message.question[0].name.to_wire()
    if wire[12 : 12 + len(name)] != name:
        return False  # compressed
    return message.opt is None or (not message.opt.ttl >> 16 and not message.options)


def test_mutated_queries_read_as_dnspython_reads_them_or_left_to_it():
    rng = random.Random(29)
    read = 0
    for _ in range(3000):
        wire = mutated(rng, rng.choice(QUERIES))
        fields = scan.plain_query(wire)
        key = scan.query_key(wire)
        assert len(key) == len(wire) - 2
        differ = [i for i in range(len(key)) if key[i] != wire[i + 2]]
        assert all(key[i] == 0 for i in differ)
        message = dnspython(wire)
        if message is not None and not any(o.otype == COOKIE for o in message.options):
            assert not differ
        if len(wire) < 12 or struct.unpack_from("!H", wire, 4)[0] != 1 or wire[2] & 0xF8:
            assert fields is None  # a response, another opcode, not one question: never a plain query
            continue  # the caller's to drop or refuse (FORMERR, NOTIMP); dnspython reads an UPDATE otherwise
        if fields is None:
            assert message is None or not plain(message, wire), wire
            continue
        read += 1
        assert message is not None, "read, though dnspython refuses it"
        flags, qname, qtype, qclass, edns, payload, do = fields
        question = message.question[0]
        assert (qname, qtype, qclass) == (question.name.to_wire(), question.rdtype, question.rdclass)
        assert (edns, do) == (message.edns, bool(message.ednsflags & dns.flags.DO))
        assert payload == (message.payload if edns == 0 else 0) and not message.options
    assert read > 150

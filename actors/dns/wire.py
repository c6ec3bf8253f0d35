"""DNS messages as bytes: plain queries read by hand, upstream answers kept as wire.

dnspython costs about a quarter of a millisecond to parse and build one
message. The messages the controller sees by the thousand are simple: a
query with one question and at most a bare OPT, and an upstream's answer
that is passed on, cached and served again. Those are handled here, by
hand; anything else goes through dnspython (message.py). The reads themselves,
every byte of them untrusted, are in C (scan.c: a third of a forwarded
query's CPU time in Python); this module makes them into what the rest of
the controller uses.

- ``parse_plain_query`` reads a query that has nothing but a question and an
  optional OPT without options; it returns None for anything else (a
  response, another opcode too), so dnspython decides what is wrong with it.
- ``parse_answer`` checks an upstream's answer as dnspython would (names,
  compression pointers, record bounds, trailing bytes, the question) and
  keeps its records as bytes, with where the TTLs are. Record data the
  controller does not read is passed on as the upstream sent it, as any
  forwarder does; A, AAAA and SOA data are checked, being read.
- ``assemble`` makes the reply to a query from such an answer. The records
  keep their offsets: a reply has the same 12-byte header and a question
  of the same length as the answer it came from, so the upstream's
  compression pointers still point where they did.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import NamedTuple

from meshsup.actors.dns import scan
from meshsup.actors.dns.scan import WireError, read_name

__all__ = ["WireError", "read_name"]  # the checks of scan.c, as the rest of the controller knows them

HEADER = struct.Struct("!HHHHHH")
RR_FIXED = struct.Struct("!HHIH")  # type, class, ttl, rdlength
TYPE_CLASS = struct.Struct("!HH")
TTL = struct.Struct("!I")
HEADER_LEN = 12

QR, AA, TC, RD, RA, AD, CD = 0x8000, 0x0400, 0x0200, 0x0100, 0x0080, 0x0020, 0x0010
OPCODE_MASK = 0x7800
EDNS_DO = 0x8000
A, NS, SOA, AAAA, OPT = 1, 2, 6, 28, 41
COOKIE = 10  # the EDNS option (RFC 7873)
ANSWER, AUTHORITY, ADDITIONAL = 0, 1, 2
# The DNS flag day 2020 size: no IP fragmentation on common paths.
OUR_PAYLOAD = 1232


# Ours, with and without DO: one goes into every forwarded query and every reply made from an answer.
_OUR_OPT = {do: b"\x00" + RR_FIXED.pack(OPT, OUR_PAYLOAD, EDNS_DO if do else 0, 0) for do in (False, True)}


def opt_record(do: bool, payload: int = OUR_PAYLOAD) -> bytes:
    """An OPT pseudo-record: EDNS version 0, no options."""
    if payload == OUR_PAYLOAD:
        return _OUR_OPT[do]
    return b"\x00" + RR_FIXED.pack(OPT, payload, EDNS_DO if do else 0, 0)


# The name at an offset as dnspython writes it (lowercase, no final dot), checked as read_name checks it.
name_text: Callable[[bytes, int], str] = scan.name_text


class PlainQuery(NamedTuple):
    """What parse_plain_query reads from a query."""

    flags: int
    qname: bytes  # the question's name in wire form, as the client wrote it
    qtype: int
    qclass: int
    edns: int  # -1 without EDNS, else the version (always 0 here)
    payload: int
    do: bool


_tuple = tuple.__new__  # makes a NamedTuple without its __new__, a Python function


def parse_plain_query(wire: bytes) -> PlainQuery | None:
    """A query (QR clear, opcode QUERY) with one question and nothing else but
    a bare OPT (no options, version 0); None for anything else, even if valid."""
    fields = scan.plain_query(wire)
    return None if fields is None else _tuple(PlainQuery, fields)


# What the fast path knows a query by: its bytes after the ID, with the data
# of an EDNS COOKIE option zeroed (its length kept: a wrong one is a FORMERR).
# Clients send a fresh cookie with every query; a reply never depends on it
# (we do not do cookies, so, as RFC 7873 section 5.2.1 says, replies carry
# none). Anything else in the query stays part of the key; a query not laid
# out as one question and one OPT is keyed as it is.
query_key: Callable[[bytes], bytes] = scan.query_key


def label_count(qname: bytes) -> int:
    """Labels of a name in uncompressed wire form, the root's empty one included."""
    count, offset = 1, 0
    while qname[offset]:
        offset += qname[offset] + 1
        count += 1
    return count


_FORWARD_HEADERS = {cd: HEADER.pack(0, RD | cd, 1, 0, 0, 1) for cd in (0, CD)}


def forward_query(qname: bytes, qtype: int, qclass: int, flags: int, do: bool) -> bytes:
    """The query sent upstream: ID 0 (the transport sets its own), RD, the
    client's CD, our EDNS with the client's DO."""
    return _FORWARD_HEADERS[flags & CD] + qname + TYPE_CLASS.pack(qtype, qclass) + _OUR_OPT[do]


class WireAnswer(NamedTuple):
    """An upstream's answer, its records kept as bytes at their offsets. A tuple,
    made by scan.c's fields as they are (no Python __init__ per answer)."""

    rcode: int
    authenticated: bool  # AD
    base: int  # where the records start in the answer (and in every reply made from it)
    records: bytes  # answer, authority and additional records, without the OPT
    counts: tuple[int, int, int]
    # Each record's TTL, type and where its TTL is in records: flat tuples of
    # numbers, which the garbage collector stops walking (a cache holds many).
    ttls: tuple[int, ...]
    types: tuple[int, ...]
    ttl_offsets: tuple[int, ...]
    # Where each RRset ends (offset in records, records before it): a reply cut
    # for a small client keeps whole RRsets, as dnspython does.
    set_ends: tuple[tuple[int, int], ...]
    negative_ttl: int | None  # min(TTL, MINIMUM) of the first SOA in authority
    addresses: tuple[tuple[str, tuple[str, ...]], ...]  # A and AAAA in the answer, by owner

    @property
    def empty(self) -> bool:
        return self.counts[ANSWER] == 0

    def retimed(self, ttl_of: Callable[[int, int], int] | None, *, keep_addresses: bool = True) -> WireAnswer:
        """A copy with each record's TTL set to ttl_of(its TTL, its type) (the
        records copied only if one changes; None: none does), and without the
        addresses unless keep_addresses: a cache need not hold on to what was
        learned from it."""
        if ttl_of is None and (keep_addresses or not self.addresses):
            return self  # nothing would change (and nothing changes in place)
        ttls = self.ttls if ttl_of is None else tuple(map(ttl_of, self.ttls, self.types))
        records = self.records
        if ttls != self.ttls:
            out = bytearray(records)
            for offset, ttl in zip(self.ttl_offsets, ttls):
                TTL.pack_into(out, offset, ttl)
            records = bytes(out)
        return WireAnswer(
            self.rcode,
            self.authenticated,
            self.base,
            records,
            self.counts,
            ttls,
            self.types,
            self.ttl_offsets,
            self.set_ends,
            self.negative_ttl,
            self.addresses if keep_addresses else (),
        )

    def reply_ttls(self) -> tuple[tuple[int, int], ...]:
        """(offset, TTL) of each record in a reply assemble() made of it, whole."""
        return tuple((self.base + offset, ttl) for offset, ttl in zip(self.ttl_offsets, self.ttls))


def parse_answer(wire: bytes, qname: bytes, qtype: int, qclass: int, learn: bool = True) -> WireAnswer | str:
    """An upstream's answer to the question, or why it cannot be used
    (malformed, not_response, question_mismatch, truncated, extended_rcode).
    qname is the question's name in wire form; case does not matter. Without
    learn, the addresses are checked but not read out (half the work)."""
    fields = scan.answer(wire, qname, qtype, qclass, learn)
    return fields if fields.__class__ is str else _tuple(WireAnswer, fields)


# The reply to a query (its ID as written, flags and question in wire form, as
# the client wrote it) from a WireAnswer, as message.render would make it: RD
# and CD from the query, RA, AD only for clients asking for DNSSEC data (RFC
# 6840 section 5.8), our own OPT (with the client's DO) if it sent one.
assemble: Callable[[bytes, int, bytes, WireAnswer, bool, bool], bytes] = scan.assemble


def truncated(reply: bytes) -> bytes:
    """The reply cut to its header and question, TC set: all a client gets when
    it is rate limited (RRL's slip), enough to make a real one retry over TCP."""
    query_id, flags, qdcount = struct.unpack_from("!HHH", reply)
    # Ours, so well formed: a question, or none (a bare header for a query that had none readable).
    end = read_name(reply, HEADER_LEN) + TYPE_CLASS.size if qdcount else HEADER_LEN
    return HEADER.pack(query_id, flags | TC, qdcount, 0, 0, 0) + reply[HEADER_LEN:end]


def cut(reply: bytes, answer: WireAnswer, limit: int, edns: bool) -> bytes:
    """reply (assembled from answer) cut to limit bytes at an RRset boundary;
    TC set if answer or authority records had to go (RFC 2181 section 9)."""
    opt = reply[answer.base + len(answer.records) :]
    room = limit - answer.base - len(opt)
    kept_end, kept = 0, 0
    for end, count in answer.set_ends:
        if end > room:
            break
        kept_end, kept = end, count
    an, ns, ar = answer.counts
    flags = struct.unpack_from("!H", reply, 2)[0]
    if kept < an + ns:
        flags |= TC
    counts = (min(kept, an), min(max(kept - an, 0), ns), max(kept - an - ns, 0))
    header = HEADER.pack(struct.unpack_from("!H", reply)[0], flags, 1, counts[0], counts[1], counts[2] + bool(edns))
    return header + reply[HEADER_LEN : answer.base] + answer.records[:kept_end] + opt

"""DNS messages as bytes: plain queries read by hand, upstream answers kept as wire.

dnspython costs about a quarter of a millisecond to parse and build one
message. The messages the controller sees by the thousand are simple: a
query with one question and at most a bare OPT, and an upstream's answer
that is passed on, cached and served again. Those are handled here, by
hand; anything else goes through dnspython (message.py).

- ``parse_plain_query`` reads a query that has nothing but a question and an
  optional OPT without options; it returns None for anything else, so
  dnspython decides what is wrong with it.
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

import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import dns.name

HEADER = struct.Struct("!HHHHHH")
RR_FIXED = struct.Struct("!HHIH")  # type, class, ttl, rdlength
TYPE_CLASS = struct.Struct("!HH")
TTL = struct.Struct("!I")
OPTION_HEADER = struct.Struct("!HH")  # EDNS option code, length
HEADER_LEN = 12
MAX_NAME = 255
MAX_POINTER_HOPS = 16  # dnspython's limit on a chain of compression pointers

QR, AA, TC, RD, RA, AD, CD = 0x8000, 0x0400, 0x0200, 0x0100, 0x0080, 0x0020, 0x0010
OPCODE_MASK = 0x7800
EDNS_DO = 0x8000
A, NS, SOA, AAAA, OPT = 1, 2, 6, 28, 41
COOKIE = 10  # the EDNS option (RFC 7873)
ANSWER, AUTHORITY, ADDITIONAL = 0, 1, 2
# The DNS flag day 2020 size: no IP fragmentation on common paths.
OUR_PAYLOAD = 1232
_PLAIN_BYTES = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_"
_ONE_QUESTION_ONE_ADDITIONAL = b"\x00\x01\x00\x00\x00\x00\x00\x01"
_ADDRESS_SIZES = {A: (4, socket.AF_INET), AAAA: (16, socket.AF_INET6)}


# Ours, with and without DO: one goes into every forwarded query and every reply made from an answer.
_OUR_OPT = {do: b"\x00" + RR_FIXED.pack(OPT, OUR_PAYLOAD, EDNS_DO if do else 0, 0) for do in (False, True)}


class WireError(ValueError):
    """Not a well-formed message."""


def opt_record(do: bool, payload: int = OUR_PAYLOAD) -> bytes:
    """An OPT pseudo-record: EDNS version 0, no options."""
    if payload == OUR_PAYLOAD:
        return _OUR_OPT[do]
    return b"\x00" + RR_FIXED.pack(OPT, payload, EDNS_DO if do else 0, 0)


def read_name(wire: bytes, offset: int, labels: list[bytes] | None = None) -> int:
    """The offset just past the name at offset, after checking all of it as
    dnspython does: every compression pointer strictly before the one
    before it (so no loops) and never into the header, labels below 64 bytes,
    255 bytes in all. The labels are appended to labels, if given."""
    end = -1
    limit = len(wire)  # a pointed-to name may not run into the name that pointed
    start = offset
    total = 1
    hops = 0
    while True:
        if offset >= limit:
            raise WireError("name runs past its end")
        length = wire[offset]
        if length == 0:
            break
        if length < 64:
            total += length + 1
            if offset + 1 + length > limit:
                raise WireError("label runs past its end")
            if labels is not None:
                labels.append(wire[offset + 1 : offset + 1 + length])
            offset += 1 + length
        elif length >= 0xC0:
            if offset + 1 >= limit:
                raise WireError("pointer runs past its end")
            target = ((length & 0x3F) << 8) | wire[offset + 1]
            if end < 0:
                end = offset + 2
            hops += 1
            if not HEADER_LEN <= target < start or hops > MAX_POINTER_HOPS:
                raise WireError("bad compression pointer")
            limit, offset, start = start, target, target
        else:
            raise WireError("bad label type")
    if total > MAX_NAME:
        raise WireError("name too long")
    return end if end >= 0 else offset + 1


def name_text(labels: list[bytes]) -> str:
    """A name as dnspython writes it (lowercase, no final dot)."""
    joined = b".".join(labels)
    # Letters, digits, '-' and '_' need no escapes: only the dots between labels may be left.
    if len(joined.translate(None, _PLAIN_BYTES)) == max(0, len(labels) - 1):
        return joined.decode("ascii").lower()
    return dns.name.Name([*labels, b""]).to_text(omit_final_dot=True).lower()


class PlainQuery(NamedTuple):
    """What parse_plain_query reads from a query."""

    flags: int
    qname: bytes  # the question's name in wire form, as the client wrote it
    qtype: int
    qclass: int
    edns: int  # -1 without EDNS, else the version (always 0 here)
    payload: int
    do: bool


_FLAGS_COUNTS = struct.Struct("!HHHHH")  # a header after its ID
_tuple = tuple.__new__  # makes a NamedTuple without its __new__, a Python function


def parse_plain_query(wire: bytes) -> PlainQuery | None:
    """A query with one question and nothing else but a bare OPT (no options,
    version 0); None for anything else, even if valid. The caller has checked
    QR, the opcode and QDCOUNT."""
    flags, _, ancount, nscount, arcount = _FLAGS_COUNTS.unpack_from(wire, 2)
    if ancount or nscount or arcount > 1:
        return None
    offset, size = HEADER_LEN, len(wire)
    while offset < size and 0 < wire[offset] < 64:
        offset += 1 + wire[offset]
    if offset >= size or wire[offset] != 0 or offset + 1 - HEADER_LEN > MAX_NAME:
        return None
    name_end = offset + 1
    end = name_end + TYPE_CLASS.size
    if end > size:
        return None
    qtype, qclass = TYPE_CLASS.unpack_from(wire, name_end)
    if not arcount:
        if end != size:
            return None
        return _tuple(PlainQuery, (flags, wire[HEADER_LEN:name_end], qtype, qclass, -1, 0, False))
    if size != end + 1 + RR_FIXED.size or wire[end] != 0:
        return None
    rtype, payload, ttl, rdlength = RR_FIXED.unpack_from(wire, end + 1)
    # The top 16 bits are the extended RCODE and the version: both 0 here.
    if rtype != OPT or rdlength or ttl & 0xFFFF0000:
        return None
    return _tuple(PlainQuery, (flags, wire[HEADER_LEN:name_end], qtype, qclass, 0, payload, bool(ttl & EDNS_DO)))


def query_key(query: bytes) -> bytes:
    """What the fast path knows a query by: its bytes after the ID, with the
    data of an EDNS COOKIE option blanked (its length kept: a wrong one is a
    FORMERR). Clients send a fresh cookie with every query; a reply never
    depends on it (we do not do cookies, so, as RFC 7873 section 5.2.1 says,
    replies carry none). Anything else in the query stays part of the key;
    a query not laid out as one question and one OPT is keyed as it is."""
    if len(query) < HEADER_LEN + 16 or not query[11] or query[4:12] != _ONE_QUESTION_ONE_ADDITIONAL:
        return query[2:]
    offset, size = HEADER_LEN, len(query)
    while offset < size and 0 < query[offset] < 64:
        offset += 1 + query[offset]
    start = offset + 1 + TYPE_CLASS.size  # the OPT: root name, then its fixed part
    if start + 1 + RR_FIXED.size > size or query[offset] or query[start]:
        return query[2:]
    rtype, _, _, rdlength = RR_FIXED.unpack_from(query, start + 1)
    offset = start + 1 + RR_FIXED.size
    if rtype != OPT or not rdlength or offset + rdlength != size:
        return query[2:]
    key = bytearray(query)
    while offset + 4 <= size:
        code, length = OPTION_HEADER.unpack_from(query, offset)
        offset += 4
        if code == COOKIE:
            key[offset : offset + length] = bytes(min(length, size - offset))
        offset += length
    return bytes(key[2:])


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


@dataclass(slots=True)
class WireAnswer:
    """An upstream's answer, its records kept as bytes at their offsets (never changed in place)."""

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
    if len(wire) < HEADER_LEN:
        return "malformed"
    _, flags, qdcount, ancount, nscount, arcount = HEADER.unpack_from(wire)
    if not flags & QR or flags & OPCODE_MASK:
        return "not_response"
    if qdcount != 1:
        return "question_mismatch"
    name_end = HEADER_LEN + len(qname)
    base = name_end + TYPE_CLASS.size
    if len(wire) < base:
        return "malformed"
    name = wire[HEADER_LEN:name_end]
    # The same bytes, as upstreams echo the question: no need to lowercase either.
    if (name != qname and name.lower() != qname.lower()) or wire[name_end:base] != TYPE_CLASS.pack(qtype, qclass):
        return "question_mismatch"
    if flags & TC:
        return "truncated"
    try:
        return _records(wire, base, flags, (ancount, nscount, arcount), learn)
    except (WireError, IndexError, struct.error):
        return "malformed"


def _records(wire: bytes, base: int, flags: int, counts: tuple[int, int, int], learn: bool) -> WireAnswer | str:
    offset, size = base, len(wire)
    unpack_fixed = RR_FIXED.unpack_from
    ttls: list[int] = []
    types: list[int] = []
    ttl_offsets: list[int] = []
    set_ends: list[tuple[int, int]] = []
    addresses: dict[tuple[str, int], list[str]] = {}
    owners: dict[bytes, str] = {}  # owner name as written -> as text: a set's records share one
    negative_ttl = None
    opt: tuple[int, int] | None = None  # where the OPT is, to leave it out
    # The RRset of the record before: owner (lowercase), type, class, section.
    set_owner, set_type, set_class, set_section = b"", -1, -1, -1
    index = 0
    for section, count in enumerate(counts):
        for _ in range(count):
            start = offset
            first = wire[offset]
            if first == 0:  # the root, as an OPT's owner
                fixed = offset + 1
            elif first == 0xC0 and wire[offset + 1] == HEADER_LEN:  # a pointer to the (checked) question
                fixed = offset + 2
            else:
                fixed = read_name(wire, offset)
            rtype, rclass, ttl, rdlength = unpack_fixed(wire, fixed)
            rdata = fixed + RR_FIXED.size
            offset = rdata + rdlength
            if offset > size:
                raise WireError("record runs past the end")
            if rtype == OPT:
                if section != ADDITIONAL or opt is not None or first != 0:
                    raise WireError("misplaced OPT")
                opt = (start, offset)
                if ttl >> 24:
                    return "extended_rcode"  # we send no cookies and EDNS 0: nothing to act on
                continue
            written = wire[start:fixed]
            owner = written.lower()
            if rtype != set_type or section != set_section or rclass != set_class or owner != set_owner:
                if index:
                    set_ends.append((start - base, index))
                set_owner, set_type, set_class, set_section = owner, rtype, rclass, section
            index += 1
            ttls.append(ttl)
            types.append(rtype)
            ttl_offsets.append(fixed + 4 - base)
            if rtype == A or rtype == AAAA:
                length, family = _ADDRESS_SIZES[rtype]
                if rdlength != length:
                    raise WireError("bad address length")
                if section == ANSWER and learn:
                    name = owners.get(written)
                    if name is None:
                        labels: list[bytes] = []
                        read_name(wire, start, labels)
                        name = owners[written] = name_text(labels)
                    text = socket.inet_ntop(family, wire[rdata:offset])
                    found = addresses.get((name, rtype))
                    if found is None:
                        addresses[(name, rtype)] = [text]
                    else:
                        found.append(text)
            elif rtype == SOA:
                minimum_at = read_name(wire, read_name(wire, rdata))
                if minimum_at + 20 != offset:
                    raise WireError("bad SOA")
                if section == AUTHORITY and negative_ttl is None:
                    negative_ttl = min(ttl, struct.unpack_from("!I", wire, minimum_at + 16)[0])
    if offset != size:
        raise WireError("trailing bytes")
    records = wire[base:]
    if opt is not None:
        if opt[1] != offset:
            # Records after the OPT would move; their pointers might not. Rare
            # enough to refuse rather than rewrite.
            raise WireError("OPT before other records")
        records = wire[base : opt[0]]
    set_ends.append((len(records), index))
    an, ns, ar = counts
    return WireAnswer(  # by position: a tenth faster than by keyword, and made once an answer
        flags & 0xF,  # rcode
        bool(flags & AD),  # authenticated
        base,
        records,
        (an, ns, ar - (opt is not None)),  # counts
        tuple(ttls),
        tuple(types),
        tuple(ttl_offsets),
        tuple(set_ends),
        negative_ttl,
        tuple((name, tuple(found)) for (name, _), found in addresses.items()) if addresses else (),
    )


_REPLY_HEADER = struct.Struct("!HHHHH")  # a header after its ID


def assemble(query_id: bytes, query_flags: int, question: bytes, answer: WireAnswer, edns: bool, do: bool) -> bytes:
    """The reply to a query (its ID as written, flags and question in wire form,
    as the client wrote it) from answer, as message.render would make it: RD
    and CD from the query, RA, AD only for clients asking for DNSSEC data
    (RFC 6840 section 5.8), our own OPT."""
    if HEADER_LEN + len(question) != answer.base:
        raise WireError("question of another length")
    flags = QR | RA | (query_flags & (RD | CD)) | answer.rcode
    if answer.authenticated and (do or query_flags & AD):
        flags |= AD
    an, ns, ar = answer.counts
    if edns:
        return query_id + _REPLY_HEADER.pack(flags, 1, an, ns, ar + 1) + question + answer.records + _OUR_OPT[do]
    return query_id + _REPLY_HEADER.pack(flags, 1, an, ns, ar) + question + answer.records


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

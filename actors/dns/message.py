"""Query hygiene and reply rendering.

Checks, in order (RFC 1035, RFC 6891, RFC 8906):
- shorter than a header: dropped, there is nothing to answer to;
- QR set: dropped, answering a response invites reflection loops;
- an opcode other than QUERY: NOTIMP;
- QDCOUNT other than 1: FORMERR;
- anything dnspython cannot parse (truncated, compression-pointer loops,
  which dnspython refuses as pointers must point strictly backwards, trailing
  junk, several OPT RRs): FORMERR with a bare header;
- EDNS version above 0: BADVERS with an OPT of version 0.

A plain query (one question, at most a bare OPT) is read by hand (wire.py);
dnspython reads the rest, and would read a plain one the same way.

Replies are cut to what the client can take: its EDNS payload size over UDP
(512 without EDNS) but never more than the 1232 bytes we advertise (a
bigger UDP answer is an amplifier's, and may be fragmented), 65535 over
TCP; whole RRsets that do not fit are left out and TC is set, so the
client retries over TCP. Local answers are rendered by dnspython; upstream
answers are assembled from their bytes (wire.py) when the query is plain
and the reply fits, else rendered too.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dns.rrset

from meshsup.actors.dns import wire
from meshsup.actors.dns.wire import HEADER_LEN, OUR_PAYLOAD, PlainQuery, WireAnswer

CLASSIC_UDP_LIMIT = 512
TCP_LIMIT = 65535
# Meta and transfer types are never something a stub resolver may forward.
REFUSED_QTYPES = frozenset(
    int(t)  # plain ints: looked up per query
    for t in {
        dns.rdatatype.OPT,
        dns.rdatatype.AXFR,
        dns.rdatatype.IXFR,
        dns.rdatatype.TSIG,
        dns.rdatatype.TKEY,
        dns.rdatatype.MAILA,
        dns.rdatatype.MAILB,
    }
)


class Query:
    """A client's query: the question and EDNS read from the wire, the
    dnspython message made only when a reply has to be rendered."""

    # The fields the resolver reads per query are plain attributes, not properties: a call each saved.
    __slots__ = ("wire", "fields", "plain", "_message", "qname_key", "qtype", "qclass", "do", "flags")

    def __init__(self, wire_bytes: bytes, fields: PlainQuery, message: dns.message.Message | None = None) -> None:
        self.wire = wire_bytes
        self.fields = fields
        self.plain = message is None  # read by hand, so replies may be assembled by hand
        self._message = message
        self.qname_key = fields.qname.lower()  # what caches and flights are keyed on
        self.qtype = fields.qtype
        self.qclass = fields.qclass
        self.do = fields.do
        self.flags = fields.flags

    @classmethod
    def from_message(cls, wire_bytes: bytes, message: dns.message.Message) -> Query:
        question = message.question[0]
        fields = PlainQuery(
            flags=struct.unpack_from("!H", wire_bytes, 2)[0],
            qname=question.name.to_wire(),
            qtype=int(question.rdtype),
            qclass=int(question.rdclass),
            edns=message.edns,
            payload=message.payload,
            do=bool(message.ednsflags & dns.flags.DO),
        )
        return cls(wire_bytes, fields, message)

    @property
    def message(self) -> dns.message.Message:
        if self._message is None:
            self._message = dns.message.from_wire(self.wire)
        return self._message

    @property
    def qname_wire(self) -> bytes:
        return self.fields.qname

    @property
    def qname(self) -> dns.name.Name:
        return dns.name.from_wire(self.fields.qname, 0)[0]

    @property
    def name_text(self) -> str:
        """The name as rules match it: lowercase, no final dot."""
        return wire.name_text(self.fields.qname, 0)

    @property
    def question_wire(self) -> bytes:
        """The question as the client wrote it (its case kept: RFC 5452 clients may check it)."""
        if self.plain:  # right after the header, uncompressed
            return self.wire[HEADER_LEN : HEADER_LEN + len(self.fields.qname) + wire.TYPE_CLASS.size]
        return self.fields.qname + wire.TYPE_CLASS.pack(self.fields.qtype, self.fields.qclass)

    def size_limit(self, transport: str) -> int:
        if transport == "tcp":
            return TCP_LIMIT
        if self.fields.edns < 0:
            return CLASSIC_UDP_LIMIT
        # RFC 6891 section 6.2.5: values below 512 are treated as 512. (Not min() and max(): a call
        # each that parses keywords, for every reply.)
        payload = self.fields.payload
        return CLASSIC_UDP_LIMIT if payload < CLASSIC_UDP_LIMIT else OUR_PAYLOAD if payload > OUR_PAYLOAD else payload


@dataclass(frozen=True)
class ErrorReply:
    """The query is answered with an error; reason is a counter name."""

    reason: str
    wire: bytes


@dataclass(frozen=True)
class Ignored:
    """Nothing is sent back; reason is a counter name."""

    reason: str


@dataclass(frozen=True)
class Answer:
    """What goes into a reply, apart from the header and question."""

    rcode: int
    answer: tuple[dns.rrset.RRset, ...] = ()
    authority: tuple[dns.rrset.RRset, ...] = ()
    additional: tuple[dns.rrset.RRset, ...] = ()
    authoritative: bool = False
    authenticated: bool = False

    @classmethod
    def from_message(cls, message: dns.message.Message) -> Answer:
        return cls(
            rcode=int(message.rcode()),
            answer=tuple(message.answer),
            authority=tuple(message.authority),
            additional=tuple(message.additional),
            authenticated=bool(message.flags & dns.flags.AD),
        )

    @classmethod
    def from_wire_answer(cls, query: Query, answer: WireAnswer) -> Answer:
        """The upstream answer as dnspython objects, for a reply dnspython renders."""
        flags = wire.QR | answer.rcode | (wire.AD if answer.authenticated else 0)
        message = wire.HEADER.pack(0, flags, 1, *answer.counts) + query.question_wire + answer.records
        return cls.from_message(dns.message.from_wire(message))


def header_reply(wire_bytes: bytes, rcode: int) -> bytes:
    """A reply that is only a header: all that can be said to a query we cannot parse."""
    query_id, flags = struct.unpack_from("!HH", wire_bytes)
    return struct.pack("!HHHHHH", query_id, wire.QR | (flags & (wire.OPCODE_MASK | wire.RD)) | rcode, 0, 0, 0, 0)


def parse_query(wire_bytes: bytes) -> Query | ErrorReply | Ignored:
    """Validate a query from a client. Never raises."""
    plain = wire.parse_plain_query(wire_bytes)  # the usual query: its header checked by the same read
    if plain is not None:
        query = Query(wire_bytes, plain)  # EDNS version 0 or none
    else:
        if len(wire_bytes) < HEADER_LEN:
            return Ignored("drop_short")
        _, flags, qdcount = struct.unpack_from("!HHH", wire_bytes)
        if flags & wire.QR:
            return Ignored("drop_response")
        if flags & wire.OPCODE_MASK:  # an opcode other than QUERY (0)
            return ErrorReply("notimp", header_reply(wire_bytes, dns.rcode.NOTIMP))
        if qdcount != 1:
            return ErrorReply("formerr", header_reply(wire_bytes, dns.rcode.FORMERR))
        try:
            query = Query.from_message(wire_bytes, dns.message.from_wire(wire_bytes))
        except Exception:  # garbage can trip any parser error; all of them mean FORMERR
            return ErrorReply("formerr", header_reply(wire_bytes, dns.rcode.FORMERR))
        if query.fields.edns > 0:
            return ErrorReply("badvers", render(query, Answer(dns.rcode.BADVERS), "udp"))
    if query.qtype in REFUSED_QTYPES:
        return ErrorReply("refused_qtype", render(query, Answer(dns.rcode.REFUSED), "udp"))
    return query


def refusal(wire_bytes: bytes, transport: str) -> bytes | None:
    """REFUSED to a query from a client not served: with its question if it has
    one that can be read, else a bare header; None if not even that."""
    parsed = parse_query(wire_bytes)
    if isinstance(parsed, Query):
        return render(parsed, Answer(dns.rcode.REFUSED), transport)
    return None if isinstance(parsed, Ignored) else header_reply(wire_bytes, dns.rcode.REFUSED)


def render(query: Query, answer: Answer | WireAnswer, transport: str) -> bytes:
    """The reply to query carrying answer, cut to the client's size limit."""
    limit = query.size_limit(transport)
    if isinstance(answer, WireAnswer):
        if query.plain:
            fields = query.fields
            reply = wire.assemble(
                query.wire[:2], fields.flags, query.question_wire, answer, fields.edns >= 0, fields.do
            )
            return reply if len(reply) <= limit else wire.cut(reply, answer, limit, fields.edns >= 0)
        answer = Answer.from_wire_answer(query, answer)
    message = query.message
    reply = dns.message.make_response(message, recursion_available=True, our_payload=OUR_PAYLOAD)
    reply.flags |= message.flags & dns.flags.CD
    if answer.authoritative:
        reply.flags |= dns.flags.AA
    # RFC 6840 section 5.8: AD only to clients that asked for DNSSEC data.
    if answer.authenticated and (query.do or message.flags & dns.flags.AD):
        reply.flags |= dns.flags.AD
    if query.do:
        reply.want_dnssec(True)
    reply.set_rcode(dns.rcode.Rcode.make(answer.rcode))
    reply.answer = list(answer.answer)
    reply.authority = list(answer.authority)
    reply.additional = list(answer.additional)
    return reply.to_wire(max_size=limit, prefer_truncation=True)


def reply_ttls(query: Query, answer: WireAnswer, reply: bytes) -> tuple[tuple[int, int], ...] | None:
    """Where the TTLs are in a reply render() made of answer, if it was assembled
    whole (so the fast path need not read it), else None."""
    opt = len(wire.opt_record(False)) if query.fields.edns >= 0 else 0
    if query.plain and len(reply) == answer.base + len(answer.records) + opt:
        return answer.reply_ttls()
    return None


def make_forward_query(query: Query) -> bytes:
    """The query we send upstream: same question, our own EDNS, the client's DO and CD."""
    fields = query.fields
    return wire.forward_query(fields.qname, fields.qtype, fields.qclass, fields.flags, fields.do)


def parse_response(answer: bytes, query: Query, learn: bool = True) -> WireAnswer | str:
    """An upstream's answer to query, or the reason it is unusable; its
    addresses read out only if learn. Never raises."""
    fields = query.fields
    return wire.parse_answer(answer, fields.qname, fields.qtype, fields.qclass, learn)

"""Query hygiene and reply rendering on top of dnspython.

Checks, in order (RFC 1035, RFC 6891, RFC 8906):
- shorter than a header: dropped, there is nothing to answer to;
- QR set: dropped, answering a response invites reflection loops;
- an opcode other than QUERY: NOTIMP;
- QDCOUNT other than 1: FORMERR;
- anything dnspython cannot parse (truncated, compression-pointer loops,
  which dnspython refuses as pointers must point strictly backwards, trailing
  junk, several OPT RRs): FORMERR with a bare header;
- EDNS version above 0: BADVERS with an OPT of version 0.

Replies are cut to what the client can take: its EDNS payload size over UDP
(512 without EDNS), 65535 over TCP; whole RRsets that do not fit are left
out and TC is set, so the client retries over TCP.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdatatype
import dns.rrset

HEADER_LEN = 12
CLASSIC_UDP_LIMIT = 512
TCP_LIMIT = 65535
# The DNS flag day 2020 size: no IP fragmentation on common paths.
OUR_PAYLOAD = 1232
_QR = 0x8000
_OPCODE_MASK = 0x7800
_RD = 0x0100
# Meta and transfer types are never something a stub resolver may forward.
REFUSED_QTYPES = frozenset(
    {
        dns.rdatatype.OPT,
        dns.rdatatype.AXFR,
        dns.rdatatype.IXFR,
        dns.rdatatype.TSIG,
        dns.rdatatype.TKEY,
        dns.rdatatype.MAILA,
        dns.rdatatype.MAILB,
    }
)


@dataclass(frozen=True)
class Query:
    message: dns.message.Message

    @property
    def question(self) -> dns.rrset.RRset:
        return self.message.question[0]

    @property
    def qname(self) -> dns.name.Name:
        return self.question.name

    @property
    def qtype(self) -> int:
        return int(self.question.rdtype)

    @property
    def qclass(self) -> int:
        return int(self.question.rdclass)

    @property
    def do(self) -> bool:
        return bool(self.message.ednsflags & dns.flags.DO)

    @property
    def cd(self) -> bool:
        return bool(self.message.flags & dns.flags.CD)

    def size_limit(self, transport: str) -> int:
        if transport == "tcp":
            return TCP_LIMIT
        if self.message.edns < 0:
            return CLASSIC_UDP_LIMIT
        # RFC 6891 section 6.2.5: values below 512 are treated as 512.
        return min(max(self.message.payload, CLASSIC_UDP_LIMIT), TCP_LIMIT)


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


def header_reply(wire: bytes, rcode: int) -> bytes:
    """A reply that is only a header: all that can be said to a query we cannot parse."""
    query_id, flags = struct.unpack_from("!HH", wire)
    return struct.pack("!HHHHHH", query_id, _QR | (flags & (_OPCODE_MASK | _RD)) | rcode, 0, 0, 0, 0)


def parse_query(wire: bytes) -> Query | ErrorReply | Ignored:
    """Validate a query from a client. Never raises."""
    if len(wire) < HEADER_LEN:
        return Ignored("drop_short")
    _, flags, qdcount = struct.unpack_from("!HHH", wire)
    if flags & _QR:
        return Ignored("drop_response")
    if dns.opcode.from_flags(flags) != dns.opcode.QUERY:
        return ErrorReply("notimp", header_reply(wire, dns.rcode.NOTIMP))
    if qdcount != 1:
        return ErrorReply("formerr", header_reply(wire, dns.rcode.FORMERR))
    try:
        message = dns.message.from_wire(wire)
    except Exception:  # garbage can trip any parser error; all of them mean FORMERR
        return ErrorReply("formerr", header_reply(wire, dns.rcode.FORMERR))
    query = Query(message)
    if message.edns > 0:
        return ErrorReply("badvers", render(query, Answer(dns.rcode.BADVERS), "udp"))
    if query.qtype in REFUSED_QTYPES:
        return ErrorReply("refused_qtype", render(query, Answer(dns.rcode.REFUSED), "udp"))
    return query


def render(query: Query, answer: Answer, transport: str) -> bytes:
    """The reply to query carrying answer, cut to the client's size limit."""
    reply = dns.message.make_response(query.message, recursion_available=True, our_payload=OUR_PAYLOAD)
    reply.flags |= query.message.flags & dns.flags.CD
    if answer.authoritative:
        reply.flags |= dns.flags.AA
    # RFC 6840 section 5.8: AD only to clients that asked for DNSSEC data.
    if answer.authenticated and (query.do or query.message.flags & dns.flags.AD):
        reply.flags |= dns.flags.AD
    if query.do:
        reply.want_dnssec(True)
    reply.set_rcode(dns.rcode.Rcode.make(answer.rcode))
    reply.answer = list(answer.answer)
    reply.authority = list(answer.authority)
    reply.additional = list(answer.additional)
    return reply.to_wire(max_size=query.size_limit(transport), prefer_truncation=True)


def make_forward_query(query: Query) -> bytes:
    """The query we send upstream: same question, our own EDNS, the client's DO and CD."""
    forward = dns.message.make_query(
        query.qname, query.qtype, query.qclass, use_edns=0, want_dnssec=query.do, payload=OUR_PAYLOAD, id=0
    )
    forward.flags |= dns.flags.RD | (query.message.flags & dns.flags.CD)
    return forward.to_wire()


def parse_response(wire: bytes, question: dns.rrset.RRset) -> dns.message.Message | str:
    """An upstream's answer to question, or the reason it is unusable. Never raises."""
    try:
        message = dns.message.from_wire(wire)
    except Exception:  # an upstream's garbage is a failed attempt, not a crash
        return "malformed"
    if not message.flags & dns.flags.QR or message.opcode() != dns.opcode.QUERY:
        return "not_response"
    if len(message.question) != 1:
        return "question_mismatch"
    got = message.question[0]
    if got.name != question.name or got.rdtype != question.rdtype or got.rdclass != question.rdclass:
        return "question_mismatch"
    if message.flags & dns.flags.TC:
        return "truncated"
    return message

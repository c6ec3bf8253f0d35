"""Helpers the DNS controller's sans-IO unit tests share: queries, settings, upstream answers."""

from __future__ import annotations

import struct

import dns.edns
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rrset

from meshsup.actors.dns.message import Answer
from meshsup.actors.dns.resolver import Forward, Reply
from meshsup.actors.dns.wire import WireAnswer
from meshsup.actors.settings.dns import DnsSettings

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


def header(flags: int, qd: int = 1, an: int = 0, ns: int = 0, ar: int = 0, query_id: int = 0x1234) -> bytes:
    return struct.pack("!HHHHHH", query_id, flags, qd, an, ns, ar)


def big_answer(name: dns.name.Name, count: int = 40) -> Answer:
    rrset = dns.rrset.from_text_list(name, 60, "IN", "A", [f"203.0.113.{i}" for i in range(1, count + 1)])
    return Answer(dns.rcode.NOERROR, answer=(rrset,))


def answer_wire(
    *records: str, rcode: str = "NOERROR", name: str = "x.example", rdtype: str = "A", edns: bool = True, **flags: bool
) -> bytes:
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


def sections(answer: WireAnswer, qname: bytes) -> dns.message.Message:
    """The answer's records read back with dnspython."""
    head = struct.pack("!HHHHHH", 0, 0x8000 | answer.rcode, 1, *answer.counts)
    return dns.message.from_wire(head + qname + struct.pack("!HH", 1, 1) + answer.records)


def cookie_query(name: str, cookie: bytes, rdtype: str = "A", **kwargs) -> bytes:
    option = dns.edns.GenericOption(dns.edns.OptionType.COOKIE, cookie)
    kwargs.setdefault("use_edns", 0)
    return dns.message.make_query(name, rdtype, options=[option], **kwargs).to_wire()

"""forwarder.c, the plain UDP forward in C: against an upstream socket the test
plays, what goes out (byte for byte what the resolver's path sends), what comes
back to clients (byte for byte what message.render makes of the same answer),
what it leaves to the resolver, and every way a forward fails, handed back."""

from __future__ import annotations

import select
import socket
import time
from collections import Counter
from typing import Any

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rrset
import pytest

from meshsup.actors.dns import scan
from meshsup.actors.dns.cache import DnsCache, cache_key
from meshsup.actors.dns.forwarder import BURST, SOCKET_LIFE, Forwarder
from meshsup.actors.dns.message import Query, parse_query, render
from meshsup.actors.dns.wire import assemble, cut, forward_query, parse_answer
from meshsup.actors.dns.zone import REVERSE_V4, REVERSE_V6
from meshsup.actors.settings.dns import DnsSettings
from meshsup.actors.settings.dnstypes import Upstream
from tests.dns_fixtures import ServerThread, dig, endpoint, need_tool, start_dnsmasq, url

MESH = dns.name.from_text("mesh.").to_wire()
CLIENT = ("127.0.0.1", 40000)


class Context:
    """Where replies go: what the server's listeners are to the forwarder."""


class Rig:
    """A Forwarder, its cache and the resolver's (empty) tables, and an upstream socket the test answers from."""

    def __init__(
        self, timeout: float = 2.0, cap: int = 64, share: int = 8, single_label: bool = False, host: str = "127.0.0.1"
    ) -> None:
        self.upstream_sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
        self.upstream_sock.bind((host, 0))
        self.upstream_sock.settimeout(3)
        port = self.upstream_sock.getsockname()[1]
        self.upstream = Upstream("udp", host, port)
        self.cache = DnsCache(size=1000)
        self.their_flights: dict[Any, Any] = {}
        self.their_owned: dict[Any, int] = {}
        self.forwarder = Forwarder(scan.plain_query, parse_answer, assemble, cut)
        self.ctx = Context()
        self.configure(timeout=timeout, cap=cap, share=share, single_label=single_label)

    def configure(self, **changes: Any) -> None:
        settings = {
            "upstream": self.upstream,
            "host": self.upstream.host,
            "port": self.upstream.port,
            "timeout": 2.0,
            "cap": 64,
            "share": 8,
            "decline": (MESH, REVERSE_V4, REVERSE_V6),
            "single_label": False,
            "learn": True,
            "view": b"",
            "put": self.cache.put,
            "cached": self.cache.table(),
            "their_flights": self.their_flights,
            "their_owned": self.their_owned,
        }
        self.forwarder.configure(**{**settings, **changes})

    def take(self, wire: bytes, owner: Any = None, source: tuple[str, int] = CLIENT) -> bool:
        return self.forwarder.take(wire, source, self.ctx, owner, time.monotonic())

    def upstream_gets(self) -> tuple[bytes, tuple[str, int]]:
        return self.upstream_sock.recvfrom(4096)

    def results(self, timeout: float = 3.0) -> tuple[list, list, list]:
        """What readable() gives once something came."""
        replies: list = []
        answered: list = []
        returned: list = []
        deadline = time.monotonic() + timeout
        while not (replies or answered or returned) and time.monotonic() < deadline:
            select.select([self.forwarder.fileno()], [], [], 0.05)
            more = self.forwarder.readable(time.monotonic())
            for into, items in zip((replies, answered, returned), more, strict=True):
                into.extend(items)
        return replies, answered, returned

    def close(self) -> None:
        self.forwarder.close()
        self.upstream_sock.close()


@pytest.fixture
def rig():
    made: list[Rig] = []

    def make(**kwargs: Any) -> Rig:
        made.append(Rig(**kwargs))
        return made[-1]

    yield make
    for each in made:
        each.close()


def client_query(name: str, rdtype: str = "A", query_id: int = 7, **kwargs: Any) -> bytes:
    message = dns.message.make_query(name, rdtype, **kwargs)
    message.id = query_id
    return message.to_wire()


def answer_to(upstream_query: bytes, *addresses: str, rcode: int = dns.rcode.NOERROR, ttl: int = 300, tc: bool = False):
    query = dns.message.from_wire(upstream_query)
    answer = dns.message.make_response(query)
    answer.set_rcode(dns.rcode.Rcode.make(rcode))
    if addresses:
        answer.answer.append(dns.rrset.from_text_list(query.question[0].name, ttl, "IN", "A", list(addresses)))
    if tc:
        answer.flags |= dns.flags.TC
    return answer.to_wire()


@pytest.mark.parametrize(
    "kwargs", [{}, {"use_edns": 0}, {"want_dnssec": True}, {"flags": dns.flags.RD | dns.flags.CD, "use_edns": 0}]
)
def test_what_goes_upstream_is_what_the_resolver_would_send(rig, kwargs):
    r = rig()
    wire = client_query("WwW.Example.TEST", **kwargs)
    assert r.take(wire) and len(r.forwarder) == 1
    assert r.forwarder.send() == []
    sent, _ = r.upstream_gets()
    query = parse_query(wire)
    assert isinstance(query, Query)
    fields = query.fields
    assert sent[2:] == forward_query(fields.qname, fields.qtype, fields.qclass, fields.flags, fields.do)[2:]


def test_identical_questions_merge_and_each_client_gets_the_reply_render_makes(rig):
    r = rig()
    first = client_query("www.example.test", query_id=1, use_edns=0, payload=4096)
    second = client_query("WWW.example.test", query_id=2, use_edns=False)  # another spelling, no EDNS
    assert r.take(first, source=("127.0.0.1", 1)) and r.take(second, source=("127.0.0.1", 2))
    r.forwarder.send()
    sent, upstream_address = r.upstream_gets()
    r.upstream_sock.sendto(answer_to(sent, "203.0.113.7", "203.0.113.8"), upstream_address)
    replies, answered, returned = r.results()
    assert returned == [] and len(answered) == 1 and len(r.forwarder) == 0
    upstream, rtt, answer = answered[0]
    assert upstream is r.upstream and 0 <= rtt < 3
    [(name, addresses)] = answer.addresses
    assert name == "www.example.test" and sorted(addresses) == ["203.0.113.7", "203.0.113.8"]
    assert [(ctx, source, owner) for ctx, _, source, owner in replies] == [
        (r.ctx, ("127.0.0.1", 1), None),
        (r.ctx, ("127.0.0.1", 2), None),
    ]
    for wire, (_, reply, _, _) in zip((first, second), replies, strict=True):
        query = parse_query(wire)
        assert reply == render(query, answer, "udp")  # as the resolver's path makes it, the client's ID and spelling
    counters = r.forwarder.counters()
    assert counters["forwarded_native"] == 1 and counters["merged"] == 1 and counters["queries_udp"] == 2
    assert r.forwarder.rcodes() == {0: 2}
    # And the answer is in the cache, under the resolver's key.
    key = cache_key(dns.name.from_text("www.example.test").to_wire(), 1, 1, False)
    assert r.cache.fresh(key, time.monotonic()) is not None


def test_an_ipv6_upstream(rig):
    r = rig(host="::1")
    assert r.take(client_query("www.example.test"))
    r.forwarder.send()
    sent, address = r.upstream_gets()
    r.upstream_sock.sendto(answer_to(sent, "203.0.113.7"), address)
    replies, answered, _ = r.results()
    assert len(replies) == 1 and answered[0][0] is r.upstream


@pytest.mark.parametrize(("host", "port"), [("dns.example", 53), ("127.0.0.1", 0), ("127.0.0.1", 70000)])
def test_an_upstream_that_is_no_ip_address_and_port_is_refused(rig, host, port):
    r = rig()
    with pytest.raises(ValueError):
        r.configure(host=host, port=port)


def test_a_reply_too_big_for_the_client_is_cut_as_render_cuts_it(rig):
    r = rig()
    wire = client_query("big.example.test", use_edns=False)  # 512 bytes at most
    assert r.take(wire)
    r.forwarder.send()
    sent, address = r.upstream_gets()
    r.upstream_sock.sendto(answer_to(sent, *(f"203.0.113.{i}" for i in range(1, 60))), address)
    replies, answered, _ = r.results()
    reply = replies[0][1]
    assert len(reply) <= 512 and reply[2] & 0x02  # TC: the client retries over TCP
    assert reply == render(parse_query(wire), answered[0][2], "udp")


@pytest.mark.parametrize(
    "wire",
    [
        client_query("alpha.mesh"),  # the local zone's
        client_query("7.0.113.203.in-addr.arpa", "PTR"),  # reverse names: the zone's, or so it may be
        client_query("1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.ip6.arpa", "PTR"),
        client_query("www.example.test", "ANY"),  # answered minimally
        client_query("www.example.test", "AXFR"),  # refused
        client_query("www.example.test", "A", rdclass="CH"),
        client_query("."),
        client_query("www.example.test", use_edns=0, options=[dns.edns.GenericOption(10, b"12345678")]),
        client_query("www.example.test", use_edns=1),  # BADVERS is the resolver's to say
        b"\x00\x01garbage",
        b"",
    ],
)
def test_what_is_not_a_plain_forward_is_left_to_the_resolver(rig, wire):
    r = rig()
    assert not r.take(wire)
    assert len(r.forwarder) == 0 and r.forwarder.counters()["queries_udp"] == 0


def test_a_name_under_the_zone_only_at_a_label_boundary_is_left(rig):
    r = rig()
    assert not r.take(client_query("x.Mesh"))
    assert r.take(client_query("x.notmesh"))  # ends in "mesh" but not under it


def test_one_label_names_are_left_when_told(rig):
    r = rig(single_label=True)
    assert not r.take(client_query("printer"))
    assert r.take(client_query("printer.example"))


def test_a_cached_question_or_one_the_resolver_forwards_is_left_to_it(rig):
    r = rig()
    name = dns.name.from_text("www.example.test").to_wire()
    r.cache.table()[cache_key(name, 1, 1, False)] = b"whatever the cache keeps"
    assert not r.take(client_query("www.example.test"))
    r.their_flights[cache_key(dns.name.from_text("other.example.test").to_wire(), 1, 1, False)] = object()
    assert not r.take(client_query("other.example.test"))
    assert r.take(client_query("third.example.test"))


def test_the_cap_and_the_share_count_the_resolvers_flights_too(rig):
    r = rig(cap=3, share=2)
    r.their_flights[b"one of the resolver's"] = object()
    r.their_owned["10.0.0.0/24"] = 1
    assert r.take(client_query("a.example"), owner="10.0.0.0/24")
    assert not r.take(client_query("b.example"), owner="10.0.0.0/24")  # its share: 1 there, 1 here
    assert r.forwarder.owned("10.0.0.0/24") == 1
    assert r.take(client_query("c.example"), owner=None)  # loopback: no share
    assert not r.take(client_query("d.example"), owner=None)  # the cap: 1 there, 2 here
    assert len(r.forwarder) == 2


def test_nothing_is_taken_without_an_upstream(rig):
    r = rig()
    r.forwarder.configure(None)
    assert not r.take(client_query("www.example.test"))


def test_stray_datagrams_are_counted_and_the_answer_still_found(rig):
    r = rig()
    assert r.take(client_query("www.example.test"))
    r.forwarder.send()
    sent, address = r.upstream_gets()
    answer = answer_to(sent, "203.0.113.7")
    other = bytes([sent[0], sent[1] ^ 1]) + answer[2:]
    for datagram in (b"\x00\x01junk", other, answer[:12] + bytes(5000), sent, answer):  # sent: QR clear
        r.upstream_sock.sendto(datagram, address)
    time.sleep(0.05)  # all five in: one readable() reads them
    replies, _, returned = r.results()
    assert len(replies) == 1 and returned == []
    counters = r.forwarder.counters()
    assert counters["upstream_udp_mismatched"] == 3 and counters["upstream_udp_oversized"] == 1


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda sent: answer_to(sent, rcode=dns.rcode.SERVFAIL), "servfail"),
        (lambda sent: answer_to(sent, rcode=dns.rcode.REFUSED), "refused"),
        (lambda sent: answer_to(sent, "203.0.113.7", tc=True), "truncated"),
        (lambda sent: answer_to(sent, "203.0.113.7")[:-3], "malformed"),
        (lambda sent: sent[:2] + answer_to(client_query("other.example"), "203.0.113.7")[2:], "question_mismatch"),
    ],
)
def test_an_answer_that_will_not_do_hands_the_forward_back(rig, make, reason):
    r = rig()
    first = client_query("www.example.test", query_id=1)
    assert r.take(first, owner="10.0.0.0/24") and r.take(client_query("www.example.test", query_id=2))
    r.forwarder.send()
    sent, address = r.upstream_gets()
    r.upstream_sock.sendto(make(sent), address)
    replies, answered, returned = r.results()
    assert replies == [] and answered == []
    [(why, upstream, rtt, waiters)] = returned
    assert why == reason and upstream is r.upstream and rtt is not None
    assert [w[0] for w in waiters] == [first, client_query("www.example.test", query_id=2)]
    assert len(r.forwarder) == 0 and r.forwarder.owned("10.0.0.0/24") == 0
    assert r.cache.table() == {}


def test_an_unanswered_forward_times_out_and_a_closed_port_is_refused(rig):
    r = rig(timeout=0.2)
    assert r.take(client_query("www.example.test"))
    r.forwarder.send()
    r.upstream_gets()
    assert r.forwarder.expire(time.monotonic()) == []  # not yet
    time.sleep(0.25)
    [(why, upstream, rtt, waiters)] = r.forwarder.expire(time.monotonic())
    assert (why, upstream, rtt, len(waiters)) == ("timeout", r.upstream, None, 1)

    r.upstream_sock.close()  # nothing listens: ICMP port unreachable
    assert r.take(client_query("www.example.test"))
    r.forwarder.send()
    _, _, returned = r.results()
    assert [(why, rtt) for why, _, rtt, _ in returned] == [("refused", None)]


def test_a_new_upstream_takes_the_next_queries_and_the_old_one_answers_its_own(rig):
    r, other = rig(), rig()
    assert r.take(client_query("before.example"))
    r.forwarder.send()
    sent, address = r.upstream_gets()
    r.configure(upstream=other.upstream, host=other.upstream.host, port=other.upstream.port)
    assert r.take(client_query("after.example"))
    r.forwarder.send()
    after, _ = other.upstream_gets()
    assert b"after" in after
    r.upstream_sock.sendto(answer_to(sent, "203.0.113.7"), address)
    replies, answered, _ = r.results()
    assert len(replies) == 1 and answered[0][0] is r.upstream
    assert len(r.forwarder) == 1  # "after" waits on the other upstream


def test_close_hands_back_what_is_under_way(rig):
    r = rig()
    assert r.take(client_query("www.example.test"))
    r.forwarder.send()
    [(why, _, _, waiters)] = r.forwarder.close()
    assert why == "closed" and len(waiters) == 1 and len(r.forwarder) == 0


# -- in the server ----------------------------------------------------------------


def server_counters(later, tmp_path, **table: Any) -> dict[str, int]:
    """Three names asked of a server forwarding to a dnsmasq upstream; its counters then."""
    need_tool("dig")
    upstream = later(start_dnsmasq(tmp_path, ["--address=/example.test/203.0.113.7"]))
    host, port = endpoint()
    settings = DnsSettings.from_config({"listen": [f"{host}:{port}"], "upstreams": [url(upstream)], **table}, {})
    server = later(ServerThread(settings))
    for name in ("a.example.test", "b.example.test", "a.example.test"):
        assert dig(server.host, server.port, name).rdata("A") == ["203.0.113.7"]
    return server.counters()


def test_a_server_forwards_plain_queries_natively_and_counts_them_as_any(later, tmp_path):
    counters = server_counters(later, tmp_path)
    assert counters["forwarded_native"] == 2 and counters["forwarded"] == 2  # the third: from the cache
    assert counters["queries_udp"] == 3 and counters["upstream_answers"] == 2 and counters["replies_noerror"] == 3
    assert counters["cache_hits"] == 1 and counters["inflight"] == 0


@pytest.mark.parametrize(
    "table",
    [
        {"rules": [{"match": "suffix:blocked.test", "action": "reject"}]},  # a rule: the router decides
        {"policy": "random"},  # a pick per query
    ],
)
def test_what_the_router_must_decide_stays_in_python(later, tmp_path, table):
    counters = server_counters(later, tmp_path, **table)
    assert counters.get("forwarded_native", 0) == 0 and counters["forwarded"] == 2


def test_a_socket_takes_queries_for_a_short_while_then_closes_once_answered(rig):
    r = rig()
    ports = []
    for name in ("one.example", "two.example"):  # two batches, one after the other
        assert r.take(client_query(name))
        r.forwarder.send()
        sent, address = r.upstream_gets()
        ports.append(address[1])
        r.upstream_sock.sendto(answer_to(sent, "203.0.113.7"), address)
        assert len(r.results()[0]) == 1
        r.configure()  # told the same upstream again (the server does, every probe tick): the socket stays
    assert ports[0] == ports[1] and r.forwarder.busy()  # the socket takes queries still, for a while
    time.sleep(SOCKET_LIFE * 1.2)
    assert r.forwarder.expire(time.monotonic()) == [] and not r.forwarder.busy()  # retired: nothing waits, closed
    assert r.take(client_query("three.example"))
    r.forwarder.send()
    assert r.upstream_gets()[1][1] != ports[0]  # a fresh socket, a fresh port
    assert r.forwarder.counters()["upstream_sockets_udp"] == 2


def test_a_socket_carries_at_most_a_burst(rig):
    r = rig()
    for i in range(BURST + 1):
        assert r.take(client_query(f"n{i}.example"))
    r.forwarder.send()
    ports = Counter(r.upstream_gets()[1][1] for _ in range(BURST + 1))
    assert sorted(ports.values()) == [1, BURST]

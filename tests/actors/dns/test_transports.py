"""The newer upstream transports through the controller, asked with dig: DoH over
HTTP/2 (dnsdist and unbound, both real) with the fall back to HTTP/1.1, DNS over
QUIC (a server built from aioquic: Debian has none), upstreams given by host
name and resolved through the bootstrap servers, and upstreams that break
those protocols, each break counted and failed over from."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dns.message
import dns.name
import dns.rdatatype
import dns.rrset
import pytest
import structlog.testing

from meshsup.actors.dns.bootstrap import MIN_TTL, addresses_of
from meshsup.actors.dns.doh2 import FrameLengths
from meshsup.actors.settings.dns import DnsSettings
from tests.dns_fixtures import (
    Certificate,
    ServerThread,
    dig,
    endpoint,
    free_port,
    loopback_address,
    make_certificate,
    need_tool,
    start_dnsdist,
    start_dnsmasq,
    start_stub,
    start_unbound_tls,
    wait_until,
)
from tests.dns_transport_fixtures import BadDoh2, DoqServer

NAME = "resolver.test"  # what the upstreams' certificate names, besides their address


@dataclass
class Site:
    """A loopback address the upstreams of a test listen on, and their certificate."""

    host: str
    certificate: Certificate

    @property
    def ca_file(self) -> str:
        return str(self.certificate.cert)


@pytest.fixture
def site(tmp_path: Path) -> Site:
    host = loopback_address()
    return Site(host, make_certificate(tmp_path, host, NAME))


def start_server(later: Callable[[Any], Any], **table: Any) -> ServerThread:
    host, port = endpoint()
    table.setdefault("listen", [f"{host}:{port}"])
    table.setdefault("timeout", 2.0)
    return later(ServerThread(DnsSettings.from_config(table, {})))


def ask(server: ServerThread, name: str, *options: str) -> list[str]:
    return dig(server.host, server.port, name, "A", *options).rdata("A")


def at_once(server: ServerThread, names: list[str]) -> list[dns.message.Message]:
    """The answers to queries for names sent all at once, in the order of the names."""
    queries = [dns.message.make_query(name, "A") for name in names]
    answers: dict[int, dns.message.Message] = {}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(5)
        for query in queries:
            sock.sendto(query.to_wire(), (server.host, server.port))
        while len(answers) < len(queries):
            answer = dns.message.from_wire(sock.recv(65535))
            answers[answer.id] = answer
    return [answers[query.id] for query in queries]


def counted(server: ServerThread, what: Callable[[dict[str, int]], bool]) -> dict[str, int]:
    """The server's counters once what holds of them (a connection's counters
    may follow its answer by a loop turn)."""
    wait_until(lambda: what(server.counters()), what="counters")
    return server.counters()


# -- sans-IO: what a bootstrap answer gives, how long an HTTP/2 frame is ------------------------


def test_bootstrap_addresses_follow_cnames_and_take_the_least_ttl():
    query = dns.message.make_query("dns.example", "A")
    answer = dns.message.make_response(query)
    answer.answer.append(dns.rrset.from_text("dns.example.", 300, "IN", "CNAME", "edge.cdn.example."))
    answer.answer.append(dns.rrset.from_text("edge.cdn.example.", 60, "IN", "A", "198.51.100.7", "198.51.100.8"))
    answer.answer.append(dns.rrset.from_text("elsewhere.example.", 5, "IN", "A", "203.0.113.1"))  # not on the way
    answer = dns.message.from_wire(answer.to_wire())  # read as the bootstrap reads one
    name = dns.name.from_text("dns.example")
    addresses, ttl = addresses_of(answer, name, dns.rdatatype.A)
    assert sorted(addresses) == ["198.51.100.7", "198.51.100.8"] and ttl == 60
    assert addresses_of(answer, name, dns.rdatatype.AAAA) == ((), 0.0)
    zero = dns.message.make_response(query)
    zero.answer.append(dns.rrset.from_text("dns.example.", 0, "IN", "A", "198.51.100.9"))
    zero = dns.message.from_wire(zero.to_wire())
    assert addresses_of(zero, name, dns.rdatatype.A) == (("198.51.100.9",), MIN_TTL)  # never a lookup a query


def frame(length: int) -> bytes:
    """An HTTP/2 DATA frame of length bytes (RFC 9113 section 4.1)."""
    return length.to_bytes(3, "big") + b"\x00\x00" + (1).to_bytes(4, "big") + b"x" * length


def test_http2_frame_lengths_are_checked_from_their_headers_however_the_bytes_come():
    ok = frame(0) + frame(16384) + frame(5)
    lengths = FrameLengths()
    assert all(lengths.fit(ok[i : i + 7]) for i in range(0, len(ok), 7))  # headers split too
    too_long = frame(5)[:14] + frame(16385)[:9]  # refused by its header, before its payload comes
    lengths = FrameLengths()
    assert lengths.fit(too_long[:12]) and not lengths.fit(too_long[12:])


# -- DoH over HTTP/2 -------------------------------------------------------------------------


def test_doh_over_http2_with_dnsdist_and_unbound_many_queries_on_one_connection(tmp_path, later, site):
    need_tool("dig", "unbound", "dnsdist")
    backend = later(start_dnsmasq(tmp_path, ["--address=/example.test/203.0.113.7"]))
    dnsdist = later(start_dnsdist(tmp_path, site.certificate, site.host, backend, "example.test"))
    unbound = later(start_unbound_tls(tmp_path, site.certificate, site.host, ["www.h2.test. 300 IN A 203.0.113.9"]))
    server = start_server(
        later,
        ca_file=site.ca_file,
        upstreams=[f"https://{site.host}:{dnsdist.doh_port}/dns-query"],
        routes=[{"suffix": "h2.test", "upstreams": [f"https://{site.host}:{unbound.https_port}/dns-query"]}],
    )
    assert ask(server, "www.h2.test") == ["203.0.113.9"] and unbound.count("www.h2.test") == 1
    # Twenty at once share the one connection, a stream each (HTTP/1.1 would take four).
    answers = at_once(server, [f"n{i}.example.test" for i in range(20)])
    assert [a.answer[0][0].address for a in answers] == ["203.0.113.7"] * 20
    counters = counted(server, lambda c: c.get("upstream_queries_https") == 21)
    assert counters["upstream_connections_https"] == counters["upstream_https_h2"] == 2  # one each
    assert "upstream_https_http1" not in counters and "failovers" not in counters


def test_doh2_waits_for_the_streams_the_server_allows_and_closes_when_idle(later, site):
    need_tool("dig")
    doh = later(BadDoh2(site.certificate, site.host, max_streams=2))
    server = start_server(later, ca_file=site.ca_file, upstreams=[doh.url()], tcp_idle_timeout=0.5)
    answers = at_once(server, [f"n{i}.example.test" for i in range(12)])
    assert [a.answer[0][0].address for a in answers] == ["203.0.113.61"] * 12
    assert doh.requests == 12 and doh.connections == 1  # two at a time, on the one connection
    time.sleep(1.5)  # idle past the timeout: closed (GOAWAY), and the next query opens another
    assert ask(server, "again.example.test") == ["203.0.113.61"] and doh.connections == 2
    assert server.counters()["upstream_https_h2"] == 2


def test_doh_falls_back_to_http1_when_the_server_offers_only_that(later, site):
    need_tool("dig")
    http1 = later(BadDoh2(site.certificate, site.host, http1=True))
    server = start_server(later, ca_file=site.ca_file, upstreams=[http1.url()])
    for i in range(3):
        assert ask(server, f"q{i}.example.test") == ["203.0.113.61"]
    counters = counted(server, lambda c: c.get("upstream_queries_https") == 3)
    # The connection that found HTTP/1.1 carries the queries: one connection, never an HTTP/2 one.
    assert http1.requests == 3 and http1.connections == 1
    assert counters["upstream_https_http1"] == counters["upstream_connections_https"] == 1
    assert "upstream_https_h2" not in counters


# -- DNS over QUIC --------------------------------------------------------------------------


def test_doq_answers_on_one_connection_with_id_0_and_closes_it_when_idle(later, site):
    need_tool("dig")
    doq = later(DoqServer(site.certificate, site.host))
    server = start_server(later, ca_file=site.ca_file, upstreams=[doq.url()], tcp_idle_timeout=0.5)
    answers = at_once(server, [f"q{i}.example.test" for i in range(3)])
    assert [a.answer[0][0].address for a in answers] == ["203.0.113.60"] * 3
    assert doq.queries == 3 and doq.connections == 1 and doq.ids == [0, 0, 0]  # RFC 9250 section 4.2.1
    time.sleep(1.5)  # idle for longer than the timeout: QUIC's idle timeout closes it
    assert ask(server, "again.example.test") == ["203.0.113.60"]
    assert doq.connections == 2
    counters = server.counters()
    assert counters["upstream_queries_doq"] == 4 and counters["upstream_connections_doq"] == 2


def test_doq_checks_the_certificate_name(later, site):
    need_tool("dig")
    doq = later(DoqServer(site.certificate, site.host))
    good = later(start_stub())
    server = start_server(
        later, ca_file=site.ca_file, upstreams=[doq.url("other.test"), f"udp://{good.host}:{good.port}"]
    )
    assert ask(server, "www.example.test") == ["203.0.113.50"]
    counters = server.counters()
    assert counters["upstream_tls"] == 1 and counters["failovers"] == 1 and doq.queries == 0


def test_a_doq_upstream_nobody_listens_on_is_refused_at_once(later, site):
    need_tool("dig")
    good = later(start_stub())
    dead = f"doq://{site.host}:{free_port(site.host)}"
    server = start_server(later, ca_file=site.ca_file, timeout=5.0, upstreams=[dead, f"udp://{good.host}:{good.port}"])
    started = time.monotonic()
    assert ask(server, "www.example.test", "+time=8") == ["203.0.113.50"]
    assert time.monotonic() - started < 5.0  # ICMP port unreachable ended it, not the timeout
    counters = server.counters()
    assert counters["upstream_refused"] == 1 and counters["failovers"] == 1


# -- host names, through the bootstrap servers ---------------------------------------------------


def test_host_name_upstreams_resolve_through_bootstrap_and_again_by_ttl(tmp_path, later, site):
    need_tool("dig", "unbound", "dnsdist")
    bootstrap = later(
        start_dnsmasq(
            tmp_path, [f"--address=/{NAME}/{site.host}", f"--address=/impostor.test/{site.host}"], ttl=1, name="boot"
        )
    )
    backend = later(start_dnsmasq(tmp_path, ["--address=/example.test/203.0.113.7"], name="backend"))
    dnsdist = later(start_dnsdist(tmp_path, site.certificate, site.host, backend, "example.test"))
    unbound = later(start_unbound_tls(tmp_path, site.certificate, site.host, ["www.dot.test. 300 IN A 203.0.113.9"]))
    doq = later(DoqServer(site.certificate, site.host))
    good = later(start_stub())
    fallback = f"udp://{good.host}:{good.port}"
    server = start_server(
        later,
        ca_file=site.ca_file,
        bootstrap=[f"{bootstrap.host}:{bootstrap.port}"],
        cache_size=0,
        upstreams=[f"https://{NAME}:{dnsdist.doh_port}/dns-query"],
        routes=[
            {"suffix": "dot.test", "upstreams": [f"tls://{NAME}:{unbound.tls_port}"]},
            {"suffix": "doq.test", "upstreams": [f"doq://{NAME}:{doq.port}"]},
            # A name the certificate does not carry, and one no server knows: both fail over.
            {"suffix": "impostor.test", "upstreams": [f"tls://impostor.test:{unbound.tls_port}", fallback]},
            {"suffix": "nowhere.test", "upstreams": [f"doq://nowhere.test:{doq.port}", fallback]},
        ],
    )
    assert ask(server, "www.example.test") == ["203.0.113.7"]
    assert ask(server, "www.dot.test") == ["203.0.113.9"] and unbound.count("www.dot.test") == 1
    assert ask(server, "www.doq.test") == ["203.0.113.60"] and doq.queries == 1
    assert ask(server, "www.impostor.test") == ["203.0.113.50"]
    assert ask(server, "www.nowhere.test") == ["203.0.113.50"]
    counters = server.counters()
    assert counters["upstream_tls"] == 1 and counters["upstream_bootstrap"] == 1 and counters["failovers"] == 2
    looked_up = bootstrap.count(NAME)
    assert 1 <= looked_up <= 3  # once, or again as its one-second TTL ran out between the queries
    assert bootstrap.count("nowhere.test") == 1 and bootstrap.count("nowhere.test", "AAAA") == 1

    # Within the TTL the name is not asked again; once it is up, the next query has it asked
    # again (and goes on to the address had meanwhile).
    assert ask(server, "a.doq.test") == ["203.0.113.60"]
    time.sleep(1.2)
    assert ask(server, "b.doq.test") == ["203.0.113.60"]
    wait_until(lambda: bootstrap.count(NAME) > looked_up, what="the name looked up again")

    # The bootstrap server gone, the name's last address serves on.
    bootstrap.stop()
    time.sleep(1.2)
    assert ask(server, "c.doq.test") == ["203.0.113.60"] and doq.queries == 4
    counted(server, lambda c: c.get("bootstrap_failures", 0) >= 1)


# -- upstreams breaking the protocol ------------------------------------------------------------

# What a server does, and the reason it is counted under.
DOQ_BREAKS = {
    "truncated": "doq_bad_response",  # a length prefix longer than what came before FIN
    "padded": "doq_bad_response",  # bytes after the message
    "server-stream": "doq_bad_response",  # the answer on a stream the server opened
    "garbage": "doq_bad_response",
    "nonzero-id": "mismatched",  # RFC 9250 section 4.2.1: the answer's ID is 0 too
    "oversized": "doq_bad_response",  # more than a prefixed message, stopped there
}
H2_BREAKS = {
    "status-500": "http_status",
    "text-plain": "http_content_type",
    "wrong-stream": "http_bad_response",  # HEADERS on a stream the client never opened
    "truncated-frame": "closed",  # a DATA frame cut short by the connection's end
    "garbage": "http_bad_response",  # HTTP/1.1 where HTTP/2 was agreed
    "oversized": "http_bad_response",  # a body past 65535 bytes, stopped there
}


@pytest.mark.parametrize(
    ("kind", "mode", "reason"),
    [("doq", m, r) for m, r in DOQ_BREAKS.items()] + [("h2", m, r) for m, r in H2_BREAKS.items()],
)
def test_an_upstream_breaking_doq_or_http2_fails_over_counted_without_a_traceback(later, site, kind, mode, reason):
    need_tool("dig")
    bad = later(
        DoqServer(site.certificate, site.host, mode) if kind == "doq" else BadDoh2(site.certificate, site.host, mode)
    )
    good = later(start_stub())
    server = start_server(
        later, ca_file=site.ca_file, timeout=5.0, upstreams=[bad.url(), f"udp://{good.host}:{good.port}"]
    )
    with structlog.testing.capture_logs() as logs:
        started = time.monotonic()
        assert ask(server, "www.example.test", "+time=8") == ["203.0.113.50"]
        elapsed = time.monotonic() - started
    counters = server.counters()
    got = bad.queries if kind == "doq" else bad.requests
    assert got == 1 and counters[f"upstream_{reason}"] == 1 and counters["failovers"] == 1
    assert elapsed < 5.0 and "upstream_timeout" not in counters  # it gave up by itself, not at the deadline
    assert "upstream_internal" not in counters and not [e for e in logs if e.get("log_level") == "error"], logs

"""The DNS controller's server against real clients (dig, raw sockets) and
real upstreams (dnsmasq, unbound over TLS, dnsdist over HTTPS, small stubs),
all on random 127.x.y.z loopback addresses."""

from __future__ import annotations

import random
import socket
import struct
import threading
import time

import dns.flags
import dns.message
import dns.rcode
import dns.reversename
import dns.rrset
import pytest

from meshsup.actors.dns.server import MAX_QUERY
from meshsup.actors.settings.dns import DnsSettings
from tests.dns_fixtures import (
    BAD_PACKETS,
    ServerThread,
    assert_bad_packet_answer,
    dig,
    endpoint,
    free_port,
    header,
    loopback_address,
    make_certificate,
    need_tool,
    split_dns_table,
    start_dnsdist,
    start_dnsmasq,
    start_stub,
    start_unbound_tls,
    udp_exchange,
    url,
)

NAMES = {"alpha": ["100.64.0.1/32", "fd7a:115c:a1e0::1/128"], "bravo": ["100.64.0.2", "100.64.0.3", "100.64.0.4"]}


@pytest.fixture(autouse=True)
def _tools() -> None:
    need_tool("dig")


def dead_upstream(scheme: str = "udp") -> str:
    host = loopback_address()
    return f"{scheme}://{host}:{free_port(host)}"  # nothing listens there


def start_server(later, names=NAMES, on_learned=None, **table) -> ServerThread:
    host, port = endpoint()
    table.setdefault("listen", [f"{host}:{port}"])
    table.setdefault("timeout", 1.0)
    return later(ServerThread(DnsSettings.from_config(table, names), on_learned=on_learned))


def burst(server: ServerThread, wires: list[bytes], timeout: float = 3.0) -> dict[int, dns.message.Message]:
    """Send all queries at once from one socket; answers by query ID."""
    answers: dict[int, dns.message.Message] = {}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        for wire in wires:
            sock.sendto(wire, (server.host, server.port))
        deadline = time.monotonic() + timeout
        while len(answers) < len(wires) and time.monotonic() < deadline:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                message = dns.message.from_wire(sock.recv(65535))
            except TimeoutError:
                break
            answers[message.id] = message
    return answers


def queries(name: str, count: int, rdtype: str = "A") -> list[bytes]:
    out = []
    for query_id in range(1, count + 1):
        message = dns.message.make_query(name, rdtype)
        message.id = query_id
        out.append(message.to_wire())
    return out


# -- local names ------------------------------------------------------------


def test_local_names_like_docker(tmp_path, later):
    upstream = later(start_dnsmasq(tmp_path, ["--address=/example.test/203.0.113.7"]))
    server = start_server(
        later,
        upstreams=[url(upstream)],
        ttl=123,
        srv=[{"name": "_http._tcp", "target": "alpha", "port": 8080, "priority": 1, "weight": 5}],
    )
    h, p = server.host, server.port

    a = dig(h, p, "alpha.mesh")
    assert a.status == "NOERROR" and "aa" in a.flags
    assert a.rdata("A") == ["100.64.0.1"] and a.answer[0][1] == "123"
    assert dig(h, p, "alpha.mesh", "AAAA").rdata("AAAA") == ["fd7a:115c:a1e0::1"]

    orders = {tuple(dig(h, p, "bravo.mesh").rdata("A")) for _ in range(8)}
    assert all(sorted(o) == ["100.64.0.2", "100.64.0.3", "100.64.0.4"] for o in orders) and len(orders) > 1

    no_v6 = dig(h, p, "bravo.mesh", "AAAA")
    assert no_v6.status == "NOERROR" and no_v6.answer == [] and no_v6.authority[0][3] == "SOA"
    mx = dig(h, p, "alpha.mesh", "MX")
    assert mx.status == "NOERROR" and mx.answer == []

    missing = dig(h, p, "charlie.mesh")
    assert missing.status == "NXDOMAIN" and missing.authority[0][:4] == ["mesh.", "123", "IN", "SOA"]

    for address, host in [("100.64.0.3", "bravo.mesh."), ("fd7a:115c:a1e0::1", "alpha.mesh.")]:
        assert dig(h, p, dns.reversename.from_address(address).to_text(), "PTR").rdata("PTR") == [host]

    srv = dig(h, p, "_http._tcp.mesh", "SRV")
    assert srv.rdata("SRV") == ["1 5 8080 alpha.mesh."]
    assert srv.rdata("A", "additional") == ["100.64.0.1"]
    assert srv.rdata("AAAA", "additional") == ["fd7a:115c:a1e0::1"]

    assert dig(h, p, "alpha.mesh", "A", "+tcp").rdata("A") == ["100.64.0.1"]
    assert "mesh" not in upstream.log.read_text() and "arpa" not in upstream.log.read_text()


# -- forwarding, cache, flush ---------------------------------------------------


def test_forwarding_cache_flush_and_learning(tmp_path, later):
    upstream = later(start_dnsmasq(tmp_path, ["--address=/example.test/203.0.113.7"], ttl=300))
    learned: list[tuple[str, tuple[str, ...]]] = []
    server = start_server(later, upstreams=[url(upstream)], on_learned=lambda n, a: learned.append((n, a)))

    first = dig(server.host, server.port, "www.example.test")
    assert first.rdata("A") == ["203.0.113.7"] and "ra" in first.flags and "aa" not in first.flags
    time.sleep(1.1)
    second = dig(server.host, server.port, "www.example.test")
    assert second.rdata("A") == ["203.0.113.7"] and int(second.answer[0][1]) < 300  # counted down
    assert upstream.count("www.example.test") == 1
    assert learned == [("www.example.test", ("203.0.113.7",))]

    server.call(lambda s: s.flush_cache())  # e.g. a link change
    dig(server.host, server.port, "www.example.test")
    assert upstream.count("www.example.test") == 2
    counters = server.counters()
    assert counters["cache_hits"] == 1 and counters["upstream_answers"] == 2 and counters["cache_flushes"] == 1

    server.call(lambda s: s.set_learning(False))  # nobody listens: names are answered, not learned
    assert dig(server.host, server.port, "quiet.example.test").rdata("A") == ["203.0.113.7"]
    server.call(lambda s: s.set_learning(True))
    assert dig(server.host, server.port, "heard.example.test").rdata("A") == ["203.0.113.7"]
    assert [name for name, _ in learned] == ["www.example.test", "www.example.test", "heard.example.test"]


class _NoisyUpstream:
    """Answers each query after three datagrams a forwarder must drop: garbage,
    the answer under another ID, and a datagram too large to be one of ours."""

    def __init__(self, ttl: int) -> None:
        self.host, self.port = endpoint()
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((self.host, self.port))
        self.sock.settimeout(5)
        self.ttl = ttl
        self.thread = threading.Thread(target=self._answer_one, daemon=True)
        self.thread.start()

    def _answer_one(self) -> None:
        try:
            wire, source = self.sock.recvfrom(4096)
        except OSError:
            return
        query = dns.message.from_wire(wire)
        reply = dns.message.make_response(query)
        reply.answer.append(dns.rrset.from_text(query.question[0].name, self.ttl, "IN", "A", "203.0.113.9"))
        answer = reply.to_wire()
        other_id = struct.pack("!H", (query.id + 1) % 65536)
        for datagram in (b"\x00\x01junk", other_id + answer[2:], answer[:12] + bytes(5000), answer):
            self.sock.sendto(datagram, source)

    def stop(self) -> None:
        self.thread.join(timeout=5)
        self.sock.close()


def test_a_forwarded_answer_comes_back_byte_correct_past_stray_datagrams(later):
    upstream = later(_NoisyUpstream(ttl=3600))
    learned: list[tuple[str, tuple[str, ...]]] = []
    server = start_server(
        later,
        upstreams=[f"udp://{upstream.host}:{upstream.port}"],
        cache_max_ttl=120,
        on_learned=lambda n, a: learned.append((n, a)),
    )
    query = dns.message.make_query("WwW.Example.TEST", "A", use_edns=False)
    answer = dns.message.from_wire(udp_exchange(server.host, server.port, query.to_wire()))
    assert answer.id == query.id and answer.flags & dns.flags.QR and answer.flags & dns.flags.RA
    assert answer.question[0].name.to_text() == "WwW.Example.TEST."  # the client's spelling
    assert [rrset.to_text() for rrset in answer.answer] == ["WwW.Example.TEST. 120 IN A 203.0.113.9"]  # clamped
    assert learned == [("www.example.test", ("203.0.113.9",))]
    counters = server.counters()
    assert counters["upstream_udp_mismatched"] == 2 and counters["upstream_udp_oversized"] == 1
    assert counters["upstream_answers"] == 1 and counters.get("failovers", 0) == 0


def test_truncated_upstream_answer_retried_over_tcp(tmp_path, later):
    txt = [f"--txt-record=big.example.test,{str(i) * 200}" for i in range(7)]  # about 1.5 kB
    upstream = later(start_dnsmasq(tmp_path, txt))
    server = start_server(later, upstreams=[url(upstream)])

    small = dig(server.host, server.port, "big.example.test", "TXT", "+noedns", "+ignore")
    assert "tc" in small.flags  # 512 bytes without EDNS
    full = dig(server.host, server.port, "big.example.test", "TXT", "+tcp")
    assert full.status == "NOERROR" and len(full.rdata("TXT")) == 7
    assert server.counters()["upstream_truncated_retried_tcp"] == 1


# -- failover and serve-stale ---------------------------------------------------------


@pytest.mark.parametrize("scheme", ["udp", "tcp"])
def test_failover_from_dead_upstream(tmp_path, later, scheme):
    upstream = later(start_dnsmasq(tmp_path, ["--address=/example.test/203.0.113.7"]))
    server = start_server(later, upstreams=[dead_upstream(scheme), url(upstream, scheme)])
    assert dig(server.host, server.port, "www.example.test").rdata("A") == ["203.0.113.7"]
    counters = server.counters()
    assert counters["upstream_refused"] == 1 and counters["failovers"] == 1


def test_failover_after_a_timeout_and_the_late_answer_ignored(tmp_path, later):
    late = threading.Event()
    slow = later(start_stub(hold=late))  # answers only once the test says so
    upstream = later(start_dnsmasq(tmp_path, ["--address=/example.test/203.0.113.7"]))
    server = start_server(later, upstreams=[f"udp://{slow.host}:{slow.port}", url(upstream)], timeout=0.3)
    started = time.monotonic()
    assert dig(server.host, server.port, "www.example.test").rdata("A") == ["203.0.113.7"]
    assert time.monotonic() - started >= 0.3  # the second upstream was asked after the first's timeout
    late.set()  # the late answer finds its socket closed (a socket per burst): nothing counted, nothing sent on
    counters = server.counters()
    assert counters["upstream_timeout"] == 1 and counters["failovers"] == 1 and counters["upstream_answers"] == 1


def test_failover_on_refused_and_servfail(tmp_path, later):
    refusing = later(start_stub(rcode=dns.rcode.REFUSED))
    failing = later(start_stub(rcode=dns.rcode.SERVFAIL))
    upstream = later(start_dnsmasq(tmp_path, ["--address=/example.test/203.0.113.7"]))
    upstreams = [f"udp://{s.host}:{s.port}" for s in (refusing, failing)] + [url(upstream)]
    server = start_server(later, upstreams=upstreams)
    assert dig(server.host, server.port, "www.example.test").rdata("A") == ["203.0.113.7"]
    assert refusing.questions == ["www.example.test."] and failing.questions == ["www.example.test."]

    only_failing = start_server(later, upstreams=upstreams[:2])
    assert dig(only_failing.host, only_failing.port, "www.example.test").status == "SERVFAIL"


def test_upstream_killed_then_failover_then_serve_stale(tmp_path, later):
    first = later(start_dnsmasq(tmp_path, ["--address=/example.test/203.0.113.7"], name="first"))
    second = later(start_dnsmasq(tmp_path, ["--address=/example.test/203.0.113.7"], name="second"))
    server = start_server(later, upstreams=[url(first), url(second)], serve_stale=True, cache_max_ttl=1, timeout=0.5)
    h, p = server.host, server.port

    assert dig(h, p, "www.example.test").rdata("A") == ["203.0.113.7"]
    assert (first.count("www.example.test"), second.count("www.example.test")) == (1, 0)

    first.stop()
    time.sleep(1.1)  # the cached answer expires
    assert dig(h, p, "www.example.test").rdata("A") == ["203.0.113.7"]
    assert second.count("www.example.test") == 1

    second.stop()
    time.sleep(1.1)
    stale = dig(h, p, "www.example.test")
    assert stale.status == "NOERROR" and stale.rdata("A") == ["203.0.113.7"] and stale.answer[0][1] == "30"
    assert server.counters()["stale_answers"] == 1

    fresh_name = dig(h, p, "other.example.test")  # nothing stale to fall back on
    assert fresh_name.status == "SERVFAIL"


# -- encrypted upstreams ----------------------------------------------------------


def test_dot_with_unbound_and_doh_with_dnsdist(tmp_path, later):
    need_tool("openssl", "unbound", "dnsdist")
    tls_host = loopback_address()
    certificate = make_certificate(tmp_path, tls_host, "resolver.test")
    backend = later(start_dnsmasq(tmp_path, ["--address=/example.test/203.0.113.7"]))
    unbound = later(start_unbound_tls(tmp_path, certificate, tls_host, ["www.dot.test. 300 IN A 203.0.113.9"]))
    dnsdist = later(start_dnsdist(tmp_path, certificate, tls_host, backend, "example.test"))
    server = start_server(
        later,
        ca_file=str(certificate.cert),
        upstreams=[f"https://{tls_host}:{dnsdist.doh_port}/dns-query"],
        routes=[
            {"suffix": "dot.test", "upstreams": [f"tls://{tls_host}:{unbound.tls_port}#resolver.test"]},
            {"suffix": "dot-via-dnsdist.example.test", "upstreams": [f"tls://{tls_host}:{dnsdist.tls_port}"]},
        ],
    )
    for i in range(4):
        assert dig(server.host, server.port, f"n{i}.example.test").rdata("A") == ["203.0.113.7"]
        assert backend.count(f"n{i}.example.test") == 1
    assert dig(server.host, server.port, "www.dot.test").rdata("A") == ["203.0.113.9"]
    assert dig(server.host, server.port, "www.dot.test", "TXT").status == "NOERROR"
    assert unbound.count("www.dot.test") == 1 and unbound.count("www.dot.test", "TXT") == 1
    assert dig(server.host, server.port, "a.dot-via-dnsdist.example.test").rdata("A") == ["203.0.113.7"]
    counters = server.counters()
    # Keep-alive and connection reuse: one connection per upstream for all queries.
    assert counters["upstream_queries_https"] == 4 and counters["upstream_connections_https"] == 1
    assert counters["upstream_queries_tls"] == 3 and counters["upstream_connections_tls"] == 2

    # System CAs only; a slow handshake on a busy machine must fail as "tls", not "timeout".
    untrusted = start_server(later, upstreams=[f"https://{tls_host}:{dnsdist.doh_port}"], timeout=10.0)
    assert dig(untrusted.host, untrusted.port, "x.example.test").status == "SERVFAIL"
    assert untrusted.counters()["upstream_tls"] == 1


@pytest.mark.parametrize(("scheme", "counter", "most"), [("tcp", "upstream_connections_tcp", 1)])
def test_upstream_sockets_carry_many_queries(tmp_path, later, scheme, counter, most):
    upstream = later(start_dnsmasq(tmp_path, ["--address=/example.test/203.0.113.7"]))
    server = start_server(later, upstreams=[url(upstream, scheme)])
    wires = []
    for i in range(100):
        message = dns.message.make_query(f"n{i}.example.test", "A")
        message.id = i
        wires.append(message.to_wire())
    answers = burst(server, wires)
    assert len(answers) == 100 and all(a.answer[0][0].address == "203.0.113.7" for a in answers.values())
    assert server.counters()[counter] == most  # never a socket per query


# -- merging and the in-flight cap --------------------------------------------------------


def test_identical_concurrent_queries_reach_upstream_once(tmp_path, later):
    upstream = later(start_dnsmasq(tmp_path, ["--address=/example.test/203.0.113.7"]))
    server = start_server(later, upstreams=[url(upstream)])
    answers = burst(server, queries("same.example.test", 100))
    assert len(answers) == 100 and all(a.answer and a.rcode() == 0 for a in answers.values())
    assert upstream.count("same.example.test") == 1


def test_identical_queries_merge_while_upstream_is_slow(later):
    slow = later(start_stub(delay=0.3))
    server = start_server(later, upstreams=[f"udp://{slow.host}:{slow.port}"], cache_size=0)
    answers = burst(server, queries("merge.example.test", 100))
    assert len(answers) == 100 and {a.answer[0][0].address for a in answers.values()} == {"203.0.113.50"}
    assert slow.questions == ["merge.example.test."]
    assert server.counters()["merged"] == 99


def test_inflight_cap_refuses_excess_but_local_names_answer(later):
    release = threading.Event()
    slow = later(start_stub(hold=release))  # no answer until the excess was refused
    server = start_server(later, upstreams=[f"udp://{slow.host}:{slow.port}"], max_inflight=5, timeout=10.0)
    wires = []
    for i in range(8):
        message = dns.message.make_query(f"n{i}.example.test", "A")
        message.id = i
        wires.append(message.to_wire())
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(10.0)
        for wire in wires:
            sock.sendto(wire, (server.host, server.port))
        refused_ids = set()
        for _ in range(3):  # refused at once: the upstream holds every answer meanwhile
            refused = dns.message.from_wire(sock.recv(65535))
            assert refused.rcode() == dns.rcode.REFUSED
            refused_ids.add(refused.id)
        assert dig(server.host, server.port, "alpha.mesh").rdata("A") == ["100.64.0.1"]
        release.set()
        answered = [dns.message.from_wire(sock.recv(65535)) for _ in range(5)]
    assert all(a.rcode() == dns.rcode.NOERROR for a in answered)
    assert refused_ids.isdisjoint(a.id for a in answered) and len(slow.questions) == 5
    assert server.counters()["refused_inflight_cap"] == 3


# -- rules and split DNS ---------------------------------------------------------------


def test_rules_and_split_dns(tmp_path, later):
    default = later(start_dnsmasq(tmp_path, ["--address=/test/203.0.113.7"], name="default"))
    corp = later(start_dnsmasq(tmp_path, ["--address=/corp.test/203.0.113.8"], name="corp"))
    deep = later(start_dnsmasq(tmp_path, ["--address=/eu.corp.test/203.0.113.9"], name="deep"))
    fast = later(start_stub())
    server = start_server(later, **split_dns_table(default, fast, corp, deep))

    def ask(name: str, rdtype: str = "A"):
        return dig(server.host, server.port, name, rdtype)

    rejected = [
        ("blocked.test", "A"), ("x.ads.test", "A"), ("ads.test", "A"), ("my-tracker.test", "A"), ("www.test", "MX")
    ]  # fmt: skip
    for name, rdtype in rejected:
        result = ask(name, rdtype)
        assert result.status == "NXDOMAIN" and result.answer == [], name
    assert ask("notblocked.test").rdata("A") == ["203.0.113.7"]  # full: is exact
    assert ask("ok.ads.test").rdata("A") == ["203.0.113.7"]  # asis before reject
    assert ask("cdn7.test").rdata("A") == ["203.0.113.50"] and fast.questions == ["cdn7.test."]
    assert ask("cdn.test").rdata("A") == ["203.0.113.7"]
    assert ask("www.corp.test").rdata("A") == ["203.0.113.8"]
    assert ask("a.eu.corp.test").rdata("A") == ["203.0.113.9"]  # the most specific route wins
    assert ask("www.test").rdata("A") == ["203.0.113.7"]
    assert [default.count(name, rdtype) for name, rdtype in rejected] == [0] * 5  # never left the node
    assert default.count("ok.ads.test") == 1 and default.count("cdn7.test") == 0
    assert "corp" not in default.log.read_text() and corp.count("a.eu.corp.test") == 0
    assert server.counters()["rejected_by_rule"] == 5


def test_upstreams_by_source_address_and_ndots(later):
    default, office = later(start_stub(address="203.0.113.1")), later(start_stub(address="203.0.113.2"))
    server = start_server(
        later,
        upstreams=[f"udp://{default.host}:{default.port}"],
        source_overrides=[{"source": "127.77.0.0/16", "upstreams": [f"udp://{office.host}:{office.port}"]}],
        ndots=1,
    )
    from_office = ("-b", "127.77.0.5")
    for _ in range(2):  # the second time from the cache: each source set keeps its own view
        assert dig(server.host, server.port, "www.example.test", "A", *from_office).rdata("A") == ["203.0.113.2"]
        assert dig(server.host, server.port, "www.example.test").rdata("A") == ["203.0.113.1"]
    assert office.questions == default.questions == ["www.example.test."]
    single = dig(server.host, server.port, "intranet")
    assert single.status == "NOERROR" and single.answer == []  # Docker's ndots rule: not sent out
    assert default.questions == ["www.example.test."] and server.counters()["ndots_not_forwarded"] == 1


# -- hygiene ---------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "wire", "rcode"), BAD_PACKETS, ids=[name for name, _, _ in BAD_PACKETS])
def test_bad_packets_get_the_right_answer(later, name, wire, rcode):
    server = start_server(later, upstreams=[])
    answer = udp_exchange(server.host, server.port, wire, timeout=0.3 if rcode is None else 2.0)
    assert_bad_packet_answer(answer, rcode)
    assert dig(server.host, server.port, "alpha.mesh").rdata("A") == ["100.64.0.1"]


def test_garbage_over_udp_and_tcp_keeps_the_server_answering(later):
    server = start_server(later, upstreams=[])
    rng = random.Random(5)
    for _ in range(200):
        garbage = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 60)))
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.sendto(garbage, (server.host, server.port))
    with socket.create_connection((server.host, server.port), timeout=2) as tcp:
        bad = header(0x0100, qd=2)
        good = dns.message.make_query("alpha.mesh", "A", id=7).to_wire()
        tcp.sendall(struct.pack("!H", len(bad)) + bad + struct.pack("!H", len(good)) + good)
        replies = [read_tcp_message(tcp) for _ in range(2)]
    assert replies[0].rcode() == dns.rcode.FORMERR
    assert replies[1].id == 7 and replies[1].answer[0][0].address == "100.64.0.1"
    assert dig(server.host, server.port, "alpha.mesh").rdata("A") == ["100.64.0.1"]
    counters = server.counters()
    assert counters["queries_udp"] >= 200 and counters["formerr"] >= 1


def test_an_oversized_datagram_is_counted_and_dropped(later):
    server = start_server(later, upstreams=[])
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(2)
        sock.sendto(header(0x0100) + b"\x00" * MAX_QUERY, (server.host, server.port))
        sock.sendto(dns.message.make_query("alpha.mesh", "A", id=9).to_wire(), (server.host, server.port))
        reply = dns.message.from_wire(sock.recv(65535))
    assert reply.id == 9 and reply.answer[0][0].address == "100.64.0.1"
    assert server.counters()["udp_oversized_queries"] == 1


# -- the server itself -------------------------------------------------------------------


def read_tcp_message(sock: socket.socket) -> dns.message.Message:
    length = struct.unpack("!H", sock.recv(2, socket.MSG_WAITALL))[0]
    return dns.message.from_wire(sock.recv(length, socket.MSG_WAITALL))


def test_tcp_pipelining_and_idle_close(later):
    server = start_server(later, upstreams=[], tcp_idle_timeout=0.5)
    with socket.create_connection((server.host, server.port), timeout=3) as tcp:
        names = ["alpha.mesh", "bravo.mesh", "x.mesh"]
        wires = [dns.message.make_query(n, "A", id=i).to_wire() for i, n in enumerate(names)]
        tcp.sendall(b"".join(struct.pack("!H", len(w)) + w for w in wires))
        replies = {m.id: m for m in (read_tcp_message(tcp) for _ in wires)}
        assert replies[0].answer and replies[1].answer and replies[2].rcode() == dns.rcode.NXDOMAIN
        started = time.monotonic()
        assert tcp.recv(1) == b""  # the server closes the idle connection
        assert 0.3 < time.monotonic() - started < 2.0
    assert server.counters()["tcp_idle_closed"] == 1


def test_reconfigure_keeps_listeners_and_applies_names(later):
    server = start_server(later, upstreams=[], tcp_idle_timeout=30)
    listen = f"{server.host}:{server.port}"
    with socket.create_connection((server.host, server.port), timeout=3) as tcp:
        new = DnsSettings.from_config({"listen": [listen], "upstreams": []}, {"carol": ["100.64.0.9"]})
        server.call(lambda s: s.reconfigure(new))
        wire = dns.message.make_query("carol.mesh", "A", id=9).to_wire()
        tcp.sendall(struct.pack("!H", len(wire)) + wire)  # the connection made before still works
        assert read_tcp_message(tcp).answer[0][0].address == "100.64.0.9"
    assert dig(server.host, server.port, "alpha.mesh").status == "NXDOMAIN"

    other_host, other_port = endpoint()
    moved = DnsSettings.from_config({"listen": [f"{other_host}:{other_port}"], "upstreams": []}, new.names)
    server.call(lambda s: s.reconfigure(moved))
    assert dig(other_host, other_port, "carol.mesh").rdata("A") == ["100.64.0.9"]
    assert dig(server.host, server.port, "carol.mesh").status == "NO-ANSWER"


def test_two_servers_share_the_port_with_reuseport(later):
    first = start_server(later, upstreams=[])
    listen = [f"{first.host}:{first.port}"]
    second = later(ServerThread(DnsSettings.from_config({"listen": listen, "upstreams": []}, NAMES)))
    for _ in range(10):
        assert dig(first.host, first.port, "alpha.mesh").rdata("A") == ["100.64.0.1"]
    served = first.counters().get("queries_udp", 0) + second.counters().get("queries_udp", 0)
    assert served == 10


def test_queries_from_one_source_port_are_spread_over_the_workers(later):
    first = start_server(later, upstreams=[])
    listen = [f"{first.host}:{first.port}"]
    second = later(ServerThread(DnsSettings.from_config({"listen": listen, "upstreams": []}, NAMES)))
    answers = burst(first, queries("alpha.mesh", 60))  # one socket: the port hash alone picks one server
    assert len(answers) == 60
    served = [server.counters().get("queries_udp", 0) for server in (first, second)]
    assert sum(served) == 60 and min(served) > 0, served


def test_ipv6_loopback_listener(later):
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as probe:
            probe.bind(("::1", 0))
            port = probe.getsockname()[1]
    except OSError:
        pytest.skip("needs IPv6 on the loopback interface")
    listen = [f"[::1]:{port}", f"{loopback_address()}:{port}"]
    server = later(ServerThread(DnsSettings.from_config({"listen": listen, "upstreams": []}, NAMES)))
    assert dig("::1", port, "alpha.mesh", "AAAA").rdata("AAAA") == ["fd7a:115c:a1e0::1"]
    assert dig("::1", port, "alpha.mesh", "A", "+tcp").rdata("A") == ["100.64.0.1"]
    assert server.counters()["local_answers"] == 2

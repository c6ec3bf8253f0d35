"""The DNS controller against abuse: who it answers (a node on an underlay,
with a neighbour, an allowed prefix and a wireguard-go peer, asked with dig
and dnsperf), how much (response rate limiting, per-prefix shares of the
in-flight forwards and TCP connections), ANY, the UDP size cap, the source
ports of forwarded queries, and DoH upstreams that break HTTP's bounds."""

from __future__ import annotations

import ipaddress
import os
import re
import select
import socket
import ssl
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dns.flags
import dns.message
import dns.rcode
import dns.rrset
import pytest
import structlog.testing

from meshsup.actors.dns.access import RateLimit, Sources, Verdict
from meshsup.actors.dns.forwarder import BURST, SOCKET_LIFE
from meshsup.actors.dns.inflight import Admission, Flight, InflightTable
from meshsup.actors.dns.upstream import FailoverPlan
from meshsup.actors.dns.wire import truncated
from meshsup.actors.settings.dns import DnsSettings
from tests.dns_fixtures import (
    Certificate,
    ServerThread,
    dig,
    endpoint,
    loopback_address,
    make_certificate,
    make_socket,
    need_tool,
    node_config,
    start_dnsmasq,
    start_stub,
    udp_exchange,
    wait_until,
)
from tests.nodes import Netns, Node, is_root
from tests.topology import Identity, Underlay, have, start_wg

NAMES = {"alpha": ["100.64.0.1/32"]}


def start_server(later: Callable[[Any], Any], **table: Any) -> ServerThread:
    host, port = endpoint()
    table.setdefault("listen", [f"{host}:{port}"])
    table.setdefault("timeout", 1.0)
    return later(ServerThread(DnsSettings.from_config(table, NAMES)))


# -- sans-IO: who, and how much ------------------------------------------------------


def test_sources_answer_loopback_the_mesh_and_allowed_prefixes():
    nets = [ipaddress.ip_network(n) for n in ("100.64.0.1/32", "100.64.0.2/32", "10.9.0.0/16", "fd7a:115c:a1e0::/48")]
    sources = Sources(nets)
    assert sources("127.0.0.1") == (True, None) and sources("::1") == (True, None)  # the node: no limits
    assert sources("100.64.0.2").allowed and sources("10.9.200.7").allowed and sources("fd7a:115c:a1e0:5::9").allowed
    for outside in ("100.64.0.3", "10.10.0.1", "198.51.100.2", "fd7a:115c:a1e1::1", "2001:db8::1"):
        assert not sources(outside).allowed, outside
    # Accounted by /24 and /56, as BIND's RRL.
    assert sources("10.9.200.7").prefix == sources("10.9.200.250").prefix != sources("10.9.201.7").prefix
    assert sources("fd7a:115c:a1e0:5::9").prefix == sources("fd7a:115c:a1e0:ff::1").prefix
    assert sources("fd7a:115c:a1e0:5::9").prefix != sources("fd7a:115c:a1e0:100::1").prefix
    assert not Sources([])("100.64.0.2").allowed


def test_rate_limit_drops_and_slips_beyond_the_rate_until_the_window_has_passed():
    limit = RateLimit(rate=4, window=2.0, slip=2)
    verdicts = [limit("a", 0.0) for _ in range(20)]
    assert verdicts[:4] == [Verdict.SEND] * 4  # a second's worth saved up
    assert verdicts[4:] == [Verdict.DROP, Verdict.SLIP] * 8  # every second one goes out truncated
    assert limit("b", 0.0) is Verdict.SEND  # another prefix has its own account
    # The debt runs to the window's worth (2 s at 4/s) however long the flood: paid back after 2 s.
    assert limit("a", 1.9) is not Verdict.SEND
    assert limit("a", 4.2) is Verdict.SEND
    never_slips = RateLimit(rate=1, window=1.0, slip=0)
    assert [never_slips("c", 0.0) for _ in range(4)] == [Verdict.SEND] + [Verdict.DROP] * 3


def test_one_owner_starts_at_most_its_share_of_the_forwards():
    table: InflightTable[str] = InflightTable(cap=8, share=2)

    def admit(key: str, owner: Any) -> Admission:
        return table.admit(key, "waiter", lambda: Flight(b"", FailoverPlan([]), 0.0), owner=owner)

    assert [admit(f"a{i}", "flood") for i in range(3)] == [Admission.STARTED] * 2 + [Admission.OWNER_FULL]
    assert admit("a0", "other") is Admission.MERGED  # an identical question joins, whoever asks
    assert admit("b0", "other") is Admission.STARTED
    assert [admit(f"n{i}", None) for i in range(5)] == [Admission.STARTED] * 5  # loopback: the cap alone
    assert admit("n5", None) is Admission.FULL
    table.finish("a0")
    assert admit("a2", "flood") is Admission.STARTED  # its share is free again


def test_a_slipped_reply_is_the_header_and_question_with_tc():
    query = dns.message.make_query("www.example.test", "A", id=77)
    reply = dns.message.make_response(query)
    reply.answer.append(dns.rrset.from_text("www.example.test.", 60, "IN", "A", "203.0.113.7"))
    slipped = dns.message.from_wire(truncated(reply.to_wire()))
    assert slipped.id == 77 and slipped.flags & dns.flags.TC and slipped.flags & dns.flags.QR
    assert slipped.question == query.question and not slipped.answer and slipped.edns < 0


# -- a node on an underlay: who is answered -----------------------------------------------


NEEDS_LAB = pytest.mark.skipif(
    not is_root() or bool(have("wireguard-go", "wg", "dig", "dnsperf")),
    reason=have("wireguard-go", "wg", "dig", "dnsperf") or "needs root",
)
MESH_ADDRESS = "100.64.0.1"
ALLOWED_SOURCE = "203.0.113.7"  # an address of the neighbour's, in an `allow` prefix


@dataclass
class Site:
    """alpha (a meshsup node) and an underlay neighbour of it, which has a
    route to the mesh through alpha and a second address in 203.0.113.0/24."""

    underlay: Underlay
    node: Node
    alpha: Netns
    alpha_identity: Identity
    neighbour: Netns
    neighbour_address: str
    stub: Any = None

    def dig(self, name: str, *options: str, source: str, qtype: str = "A", ns: Netns | None = None) -> Any:
        return dig(MESH_ADDRESS, 53, name, qtype, "-b", source, *options, ns=ns or self.neighbour)

    def counters(self) -> dict[str, int]:
        return self.node.counters()["dns"]

    def wait_counters(self, check: Callable[[dict[str, int]], bool], what: str) -> dict[str, int]:
        """Counters come with heartbeats: wait for the ones that have seen it all."""
        return self.node.wait(lambda: check(c := self.counters()) and c, what=what)


def site(
    underlay: Underlay,
    tmp: Path,
    dns_table: dict[str, Any],
    peers: tuple[Identity, ...] = (),
    later: Callable[[Any], Any] | None = None,
    stub_delay: float | None = None,
) -> Site:
    """With stub_delay, a stub upstream answering that late runs beside alpha, its only upstream."""
    (alpha, alpha_address), (neighbour, neighbour_address) = underlay.host(), underlay.host()
    me = Identity("alpha", 1)
    me.endpoint = f"{alpha_address}:51820"
    stub = None
    if later is not None and stub_delay is not None:
        stub = later(start_stub(ns=alpha, delay=stub_delay))
        dns_table = {**dns_table, "upstreams": [f"udp://{stub.host}:{stub.port}"]}
    config = node_config(tmp, me, list(peers), {"listen": ["127.0.0.1:53", f"{MESH_ADDRESS}:53"], **dns_table})
    node = underlay.track(Node(tmp, "--config", str(config), netns=alpha))
    node.wait_ready(timeout=60)
    neighbour.run("ip", "route", "add", "100.64.0.0/10", "via", alpha_address)
    neighbour.run("ip", "addr", "add", f"{ALLOWED_SOURCE}/32", "dev", "eth0")
    alpha.run("ip", "route", "add", "203.0.113.0/24", "via", neighbour_address)
    return Site(underlay, node, alpha, me, neighbour, neighbour_address, stub)


@pytest.mark.netns
@NEEDS_LAB
def test_only_the_mesh_loopback_and_allowed_prefixes_are_answered(underlay, tmp_path):
    bravo = Identity("bravo", 2)
    bravo_ns, bravo_address = underlay.host()
    bravo.endpoint = f"{bravo_address}:51820"
    lab = site(underlay, tmp_path, {"allow": ["203.0.113.0/24"]}, peers=(bravo,))
    start_wg(underlay, tmp_path, bravo_ns, bravo, [lab.alpha_identity])

    # The neighbour reaches the mesh address over the underlay: nothing over UDP, REFUSED over TCP.
    assert lab.dig("alpha.mesh", "+time=1", source=lab.neighbour_address).status == "NO-ANSWER"
    refused = lab.dig("alpha.mesh", "+tcp", source=lab.neighbour_address)
    assert refused.status == "REFUSED" and refused.answer == []
    # From an allowed prefix, from a peer through the tunnel, and from the node itself: answered.
    assert lab.dig("alpha.mesh", source=ALLOWED_SOURCE).rdata("A") == [MESH_ADDRESS]
    through_tunnel = lab.dig("alpha.mesh", "+tries=3", source=bravo.v4, ns=bravo_ns)
    assert through_tunnel.rdata("A") == [MESH_ADDRESS]
    assert dig("127.0.0.1", 53, "alpha.mesh", ns=lab.alpha).rdata("A") == [MESH_ADDRESS]
    counters = lab.wait_counters(
        lambda c: c.get("local_answers", 0) + c.get("fast_answers", 0) >= 3, what="the answers counted"
    )
    assert counters["refused_source"] == 2  # one over UDP, one over TCP


def dnsperf(ns: Netns, tmp: Path, *, server: str, source: str, qps: int, seconds: int) -> dict[str, int]:
    data = tmp / "queries.txt"
    data.write_text("alpha.mesh A\n")
    out = ns.run(
        "dnsperf",
        "-s",
        server,
        "-a",
        source,
        "-d",
        str(data),
        "-l",
        str(seconds),
        "-Q",
        str(qps),
        "-c",
        "4",
        "-t",
        "1",
        timeout=seconds + 30,
    ).stdout
    return {key: int(re.search(rf"Queries {key}:\s+(\d+)", out).group(1)) for key in ("sent", "completed")}


@pytest.mark.netns
@NEEDS_LAB
def test_a_flood_from_one_prefix_is_rate_limited_while_another_is_served(underlay, tmp_path):
    lab = site(underlay, tmp_path, {"allow": ["203.0.113.0/24", "198.51.100.0/24"], "rate_limit": 50})
    # The node's own clients are never limited.
    own = dnsperf(lab.alpha, tmp_path, server="127.0.0.1", source="127.0.0.1", qps=500, seconds=2)
    assert own["completed"] >= 0.97 * own["sent"]
    assert "rrl_dropped" not in lab.counters()

    result: dict[str, dict[str, int]] = {}
    flood = threading.Thread(
        target=lambda: result.update(
            flood=dnsperf(lab.neighbour, tmp_path, server=MESH_ADDRESS, source=ALLOWED_SOURCE, qps=1000, seconds=4)
        )
    )
    flood.start()
    try:
        lab.wait_counters(lambda c: c.get("rrl_dropped", 0) > 50, what="the flood limited")
        during = [lab.dig("alpha.mesh", "+ignore", source=lab.neighbour_address) for _ in range(5)]
    finally:
        flood.join()
    # Another prefix is served, whole, while the flood goes on.
    assert all(d.rdata("A") == [MESH_ADDRESS] and "tc" not in d.flags for d in during)
    sent = result["flood"]["sent"]
    # All but what the rate lets through (a second's worth, then 50 a second) counted.
    counters = lab.wait_counters(
        lambda c: c.get("rrl_dropped", 0) + c.get("rrl_slipped", 0) >= sent - 50 * 10, what="the flood counted"
    )
    # Every second limited reply goes out truncated (slip 2): a real client would retry over TCP.
    assert abs(counters["rrl_dropped"] - counters["rrl_slipped"]) <= 1
    assert result["flood"]["completed"] < 0.75 * sent  # about half of it never answered


@pytest.mark.netns
@NEEDS_LAB
def test_one_prefix_gets_only_its_share_of_forwards_and_tcp_connections(underlay, tmp_path, later):
    lab = site(
        underlay,
        tmp_path,
        {
            "allow": ["203.0.113.0/24", "198.51.100.0/24"],
            "max_inflight": 16,
            "timeout": 3.0,
            "rate_limit": 0,
            "tcp_idle_timeout": 30.0,
        },
        later=later,
        stub_delay=1.0,
    )
    # A burst of ten new names from one prefix: two forwarded (16 / 8), eight refused at once ...
    with make_socket(socket.SOCK_DGRAM, lab.neighbour) as flooder:
        flooder.bind((ALLOWED_SOURCE, 0))
        flooder.settimeout(5)
        for i in range(10):
            flooder.sendto(dns.message.make_query(f"n{i}.example.test", "A").to_wire(), (MESH_ADDRESS, 53))
        # ... while another prefix still has a share of its own.
        other = lab.dig("other.example.test", source=lab.neighbour_address)
        answers = [dns.message.from_wire(flooder.recv(65535)) for _ in range(10)]
    assert Counter(a.rcode() for a in answers) == {dns.rcode.REFUSED: 8, dns.rcode.NOERROR: 2}
    assert other.rdata("A") == ["203.0.113.50"] and len(lab.stub.questions) == 3
    counters = lab.wait_counters(lambda c: c.get("upstream_answers", 0) == 3, what="the forwards counted")
    assert counters["refused_source_inflight_cap"] == 8 and "refused_inflight_cap" not in counters

    # TCP: one prefix holds at most 512 / 8 connections; the next is closed at once, others get in.
    held: list[socket.socket] = []
    try:
        for _ in range(64):
            held.append(tcp_connect(lab.neighbour, ALLOWED_SOURCE))
            assert tcp_ask(held[-1], "alpha.mesh").answer  # taken in and counted before the next comes
        with tcp_connect(lab.neighbour, ALLOWED_SOURCE) as one_too_many, pytest.raises(ConnectionError):
            tcp_ask(one_too_many, "alpha.mesh")
        assert lab.dig("alpha.mesh", "+tcp", source=lab.neighbour_address).rdata("A") == [MESH_ADDRESS]
    finally:
        for sock in held:
            sock.close()
    lab.wait_counters(lambda c: c.get("tcp_clients_refused_source") == 1, what="the refused connection counted")


def tcp_connect(ns: Netns, source: str) -> socket.socket:
    sock = make_socket(socket.SOCK_STREAM, ns)
    sock.settimeout(5)
    sock.bind((source, 0))
    sock.connect((MESH_ADDRESS, 53))
    return sock


def tcp_ask(sock: socket.socket, name: str) -> dns.message.Message:
    wire = dns.message.make_query(name, "A").to_wire()
    sock.sendall(struct.pack("!H", len(wire)) + wire)
    header = sock.recv(2, socket.MSG_WAITALL)
    if len(header) < 2:
        raise ConnectionResetError("closed")
    return dns.message.from_wire(sock.recv(struct.unpack("!H", header)[0], socket.MSG_WAITALL))


# -- ANY, the UDP size cap, source ports ----------------------------------------------------


def test_any_gets_one_hinfo_and_is_never_forwarded(later):
    need_tool("dig")
    upstream = later(start_stub())
    server = start_server(later, upstreams=[f"udp://{upstream.host}:{upstream.port}"], ttl=300)
    for name in ("www.example.test", "alpha.mesh", "www.example.test"):
        answer = dig(server.host, server.port, name, "ANY")
        assert answer.status == "NOERROR" and answer.rdata("HINFO") == ['"RFC8482" ""'], answer.text
        assert len(answer.answer) == 1 and answer.answer[0][1] == "300"
    assert dig(server.host, server.port, "alpha.mesh", "ANY", "+tcp").rdata("HINFO") == ['"RFC8482" ""']
    assert upstream.questions == []
    assert server.counters()["any_minimised"] == 4


def test_a_big_answer_is_truncated_over_udp_and_whole_over_tcp(tmp_path, later):
    need_tool("dig")
    txt = [f"--txt-record=big.example.test,{str(i) * 200}" for i in range(7)]  # about 1.5 kB
    upstream = later(start_dnsmasq(tmp_path, txt))
    server = start_server(later, upstreams=[f"tcp://{upstream.host}:{upstream.port}"])
    for _ in range(2):  # forwarded, then from the cache (the fast path)
        small = dig(server.host, server.port, "big.example.test", "TXT", "+bufsize=4096", "+ignore")
        size = int(re.search(r"MSG SIZE\s+rcvd: (\d+)", small.text).group(1))
        assert "tc" in small.flags and size <= 1232  # what we advertise, whatever the client says
    full = dig(server.host, server.port, "big.example.test", "TXT", "+bufsize=4096")  # dig retries over TCP
    assert full.status == "NOERROR" and len(full.rdata("TXT")) == 7 and "tc" not in full.flags


class PortRecorder:
    """A UDP upstream that answers every A query and records the source port it came from."""

    def __init__(self) -> None:
        self.host, self.port = endpoint()
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((self.host, self.port))
        self.ports: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            if not select.select([self.sock], [], [], 0.05)[0]:
                continue
            wire, source = self.sock.recvfrom(4096)
            query = dns.message.from_wire(wire)
            reply = dns.message.make_response(query)
            reply.answer.append(dns.rrset.from_text(query.question[0].name, 60, "IN", "A", "203.0.113.9"))
            self.ports.append(source[1])
            self.sock.sendto(reply.to_wire(), source)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()


def test_forwarded_queries_leave_from_random_ports_each_carrying_few_for_a_short_time(later):
    upstream = later(PortRecorder())
    server = start_server(later, upstreams=[f"udp://{upstream.host}:{upstream.port}"])
    fds = len(os.listdir("/proc/self/fd"))

    def ask(name: str) -> None:
        answer = udp_exchange(server.host, server.port, dns.message.make_query(name, "A").to_wire())
        assert dns.message.from_wire(answer).answer[0][0].address == "203.0.113.9"

    # Apart by more than a socket's life: a port each, the kernel's random pick (two may meet by chance).
    for i in range(6):
        ask(f"apart{i}.example.test")
        time.sleep(SOCKET_LIFE * 1.2)
    assert len(set(upstream.ports)) >= 5, upstream.ports
    # One after another: they may share a socket, never more than BURST of them, each still a fresh port.
    for i in range(40):
        ask(f"s{i}.example.test")
    per_port = Counter(upstream.ports[6:])
    assert max(per_port.values()) <= BURST and len(per_port) >= 40 // BURST + 1
    assert not set(per_port) & set(upstream.ports[:6])
    # Each socket closed once it has lived and its answers are in.
    wait_until(lambda: len(os.listdir("/proc/self/fd")) <= fds + 1, what="the forward sockets closed")

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.settimeout(3)
        for i in range(40):  # at once: they share sockets, never more than BURST a socket
            client.sendto(dns.message.make_query(f"b{i}.example.test", "A").to_wire(), (server.host, server.port))
        assert all(dns.message.from_wire(client.recv(65535)).answer for _ in range(40))
    per_port = Counter(upstream.ports[46:])
    assert max(per_port.values()) <= BURST and len(per_port) >= 40 // BURST + 1


# -- DoH upstreams breaking HTTP's bounds ------------------------------------------------------


OK_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: application/dns-message\r\n"
CHUNKED = OK_HEAD + b"Transfer-Encoding: chunked\r\n\r\n"
# What the server sends, then what it sends again and again for as long as the client reads.
BAD_RESPONSES: dict[str, tuple[bytes, bytes]] = {
    "huge-chunk-size": (CHUNKED + b"FFFFFFFF\r\n", b"x" * 16384),
    "negative-chunk-size": (CHUNKED + b"-10\r\n" + b"x" * 16 + b"\r\n0\r\n\r\n", b""),
    "garbage-chunk-size": (CHUNKED + b"0x10\r\n" + b"x" * 16 + b"\r\n0\r\n\r\n", b""),
    "endless-header-line": (OK_HEAD + b"X-Filler: ", b"a" * 16384),
    "endless-chunked-body": (CHUNKED, b"4000\r\n" + b"x" * 0x4000 + b"\r\n"),
    "endless-body": (OK_HEAD + b"\r\n", b"x" * 16384),
}


class BadDoh:
    """An HTTPS server on loopback answering every request with the same bad response."""

    def __init__(self, certificate: Certificate, host: str, head: bytes, filler: bytes) -> None:
        self.head, self.filler = head, filler
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(certificate.cert, certificate.key)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind((host, 0))
        self.sock.listen(8)
        self.host, self.port = host, self.sock.getsockname()[1]
        self.requests = 0
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            if select.select([self.sock], [], [], 0.05)[0]:
                connection, _ = self.sock.accept()
                thread = threading.Thread(target=self._serve, args=(connection,), daemon=True)
                self._threads.append(thread)
                thread.start()

    def _serve(self, connection: socket.socket) -> None:
        connection.settimeout(5)
        try:
            with self.context.wrap_socket(connection, server_side=True) as tls:
                request = b""
                while b"\r\n\r\n" not in request:
                    request += tls.recv(4096)
                length = int(re.search(rb"Content-Length: (\d+)", request).group(1))
                while len(request.partition(b"\r\n\r\n")[2]) < length:
                    request += tls.recv(4096)
                self.requests += 1
                tls.sendall(self.head)
                while self.filler and not self._stop.is_set():
                    tls.sendall(self.filler)
                tls.recv(1)  # until the client hangs up
        except (OSError, ssl.SSLError):
            pass  # the client hung up, as it should

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=5)
        self.sock.close()


@pytest.mark.parametrize("case", list(BAD_RESPONSES))
def test_a_doh_upstream_breaking_http_bounds_fails_over_counted_without_a_traceback(tmp_path, later, case):
    need_tool("dig", "openssl")
    host = loopback_address()
    certificate = make_certificate(tmp_path, host)
    bad = later(BadDoh(certificate, host, *BAD_RESPONSES[case]))
    good = later(start_stub())
    server = start_server(
        later,
        ca_file=str(certificate.cert),
        timeout=5.0,
        upstreams=[f"https://{host}:{bad.port}", f"udp://{good.host}:{good.port}"],
    )
    with structlog.testing.capture_logs() as logs:
        started = time.monotonic()
        assert dig(server.host, server.port, "www.example.test", "+time=8").rdata("A") == ["203.0.113.50"]
        elapsed = time.monotonic() - started
    counters = server.counters()
    assert bad.requests == 1 and counters["upstream_http_bad_response"] == 1 and counters["failovers"] == 1
    assert elapsed < 5.0 and "upstream_timeout" not in counters  # it gave up by itself, not at the deadline
    assert "upstream_internal" not in counters and not [e for e in logs if e.get("log_level") == "error"], logs

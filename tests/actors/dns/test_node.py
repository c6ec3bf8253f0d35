"""The DNS controller inside a running node, configured through its TOML and
asked with dig and dnsperf from inside the node's namespace; its upstreams
(dnsmasq, small stubs) run in that namespace too."""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dns.message
import dns.rcode
import dns.reversename
import pytest
import zmq

from meshsup.actors.bus.codec import decode
from meshsup.actors.bus.endpoints import Runtime
from meshsup.actors.bus.messages import LinkChanged, NameLearned
from meshsup.actors.dns.server import BATCH
from tests.dns_fixtures import (
    BAD_PACKETS,
    DigResult,
    Dnsmasq,
    assert_bad_packet_answer,
    dig,
    endpoint,
    loopback_address,
    make_certificate,
    make_socket,
    need_tool,
    node_config,
    split_dns_table,
    start_dnsdist,
    start_dnsmasq,
    start_stub,
    start_unbound_tls,
    url,
)
from tests.dns_transport_fixtures import DoqServer
from tests.nodes import Netns, Node, udp_counters, udp_sockets
from tests.topology import Identity

ALPHA = Identity("alpha", 1)

pytestmark = pytest.mark.netns


class Peer(Identity):
    """A peer with the addresses a test wants (single-host allowed IPs become its names)."""

    def __init__(self, name: str, addresses: list[str]) -> None:
        super().__init__(name, 0)
        self.addresses = addresses

    def allowed(self) -> list[str]:
        return [f"{a}/{128 if ':' in a else 32}" for a in self.addresses]


BRAVO = Peer("bravo", ["100.64.0.2", "100.64.0.3", "100.64.0.4", "fd7a:115c:a1e0::2"])
CHARLIE = Peer("charlie", ["100.64.0.5"])  # no IPv6


@dataclass
class Lab:
    """One namespace holding the node and its upstreams."""

    ns: Netns
    tmp: Path
    start_node: Callable[..., Node]
    stoppable: list[Any] = field(default_factory=list)
    node: Node | None = None

    def dnsmasq(self, *records: str, name: str = "dnsmasq", ttl: int = 60) -> Dnsmasq:
        upstream = start_dnsmasq(self.tmp, list(records), ns=self.ns, name=name, ttl=ttl)
        self.stoppable.append(upstream)
        return upstream

    def stub(self, **kwargs: Any) -> Any:
        stub = start_stub(ns=self.ns, **kwargs)
        self.stoppable.append(stub)
        return stub

    def dead(self, scheme: str = "udp") -> str:
        host, port = endpoint(self.ns)  # nothing listens there
        return f"{scheme}://{host}:{port}"

    def start(
        self, dns_table: dict[str, Any], workers: int = 1, peers: tuple[Identity, ...] = (BRAVO, CHARLIE)
    ) -> Node:
        dns_table = {"listen": ["127.0.0.1:53"], "timeout": 1.0, **dns_table}
        config = node_config(self.tmp, ALPHA, list(peers), dns_table)
        self.node = self.start_node("--config", str(config), "--dns-workers", str(workers), ns=self.ns)
        self.node.wait_ready(timeout=60)  # a busy machine starts nodes slowly
        return self.node

    def dig(self, name: str, qtype: str = "A", *options: str) -> DigResult:
        return dig("127.0.0.1", 53, name, qtype, *options, ns=self.ns)

    def dns_counters(self) -> dict[str, int]:
        assert self.node is not None
        return self.node.counters()["dns"]

    def dns_workers(self) -> dict[str, dict[str, Any]]:
        assert self.node is not None
        return {name: a for name, a in self.node.actors().items() if a["kind"] == "dns"}


@pytest.fixture
def lab(node_factory: Callable[..., Node], netns: Callable[..., Netns], tmp_path: Path) -> Iterator[Lab]:
    need_tool("dig", "dnsmasq")
    made = Lab(netns(), tmp_path, node_factory)
    yield made
    if made.node is not None:
        made.node.close()  # before its upstreams go
    for thing in reversed(made.stoppable):
        thing.stop()


# -- local names ----------------------------------------------------------------------


def test_node_answers_mesh_names_like_docker(lab: Lab) -> None:
    upstream = lab.dnsmasq("--address=/example.test/203.0.113.7")
    srv = [{"name": "_http._tcp", "target": "alpha", "port": 8080, "priority": 1, "weight": 5}]
    lab.start({"upstreams": [url(upstream)], "ttl": 123, "srv": srv})

    a = lab.dig("alpha.mesh")
    assert a.status == "NOERROR" and "aa" in a.flags and a.rdata("A") == [ALPHA.v4] and a.answer[0][1] == "123"
    assert lab.dig("alpha.mesh", "AAAA").rdata("AAAA") == [ALPHA.v6]
    orders = [tuple(lab.dig("bravo.mesh").rdata("A")) for _ in range(10)]
    assert all(sorted(o) == BRAVO.addresses[:3] for o in orders) and len(set(orders)) > 1  # shuffled
    assert lab.dig("bravo.mesh", "AAAA").rdata("AAAA") == [BRAVO.addresses[3]]
    no_v6 = lab.dig("charlie.mesh", "AAAA")
    assert no_v6.status == "NOERROR" and no_v6.answer == [] and no_v6.authority[0][3] == "SOA"
    mx = lab.dig("alpha.mesh", "MX")
    assert mx.status == "NOERROR" and mx.answer == []
    missing = lab.dig("nobody.mesh")
    assert missing.status == "NXDOMAIN" and missing.authority[0][:4] == ["mesh.", "123", "IN", "SOA"]
    for address, owner in [
        ("100.64.0.3", "bravo.mesh."),
        ("fd7a:115c:a1e0::2", "bravo.mesh."),
        (ALPHA.v4, "alpha.mesh."),
    ]:
        assert lab.dig(dns.reversename.from_address(address).to_text(), "PTR").rdata("PTR") == [owner]
    srv_answer = lab.dig("_http._tcp.mesh", "SRV")
    assert srv_answer.rdata("SRV") == ["1 5 8080 alpha.mesh."]
    assert srv_answer.rdata("A", "additional") == [ALPHA.v4]
    assert srv_answer.rdata("AAAA", "additional") == [ALPHA.v6]
    assert lab.dig("alpha.mesh", "A", "+tcp").rdata("A") == [ALPHA.v4]
    log = upstream.log.read_text()
    assert "mesh" not in log and "arpa" not in log  # answered at home, never forwarded


def test_node_survives_a_dns_worker_crash(lab: Lab) -> None:
    lab.start({}, workers=2)
    assert lab.dig("bravo.mesh", "AAAA").rdata("AAAA") == [BRAVO.addresses[3]]
    old = lab.dns_workers()["dns-0"]["pid"]
    os.kill(old, signal.SIGKILL)
    lab.node.wait(
        lambda: (a := lab.dns_workers()["dns-0"])["pid"] != old and a["state"] == "running", what="dns-0 replaced"
    )
    assert lab.dig("bravo.mesh", "AAAA").rdata("AAAA") == [BRAVO.addresses[3]]


# -- forwarding -------------------------------------------------------------------------


class Events:
    """The node's event bus, as any actor sees it."""

    def __init__(self, node: Node, *tags: str) -> None:
        self.context = zmq.Context()
        self.sub = self.context.socket(zmq.SUB)
        self.sub.connect(Runtime(node.state_dir).events_out)
        for tag in tags:
            self.sub.setsockopt(zmq.SUBSCRIBE, tag.encode())

    def wait_for(self, match: Callable[[Any], bool], timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            if self.sub.poll(int(left * 1000)):
                message = decode(self.sub.recv_multipart()[-1])
                if match(message):
                    return message
        return None

    def close(self) -> None:
        self.sub.close(0)
        self.context.term()


def test_node_forwards_fails_over_learns_and_flushes_on_link_change(lab: Lab) -> None:
    refusing, failing = lab.stub(rcode=dns.rcode.REFUSED), lab.stub(rcode=dns.rcode.SERVFAIL)
    good = lab.dnsmasq("--address=/example.test/203.0.113.7", ttl=300)
    lab.start({"upstreams": [url(refusing), url(failing), url(good)]})
    events = Events(lab.node, NameLearned.TAG, LinkChanged.TAG)
    try:
        # Subscriptions take a moment to reach the publisher: ask fresh names until one is heard of.
        learned = None
        for i in range(20):
            name = f"n{i}.example.test"
            assert lab.dig(name).rdata("A") == ["203.0.113.7"]
            learned = events.wait_for(lambda m, name=name: isinstance(m, NameLearned) and m.name == name, 0.5)
            if learned:
                break
        assert learned is not None and learned.addresses == ["203.0.113.7"]
        assert refusing.questions[0] == "n0.example.test." and failing.questions[0] == "n0.example.test."
        # Status comes with heartbeats: wait for the one that has seen every answer and the
        # publication the test heard (a heartbeat can fall between an answer and its event).
        counters = lab.node.wait(
            lambda: (c := lab.dns_counters())["upstream_answers"] == i + 1 and c["learned_published"] >= 1 and c,
            what="every forwarded answer and the heard publication counted",
        )
        assert counters["upstream_refused"] == counters["upstream_servfail"] == i + 1
        # Names are learned only while someone listens, and each one learned is published.
        assert 1 <= counters["learned_published"] == counters["learned_names"] <= i + 1
        assert counters["failovers"] == 2 * (i + 1)

        first = lab.dig("n0.example.test")
        assert int(first.answer[0][1]) <= 300 and good.count("n0.example.test") == 1  # from the cache
        lab.ns.run("ip", "link", "add", "lc0", "type", "veth", "peer", "name", "lc1")  # the router sees it ...
        assert events.wait_for(lambda m: isinstance(m, LinkChanged) and m.interface == "lc0", 5)  # ... the cache goes
        lab.node.wait(lambda: lab.dns_counters()["cache_flushes"] >= 1, what="cache flushed")
        assert lab.dig("n0.example.test").rdata("A") == ["203.0.113.7"] and good.count("n0.example.test") == 2
    finally:
        events.close()


def test_node_fails_over_to_serve_stale_then_servfail(lab: Lab) -> None:
    first = lab.dnsmasq("--address=/example.test/203.0.113.7", name="first")
    second = lab.dnsmasq("--address=/example.test/203.0.113.7", name="second")
    lab.start(
        {
            "upstreams": [url(first), url(second)],
            "serve_stale": True,
            "cache_max_ttl": 1,
            "routes": [{"suffix": "dead.test", "upstreams": [lab.dead("udp"), lab.dead("tcp")]}],
        }
    )
    assert lab.dig("www.example.test").rdata("A") == ["203.0.113.7"]
    assert lab.dig("x.dead.test").status == "SERVFAIL"  # no upstream answers
    first.stop()  # killed mid-test
    time.sleep(1.1)
    assert lab.dig("www.example.test").rdata("A") == ["203.0.113.7"] and second.count("www.example.test") == 1
    second.stop()
    time.sleep(1.1)
    stale = lab.dig("www.example.test")
    assert stale.status == "NOERROR" and stale.rdata("A") == ["203.0.113.7"] and stale.answer[0][1] == "30"
    assert lab.dig("new.example.test").status == "SERVFAIL"
    counters = lab.node.wait(lambda: (c := lab.dns_counters())["servfail_exhausted"] == 2 and c, what="counters")
    assert counters["stale_answers"] == 1


def test_node_forwards_over_doh2_dot_and_doq_to_upstreams_named_through_bootstrap(lab: Lab) -> None:
    """Every encrypted transport, to upstreams given by host name: dnsdist (DoH over HTTP/2,
    through h2o), unbound (DoT, and DoH over HTTP/2 through nghttp2) and a DoQ server built
    from aioquic (Debian has none), all in the node's namespace."""
    need_tool("openssl", "unbound", "dnsdist")
    # The DNS worker runs as meshsup: the CA file goes where that user can read it.
    public = Path(tempfile.mkdtemp(prefix="meshsup-dns-ca-"))
    try:
        public.chmod(0o755)
        host, name = loopback_address(), "resolver.test"
        certificate = make_certificate(public, host, name)
        bootstrap = lab.dnsmasq(f"--address=/{name}/{host}", name="bootstrap")
        backend = lab.dnsmasq("--address=/example.test/203.0.113.7", name="backend")
        dnsdist = start_dnsdist(lab.tmp, certificate, host, backend, "example.test", ns=lab.ns)
        lab.stoppable.append(dnsdist)
        records = ["www.dot.test. 300 IN A 203.0.113.9", "www.h2.test. 300 IN A 203.0.113.10"]
        unbound = start_unbound_tls(lab.tmp, certificate, host, records, ns=lab.ns)
        lab.stoppable.append(unbound)
        doq = DoqServer(certificate, host, ns=lab.ns)
        lab.stoppable.append(doq)
        lab.start(
            {
                "upstreams": [f"https://{name}:{dnsdist.doh_port}/dns-query"],
                "bootstrap": [f"{bootstrap.host}:{bootstrap.port}"],
                "ca_file": str(certificate.cert),
                "timeout": 3.0,
                "routes": [
                    {"suffix": "dot.test", "upstreams": [f"tls://{name}:{unbound.tls_port}"]},
                    {"suffix": "h2.test", "upstreams": [f"https://{name}:{unbound.https_port}/dns-query"]},
                    {"suffix": "doq.test", "upstreams": [f"doq://{name}:{doq.port}"]},
                ],
            }
        )
        assert lab.dig("www.example.test").rdata("A") == ["203.0.113.7"]
        assert lab.dig("www.dot.test").rdata("A") == ["203.0.113.9"]
        assert lab.dig("www.h2.test").rdata("A") == ["203.0.113.10"]
        assert lab.dig("www.doq.test").rdata("A") == ["203.0.113.60"] and doq.ids == [0]
        assert unbound.count("www.dot.test") == 1 and unbound.count("www.h2.test") == 1
        counters = lab.node.wait(
            lambda: (c := lab.dns_counters()).get("upstream_answers") == 4 and c, what="every answer counted"
        )
        assert counters["upstream_queries_https"] == 2 and counters["upstream_https_h2"] == 2
        assert counters["upstream_queries_tls"] == 1 and counters["upstream_queries_doq"] == 1
        assert bootstrap.count(name) == 1 and "failovers" not in counters
    finally:
        shutil.rmtree(public)


def test_node_rules_and_split_dns(lab: Lab) -> None:
    default = lab.dnsmasq("--address=/test/203.0.113.7", name="default")
    corp = lab.dnsmasq("--address=/corp.test/203.0.113.8", name="corp")
    deep = lab.dnsmasq("--address=/eu.corp.test/203.0.113.9", name="deep")
    fast = lab.stub()
    lab.start(split_dns_table(default, fast, corp, deep))
    rejected = [("blocked.test", "A"), ("x.ads.test", "A"), ("my-tracker.test", "A"), ("www.test", "MX")]
    for name, rdtype in rejected:
        result = lab.dig(name, rdtype)
        assert result.status == "NXDOMAIN" and result.answer == [], name
    assert lab.dig("notblocked.test").rdata("A") == ["203.0.113.7"]  # full: is exact
    assert lab.dig("ok.ads.test").rdata("A") == ["203.0.113.7"]  # asis before the reject
    assert lab.dig("cdn7.test").rdata("A") == ["203.0.113.50"] and fast.questions == ["cdn7.test."]
    assert lab.dig("www.corp.test").rdata("A") == ["203.0.113.8"]
    assert lab.dig("a.eu.corp.test").rdata("A") == ["203.0.113.9"]  # the most specific route wins
    assert [default.count(name, rdtype) for name, rdtype in rejected] == [0] * len(rejected)
    assert "corp" not in default.log.read_text() and corp.count("a.eu.corp.test") == 0
    assert lab.dns_counters()["rejected_by_rule"] == len(rejected)


# -- hostile clients, crashes ------------------------------------------------------------


def flood(ns: Netns, count: int, seed: int) -> None:
    """count random and cut-short packets at the node from many source ports (so every
    worker gets its share); the answers are left unread."""
    rng = random.Random(seed)
    good = [
        dns.message.make_query(n, t, use_edns=e).to_wire()
        for n, t, e in [("alpha.mesh", "A", None), ("x.example.test", "AAAA", 0), ("bravo.mesh", "PTR", 0)]
    ]
    sockets = [make_socket(socket.SOCK_DGRAM, ns) for _ in range(16)]
    try:
        for i in range(count):
            if i % 3 == 0:
                wire = rng.randbytes(rng.randrange(0, 120))
            elif i % 3 == 1:
                wire = rng.choice(good)[: rng.randrange(0, 40)]
            else:
                wire = bytearray(rng.choice(good))
                for _ in range(rng.randrange(1, 6)):
                    wire[rng.randrange(len(wire))] = rng.randrange(256)
            sockets[i % len(sockets)].sendto(bytes(wire), ("127.0.0.1", 53))
            if i % 200 == 199:  # a flood, not a socket-buffer overrun test
                time.sleep(0.01)
    finally:
        for sock in sockets:
            sock.close()


def test_malformed_input_never_restarts_a_worker(lab: Lab) -> None:
    lab.start({"upstreams": [url(lab.stub())]}, workers=2)
    before = lab.dns_workers()
    for _name, wire, rcode in BAD_PACKETS:
        with make_socket(socket.SOCK_DGRAM, lab.ns) as sock:
            sock.settimeout(0.3 if rcode is None else 3.0)
            sock.sendto(wire, ("127.0.0.1", 53))
            try:
                answer: bytes | None = sock.recv(65535)
            except TimeoutError:
                answer = None
        assert_bad_packet_answer(answer, rcode)
    flood(lab.ns, 10_000, seed=4)
    # Nothing lost, however fast the workers are: every datagram sent to port 53 was taken in by a
    # worker, or dropped by the kernel for want of room in a worker's socket (counted there).
    sent = len(BAD_PACKETS) + 10_000

    def taken() -> int:
        counters = lab.dns_counters()
        return counters.get("queries_udp", 0) + counters.get("udp_oversized_queries", 0)

    lab.node.wait(
        lambda: taken() + sum(drops for _, drops in udp_sockets(53, lab.ns)) >= sent,
        what="every datagram taken in or dropped and counted",
    )
    assert taken() + sum(drops for _, drops in udp_sockets(53, lab.ns)) == sent
    # Garbage over TCP too: a bad length, a cut message, random bytes.
    for garbage in [b"\x00", b"\x00\x40" + b"\x00" * 20, random.Random(5).randbytes(3000)]:
        with make_socket(socket.SOCK_STREAM, lab.ns) as tcp:
            tcp.settimeout(3)
            tcp.connect(("127.0.0.1", 53))
            tcp.sendall(garbage)
    assert lab.dig("alpha.mesh").rdata("A") == [ALPHA.v4]
    assert lab.dig("x.example.test").rdata("A") == ["203.0.113.50"]
    after = lab.dns_workers()
    assert {n: (a["pid"], a["restarts"]) for n, a in after.items()} == {n: (a["pid"], 0) for n, a in before.items()}
    per_worker = [a["counters"].get("queries_udp", 0) for a in after.values()]
    assert len(per_worker) == 2 and min(per_worker) > 0  # both workers took part
    counters = lab.dns_counters()
    assert counters["formerr"] > 100 and counters["drop_response"] > 0


def test_kill_9_of_a_worker_under_dnsperf_load(lab: Lab) -> None:
    need_tool("dnsperf")
    lab.start({}, workers=2)
    queries = lab.tmp / "queries.txt"
    queries.write_text("".join(f"{n}.mesh {t}\n" for n in ("alpha", "bravo", "charlie") for t in ("A", "AAAA")))
    old = lab.dns_workers()["dns-0"]["pid"]
    perf: dict[str, str] = {}

    def load() -> None:
        perf["out"] = lab.ns.run(
            "dnsperf", "-s", "127.0.0.1", "-d", str(queries), "-l", "6", "-c", "16", "-Q", "3000", "-t", "3", timeout=60
        ).stdout

    dropped_before = udp_counters(lab.ns)["RcvbufErrors"]
    thread = threading.Thread(target=load)
    thread.start()
    lab.node.wait(
        lambda: all(w["counters"].get("queries_udp", 0) > 0 for w in lab.dns_workers().values()),
        what="both workers under load",
    )
    os.kill(old, signal.SIGKILL)
    during = lab.dig("alpha.mesh", "A", "+time=1", "+tries=3")  # the other worker answers
    thread.join()
    out = perf["out"]
    completed = int(re.search(r"Queries completed:\s+(\d+)", out).group(1))
    sent = int(re.search(r"Queries sent:\s+(\d+)", out).group(1))
    assert during.rdata("A") == [ALPHA.v4]
    # Only what sat in the dead worker's socket or batch is lost, and what the kernel dropped for want of
    # room (a slow machine's share; speed is for the benchmarks). A queued datagram costs at least 512
    # bytes of the socket's receive buffer, whatever its size.
    held = int(lab.ns.run("cat", "/proc/sys/net/core/rmem_default").stdout) // 512 + 1 + BATCH
    dropped = udp_counters(lab.ns)["RcvbufErrors"] - dropped_before
    assert sent > 0 and sent - completed <= held + dropped, (held, dropped, out)
    worker = lab.node.wait(
        lambda: (a := lab.dns_workers()["dns-0"])["state"] == "running" and a["pid"] != old and a, what="dns-0 back"
    )
    assert worker["restarts"] == 1
    assert lab.dig("bravo.mesh", "AAAA").rdata("AAAA") == [BRAVO.addresses[3]]


# -- the namespace's resolver --------------------------------------------------------------


@pytest.mark.parametrize("before", ["nameserver 198.51.100.53\n", None], ids=["file", "no-file"])
def test_set_os_resolver_points_the_namespace_at_the_controller(lab: Lab, before: str | None) -> None:
    host_resolv = Path("/etc/resolv.conf").read_bytes()
    etc_netns = Path("/etc/netns")
    had_etc_netns = etc_netns.exists()
    netns_dir = etc_netns / lab.ns.name
    resolv = netns_dir / "resolv.conf"
    try:
        if before is not None:
            netns_dir.mkdir(parents=True)
            resolv.write_text(before)
        lab.start({"set_os_resolver": True})
        inside = lab.ns.run("cat", "/etc/resolv.conf").stdout  # what the namespace's programs read
        assert "nameserver 127.0.0.1" in inside and "search mesh" in inside
        # The system resolver (nsswitch, glibc) now asks the controller, search domain included.
        assert lab.ns.run("getent", "hosts", "charlie").stdout.split() == [CHARLIE.addresses[0], "charlie.mesh"]
        assert lab.ns.run("dig", "+short", "+time=2", "alpha.mesh").stdout.strip() == ALPHA.v4
        lab.node.cli("stop")
        lab.node.proc.wait(20)
        if before is None:
            assert not netns_dir.exists()
        else:
            assert resolv.read_text() == before
            assert sorted(p.name for p in netns_dir.iterdir()) == ["resolv.conf"]
        assert Path("/etc/resolv.conf").read_bytes() == host_resolv  # the host's own is never touched
    finally:
        resolv.unlink(missing_ok=True)
        for directory in (netns_dir, *(() if had_etc_netns else (etc_netns,))):
            try:
                directory.rmdir()
            except OSError:
                pass  # gone already, or another test's namespace is in there

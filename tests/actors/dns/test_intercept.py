"""DNS interception (``[dns] intercept``) in a running node: a client namespace
routed through the node, its resolv.conf naming 203.0.113.53, where a server
namespace answers other traffic but drops DNS (nothing listens there). The
node intercepts what comes in on its client-facing interface; the client
sees answers from 203.0.113.53."""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dns.message
import dns.rcode
import pytest

from tests.dns_fixtures import (
    BAD_PACKETS,
    DigResult,
    Dnsmasq,
    assert_bad_packet_answer,
    in_netns,
    need_tool,
    node_config,
    parse_dig,
    start_dnsmasq,
)
from tests.nodes import Netns, Node
from tests.topology import Identity

pytestmark = pytest.mark.netns

ALPHA = Identity("alpha", 1)
RESOLVER = "203.0.113.53"  # the client's resolver: a real host, where no DNS server listens
OTHER = "203.0.113.54"  # the same host's second address
CLIENT, NODE_LAN = "198.51.100.2", "198.51.100.1"
SERVER, NODE_WAN = "203.0.113.2", "203.0.113.1"
# IPv6 inside these namespaces only: the client's LAN, and an address nobody has.
CLIENT6, NODE_LAN6, RESOLVER6 = "fd00:5:1::2", "fd00:5:1::1", "fd00:113::53"
ECHO_PORT = 7
NO_DNS = """table inet nodns {
  chain in {
    type filter hook input priority 0;
    udp dport 53 counter drop
    tcp dport 53 counter drop
  }
}
"""
# A UDP echo at the server that says whom it heard from.
ECHO = f"""
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("{RESOLVER}", {ECHO_PORT}))
print("ready", flush=True)
while True:
    data, peer = s.recvfrom(512)
    s.sendto(b"from " + peer[0].encode(), peer)
"""


@dataclass
class Lab:
    client: Netns
    node_ns: Netns
    server: Netns
    lan: str  # the node's client-facing interface
    tmp: Path
    start_node: Callable[..., Node]
    upstream: Dnsmasq
    group: Dnsmasq
    node: Node | None = None

    def start(self, **dns_table: Any) -> Node:
        table = {
            "listen": ["127.0.0.1:53"],
            "timeout": 1.0,
            "allow": ["198.51.100.0/24", "fd00:5:1::/64"],
            "upstreams": [f"udp://{self.upstream.host}:{self.upstream.port}"],
            "intercept": [self.lan],
            **dns_table,
        }
        config = node_config(self.tmp, ALPHA, [], table)
        self.node = self.start_node("--config", str(config), ns=self.node_ns)
        self.node.wait_ready(timeout=60)
        return self.node

    def ask(self, name: str, *options: str, at: str = "") -> DigResult:
        """The client asks as its resolv.conf says (or at ``at``)."""
        need_tool("dig")
        argv = ["dig", *([f"@{at}"] if at else []), name, "A", "+time=2", "+tries=1", "+nocookie", *options]
        text = self.client.run(*argv, check=False, timeout=15).stdout
        return parse_dig(text)

    def filters(self) -> str:
        return self.node_ns.run("tc", "filter", "show", "dev", self.lan, "ingress").stdout

    def rules(self) -> str:
        return self.node_ns.run("ip", "rule").stdout + self.node_ns.run("ip", "-6", "rule").stdout

    def dropped_dns(self) -> int:
        """DNS packets that reached the server namespace (and were dropped there)."""
        out = self.server.run("nft", "list", "table", "inet", "nodns").stdout
        return sum(int(n) for n in re.findall(r"packets (\d+)", out))


def _veth(a: Netns, a_name: str, a_addr: str, b: Netns, b_name: str, b_addr: str) -> None:
    subprocess.run(
        ["ip", "link", "add", a_name, "netns", a.name, "type", "veth", "peer", "name", b_name, "netns", b.name],
        check=True,
    )
    for ns, name, addr in ((a, a_name, a_addr), (b, b_name, b_addr)):
        ns.run("ip", "addr", "add", addr, "dev", name)
        ns.run("ip", "link", "set", name, "up")


@pytest.fixture
def lab(node_factory: Callable[..., Node], netns: Callable[..., Netns], tmp_path: Path) -> Iterator[Lab]:
    need_tool("dig", "dnsmasq", "nft", "tc")
    client, node_ns, server = netns("dic"), netns("din"), netns("dis")
    tag = secrets.token_hex(3)
    lan = f"dil{tag}"
    _veth(node_ns, lan, f"{NODE_LAN}/24", client, f"dic{tag}", f"{CLIENT}/24")
    _veth(node_ns, f"diw{tag}", f"{NODE_WAN}/30", server, f"dis{tag}", f"{SERVER}/30")
    client.run("ip", "route", "add", "default", "via", NODE_LAN)
    node_ns.run("ip", "addr", "add", f"{NODE_LAN6}/64", "dev", lan, "nodad")
    client.run("ip", "addr", "add", f"{CLIENT6}/64", "dev", f"dic{tag}", "nodad")
    client.run("ip", "-6", "route", "add", "default", "via", NODE_LAN6)
    server.run("ip", "route", "add", "default", "via", NODE_WAN)
    for address in (RESOLVER, OTHER):
        server.run("ip", "addr", "add", f"{address}/32", "dev", "lo")
    node_ns.run("ip", "route", "add", "203.0.113.0/24", "via", SERVER)
    node_ns.run("sysctl", "-qw", "net.ipv4.ip_forward=1")
    # Nothing listens for DNS at the server: its DNS is dropped (and counted), so a query times out.
    server.run("nft", "-f", "-", input=NO_DNS)
    echo = server.popen(sys.executable, "-c", ECHO, stdout=subprocess.PIPE)
    assert echo.stdout is not None and echo.stdout.readline() == "ready\n"
    resolv = Path("/etc/netns") / client.name
    resolv.mkdir(parents=True)
    (resolv / "resolv.conf").write_text(f"nameserver {RESOLVER}\noptions timeout:2 attempts:1\n")
    upstream = start_dnsmasq(tmp_path, ["--address=/example.test/198.51.100.77"], ns=node_ns)
    group = start_dnsmasq(tmp_path, ["--address=/example.test/198.51.100.88"], ns=node_ns, name="group")
    made = Lab(client, node_ns, server, lan, tmp_path, node_factory, upstream, group)
    try:
        yield made
    finally:
        if made.node is not None:
            made.node.close()
        upstream.stop()
        group.stop()
        echo.terminate()
        echo.wait(5)
        shutil.rmtree(resolv)


def _exchange(
    ns: Netns, kind: socket.SocketKind, wire: bytes, host: str = RESOLVER, port: int = 53, framed: bool = True
) -> bytes | None:
    """One message to host:port from a socket connected to it (so only its answer counts);
    over TCP with its length in front, unless not ``framed`` (bytes as they are)."""

    def run() -> bytes | None:
        with socket.socket(socket.AF_INET, kind) as sock:
            sock.settimeout(3)
            try:
                sock.connect((host, port))
                if kind == socket.SOCK_STREAM:
                    sock.sendall(len(wire).to_bytes(2, "big") + wire if framed else wire)
                    length = int.from_bytes(sock.recv(2), "big")
                    data = b""
                    while len(data) < length:
                        chunk = sock.recv(length - len(data))
                        if not chunk:
                            return None
                        data += chunk
                    return data
                sock.send(wire)
                return sock.recv(65535)
            except (TimeoutError, ConnectionError):
                return None

    return in_netns(ns, run)


def test_dns_to_any_address_is_answered_by_the_controller_and_routed_by_rules(lab: Lab) -> None:
    group = f"udp://{lab.group.host}:{lab.group.port}"
    lab.start(
        groups={"other": [group]},
        reject_rcode="nxdomain",
        rules=[
            {"match": "full:blocked.example.test", "action": "reject"},
            {"match": f"dst:{OTHER}", "action": "other"},
            {"match": "full:asis.grouped.example.test", "action": "asis"},
            {"match": "suffix:grouped.example.test", "action": "other"},
        ],
    )
    for transport in ((), ("+tcp",)):
        plain = lab.ask("www.example.test", *transport)
        assert plain.status == "NOERROR" and plain.server == RESOLVER, plain.text
        assert [a[4] for a in plain.answer] == ["198.51.100.77"]
        assert lab.ask("blocked.example.test", *transport).status == "NXDOMAIN"
        assert [a[4] for a in lab.ask("a.grouped.example.test", *transport).answer] == ["198.51.100.88"]
        assert [a[4] for a in lab.ask("asis.grouped.example.test", *transport).answer] == ["198.51.100.77"]
        # The destination the client chose routes too: the same name, asked of another address.
        other = lab.ask("www.example.test", *transport, at=OTHER)
        assert other.server == OTHER and [a[4] for a in other.answer] == ["198.51.100.88"]
        over_v6 = lab.ask("www.example.test", *transport, at=RESOLVER6)
        assert over_v6.server == RESOLVER6 and [a[4] for a in over_v6.answer] == ["198.51.100.77"], over_v6.text
    assert lab.upstream.count("www.example.test") >= 1 and lab.group.count("a.grouped.example.test") >= 1
    assert lab.dropped_dns() == 0  # no DNS got past the node
    counters = lab.node.counters()["dns"]
    assert counters["intercepted_udp"] >= 6 and counters["intercepted_tcp"] >= 6


def test_other_traffic_to_the_address_is_untouched(lab: Lab) -> None:
    lab.start()
    assert lab.ask("www.example.test").server == RESOLVER
    echoed = _exchange(lab.client, socket.SOCK_DGRAM, b"ping", port=ECHO_PORT)
    assert echoed is not None and CLIENT in echoed.decode()  # the real host answered, and saw the client


def test_garbage_gets_what_any_client_gets(lab: Lab) -> None:
    lab.start()
    workers = {n: a["pid"] for n, a in lab.node.actors().items() if a["kind"] == "dns"}
    for what, packet, rcode in BAD_PACKETS:
        answer = _exchange(lab.client, socket.SOCK_DGRAM, packet)
        try:
            assert_bad_packet_answer(answer, rcode)
        except AssertionError:
            raise AssertionError(f"{what}: {answer!r}") from None
    truncated = next(packet for what, packet, _ in BAD_PACKETS if what == "truncated")
    assert_bad_packet_answer(_exchange(lab.client, socket.SOCK_STREAM, truncated), dns.rcode.FORMERR)
    assert _exchange(lab.client, socket.SOCK_STREAM, b"\xff" * 40, framed=False) is None  # a length never completed
    assert _exchange(lab.client, socket.SOCK_DGRAM, b"") is None
    assert {n: a["pid"] for n, a in lab.node.actors().items() if a["kind"] == "dns"} == workers
    query = dns.message.make_query("www.example.test", "A").to_wire()
    assert dns.message.from_wire(_exchange(lab.client, socket.SOCK_DGRAM, query)).rcode() == dns.rcode.NOERROR


def test_interception_survives_a_router_crash_and_goes_with_the_node(lab: Lab) -> None:
    node = lab.start()
    assert "meshsup_dns" in lab.filters() and "0x4453" in lab.rules()
    old = node.actors()["router"]["pid"]
    os.kill(old, signal.SIGKILL)
    node.wait(lambda: (a := node.actors()["router"])["pid"] != old and a["state"] == "running", what="router back")
    # The new router cleared what the dead one left before attaching again: one filter, one rule per family.
    assert lab.filters().count(" meshsup_dns direct-action") == 1 and lab.rules().count("0x4453") == 2
    assert lab.ask("www.example.test").server == RESOLVER
    node.close()
    lab.node = None
    assert "meshsup_dns" not in lab.filters() and "0x4453" not in lab.rules()
    assert "clsact" not in lab.node_ns.run("tc", "qdisc", "show", "dev", lab.lan).stdout
    before = lab.dropped_dns()
    assert lab.ask("www.example.test").status == "NO-ANSWER"  # times out: no DNS server there
    assert lab.ask("www.example.test", "+tcp").status == "NO-ANSWER"
    assert lab.dropped_dns() > before

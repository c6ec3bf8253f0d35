"""Nodes behind real NAT reach each other through `meshsup relay` (DERP), in network namespaces.

Two homes, each a router masquerading its LAN onto an internet segment (nftables) with a new port
per destination (`masquerade random`: endpoint-dependent NAT, which no hole punching opens), a node
on each LAN with no endpoint for the other: the relay on the segment is the only way between them. A
wireguard-go peer on the segment, with no relay, is reached at its configured endpoint beside them.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from nacl.public import PrivateKey

from tests.netlog_fixtures import Rsyslog, free_port, wait_until
from tests.nodes import REPO, is_root
from tests.topology import (
    RELAY_PORT,
    Identity,
    NatLab,
    Netns,
    Node,
    Underlay,
    WgGo,
    assert_carried,
    carried_through,
    have,
    iperf3,
    peer,
    ping,
    relay_up,
    relays_stanza,
    start_meshsup,
    start_relay,
    start_wg,
    unanswered,
)

TOOLS = ("wireguard-go", "wg", "iperf3", "ping", "nft")
pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(not is_root() or bool(have(*TOOLS)), reason=have(*TOOLS) or "needs root"),
]


@dataclass
class Mesh:
    relay: Node
    relay_ns: Netns
    ns_a: Netns
    ns_b: Netns
    ns_c: Netns
    a: Identity
    b: Identity
    c: Identity
    node_a: Node
    node_b: Node
    wg_c: WgGo


def build(underlay: Underlay, tmp: Path, relay_workers: int = 1, extra_a: Callable[[Netns], str] | None = None) -> Mesh:
    """The relay, alpha and bravo behind their NATs, charlie (wireguard-go) in public; `extra_a` may add
    to alpha's config, given alpha's namespace (to start a collector there first)."""
    lab = NatLab(underlay)
    relay_ns, relay_addr = lab.public()
    relay = start_relay(underlay, tmp, relay_ns, relay_addr, "--relay-workers", str(relay_workers))
    (ns_a, _, _), (ns_b, _, _) = lab.home(nat="random"), lab.home(nat="random")
    ns_c, addr_c = lab.public()
    a, b, c = Identity("alpha", 1), Identity("bravo", 2), Identity("charlie", 3)
    c.endpoint = f"{addr_c}:51820"  # the one reachable endpoint; alpha and bravo have none
    extra = relays_stanza(relay_addr)
    node_a = start_meshsup(underlay, tmp, a, [b, c], ns=ns_a, extra=extra + (extra_a(ns_a) if extra_a else ""))
    node_b = start_meshsup(underlay, tmp, b, [a, c], ns=ns_b, extra=extra)
    wg_c = start_wg(underlay, tmp, ns_c, c, [a, b])
    for node in (node_a, node_b):
        node.wait(lambda: relay_up(node), what="logged in to the relay, latency measured")
    return Mesh(relay, relay_ns, ns_a, ns_b, ns_c, a, b, c, node_a, node_b, wg_c)


def wg_show_handshake(ns: Netns, node: Node, other: Identity) -> int:
    """The latest handshake with `other`, as `wg show` (the UAPI) reports it."""
    out = ns.run("wg", "show", node.status()["node"]["interface"], "latest-handshakes").stdout
    return next(int(line.split()[1]) for line in out.splitlines() if line.split()[0] == other.public)


def test_nat_pair_through_the_relay_beside_a_wireguard_go_peer(underlay: Underlay, tmp_path: Path) -> None:
    m = build(underlay, tmp_path)
    assert ping(m.ns_a, m.b.v4) and ping(m.ns_b, m.a.v4) and ping(m.ns_a, m.b.v6)
    assert_carried(iperf3(m.ns_a, m.ns_b, m.b.v4, seconds=3))
    assert_carried(iperf3(m.ns_a, m.ns_b, m.b.v4, seconds=3, reverse=True))
    for ns, node, other in ((m.ns_a, m.node_a, m.b), (m.ns_b, m.node_b, m.a)):
        assert wg_show_handshake(ns, node, other) > time.time() - 180
        p = peer(node, other.name)
        assert (p["path"], p["relay"]) == ("relay", "edge") and p["latency_ms"] > 0, p
        assert p["endpoint"] == ""  # nothing roamed to the relay
    magicsock = m.node_a.counters()["magicsock"]
    assert magicsock["relay_tx_datagrams"] > 1000 and magicsock["relay_rx_datagrams"] > 1000, magicsock
    assert m.relay.status()["counters"]["home_clients"] == 2
    # magicsock logs in with the node's key: it holds that (no preshared keys); no other actor does but crypto.
    assert {a["kind"] for a in m.node_a.status()["actors"] if a["holds_keys"]} == {"crypto", "magicsock"}
    text = m.node_a.cli("status").stdout
    assert "relay edge" in text and "(home)" in text, text
    # The wireguard-go peer, with no relay, works at its endpoint: alpha and bravo reach it
    # directly from behind their NATs, and it answers them where their handshakes came from.
    assert ping(m.ns_a, m.c.v4) and ping(m.ns_b, m.c.v4) and ping(m.ns_c, m.a.v4) and ping(m.ns_c, m.b.v4)
    assert peer(m.node_a, "charlie")["path"] == "direct"


def test_peers_learn_the_relay_is_gone(underlay: Underlay, tmp_path: Path) -> None:
    m = build(underlay, tmp_path)
    assert ping(m.ns_a, m.b.v4) and ping(m.ns_a, m.c.v4)
    m.relay.close()
    m.node_a.wait(lambda: not relay_up(m.node_a), what="the relay seen gone")
    # The peer with a reachable endpoint keeps working; the one reached only through the relay does not,
    # and status says so: its path is the relay, which has no latency (not connected).
    assert ping(m.ns_a, m.c.v4) and ping(m.ns_c, m.a.v4)
    assert unanswered(m.ns_a, m.b.v4, lambda: peer(m.node_b, "alpha")["rx_bytes"])
    p = peer(m.node_a, "bravo")
    assert (p["path"], p["relay"], p["latency_ms"]) == ("relay", "edge", None), p
    (relay,) = m.node_a.status()["relays"]
    assert relay["state"] in ("waiting", "connecting") and relay["failures"], relay
    assert "relay edge down" in m.node_a.cli("status").stdout


def test_kill_9_of_a_relay_worker(underlay: Underlay, tmp_path: Path) -> None:
    m = build(underlay, tmp_path, relay_workers=2)
    assert ping(m.ns_a, m.b.v4)
    with carried_through(m.ns_a, m.ns_b, m.b.v4, seconds=12):  # the TCP connection lives through the kill
        m.node_a.wait(lambda: m.node_a.counters()["magicsock"].get("relay_tx_datagrams", 0) > 5000, what="iperf3 going")
        workers = {a["name"]: a for a in m.relay.status()["actors"]}
        victim = max(workers.values(), key=lambda a: a["counters"].get("clients", 0))
        os.kill(victim["pid"], signal.SIGKILL)
        killed = time.monotonic()
        m.relay.wait(
            lambda: (
                (w := {a["name"]: a for a in m.relay.status()["actors"]})[victim["name"]]["restarts"] == 1
                and w[victim["name"]]["state"] == "running"
            ),
            what="the worker restarted",
        )
        m.relay.wait(lambda: m.relay.status()["counters"].get("clients") == 2, what="both clients back")
        assert ping(m.ns_a, m.b.v4, count=1, timeout=5)
        assert time.monotonic() - killed < 5, "traffic took over 5 s to resume"
    assert (
        sum(m.node_a.status()["relays"][0]["failures"].values()) >= 1
        or sum(m.node_b.status()["relays"][0]["failures"].values()) >= 1
    )


ROGUE = """
import sys, time
from meshsup.actors.wire import derp
from tests.derp_client import DerpClient
host, port, private, dst, count = sys.argv[1:]
dst = bytes.fromhex(dst)
c = DerpClient((host, int(port)), bytes.fromhex(private))
junk = [b"not wireguard at all", bytes([4, 0, 0, 0]) + bytes(60), bytes([1, 0, 0, 0]) + bytes(144)]
c.sock.sendall(b"".join(derp.send_packet(dst, junk[i % 3]) for i in range(int(count))))
print("sent", flush=True)
time.sleep(120)
"""
GARBAGE = """
import socket, sys
s = socket.create_server((sys.argv[1], int(sys.argv[2])))
print("listening", flush=True)
while True:
    conn, _ = s.accept()
    conn.recv(4096)
    conn.sendall(b"HTTP/1.1 200 OK\\r\\nContent-Length: 5\\r\\n\\r\\nhello")
    conn.close()
"""


def run_python(ns: Netns, script: str, *args: str) -> subprocess.Popen[str]:
    proc = ns.popen(
        sys.executable,
        "-c",
        script,
        *args,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.stdout is not None and proc.stdout.readline(), proc.stderr.read() if proc.stderr else ""
    return proc


def test_what_a_relay_must_not_deliver_is_counted_and_crashes_nothing(underlay: Underlay, tmp_path: Path) -> None:
    lab = NatLab(underlay)
    relay_ns, relay_addr = lab.public()
    start_relay(underlay, tmp_path, relay_ns, relay_addr)
    rogues: list[subprocess.Popen[str]] = [run_python(relay_ns, GARBAGE, relay_addr, "9000")]
    try:
        ns_a, _, _ = lab.home()
        a, d = Identity("alpha", 1), Identity("delta", 4)  # delta: a peer of alpha's that the test speaks for
        extra = f'\n[[relays]]\nname = "junk"\nurl = "http://{relay_addr}:9000/derp"\n' + relays_stanza(relay_addr)
        node = start_meshsup(underlay, tmp_path, a, [d], ns=ns_a, extra=extra)
        node.wait(lambda: (s := node.status()["relays"])[1]["state"] == "up" and s[0]["failures"], what="relays")
        stranger = PrivateKey.generate()
        alpha = base64.b64decode(a.public).hex()
        for private in (bytes(stranger), d.private):
            rogues.append(run_python(relay_ns, ROGUE, relay_addr, str(RELAY_PORT), private.hex(), alpha, "30"))

        def counted() -> Any:
            c = node.counters()
            m, crypto = c["magicsock"], c["crypto"]
            return (
                m.get("relay_unknown_peer", 0) >= 30
                and m.get("not_wireguard", 0) >= 10
                and crypto.get("no_session", 0) + crypto.get("bad_mac1", 0) >= 20
            ) and c

        node.wait(counted, what="every kind of bad delivery counted")
        status = node.status()
        junk = status["relays"][0]
        assert junk["state"] != "up" and "http_200" in junk["failures"], junk
        assert all(x["restarts"] == 0 for x in status["actors"]), status["actors"]
    finally:
        for proc in rogues:
            proc.kill()
            proc.wait()


def test_relayed_traffic_is_in_flow_records_with_the_relay_as_the_endpoint(underlay: Underlay, tmp_path: Path) -> None:
    rsyslog: list[Rsyslog] = []

    def collector(ns: Netns) -> str:
        r = Rsyslog(tmp_path / "rsyslog", free_port(), ns)
        r.start()
        rsyslog.append(r)
        return (
            f'\n[netlog]\ninterval = 1\n[[netlog.collectors]]\nkind = "syslog"\naddress = "tcp://127.0.0.1:{r.port}"\n'
        )

    try:
        m = build(underlay, tmp_path, extra_a=collector)
        assert ping(m.ns_a, m.b.v4, count=5)

        def physical() -> dict[str, int]:
            records = [json.loads(x["msg"]) for x in rsyslog[0].messages() if x["msgid"] == "flowlog"]
            out: dict[str, int] = {}
            for entry in (e for r in records for e in r.get("physicalTraffic", [])):
                if (entry["src"], entry["dst"]) == (f"{m.b.v4}:0", "127.3.3.40:1"):
                    for k in ("txPkts", "rxPkts", "txBytes", "rxBytes"):
                        out[k] = out.get(k, 0) + entry.get(k, 0)
            return out

        # Five echoes and their replies at least, each in a WireGuard datagram, bravo's through the relay.
        assert wait_until(lambda: (p := physical()).get("txPkts", 0) >= 5 and p.get("rxPkts", 0) >= 5, 15), physical()
        assert physical()["txBytes"] >= 5 * (84 + 32)
    finally:
        for r in rsyslog:
            r.stop()


def test_when_the_home_relay_fails_another_takes_over(underlay: Underlay, tmp_path: Path) -> None:
    lab = NatLab(underlay)
    relays, stanzas = {}, ""
    for name in ("one", "two"):
        ns, addr = lab.public()
        relays[name] = start_relay(underlay, tmp_path, ns, addr, name=name)
        stanzas += relays_stanza(addr, name)
    (ns_a, _, _), (ns_b, _, _) = lab.home(nat="random"), lab.home(nat="random")
    a, b = Identity("alpha", 1), Identity("bravo", 2)
    node_a = start_meshsup(underlay, tmp_path, a, [b], ns=ns_a, extra=stanzas)
    node_b = start_meshsup(underlay, tmp_path, b, [a], ns=ns_b, extra=stanzas)

    def home(node: Node) -> str | None:
        return next((r["name"] for r in node.status()["relays"] if r["home"] and r["state"] == "up"), None)

    for node in (node_a, node_b):
        node.wait(lambda: relay_up(node) and home(node), what="both relays up, a home chosen")
    assert ping(ns_a, b.v4) and ping(ns_b, a.v4)  # on the same home or not: each reaches the other
    first = home(node_a)
    relays[first].close()
    other = "two" if first == "one" else "one"
    for node in (node_a, node_b):
        node.wait(lambda: home(node) == other, what=f"{other} the home now")
    assert ping(ns_a, b.v4, count=3, timeout=15) and ping(ns_b, a.v4)
    assert peer(node_a, "bravo")["relay"] == other

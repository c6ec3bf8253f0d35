"""`wg show` and `wg set` against a running meshsup node, checked against wireguard-go's view."""

from __future__ import annotations

import socket
from functools import partial

import pytest

from tests.nodes import Node, is_root
from tests.topology import Identity, have, iperf3, pair, ping, received_from, start_meshsup, start_wg, unanswered

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(
        not is_root() or bool(have("wireguard-go", "wg", "iperf3", "ping")),
        reason=have("wireguard-go", "wg", "iperf3", "ping") or "needs root",
    ),
]


def dump(ns, iface: str) -> dict[str, list[str]]:
    """`wg show IFACE dump`: peers by public key (first line is the interface)."""
    lines = ns.run("wg", "show", iface, "dump").stdout.splitlines()
    return {f[0]: f for f in (line.split("\t") for line in lines[1:])}


def test_wg_show_agrees_with_wireguard_go(underlay, tmp_path) -> None:
    (ns_a, a, node_a), (ns_b, b, wg_b) = pair(underlay, tmp_path, "wireguard-go")
    assert ping(ns_a, b.v4)
    # Paced, so the receiver's socket buffer rarely overflows: what one side sent is what the
    # other received, less what the receiving kernel dropped (counted, and allowed for below).
    r = iperf3(ns_a, ns_b, b.v4, seconds=3, extra=("-b", "40M"))
    assert "error" not in r, r["error"]

    def caught_up() -> tuple[list[str], list[str]] | None:
        """Our figures come with the workers' heartbeats: once what we say we sent covers what
        wireguard-go (live figures) received, the heartbeat that carries the transfer is in."""
        ours, theirs = dump(ns_a, node_a.iface)[b.public], dump(ns_b, wg_b.iface)[a.public]
        return (ours, theirs) if int(ours[6]) >= int(theirs[5]) else None

    ours, theirs = node_a.wait(caught_up, what="the transfer in our counters")
    shown = ns_a.run("wg", "show", node_a.iface).stdout
    assert f"peer: {b.public}" in shown and f"endpoint: {b.endpoint}" in shown
    assert "latest handshake:" in shown and "transfer:" in shown

    table = node_a.cli("status").stdout.splitlines()
    (row,) = [line for line in table if line.startswith("bravo ")]
    assert b.endpoint in row and "MiB" in row and row.endswith(" s ago"), row

    # public-key preshared-key endpoint allowed-ips latest-handshake rx tx keepalive
    assert ours[2] == b.endpoint
    assert sorted(ours[3].split(",")) == sorted(b.allowed())
    assert abs(int(ours[4]) - int(theirs[4])) <= 3, (ours[4], theirs[4])
    sent, received = int(ours[6]), int(ours[5])
    assert sent > r["end"]["sum_sent"]["bytes"]
    # Each side counts whole datagrams.
    dropped = int(ns_b.run("nstat", "-az", "UdpRcvbufErrors").stdout.split()[-2])
    assert 0 <= sent - int(theirs[5]) <= 0.01 * sent + dropped * (1420 + 32), (sent, theirs[5], dropped)
    assert abs(received - int(theirs[6])) <= 0.03 * received + 2000, (received, theirs[6])


def test_wg_set_adds_a_peer_that_carries_traffic_and_remove_stops_it(underlay, tmp_path) -> None:
    (ns_a, addr_a), (ns_b, addr_b) = underlay.host(), underlay.host()
    a, b = Identity("alpha", 1), Identity("bravo", 2)
    a.endpoint, b.endpoint = f"{addr_a}:51820", f"{addr_b}:51820"
    node_a = start_meshsup(underlay, tmp_path, a, [], ns=ns_a)
    wg_b = start_wg(underlay, tmp_path, ns_b, b, [a])
    from_a = partial(received_from, wg_b, a)
    assert unanswered(ns_a, b.v4, from_a)

    ns_a.run(
        "wg",
        "set",
        node_a.iface,
        "peer",
        b.public,
        "allowed-ips",
        ",".join(b.allowed()),
        "endpoint",
        b.endpoint,
        "persistent-keepalive",
        "25",
    )
    assert ping(ns_a, b.v4) and ping(ns_a, b.v6) and ping(ns_b, a.v4)
    (peer,) = node_a.status()["peers"]
    assert peer["public_key"] == b.public and peer["persistent_keepalive"] == 25
    assert sorted(dump(ns_a, node_a.iface)[b.public][3].split(",")) == sorted(b.allowed())

    # A wrong request is refused whole and changes nothing.
    refused = ns_a.run("wg", "set", node_a.iface, "fwmark", "7", "peer", b.public, "remove", check=False)
    assert refused.returncode != 0
    assert ping(ns_a, b.v4, count=1)

    ns_a.run("wg", "set", node_a.iface, "peer", b.public, "remove")
    assert node_a.status()["peers"] == []
    assert b.public not in dump(ns_a, node_a.iface)
    assert unanswered(ns_a, b.v4, from_a)
    assert all(a["restarts"] == 0 for a in node_a.status()["actors"])


def test_the_api_socket_belongs_to_the_running_node_only(underlay, tmp_path) -> None:
    (ns_a, a, node_a), (ns_b, b, node_b) = pair(underlay, tmp_path, "meshsup")
    sock = f"/var/run/wireguard/{node_a.iface}.sock"
    assert ns_a.run("stat", "-c", "%a", sock).stdout.strip() == "700"  # root only: `get` shows the key
    # The path is shared by every namespace: a second node may not take over a live socket.
    ns_c, _ = underlay.host()
    clash = underlay.track(Node(tmp_path, "--interface", node_a.iface, netns=ns_c))
    assert clash.proc.wait(30) == 1
    assert "WireGuard API socket" in clash.stderr() and sock in clash.stderr()
    # Garbage on the socket gets an errno or a closed connection, never a stuck node.
    for junk in (b"set=1\nbogus=1\n\n", b"\xff\xfe\n\n", b"get=1\n", b"x" * 100000):
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(sock)
            s.sendall(junk)
            s.shutdown(socket.SHUT_WR)
            reply = s.recv(100)
            assert reply.startswith(b"errno=-") or reply == b"", (junk[:20], reply)
    assert f"PublicKey = {b.public}" in ns_a.run("wg", "showconf", node_a.iface).stdout
    assert ping(ns_a, b.v4)
    node_a.close()
    assert ns_a.run("test", "-e", sock, check=False).returncode == 1

"""meshsup carrying real traffic with real WireGuard peers (wireguard-go), ping and iperf3."""

from __future__ import annotations

import os
import random
import signal
import time

import pytest

from tests.nodes import REPO, is_root
from tests.topology import (
    Identity,
    assert_carried,
    carried_through,
    have,
    iperf3,
    pair,
    ping,
    start_meshsup,
    start_wg,
)

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(
        not is_root() or bool(have("wireguard-go", "wg", "iperf3", "ping")),
        reason=have("wireguard-go", "wg", "iperf3", "ping") or "needs root",
    ),
]


def assert_transfer(client, server, addr: str, seconds: int = 10, reverse: bool = False) -> dict:
    r = iperf3(client, server, addr, seconds=seconds, reverse=reverse)
    assert_carried(r)
    return r


@pytest.mark.parametrize("second", ["wireguard-go", "meshsup"])
@pytest.mark.parametrize("initiator", ["alpha", "bravo"])
def test_pair_carries_ping_and_tcp(underlay, tmp_path, second, initiator) -> None:
    (ns_a, a, node_a), (ns_b, b, peer_b) = pair(underlay, tmp_path, second)
    first, target = (ns_a, b) if initiator == "alpha" else (ns_b, a)
    assert ping(first, target.v4), f"{initiator} could not start the handshake"
    assert ping(ns_a, b.v4) and ping(ns_b, a.v4)
    assert ping(ns_a, b.v6) and ping(ns_b, a.v6)
    assert ping(ns_a, b.v4, size=1420 - 28) and ping(ns_b, a.v6, size=1420 - 48)  # full tunnel MTU
    sent = assert_transfer(ns_a, ns_b, b.v4)["end"]["sum_received"]["bytes"]  # alpha -> bravo
    received = assert_transfer(ns_a, ns_b, b.v4, reverse=True)["end"]["sum_received"]["bytes"]  # bravo -> alpha
    (peer,) = node_a.status()["peers"]
    assert peer["last_handshake"] > time.time() - 180
    assert peer["endpoint"] == b.endpoint
    # The tunnel carried at least what iperf3 moved, plus WireGuard's overhead.
    assert peer["tx_bytes"] > sent and peer["rx_bytes"] > received
    if second == "wireguard-go":
        fields = peer_b.show().splitlines()[1].split("\t")
        assert int(fields[4]) > time.time() - 180  # wireguard-go saw the same handshake
        assert int(fields[5]) > sent and int(fields[6]) > received


def test_udp_through_two_workers_keeps_order_on_the_direct_path(underlay, tmp_path) -> None:
    (ns_a, a, node_a), (ns_b, b, node_b) = pair(underlay, tmp_path, "meshsup")
    assert ping(ns_a, b.v4)
    r = iperf3(ns_a, ns_b, b.v4, seconds=3, extra=("-u", "-b", "100M", "-l", "1392"))
    assert "error" not in r, r.get("error")
    udp = r["end"]["sum"]
    assert udp["packets"] > 0 and udp["lost_packets"] < udp["packets"] / 2
    assert [s["udp"]["out_of_order"] for s in r["end"]["streams"]] == [0]
    for node in (node_a, node_b):
        counters = node.counters()
        crypto, tun_io = counters["crypto"], counters["tun-io"]
        # The owning worker moved the datagrams itself: its own socket and TUN queue, no hops.
        assert crypto["direct_sockets"] == 1 and crypto["udp_rx_datagrams"] > 0 and crypto["tun_writes"] > 0
        assert counters["magicsock"].get("tx_datagrams", 0) < 10
        # The kernel steered the outgoing packets straight to the owner's queue: tun-io saw none.
        assert tun_io["steering"] == 1 and tun_io.get("rx_packets", 0) == 0
        ns = ns_a if node is node_a else ns_b
        iface = node.status()["node"]["interface"]
        assert ns.run("cat", f"/sys/class/net/{iface}/tx_queue_len").stdout.strip() == "2000"  # room per queue
    assert node_a.counters()["crypto"]["tun_read"] > udp["packets"] / 2  # the sender's queue may drop some


def test_scaling_crypto_workers_keeps_the_tunnel(underlay, tmp_path) -> None:
    """Workers added later have no queue held for them; the packets steered to a queue
    whose reader does not own them are handed to the owner. Both ways the tunnel carries."""
    (ns_a, a, node_a), (ns_b, b, _) = pair(underlay, tmp_path, "wireguard-go")
    assert ping(ns_a, b.v4)
    for workers in (4, 1, 2):
        node_a.cli("scale", "crypto", str(workers))
        node_a.wait(
            lambda: (
                sum(1 for x in node_a.actors().values() if x["kind"] == "crypto" and x["state"] == "running") == workers
            ),
            what=f"{workers} crypto workers",
        )
        assert ping(ns_a, b.v4, count=5) and ping(ns_b, a.v4, count=5) and ping(ns_a, b.v6, count=3), workers
    assert node_a.counters()["tun-io"]["steering"] == 1


def test_three_node_full_mesh(underlay, tmp_path) -> None:
    hosts = [underlay.host() for _ in range(3)]
    ids = [Identity(n, i + 1) for i, n in enumerate(["alpha", "bravo", "charlie"])]
    for ident, (_, addr) in zip(ids, hosts):
        ident.endpoint = f"{addr}:51820"
    start_meshsup(underlay, tmp_path, ids[0], [ids[1], ids[2]], ns=hosts[0][0])
    start_meshsup(underlay, tmp_path, ids[1], [ids[0], ids[2]], ns=hosts[1][0])
    start_wg(underlay, tmp_path, hosts[2][0], ids[2], [ids[0], ids[1]])
    for i, (ns, _) in enumerate(hosts):
        for j, other in enumerate(ids):
            if i != j:
                assert ping(ns, other.v4), f"{ids[i].name} cannot reach {other.name}"


def test_kill_dataplane_actors_during_transfer(underlay, tmp_path) -> None:
    (ns_a, a, node_a), (ns_b, b, wg) = pair(underlay, tmp_path, "wireguard-go")
    assert ping(ns_a, b.v4)
    victims = ["crypto-0", "crypto-1", "tun-io", "magicsock"]
    with carried_through(ns_a, ns_b, b.v4, seconds=16):  # the connection lives through every kill
        for name in victims:
            time.sleep(3)
            os.kill(node_a.actors()[name]["pid"], signal.SIGKILL)
    actors = node_a.actors()
    assert all(actors[v]["restarts"] == 1 for v in victims)
    assert ping(ns_a, b.v4) and ping(ns_b, a.v4)


def _initiation_garbage(rng: random.Random) -> bytes:
    msg = bytearray(rng.randbytes(148))
    msg[0:4] = b"\x01\0\0\0"  # looks like an initiation; MAC1 is wrong
    return bytes(msg)


CAPTURE = """
import socket, struct, sys
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))  # ETH_P_ALL sees outgoing
s.settimeout(10)
got = []
while len(got) < 20:
    frame = s.recv(65535)
    ip = frame[14:]
    if frame[12:14] != b"\\x08\\x00" or ip[9] != 17:
        continue
    payload = ip[(ip[0] & 15) * 4 + 8:]
    if ip[12:16] == socket.inet_aton(sys.argv[2]) and payload[:1] == b"\\x04":  # sent by bravo
        got.append(payload)
open(sys.argv[1], "wb").write(b"".join(len(p).to_bytes(2, "big") + p for p in got))
"""

FLOOD = """
import socket, sys, time
from meshsup.actors.bus.batch import unpack
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for i, b in enumerate(unpack(open(sys.argv[1], "rb").read())):
    s.sendto(b, (sys.argv[2], 51820))
    if i % 50 == 0:
        time.sleep(0.002)  # stay under the socket buffer: this tests the node, not the kernel
"""


def test_bad_input_is_dropped_and_counted(underlay, tmp_path) -> None:
    (ns_a, a, node_a), (ns_b, b, wg) = pair(underlay, tmp_path, "wireguard-go")
    assert ping(ns_a, b.v4)
    # Real data packets from bravo to alpha, captured on the wire to be replayed.
    (tmp_path / "capture.py").write_text(CAPTURE)
    cap = ns_b.popen(
        os.sys.executable, str(tmp_path / "capture.py"), str(tmp_path / "captured"), b.endpoint.split(":")[0]
    )
    assert ping(ns_b, a.v4, count=60, timeout=20)
    assert cap.wait(20) == 0
    from meshsup.actors.bus.batch import pack, unpack

    captured = unpack((tmp_path / "captured").read_bytes())
    rng = random.Random(7)
    garbage = (
        [rng.randbytes(rng.randrange(1, 300)) for _ in range(10_000)]  # random
        + [b"\x01\0\0\0" + rng.randbytes(rng.randrange(0, 140)) for _ in range(10_000)]  # truncated
        + [_initiation_garbage(rng) for _ in range(10_000)]  # wrong MAC1
        + [captured[i % len(captured)] for i in range(10_000)]  # replayed data
    )
    (tmp_path / "garbage").write_bytes(pack(garbage))
    (tmp_path / "flood.py").write_text(FLOOD)
    attacker, _ = underlay.host()
    before = node_a.actors()
    r = attacker.run(
        os.sys.executable,
        str(tmp_path / "flood.py"),
        str(tmp_path / "garbage"),
        a.endpoint.split(":")[0],
        check=False,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert r.returncode == 0, r.stderr
    assert ping(ns_a, b.v4) and ping(ns_b, a.v4), "the tunnel stopped working"
    after = node_a.actors()
    assert all(after[n]["restarts"] == 0 and after[n]["pid"] == before[n]["pid"] for n in before)
    counters = node_a.counters()
    assert counters["magicsock"].get("not_wireguard", 0) >= 15_000  # random + truncated, mostly
    crypto = counters["crypto"]
    assert crypto.get("bad_mac1", 0) >= 9_000
    assert crypto.get("replay", 0) >= 9_000

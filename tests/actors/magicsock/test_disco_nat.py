"""Direct paths through real NAT, as Tailscale's magicsock finds them: disco, STUN, call-me-maybe and
hole punching, with the relay as the way in and the fallback, in network namespaces.

NatLab homes are routers that masquerade their LAN onto an internet segment with nftables: plain
`masquerade` keeps a mapping per source (endpoint-independent: hole punching opens it), `masquerade
random` takes a new port per destination (endpoint-dependent). The relay, with its STUN server,
sits on the segment. No node has an endpoint configured for another: whatever direct path they use,
they found.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from meshsup.actors.settings import keys
from tests.nodes import REPO, is_root
from tests.topology import (
    Identity,
    NatLab,
    Netns,
    Node,
    Underlay,
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
)

TOOLS = ("wireguard-go", "wg", "iperf3", "ping", "nft", "conntrack")
pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(not is_root() or bool(have(*TOOLS)), reason=have(*TOOLS) or "needs root"),
]


@dataclass
class Pair:
    lab: NatLab
    ns_a: Netns
    ns_b: Netns
    a: Identity
    b: Identity
    node_a: Node
    node_b: Node
    public_b: str  # where bravo's datagrams come from on the segment: its router's, or its own


def build(underlay: Underlay, tmp: Path, nat_a: str, nat_b: str, relays: int = 1) -> Pair:
    """alpha and bravo, each in a home with that NAT or ("public") on the segment, and the relays."""
    lab = NatLab(underlay)
    stanzas = ""
    for i in range(relays):
        ns, addr = lab.public()
        start_relay(underlay, tmp, ns, addr, name=f"r{i}")
        stanzas += relays_stanza(addr, f"r{i}")

    def host(nat: str) -> tuple[Netns, str]:
        if nat == "public":
            return lab.public()
        ns, _, public = lab.home(nat=nat)  # type: ignore[arg-type]
        return ns, public

    (ns_a, _), (ns_b, public_b) = host(nat_a), host(nat_b)
    a, b = Identity("alpha", 1), Identity("bravo", 2)
    node_a = start_meshsup(underlay, tmp, a, [b], ns=ns_a, extra=stanzas)
    node_b = start_meshsup(underlay, tmp, b, [a], ns=ns_b, extra=stanzas)
    for node in (node_a, node_b):
        node.wait(lambda: relay_up(node), what="logged in to the relays")
    return Pair(lab, ns_a, ns_b, a, b, node_a, node_b, public_b)


@contextmanager
def traffic(ns: Netns, addr: str, seconds: float, interval: float = 0.2) -> Iterator[None]:
    """Pings from `ns` to `addr` in the background for the body (at most `seconds`): a peer with traffic
    is one disco keeps a path for."""
    pinger = ns.popen("ping", "-q", "-i", str(interval), "-w", str(int(seconds)), addr, stdout=subprocess.DEVNULL)
    try:
        yield
    finally:
        pinger.kill()
        pinger.wait()


def direct(node: Node, name: str) -> dict[str, Any] | None:
    p = peer(node, name)
    return p if p["path"] == "direct" else None


def go_direct(p: Pair, within: float) -> tuple[dict[str, Any], dict[str, Any]]:
    """Traffic starts; both sides must be on a direct path within `within` seconds of the first packet."""
    first = time.monotonic()
    assert ping(p.ns_a, p.b.v4, count=1, timeout=5)
    with traffic(p.ns_a, p.b.v4, within + 2):
        seen_a = p.node_a.wait(lambda: direct(p.node_a, "bravo"), timeout=within, what="alpha direct to bravo")
        seen_b = p.node_b.wait(lambda: direct(p.node_b, "alpha"), timeout=within, what="bravo direct to alpha")
    assert time.monotonic() - first < within + 1
    return seen_a, seen_b


def test_both_behind_endpoint_independent_nat_go_direct(underlay: Underlay, tmp_path: Path) -> None:
    p = build(underlay, tmp_path, "masquerade", "masquerade")
    seen_a, seen_b = go_direct(p, within=5)
    # alpha reaches bravo at bravo's router's mapping (masquerade keeps the port), trusted after a pong.
    assert seen_a["endpoint"] == f"{p.public_b}:51820", seen_a
    assert seen_a["why"] is None and seen_a["latency_ms"] is not None
    assert any(c["endpoint"] == seen_a["endpoint"] and c["latency_ms"] is not None for c in seen_a["candidates"])
    relayed = p.node_a.counters()["magicsock"].get("relay_tx_datagrams", 0)
    assert_carried(iperf3(p.ns_a, p.ns_b, p.b.v4, seconds=3))
    assert direct(p.node_a, "bravo") and direct(p.node_b, "alpha")
    # The transfer went the direct way: the relay carried a handful of datagrams at most.
    assert p.node_a.counters()["magicsock"].get("relay_tx_datagrams", 0) - relayed < 50
    # `meshsup ping` with disco shows the path and the latency; with TSMP, an answer from inside the tunnel.
    out = p.node_a.cli("ping", "bravo", "--type", "disco", "-c", "2", "-i", "0.2").stdout
    assert out.count(f"direct {p.public_b}:51820 in ") == 2, out
    out = p.node_a.cli("ping", "bravo", "--type", "tsmp", "-c", "2", "-i", "0.2").stdout
    assert out.count("pong from bravo") == 2 and "in the tunnel" in out, out
    text = p.node_a.cli("status").stdout
    assert "direct" in text and "candidate" in text, text
    assert all(a["restarts"] == 0 for a in p.node_a.status()["actors"])


def test_a_transfer_begun_on_the_relay_moves_to_the_direct_path_unbroken(underlay: Underlay, tmp_path: Path) -> None:
    p = build(underlay, tmp_path, "masquerade", "masquerade")
    # The transfer's first packets go through the relay: no direct path exists yet.
    with carried_through(p.ns_a, p.ns_b, p.b.v4, seconds=8):
        p.node_a.wait(lambda: direct(p.node_a, "bravo"), timeout=8, what="direct during the transfer")
        relayed = p.node_a.counters()["magicsock"].get("relay_tx_datagrams", 0)
    assert relayed > 0 and direct(p.node_a, "bravo")


def test_a_path_that_answers_disco_but_carries_no_data_is_demoted(underlay: Underlay, tmp_path: Path) -> None:
    """tailscale#19457: a middlebox lets disco through but not WireGuard's data (here: an nft rule on
    the first byte of the UDP payload, 4 for transport data, in alpha's router)."""
    p = build(underlay, tmp_path, "masquerade", "masquerade")
    go_direct(p, within=5)
    p.lab.home_of(p.ns_a).router.run(
        "nft",
        "-f",
        "-",
        input=f"table ip nodata {{ chain pre {{ type filter hook prerouting priority raw; "
        f"ip saddr {p.public_b} meta l4proto udp @th,64,8 4 drop; "
        f"ip daddr {p.public_b} meta l4proto udp @th,64,8 4 drop; }}; }}\n",
    )
    cut = time.monotonic()

    def demoted() -> Any:
        seen = peer(p.node_a, "bravo")
        return seen["path"] == "relay" and "carried no data" in (seen["why"] or "") and seen

    with traffic(p.ns_a, p.b.v4, 30):
        seen = p.node_a.wait(demoted, timeout=25, what="demoted, saying why")
        assert time.monotonic() - cut < 15 + 5  # the stated bound (15 s of sending unanswered), and slack
        # Disco still answers on that path, and traffic flows through the relay.
        assert any(c["latency_ms"] is not None for c in seen["candidates"]), seen
        assert ping(p.ns_a, p.b.v4, count=2) and peer(p.node_a, "bravo")["path"] == "relay"
    assert "carried no data" in p.node_a.cli("status").stdout


def test_endpoint_dependent_nat_to_a_public_node_goes_direct(underlay: Underlay, tmp_path: Path) -> None:
    p = build(underlay, tmp_path, "random", "public")
    seen_a, seen_b = go_direct(p, within=5)
    assert seen_a["endpoint"] == f"{p.public_b}:51820", seen_a
    # bravo answers alpha where alpha's pings came from: a port alpha's NAT chose for bravo alone.
    host, port = seen_b["endpoint"].rsplit(":", 1)
    assert host == p.lab.home_of(p.ns_a).public and port != "51820", seen_b
    assert_carried(iperf3(p.ns_a, p.ns_b, p.b.v4, seconds=2))


def test_both_behind_endpoint_dependent_nat_stay_relayed_and_say_why(underlay: Underlay, tmp_path: Path) -> None:
    p = build(underlay, tmp_path, "random", "random", relays=2)  # two STUN servers: the mapping is seen to vary
    assert ping(p.ns_a, p.b.v4)

    def gave_reason() -> Any:
        seen = peer(p.node_a, "bravo")
        return seen["path"] == "relay" and "endpoint-dependent" in (seen["why"] or "") and seen

    with traffic(p.ns_a, p.b.v4, 12):
        seen = p.node_a.wait(gave_reason, timeout=15, what="relayed, saying why")
    assert "no pong from any of" in seen["why"] and seen["candidates"], seen
    assert p.node_a.status()["disco"]["mapping_varies"] is True
    assert ping(p.ns_a, p.b.v4, count=3) and peer(p.node_a, "bravo")["path"] == "relay"
    assert "relayed: " in p.node_a.cli("status").stdout
    out = p.node_a.cli("ping", "bravo", "--type", "disco", "-c", "1").stdout
    assert "via relay r" in out, out


def test_a_blackholed_direct_path_falls_back_to_the_relay_and_comes_back(underlay: Underlay, tmp_path: Path) -> None:
    p = build(underlay, tmp_path, "masquerade", "masquerade")
    go_direct(p, within=5)
    with carried_through(p.ns_a, p.ns_b, p.b.v4, seconds=16):  # the TCP stream must live through the move
        time.sleep(2)
        p.lab.blackhole(p.ns_a, p.public_b)
        cut = time.monotonic()
        p.node_a.wait(lambda: peer(p.node_a, "bravo")["path"] == "relay", timeout=10, what="alpha on the relay")
        p.node_b.wait(lambda: peer(p.node_b, "alpha")["path"] == "relay", timeout=12 - (time.monotonic() - cut))
        assert time.monotonic() - cut < 12
    assert sum(p.lab.blackholed(p.ns_a, p.public_b)) > 0
    p.lab.unblackhole(p.ns_a, p.public_b)
    healed = time.monotonic()
    with traffic(p.ns_a, p.b.v4, 75, interval=0.5):
        p.node_a.wait(lambda: direct(p.node_a, "bravo"), timeout=70, what="back on the direct path")
    assert time.monotonic() - healed < 70


def test_flushed_nat_mappings_recover(underlay: Underlay, tmp_path: Path) -> None:
    p = build(underlay, tmp_path, "masquerade", "masquerade")
    go_direct(p, within=5)
    p.lab.flush_nat(p.ns_a)
    p.lab.flush_nat(p.ns_b)
    assert ping(p.ns_a, p.b.v4, count=3, timeout=15) and ping(p.ns_b, p.a.v4, count=3, timeout=15)
    go_direct(p, within=70)


def test_a_moved_underlay_address_keeps_the_transfer(underlay: Underlay, tmp_path: Path) -> None:
    p = build(underlay, tmp_path, "masquerade", "masquerade")
    go_direct(p, within=5)
    with carried_through(p.ns_a, p.ns_b, p.b.v4, seconds=12):
        time.sleep(2)
        new = p.lab.renumber(p.ns_a)
    p.node_a.wait(lambda: new in str(p.node_a.status()["disco"]["endpoints"]), what="the new address an endpoint")
    go_direct(p, within=20)


def test_a_wireguard_go_peer_beside_disco_peers(underlay: Underlay, tmp_path: Path) -> None:
    lab = NatLab(underlay)
    relay_ns, relay_addr = lab.public()
    start_relay(underlay, tmp_path, relay_ns, relay_addr)
    (ns_a, _, _), (ns_b, _, _) = lab.home(), lab.home()
    ns_c, addr_c = lab.public()
    a, b, c = Identity("alpha", 1), Identity("bravo", 2), Identity("charlie", 3)
    c.endpoint = f"{addr_c}:51820"
    node_a = start_meshsup(underlay, tmp_path, a, [b, c], ns=ns_a, extra=relays_stanza(relay_addr))
    node_b = start_meshsup(underlay, tmp_path, b, [a], ns=ns_b, extra=relays_stanza(relay_addr))
    start_wg(underlay, tmp_path, ns_c, c, [a])
    node_a.wait(lambda: relay_up(node_a), what="relay")
    node_b.wait(lambda: relay_up(node_b), what="relay")
    go_direct(Pair(lab, ns_a, ns_b, a, b, node_a, node_b, ""), within=5)
    assert ping(ns_a, c.v4) and ping(ns_c, a.v4)
    charlie = peer(node_a, "charlie")
    # No disco for it: reached at its configured endpoint, no candidates, never relayed.
    assert (charlie["path"], charlie["endpoint"], charlie["candidates"]) == ("direct", c.endpoint, []), charlie
    assert_carried(iperf3(ns_a, ns_c, c.v4, seconds=2))


FORGE = """
import os, socket, sys
from meshsup.actors.wire import disco
host, port, ours, theirs, count = sys.argv[1:]
ours, theirs = bytes.fromhex(ours), bytes.fromhex(theirs)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
as_peer = disco.SharedKey(ours, theirs)
stranger = disco.SharedKey(os.urandom(32), theirs)
public = as_peer.public
sends = [
    stranger.seal(disco.Ping(os.urandom(12))),  # a key bound to no peer
    disco.MAGIC + public + os.urandom(24 + 40),  # the peer's key, a box that does not open
    as_peer.seal(disco.Pong(os.urandom(12), ("203.0.113.250", 9))),  # a pong for no ping we sent
    as_peer.seal(disco.CallMeMaybe((("203.0.113.250", 9),))),  # call-me-maybe, not through the relay
]
for data in sends:
    s.sendto(data, (host, int(port)))
for _ in range(int(count)):
    s.sendto(disco.MAGIC + os.urandom(32 + 24 + 40), (host, int(port)))
print("sent", flush=True)
"""


def test_forged_and_stray_disco_is_counted_and_moves_nothing(underlay: Underlay, tmp_path: Path) -> None:
    p = build(underlay, tmp_path, "masquerade", "public")
    seen_a, seen_b = go_direct(p, within=5)
    stranger, _ = p.lab.public()
    alpha_disco = keys.load_or_create_disco(p.node_a.state_dir)  # the forger holds alpha's disco key
    bravo_disco = keys.parse_key(p.node_b.status()["disco"]["public_key"])
    before = p.node_b.status()["disco"]["counters"]
    forger = stranger.popen(
        sys.executable,
        "-c",
        FORGE,
        p.public_b,
        "51820",
        alpha_disco.hex(),
        bravo_disco.hex(),
        "10000",
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert forger.stdout is not None and forger.stdout.readline() == "sent\n"
    forger.wait()

    def counted() -> Any:
        c = p.node_b.status()["disco"]["counters"]
        grew = {k: c.get(k, 0) - before.get(k, 0) for k in c}
        return (
            grew.get("unknown_sender", 0) >= 9000  # some of 10,001 may be lost on the way
            and grew.get("bad_box", 0) >= 1
            and grew.get("unknown_txid", 0) >= 1
            and grew.get("call_me_maybe_not_via_relay", 0) >= 1
            and grew
        )

    p.node_b.wait(counted, what="each forgery counted")
    after = peer(p.node_b, "alpha")
    assert after["endpoint"] == seen_b["endpoint"] and after["path"] == "direct", after
    assert all("203.0.113.250" not in c["endpoint"] for c in after["candidates"]), after
    assert all(a["restarts"] == 0 for a in p.node_b.status()["actors"])
    assert ping(p.ns_a, p.b.v4)

"""Test hosts in network namespaces on one underlay, with meshsup nodes and wireguard-go peers.

The lab itself lives in supervisor/lab.py (`meshsup demo` uses it too); this
module keeps the names the tests import, and the few set-ups many tests share.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from meshsup.supervisor.lab import Identity, Netns, Node, Underlay, WgGo, have, iperf3, meshsup_config, ping, ping_rtt

__all__ = [
    "Identity",
    "Netns",
    "Node",
    "Underlay",
    "WgGo",
    "assert_carried",
    "have",
    "iperf3",
    "meshsup_config",
    "ping",
    "ping_rtt",
    "readdress",
    "received_from",
    "start_meshsup",
    "start_wg",
    "pair",
    "unanswered",
]


def readdress(underlay: Underlay, ns: Netns, old: str, ifname: str = "eth0") -> str:
    """Move a host to a new underlay address (roaming); returns the new address."""
    new = f"198.51.100.{underlay.next_host}"
    underlay.next_host += 1
    ns.run("ip", "addr", "del", f"{old}/24", "dev", ifname)
    ns.run("ip", "addr", "add", f"{new}/24", "dev", ifname)
    return new


def start_meshsup(
    u: Underlay,
    tmp: Path,
    ident: Identity,
    peers: list[Identity],
    *args: str,
    ns: Netns | None = None,
    env: dict[str, str] | None = None,
    extra: str = "",
) -> Node:
    """A meshsup node for `ident` with `peers`, in `ns`, ready."""
    node = u.track(Node(tmp, "--config", str(meshsup_config(tmp, ident, peers, extra=extra)), *args, netns=ns, env=env))
    node.wait_ready()
    return node


def start_wg(u: Underlay, tmp: Path, ns: Netns, ident: Identity, peers: list[Identity], keepalive: int = 0) -> WgGo:
    """wireguard-go for `ident` with `peers`, in `ns`."""
    wg = u.track(WgGo(ns, ident, tmp))
    for p in peers:
        wg.add_peer(p, keepalive)
    return wg


def pair(
    u: Underlay, tmp: Path, second: str
) -> tuple[tuple[Netns, Identity, Node], tuple[Netns, Identity, Node | WgGo]]:
    """alpha is meshsup; bravo is wireguard-go or meshsup; each on its own host."""
    (ns_a, addr_a), (ns_b, addr_b) = u.host(), u.host()
    a, b = Identity("alpha", 1), Identity("bravo", 2)
    a.endpoint, b.endpoint = f"{addr_a}:51820", f"{addr_b}:51820"
    node_a = start_meshsup(u, tmp, a, [b], ns=ns_a)
    peer_b = start_wg(u, tmp, ns_b, b, [a]) if second == "wireguard-go" else start_meshsup(u, tmp, b, [a], ns=ns_b)
    return (ns_a, a, node_a), (ns_b, b, peer_b)


def received_from(wg: WgGo, sender: Identity) -> int:
    """Bytes wireguard-go says it received from ``sender`` (0 before any handshake)."""
    for line in wg.show().splitlines()[1:]:
        fields = line.split("\t")
        if fields[0] == sender.public:
            return int(fields[5])
    raise KeyError(sender.name)


def unanswered(ns: Netns, addr: str, received: Callable[[], int]) -> bool:
    """No echo request from ``ns`` to ``addr`` is answered and ``received``, a WireGuard rx counter
    that the exchange would move, stays put: a request that got through, or a reply that is merely
    late, fails this where a bare ping would pass."""
    before = received()
    return not ping(ns, addr, count=2, timeout=3) and received() == before


def assert_carried(result: dict[str, Any]) -> None:
    """An iperf3 transfer ended as iperf3 ends one, its figures sent over the tunnel, and the receiver
    got data: a connection that broke, or a run that never returned (no figures), fails. Stalls and
    speed are for the benchmarks."""
    assert "error" not in result, result.get("error")
    assert result.get("end", {}).get("sum_received", {}).get("bytes", 0) > 0, result

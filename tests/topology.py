"""Test hosts in network namespaces on one underlay, with meshsup nodes and wireguard-go peers.

The lab itself lives in supervisor/lab.py (`meshsup demo` uses it too); this
module keeps the names the tests import.
"""
from __future__ import annotations

from supervisor.lab import (Identity, Netns, Node, Underlay, WgGo, have, iperf3, meshsup_config, ping,
                            ping_rtt, stalled_intervals)

__all__ = ["Identity", "Netns", "Node", "Underlay", "WgGo", "have", "iperf3", "meshsup_config", "ping",
           "ping_rtt", "readdress", "stalled_intervals"]


def readdress(underlay: Underlay, ns: Netns, old: str, ifname: str = "eth0") -> str:
    """Move a host to a new underlay address (roaming); returns the new address."""
    new = f"198.51.100.{underlay.next_host}"
    underlay.next_host += 1
    ns.run("ip", "addr", "del", f"{old}/24", "dev", ifname)
    ns.run("ip", "addr", "add", f"{new}/24", "dev", ifname)
    return new

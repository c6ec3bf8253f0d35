"""Tunnel figures: iperf3 TCP and ping RTT for meshsup and wireguard-go, in one run.

Run as root: .venv/bin/python tests/bench/bench_dataplane.py [--seconds 5]
Every pair uses the same veth/bridge underlay; ratios are against
wireguard-go <-> wireguard-go measured in the same run.
"""
from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.nodes import Node  # noqa: E402
from tests.topology import Identity, Underlay, WgGo, iperf3, meshsup_config, ping  # noqa: E402


def run_pair(kinds: tuple[str, str], seconds: int, tmp: Path) -> tuple[float, float, float]:
    u = Underlay()
    try:
        hosts = [u.host(), u.host()]
        ids = [Identity("alpha", 1), Identity("bravo", 2)]
        for ident, (_, addr) in zip(ids, hosts):
            ident.endpoint = f"{addr}:51820"
        for i, kind in enumerate(kinds):
            ns, me, other = hosts[i][0], ids[i], ids[1 - i]
            if kind == "wireguard-go":
                wg = u.track(WgGo(ns, me, tmp))
                wg.add_peer(other)
            else:
                node = u.track(Node(tmp, "--config", str(meshsup_config(tmp, me, [other])), netns=ns,
                                    faults=False))
                node.wait_ready()
        (ns_a, _), (ns_b, _) = hosts
        ping(ns_a, ids[1].v4)
        out = ns_a.run("ping", "-c", "20", "-i", "0.05", ids[1].v4, check=False).stdout
        rtt = float(re.search(r"= [\d.]+/([\d.]+)/", out).group(1)) if "/" in out else float("nan")
        fwd = iperf3(ns_a, ns_b, ids[1].v4, seconds=seconds)["end"]["sum_received"]["bits_per_second"]
        rev = iperf3(ns_a, ns_b, ids[1].v4, seconds=seconds, reverse=True)["end"]["sum_received"]["bits_per_second"]
        return fwd / 1e6, rev / 1e6, rtt
    finally:
        u.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=5)
    args = ap.parse_args()
    pairs = [("wireguard-go", "wireguard-go"), ("meshsup", "wireguard-go"), ("meshsup", "meshsup")]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for pair in pairs:
            results[pair] = run_pair(pair, args.seconds, Path(tmp))
    base_fwd, base_rev, base_rtt = results[pairs[0]]
    for (a, b), (fwd, rev, rtt) in results.items():
        print(f"{a:>12} -> {b:<12} {fwd:7.0f} Mbit/s ({fwd / base_fwd:.2f}x)   "
              f"{b:>12} -> {a:<12} {rev:7.0f} Mbit/s ({rev / base_rev:.2f}x)   "
              f"ping RTT {rtt:.3f} ms ({rtt / base_rtt:.2f}x)")


if __name__ == "__main__":
    main()

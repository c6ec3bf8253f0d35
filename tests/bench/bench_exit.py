"""iperf3 TCP through an exit node to the internet behind it, against iperf3 to the exit node itself.

Run as root: .venv/bin/python tests/bench/bench_exit.py [--seconds 5] [--rounds 3]

The namespaces of tests.topology.ExitLab: a client whose default route goes
through its exit node, and an "internet" namespace on 203.0.113.0/24 behind
the exit. The same client and exit run both measurements, alternating (exit
node itself, internet, exit node, internet, ...) so that the machine's other
load falls on both alike: to the exit node's mesh address the tunnel ends in
the exit node; to the internet host the exit node also forwards and
masquerades every packet. Prints Mbit/s both ways per target (medians) and
the ratio internet / exit node (the issue's target: >= 0.8).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.topology import ExitLab, Underlay, iperf3, ping  # noqa: E402


def mbit(result: dict) -> float:
    if "error" in result:
        raise SystemExit(f"iperf3 failed: {result['error']}")
    return result["end"]["sum_received"]["bits_per_second"] / 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    opts = ap.parse_args()
    u = Underlay()
    try:
        lab = ExitLab(u, Path(tempfile.mkdtemp(prefix="bench-exit-")))
        lab.start_exit()
        lab.start_client()
        targets = {"exit node": (lab.exit_ns, lab.exit.v4), "internet": (lab.internet, ExitLab.INTERNET_HOST)}
        for _, addr in targets.values():
            assert ping(lab.client_ns, addr), f"{addr} answers through the tunnel"
        figures: dict[str, dict[str, list[float]]] = {t: {"up": [], "down": []} for t in targets}
        for _ in range(opts.rounds):
            for target, (server, addr) in targets.items():
                figures[target]["up"].append(mbit(iperf3(lab.client_ns, server, addr, seconds=opts.seconds)))
                figures[target]["down"].append(
                    mbit(iperf3(lab.client_ns, server, addr, seconds=opts.seconds, reverse=True))
                )
        print(f"iperf3 TCP, {opts.seconds} s x {opts.rounds} rounds, medians; client -> exit node (-> internet)")
        for way, label in (("up", "client -> target"), ("down", "target -> client")):
            own, out = (statistics.median(figures[t][way]) for t in targets)
            print(f"  {label}: exit node {own:.0f} Mbit/s, internet {out:.0f} Mbit/s, ratio {out / own:.2f}")
    finally:
        u.close()


if __name__ == "__main__":
    main()

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

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.bench.iperf_rounds import medians_in_turn, options  # noqa: E402
from tests.topology import ExitLab, Underlay, ping  # noqa: E402


def main() -> None:
    opts = options(__doc__, rounds=3)
    u = Underlay()
    try:
        lab = ExitLab(u, Path(tempfile.mkdtemp(prefix="bench-exit-")))
        lab.start_exit()
        lab.start_client()
        targets = {"exit node": (lab.exit_ns, lab.exit.v4), "internet": (lab.internet, ExitLab.INTERNET_HOST)}
        for _, addr in targets.values():
            assert ping(lab.client_ns, addr), f"{addr} answers through the tunnel"
        medians = medians_in_turn(list(targets), opts.rounds, opts.seconds, lambda t: (lab.client_ns, *targets[t]))
        print(f"iperf3 TCP, {opts.seconds} s x {opts.rounds} rounds, medians; client -> exit node (-> internet)")
        for way, label in enumerate(("client -> target", "target -> client")):
            own, out = (medians[t][way] for t in targets)
            print(f"  {label}: exit node {own:.0f} Mbit/s, internet {out:.0f} Mbit/s, ratio {out / own:.2f}")
    finally:
        u.close()


if __name__ == "__main__":
    main()

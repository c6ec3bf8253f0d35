"""iperf3 TCP through the packet filter: no filter against 1,000 rules, the flow accepted by the last.

Run as root: .venv/bin/python tests/bench/bench_filter.py [--seconds 5] [--rounds 2]

Two meshsup nodes on one underlay; bravo, the iperf3 server, filters. The
same pair runs every measurement, the config switched by `meshsup reload`,
alternating (none, rules, none, rules, ...) so that the machine's other load
falls on both alike. The 999 rules before the last accept TCP to the same
ports from other sources, so a flow's first packet walks all of them; the
rest of the flow is the connection table's. Prints Mbit/s both ways per
setting (medians) and the ratio rules / none (the issue's target: >= 0.9).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.topology import Identity, Underlay, iperf3, ping, start_meshsup  # noqa: E402

RULES = 1000


def rules_toml() -> str:
    lines = ['\n[filter]\ndefault = "deny"\n']
    for i in range(RULES - 1):
        lines.append(
            f'[[filter.rules]]\naction = "accept"\nsrc = ["10.{i // 256}.{i % 256}.0/24"]\n'
            f'dst = ["*:5000-6000"]\nproto = "tcp"\n'
        )
    lines.append('[[filter.rules]]\naction = "accept"\nsrc = ["alpha"]\ndst = ["bravo:5000-6000"]\nproto = "tcp"\n')
    lines.append('[[filter.rules]]\naction = "accept"\nsrc = ["alpha"]\ndst = ["bravo:*"]\nproto = "icmp"\n')
    return "".join(lines)


def mbit(result: dict) -> float:
    if "error" in result:
        raise SystemExit(f"iperf3 failed: {result['error']}")
    return result["end"]["sum_received"]["bits_per_second"] / 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2)
    opts = ap.parse_args()
    u = Underlay()
    try:
        tmp = Path(tempfile.mkdtemp(prefix="bench-filter-"))
        (ns_a, addr_a), (ns_b, addr_b) = u.host(), u.host()
        a, b = Identity("alpha", 1), Identity("bravo", 2)
        a.endpoint, b.endpoint = f"{addr_a}:51820", f"{addr_b}:51820"
        start_meshsup(u, tmp, a, [b], ns=ns_a)
        bravo = start_meshsup(u, tmp, b, [a], ns=ns_b)
        args = bravo.proc.args
        config = Path(args[args.index("--config") + 1])
        plain = config.read_text()
        figures: dict[str, dict[str, list[float]]] = {"none": {"in": [], "out": []}, "rules": {"in": [], "out": []}}
        for _ in range(opts.rounds):
            for setting in ("none", "rules"):
                config.write_text(plain + (rules_toml() if setting == "rules" else ""))
                bravo.cli("reload")
                assert ping(ns_a, b.v4), "the tunnel is up and the filter lets ping through"
                figures[setting]["in"].append(mbit(iperf3(ns_a, ns_b, b.v4, seconds=opts.seconds)))
                figures[setting]["out"].append(mbit(iperf3(ns_a, ns_b, b.v4, seconds=opts.seconds, reverse=True)))
        hits = bravo.status()["filter"]["rules"][RULES - 1]["hits"]
        print(f"iperf3 TCP, {opts.seconds} s x {opts.rounds} rounds, medians; bravo filters ({RULES} rules)")
        for way, label in (("in", "alpha -> bravo (into the filter)"), ("out", "bravo -> alpha (out of it)")):
            none, rules = (statistics.median(figures[s][way]) for s in ("none", "rules"))
            print(f"  {label}: none {none:.0f} Mbit/s, rules {rules:.0f} Mbit/s, ratio {rules / none:.2f}")
        print(f"  last rule's hits (flows it accepted): {hits}")
    finally:
        u.close()


if __name__ == "__main__":
    main()

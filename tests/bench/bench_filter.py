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

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.bench.iperf_rounds import medians_in_turn, options  # noqa: E402
from tests.topology import Netns, Underlay, alpha_and_bravo, config_path, filter_stanza, ping, start_meshsup  # noqa: E402

RULES = 1000


def rules_toml() -> str:
    """RULES rules, the last but one accepting alpha's TCP: a flow's first packet walks them all."""
    others = [("accept", [f"10.{i // 256}.{i % 256}.0/24"], ["*:5000-6000"], "tcp") for i in range(RULES - 1)]
    return filter_stanza(
        *others, ("accept", ["alpha"], ["bravo:5000-6000"], "tcp"), ("accept", ["alpha"], ["bravo:*"], "icmp")
    )


def main() -> None:
    opts = options(__doc__, rounds=2)
    u = Underlay()
    try:
        tmp = Path(tempfile.mkdtemp(prefix="bench-filter-"))
        (ns_a, a), (ns_b, b) = alpha_and_bravo(u)
        start_meshsup(u, tmp, a, [b], ns=ns_a)
        bravo = start_meshsup(u, tmp, b, [a], ns=ns_b)
        config = config_path(bravo)
        plain = config.read_text()

        def switch(setting: str) -> tuple[Netns, Netns, str]:
            config.write_text(plain + (rules_toml() if setting == "rules" else ""))
            bravo.cli("reload")
            assert ping(ns_a, b.v4), "the tunnel is up and the filter lets ping through"
            return ns_a, ns_b, b.v4

        medians = medians_in_turn(["none", "rules"], opts.rounds, opts.seconds, switch)
        hits = bravo.status()["filter"]["rules"][RULES - 1]["hits"]
        print(f"iperf3 TCP, {opts.seconds} s x {opts.rounds} rounds, medians; bravo filters ({RULES} rules)")
        for way, label in enumerate(("alpha -> bravo (into the filter)", "bravo -> alpha (out of it)")):
            none, rules = medians["none"][way], medians["rules"][way]
            print(f"  {label}: none {none:.0f} Mbit/s, rules {rules:.0f} Mbit/s, ratio {rules / none:.2f}")
        print(f"  last rule's hits (flows it accepted): {hits}")
    finally:
        u.close()


if __name__ == "__main__":
    main()

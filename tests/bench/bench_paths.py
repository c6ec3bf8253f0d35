"""Direct-path figures: time to a trusted direct path through NAT, TCP on that path against configured
endpoints, and what disco and STUN cost with many idle peers.

Run as root: .venv/bin/python tests/bench/bench_paths.py [--runs 10] [--seconds 5] [--idle 1000 --idle-seconds 60]

1. For each NAT kind (both nodes behind endpoint-independent NAT; one behind
   endpoint-dependent NAT and the other public), --runs fresh pairs in
   network namespaces (NatLab, a relay on the segment, no endpoints
   configured): from the first packet (a ping sent the moment both nodes are
   up and logged in to the relay) to both sides' status saying "direct".
   Prints the median and the worst.
2. iperf3 TCP for --seconds between a pair that found its direct path
   through NAT, and between two nodes with configured endpoints on the
   segment, alternating, three times each: Mbit/s and the ratio.
3. A node with --idle peers configured (silent ones, at endpoints nobody holds; a relay):
   magicsock's and the crypto workers' CPU seconds over --idle-seconds, as
   seconds per minute.

Other load on the machine moves every figure.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.actors.magicsock.test_disco_nat import build, direct  # noqa: E402
from tests.bench.bench_peers import peers_toml  # noqa: E402
from tests.bench.bench_relay import cpu_seconds  # noqa: E402
from tests.topology import (  # noqa: E402
    RELAY_PORT,
    Identity,
    NatLab,
    Node,
    Underlay,
    iperf3,
    ping,
    relay_up,
    relays_stanza,
    start_meshsup,
)


def time_to_direct(tmp: Path, nat_a: str, nat_b: str) -> float:
    tmp.mkdir()
    u = Underlay()
    try:
        p = build(u, tmp, nat_a, nat_b)
        first = time.monotonic()
        pinger = p.ns_a.popen("ping", "-q", "-i", "0.2", "-w", "30", p.b.v4, stdout=subprocess.DEVNULL)
        try:
            while not (direct(p.node_a, "bravo") and direct(p.node_b, "alpha")):
                if time.monotonic() - first > 30:
                    return float("inf")
                time.sleep(0.05)
            return time.monotonic() - first
        finally:
            pinger.kill()
            pinger.wait()
    finally:
        u.close()


def mbits(result: dict) -> float:
    return result["end"]["sum_received"]["bits_per_second"] / 1e6


def throughput(tmp: Path, seconds: int) -> None:
    u = Underlay()
    try:
        nat = build(u, tmp, "masquerade", "masquerade")
        assert ping(nat.ns_a, nat.b.v4)
        nat.node_a.wait(lambda: direct(nat.node_a, "bravo"), timeout=30, what="direct")
        (ns_c, addr_c), (ns_d, addr_d) = nat.lab.public(), nat.lab.public()  # one lab: addresses unique
        c, d = Identity("charlie", 3), Identity("delta", 4)
        c.endpoint, d.endpoint = f"{addr_c}:51820", f"{addr_d}:51820"
        start_meshsup(u, tmp, c, [d], ns=ns_c)
        start_meshsup(u, tmp, d, [c], ns=ns_d)
        assert ping(ns_c, d.v4)
        through_nat, configured = [], []
        for _ in range(3):
            through_nat.append(mbits(iperf3(nat.ns_a, nat.ns_b, nat.b.v4, seconds=seconds)))
            configured.append(mbits(iperf3(ns_c, ns_d, d.v4, seconds=seconds)))
        a, b = statistics.median(through_nat), statistics.median(configured)
        print(f"iperf3 TCP, median of 3 x {seconds} s:")
        print(
            f"  direct path found through NAT   {a:8.0f} Mbit/s  (runs: {', '.join(f'{x:.0f}' for x in through_nat)})"
        )
        print(f"  configured endpoints, no NAT    {b:8.0f} Mbit/s  (runs: {', '.join(f'{x:.0f}' for x in configured)})")
        print(f"  ratio                           {a / b:8.2f}x")
        print(f"  still direct afterwards: {bool(direct(nat.node_a, 'bravo'))}")
    finally:
        u.close()


def idle_cost(tmp: Path, n: int, seconds: float) -> None:
    u = Underlay()
    try:
        lab = NatLab(u)
        relay_ns, relay_addr = lab.public()
        relay = u.track(Node(tmp, "--listen", f"{relay_addr}:{RELAY_PORT}", netns=relay_ns, command="relay"))
        relay.wait(lambda: relay.status()["relay"]["ready"], what="relay ready")
        ns, _, _ = lab.home()
        stanzas, _ = peers_toml(n)
        config = tmp / "idle.toml"
        config.write_text('[node]\nname = "idle"\n' + relays_stanza(relay_addr) + stanzas)
        node = u.track(Node(tmp, "--config", str(config), netns=ns))
        node.wait_ready(timeout=120)
        node.wait(lambda: relay_up(node), what="relay up")
        time.sleep(3)  # past start-up's own work
        watched = {a["name"]: a["pid"] for a in node.status()["actors"] if a["kind"] in ("magicsock", "crypto")}
        before = {k: cpu_seconds([pid]) for k, pid in watched.items()}
        time.sleep(seconds)
        after = {k: cpu_seconds([pid]) for k, pid in watched.items()}
        status = node.status()
        print(f"{n} idle peers, {seconds:.0f} s:")
        for k in sorted(watched):
            print(f"  {k:<12} {(after[k] - before[k]) * 60 / seconds:6.2f} CPU s/min")
        print(f"  disco: {status['disco'].get('counters', {})}")
    finally:
        u.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--idle", type=int, default=1000)
    parser.add_argument("--idle-seconds", type=float, default=60)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for nat_a, nat_b, label in (
            ("masquerade", "masquerade", "both behind endpoint-independent NAT"),
            ("random", "public", "endpoint-dependent NAT to a public node"),
        ):
            times = []
            for i in range(args.runs):
                times.append(time_to_direct(Path(tmp) / f"{nat_a}-{i}", nat_a, nat_b))
            print(
                f"time to direct, {label}: median {statistics.median(times):.2f} s, worst {max(times):.2f} s "
                f"({args.runs} runs: {', '.join(f'{t:.2f}' for t in times)})",
                flush=True,
            )
        throughput(Path(tmp), args.seconds)
        idle_cost(Path(tmp), args.idle, args.idle_seconds)


if __name__ == "__main__":
    main()

"""The cost of DNS interception: dnsperf through interception against the same
controller asked straight, in one run.

Run as root: .venv/bin/python tests/bench/bench_intercept.py [--seconds 5] [--rounds 3]

A client namespace is routed through a node namespace over a veth pair, as a
LAN behind a node that routes for it. The node's controller listens on its
LAN address, and intercepts DNS coming in on the LAN interface
(`[dns] intercept`). dnsperf in the client asks either the controller's
address (straight) or 203.0.113.53, where nothing listens: the node's ingress
program hands those queries to the controller's interception socket, and the
answers come back from 203.0.113.53. The two take turns, round after round,
over the same link to the same worker, so the difference is interception's:
the eBPF program, the policy-routed local delivery, and the interception
socket's per-datagram receive and send (it needs each query's destination,
where the straight listener reads and sends batches). Workloads as
bench_dns: mesh names answered locally, and forwarded names in the cache.
"""

from __future__ import annotations

import argparse
import secrets
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.bench.bench_dns import (  # noqa: E402
    CLIENTS,
    OUTSTANDING,
    Figures,
    Server,
    dns_workers,
    dnsperf,
    median,
    workloads,
)
from tests.dns_fixtures import Dnsmasq, node_config, start_dnsmasq  # noqa: E402
from tests.nodes import Netns, Node  # noqa: E402
from tests.topology import Identity  # noqa: E402

PEERS = 50
NODE_LAN, CLIENT = "198.51.100.1", "198.51.100.2"
INTERCEPTED = "203.0.113.53"


def link(node: Netns, client: Netns) -> str:
    """The veth pair between them, the client routed through the node; the node's end's name."""
    tag = secrets.token_hex(3)
    lan, far = f"bil{tag}", f"bic{tag}"
    subprocess.run(
        ["ip", "link", "add", lan, "netns", node.name, "type", "veth", "peer", "name", far, "netns", client.name],
        check=True,
    )
    for ns, name, address in ((node, lan, NODE_LAN), (client, far, CLIENT)):
        ns.run("ip", "addr", "add", f"{address}/24", "dev", name)
        ns.run("ip", "link", "set", name, "up")
    client.run("ip", "route", "add", "default", "via", NODE_LAN)
    node.run("ip", "route", "add", "blackhole", "203.0.113.0/24")  # nothing intercepted leaves the node
    return lan


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    node_ns, client = Netns("bin"), Netns("bic")
    results: dict[str, dict[str, list[Figures]]] = {}
    processes: list[Dnsmasq | Node] = []
    try:
        with tempfile.TemporaryDirectory() as tmp_name:
            tmp = Path(tmp_name)
            lan = link(node_ns, client)
            peers = [Identity(f"peer{i}", i + 2) for i in range(PEERS)]
            upstream = start_dnsmasq(
                tmp, ["--address=/example.test/203.0.113.7"], ttl=3600, name="upstream", ns=node_ns, log_queries=False
            )
            processes.append(upstream)
            config = node_config(
                tmp,
                Identity("alpha", 1),
                peers,
                {
                    "listen": [f"{NODE_LAN}:53"],
                    "upstreams": [f"udp://{upstream.host}:{upstream.port}"],
                    "allow": ["198.51.100.0/24"],
                    "rate_limit": 0,  # one client asking fast: not a flood to limit here
                    "intercept": [lan],
                },
            )
            node = Node(tmp, "--config", str(config), "--dns-workers", "1", netns=node_ns, faults=False)
            processes.append(node)
            node.wait_ready()
            servers = [
                Server("straight", NODE_LAN, 53, lambda: dns_workers(node)),
                Server("intercepted", INTERCEPTED, 53, lambda: dns_workers(node)),
            ]
            names = workloads(peers)
            for server in servers:
                dnsperf(client, server, names["cached"], tmp, args.seconds, passes=3)  # warm the cache
            for round_ in range(args.rounds):
                for server in servers if round_ % 2 == 0 else servers[::-1]:
                    for workload in ("local", "cached"):
                        figures = dnsperf(client, server, names[workload], tmp, args.seconds)
                        results.setdefault(server.name, {}).setdefault(workload, []).append(figures)
            intercepted = node.counters()["dns"].get("intercepted_udp", 0)
    finally:
        for process in reversed(processes):
            process.close() if isinstance(process, Node) else process.stop()
        client.close()
        node_ns.close()

    print(
        f"dnsperf from a client behind the node, 1 dns worker, {CLIENTS} clients, {OUTSTANDING} outstanding, "
        f"{args.seconds:g} s per run, medians of {args.rounds} rounds; {intercepted} queries intercepted. "
        "Ratios against straight: q/s, and CPU per query (straight's over intercepted's)"
    )
    for workload in ("local", "cached"):
        base = median(results["straight"][workload])
        for name in ("straight", "intercepted"):
            runs = results[name][workload]
            f = median(runs)
            print(
                f"{name:>12}  {workload:<6} {f}  {f.qps / base.qps:5.2f}x q/s  {base.cpu_us / f.cpu_us:5.2f}x CPU  "
                f"(q/s {min(r.qps for r in runs):.0f}..{max(r.qps for r in runs):.0f})"
            )


if __name__ == "__main__":
    main()

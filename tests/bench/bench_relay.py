"""Relay forwarding figures: DERP packets between two clients on the same worker and on two workers;
relayed TCP between two meshsup nodes against their direct path; a relay holding idle clients.

Run: .venv/bin/python tests/bench/bench_relay.py [--seconds 4] [--size 1400] [--idle 1000 --idle-seconds 60]
     [--idle-ping 15] [--nodes --node-seconds 8] (--nodes: as root)

Starts `meshsup relay --relay-workers 2` on loopback. For each pairing, one
client sends SendPacket frames of --size bytes as fast as TCP lets it, the
other counts what arrives. Prints the delivered rate, packets a second, the
relay workers' CPU seconds per GB delivered, and for the cross-worker pair
how many packets each bus message between the workers carried (the batching
that keeps the hop from costing a syscall per packet). With --idle N, then
N idle clients stay logged in for --idle-seconds: the workers' RSS before and
with them, and their CPU seconds per minute (--idle-ping S: each client sends a
Ping every S seconds, as a node's magicsock does to measure latency).

With --nodes (as root, in network namespaces on one underlay): two meshsup
nodes carry iperf3 TCP both ways over their direct path (endpoints
configured), then two others with no endpoints carry it through `meshsup
relay`, with 1 relay worker and then 2 (the nodes' connections on different
workers). For each: Mbit/s, the share of the direct path's rate, the
relay's CPU seconds per GB carried and the nodes'. Other load on the
machine moves every figure.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from meshsup.actors.wire import derp  # noqa: E402
from tests.actors.relay.test_node import Relay, on_two_workers  # noqa: E402
from tests.derp_client import DerpClient  # noqa: E402
from tests.topology import Identity, Netns, Node, Underlay, iperf3, meshsup_config, ping  # noqa: E402


def cpu_seconds(pids: list[int]) -> float:
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / tick


def run(relay: Relay, a: DerpClient, b: DerpClient, seconds: float, size: int) -> dict[str, float]:
    block = derp.send_packet(b.public, bytes(size)) * max(1, 60_000 // (size + 37))
    frame_len = size + 37
    received = [0]
    stop = threading.Event()

    def receive() -> None:
        buf = bytearray(1 << 20)
        b.sock.settimeout(0.5)
        while not stop.is_set():
            try:
                received[0] += b.sock.recv_into(buf)
            except TimeoutError:
                continue

    pids = [x["pid"] for x in relay.status()["actors"]]
    before = relay.status()["counters"]
    reader = threading.Thread(target=receive)
    reader.start()
    cpu0, t0 = cpu_seconds(pids), time.monotonic()
    while time.monotonic() - t0 < seconds:
        a.sock.sendall(block)
    time.sleep(0.5)  # let the queues drain before counting
    stop.set()
    reader.join()
    elapsed, cpu = time.monotonic() - t0, cpu_seconds(pids) - cpu0
    after = relay.status()["counters"]
    packets = received[0] / frame_len
    crossed = after.get("packets_to_workers", 0) - before.get("packets_to_workers", 0)
    batches = after.get("batches_to_workers", 0) - before.get("batches_to_workers", 0)
    return {
        "mbit_s": received[0] * 8 / elapsed / 1e6,
        "kpps": packets / elapsed / 1e3,
        "cpu_s_per_gb": cpu / (received[0] / 1e9) if received[0] else float("nan"),
        "packets_per_batch": crossed / batches if batches else 0.0,
    }


def rss_kib(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total


def idle(relay: Relay, n: int, seconds: float, ping_every: float) -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_NOFILE, (n + 256, max(n + 256, resource.getrlimit(resource.RLIMIT_NOFILE)[1])))
    pids = [x["pid"] for x in relay.status()["actors"]]
    rss0 = rss_kib(pids)
    clients = [DerpClient(relay.addr) for _ in range(n)]
    relay.wait_clients(n + 3)
    rss1, cpu0 = rss_kib(pids), cpu_seconds(pids)
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        if ping_every:
            for c in clients:  # the Pongs wait in the clients' sockets, unread
                c.sock.sendall(derp.ping(os.urandom(8)))
        time.sleep(min(left, ping_every or left))
    cpu = cpu_seconds(pids) - cpu0
    pinging = f", each pinging every {ping_every:g} s" if ping_every else ""
    print(
        f"{n} idle clients{pinging}: workers' RSS {rss0 / 1024:.1f} MiB -> {rss1 / 1024:.1f} MiB "
        f"({(rss1 - rss0) / n:.1f} KiB a client), CPU {cpu * 60 / seconds:.2f} s a minute"
    )
    for c in clients:
        c.close()


# --- meshsup nodes: relayed against direct ------------------------------------------------


def node_pids(node: Node) -> list[int]:
    return [node.proc.pid] + [a["pid"] for a in node.status()["actors"] if a["pid"]]


def node_pair(u: Underlay, tmp: Path, relay_addr: str | None) -> tuple[Netns, Netns, Identity, Node, Node]:
    """Two nodes on the underlay: at each other's endpoints, or (relay_addr) with no endpoints and the relay."""
    (ns_a, addr_a), (ns_b, addr_b) = u.host(), u.host()
    a, b = Identity("alpha", 1), Identity("bravo", 2)
    extra = ""
    if relay_addr is None:
        a.endpoint, b.endpoint = f"{addr_a}:51820", f"{addr_b}:51820"
    else:
        extra = f'\n[[relays]]\nname = "bench"\nurl = "http://{relay_addr}:8080/derp"\n'
    nodes = []
    for ns, me, other in ((ns_a, a, b), (ns_b, b, a)):
        node = u.track(Node(tmp, "--config", str(meshsup_config(tmp, me, [other], extra=extra)), netns=ns))
        node.wait_ready()
        nodes.append(node)
    return ns_a, ns_b, b, nodes[0], nodes[1]


def transfer(ns_a: Netns, ns_b: Netns, addr: str, seconds: int, watched: list[int]) -> tuple[float, float, int]:
    """iperf3 TCP both ways: (Mbit/s, CPU seconds of `watched` per GB, bytes received)."""
    cpu0, received, elapsed = cpu_seconds(watched), 0, 0.0
    for reverse in (False, True):
        r = iperf3(ns_a, ns_b, addr, seconds=seconds, reverse=reverse)
        end = r.get("end", {}).get("sum_received", {})
        received += end.get("bytes", 0)
        elapsed += end.get("seconds", 0.0)
    cpu = cpu_seconds(watched) - cpu0
    return received * 8 / elapsed / 1e6 if elapsed else 0.0, cpu / (received / 1e9) if received else 0.0, received


def worker_clients(relay: Node) -> dict[str, int]:
    return {a["name"]: a["counters"].get("clients", 0) for a in relay.status()["actors"]}


def relay_ready(node: Node) -> bool:
    return all(r["state"] == "up" for r in node.status()["relays"])


def nodes(tmp: Path, seconds: int) -> None:
    u = Underlay()
    try:
        ns_a, ns_b, b, a1, b1 = node_pair(u, tmp, None)
        ping(ns_a, b.v4)
        direct, direct_cpu, _ = transfer(ns_a, ns_b, b.v4, seconds, node_pids(a1) + node_pids(b1))
        print(f"{'direct':<17} {direct:8.0f} Mbit/s              nodes {direct_cpu:5.1f} CPU s/GB")
        relay_ns, relay_addr = u.host()
        relay = u.track(Node(tmp, "--listen", f"{relay_addr}:8080", netns=relay_ns, command="relay"))
        relay.wait(lambda: relay.status()["relay"]["ready"], what="relay ready")
        ns_a, ns_b, b, a2, b2 = node_pair(u, tmp, relay_addr)
        for workers in (1, 2):
            if workers == 2:
                relay.cli("scale", "relay", "2")
                relay.wait(lambda: len(worker_clients(relay)) == 2, what="two relay workers")
                for _ in range(20):  # bravo reconnects until the kernel puts it on the other worker
                    if min(worker_clients(relay).values()) == 1:
                        break
                    os.kill(b2.actors()["magicsock"]["pid"], signal.SIGKILL)
                    b2.wait(lambda: relay_ready(b2) and sum(worker_clients(relay).values()) == 2, what="back")
            a2.wait(lambda: relay_ready(a2) and relay_ready(b2), what="both nodes on the relay")
            ping(ns_a, b.v4)
            relay_pids = [x["pid"] for x in relay.status()["actors"]]
            nodes_cpu0 = cpu_seconds(node_pids(a2) + node_pids(b2))
            rate, relay_cpu, received = transfer(ns_a, ns_b, b.v4, seconds, relay_pids)
            nodes_cpu = (cpu_seconds(node_pids(a2) + node_pids(b2)) - nodes_cpu0) / (received / 1e9)
            where = ", ".join(f"{k} {v}" for k, v in sorted(worker_clients(relay).items()))
            print(
                f"{f'relay, {workers} worker' + 's' * (workers > 1):<17} {rate:8.0f} Mbit/s "
                f"({rate / direct:4.2f} of direct)  relay {relay_cpu:5.1f} CPU s/GB, nodes {nodes_cpu:5.1f}"
                f"  (clients: {where})"
            )
        drops = {k: v for k, v in a2.counters()["magicsock"].items() if "drop" in k or "unreach" in k}
        print(f"relay dropped: {relay.status()['dropped']}, alpha's magicsock: {drops}")
    finally:
        u.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--size", type=int, default=1400)
    ap.add_argument("--idle", type=int, default=0)
    ap.add_argument("--idle-seconds", type=float, default=60.0)
    ap.add_argument("--idle-ping", type=float, default=0.0)
    ap.add_argument("--nodes", action="store_true")
    ap.add_argument("--node-seconds", type=int, default=8)
    args = ap.parse_args()
    if args.nodes:
        with tempfile.TemporaryDirectory() as tmp:
            nodes(Path(tmp), args.node_seconds)
        return
    with tempfile.TemporaryDirectory() as tmp:
        relay = Relay(Path(tmp), "--relay-workers", "2")
        try:
            relay.wait_ready()
            a, b, where = on_two_workers(relay)
            same = DerpClient(relay.addr)  # the kernel puts it somewhere: pair it with whoever shares its worker
            counts = relay.wait_clients(3)
            partner = a if counts[where["a"]] == 2 else b
            for name, (x, y) in (("cross-worker", (a, b)), ("same worker", (same, partner))):
                r = run(relay, x, y, args.seconds, args.size)
                print(
                    f"{name:<13} {r['mbit_s']:8.0f} Mbit/s {r['kpps']:7.1f} kpps "
                    f"{r['cpu_s_per_gb']:6.1f} CPU s/GB  {r['packets_per_batch']:6.1f} packets per bus message"
                )
            print(f"dropped: {relay.status()['dropped']}")
            if args.idle:
                idle(relay, args.idle, args.idle_seconds, args.idle_ping)
        finally:
            relay.close()


if __name__ == "__main__":
    main()

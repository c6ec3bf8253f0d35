"""Relay forwarding figures: DERP packets between two clients on the same worker and on two workers.

Run: .venv/bin/python tests/bench/bench_relay.py [--seconds 4] [--size 1400] [--idle 1000 --idle-seconds 60]

Starts `meshsup relay --relay-workers 2` on loopback. For each pairing, one
client sends SendPacket frames of --size bytes as fast as TCP lets it, the
other counts what arrives. Prints the delivered rate, packets a second, the
relay workers' CPU seconds per GB delivered, and for the cross-worker pair
how many packets each bus message between the workers carried (the batching
that keeps the hop from costing a syscall per packet). With --idle N, then
N idle clients stay logged in for --idle-seconds: the workers' RSS before and
with them, and their CPU seconds per minute.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from meshsup.actors.wire import derp  # noqa: E402
from tests.actors.relay.test_node import Relay, on_two_workers  # noqa: E402
from tests.derp_client import DerpClient  # noqa: E402


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


def idle(relay: Relay, n: int, seconds: float) -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_NOFILE, (n + 256, max(n + 256, resource.getrlimit(resource.RLIMIT_NOFILE)[1])))
    pids = [x["pid"] for x in relay.status()["actors"]]
    rss0 = rss_kib(pids)
    clients = [DerpClient(relay.addr) for _ in range(n)]
    relay.wait_clients(n + 3)
    rss1, cpu0 = rss_kib(pids), cpu_seconds(pids)
    time.sleep(seconds)
    cpu = cpu_seconds(pids) - cpu0
    print(
        f"{n} idle clients: workers' RSS {rss0 / 1024:.1f} MiB -> {rss1 / 1024:.1f} MiB "
        f"({(rss1 - rss0) / n:.1f} KiB a client), CPU {cpu * 60 / seconds:.2f} s a minute"
    )
    for c in clients:
        c.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--size", type=int, default=1400)
    ap.add_argument("--idle", type=int, default=0)
    ap.add_argument("--idle-seconds", type=float, default=60.0)
    args = ap.parse_args()
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
                idle(relay, args.idle, args.idle_seconds)
        finally:
            relay.close()


if __name__ == "__main__":
    main()

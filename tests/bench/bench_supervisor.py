"""Supervisor and bus figures: restart latency after kill -9, bus throughput.

Run as root: .venv/bin/python tests/bench/bench_supervisor.py [--kills 50]
Prints figures; asserts nothing (timed tests flake on shared machines).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import signal
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import zmq

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from meshsup.actors.bus.batch import unpack  # noqa: E402
from meshsup.actors.bus.codec import decode, encode  # noqa: E402
from meshsup.actors.bus.messages import Heartbeat, PacketBatch  # noqa: E402
from tests.nodes import Netns, Node  # noqa: E402


def restart_latency(kills: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        conf = Path(tmp) / "n.toml"
        conf.write_text(f"[supervisor]\nintensity = {kills * 2}\nperiod = 3600\n")
        ns = Netns("bench")
        node = Node(Path(tmp), "--config", str(conf), netns=ns)
        try:
            node.wait_ready()
            names = ["netlog", "router", "magicsock", "crypto-0", "tun-io", "dns-0"]
            latencies = []
            for i in range(kills):
                name = names[i % len(names)]
                time.sleep(0.25)  # each actor runs past STABLE_AFTER: no backoff, a plain restart
                before = node.actors()[name]
                t_kill = time.time()
                os.kill(before["pid"], signal.SIGKILL)
                node.wait(
                    lambda: (a := node.actors()[name])["state"] == "running" and a["restarts"] == before["restarts"] + 1
                )
                ready = _ready_time(node.stderr(), name, before["restarts"] + 1)
                latencies.append(ready - t_kill)
            latencies.sort()
            p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
            print(
                f"restart after kill -9 ({kills} kills): median {statistics.median(latencies) * 1000:.0f} ms, "
                f"p99 {p99 * 1000:.0f} ms, max {latencies[-1] * 1000:.0f} ms"
            )
        finally:
            node.close()
            ns.close()


def _ready_time(log: str, name: str, restarts: int) -> float:
    for line in log.splitlines():
        if '"actor running"' in line:
            rec = json.loads(line)
            if rec["name"] == name and rec["restarts"] == restarts:
                return datetime.fromisoformat(rec["timestamp"].replace("Z", "+00:00")).timestamp()
    raise RuntimeError("no ready line")


def _sink(endpoint: str, count: int, q: multiprocessing.Queue) -> None:
    ctx = zmq.Context()
    s = ctx.socket(zmq.PULL)
    s.setsockopt(zmq.RCVHWM, 100000)
    s.bind(endpoint)
    q.put("bound")
    packets = 0
    for _ in range(count):
        msg = decode(s.recv())
        if isinstance(msg, PacketBatch):
            packets += len(unpack(msg.packets))
    q.put(packets)


def bus_throughput(endpoint: str, count: int, make) -> tuple[float, int]:
    q: multiprocessing.Queue = multiprocessing.Queue()
    p = multiprocessing.Process(target=_sink, args=(endpoint, count, q))
    p.start()
    q.get()
    ctx = zmq.Context()
    s = ctx.socket(zmq.PUSH)
    s.setsockopt(zmq.SNDHWM, 100000)
    s.connect(endpoint)
    t0 = time.perf_counter()
    for i in range(count):
        s.send(encode(make(i)))
    packets = q.get()
    elapsed = time.perf_counter() - t0
    p.join()
    ctx.destroy()
    return count / elapsed, packets


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kills", type=int, default=50)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ep = f"ipc://{tmp}/bench.sock"
        rate, _ = bus_throughput(ep, 100_000, lambda i: Heartbeat(name="bench", seq=i, status={}))
        print(f"bus, one small typed message per frame: {rate:,.0f} messages/s")
        packet = b"\x45" + os.urandom(1399)
        blob = b"".join(len(packet).to_bytes(2, "big") + packet for _ in range(64))
        rate, packets = bus_throughput(ep, 20_000, lambda i: PacketBatch(packets=blob))
        print(
            f"bus, 64 x 1400 B packets per frame: {rate:,.0f} frames/s = {rate * 64:,.0f} packets/s "
            f"= {rate * 64 * 1400 * 8 / 1e9:.1f} Gbit/s ({packets} packets checked)"
        )
    restart_latency(args.kills)


if __name__ == "__main__":
    main()

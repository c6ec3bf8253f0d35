"""What metrics cost the supervisor: its CPU per minute with metrics off, and on while scraped every second.

Run as root: .venv/bin/python tests/bench/bench_metrics.py [--peers 100] [--seconds 60]
Each run starts a node with the peers in a namespace of its own, lets it settle,
then counts the supervisor's user+system CPU over the window (the actors'
heartbeats, which the supervisor handles either way, included). With metrics on,
a scraper in the namespace GETs /metrics once a second, as Prometheus would.
Prints figures; asserts nothing (timed tests flake on shared machines).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.bench.bench_peers import bench_args  # noqa: E402
from tests.nodes import Netns, Node  # noqa: E402

LISTEN = "127.0.0.1:9273"
SCRAPER = f"""
import sys, time, urllib.request
n = size = 0
worst = 0.0
end = time.monotonic() + float(sys.argv[1])
while time.monotonic() < end:
    t = time.monotonic()
    size = len(urllib.request.urlopen("http://{LISTEN}/metrics", timeout=5).read())
    worst = max(worst, time.monotonic() - t)
    n += 1
    time.sleep(max(0.0, 1.0 - (time.monotonic() - t)))
print(n, size, worst)
"""


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def run(tmp: Path, stanzas: str, seconds: float, metrics: bool) -> tuple[float, str]:
    conf = tmp / f"node-{int(metrics)}.toml"
    extra = f'\n[metrics]\nlisten = "{LISTEN}"\n' if metrics else ""
    conf.write_text('[node]\naddresses = ["100.64.0.1/32"]\n' + stanzas + extra)
    ns = Netns("bm")
    node = Node(tmp, "--config", str(conf), netns=ns, faults=False)
    try:
        node.wait_ready(timeout=120)
        time.sleep(3)
        before = cpu_seconds(node.proc.pid)
        if metrics:
            count, size, worst = ns.run(sys.executable, "-c", SCRAPER, str(seconds)).stdout.split()
            note = f"{count} scrapes of {int(size) / 1024:.0f} KiB, slowest {float(worst) * 1000:.1f} ms"
        else:
            time.sleep(seconds)
            note = "not scraped"
        used = cpu_seconds(node.proc.pid) - before
        return used * 60 / seconds, note
    finally:
        node.close()
        ns.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=60)
    args, stanzas, _ = bench_args(100, ap)
    with tempfile.TemporaryDirectory() as tmp:
        off = run(Path(tmp), stanzas, args.seconds, metrics=False)
        on = run(Path(tmp), stanzas, args.seconds, metrics=True)
    print(f"{args.peers} peers, {args.seconds:g} s each: supervisor CPU seconds per minute")
    print(f"  metrics off:               {off[0]:.2f}  ({off[1]})")
    print(f"  metrics on, scraped at 1s: {on[0]:.2f}  ({on[1]})")


if __name__ == "__main__":
    main()

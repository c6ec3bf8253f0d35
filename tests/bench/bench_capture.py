"""What a running capture costs: iperf3 TCP between two meshsup nodes with no capture, then with
an inner capture of every packet running, in the same run (figures only, nothing asserted).

Run as root: .venv/bin/python tests/bench/bench_capture.py [--seconds 5] [--rounds 2]

The rounds alternate (off, on, off, on, ...) so that other load on the machine falls on both.
The capture writes to /dev/null: what it costs is the workers' copies, the socket and the CLI
turning batches into pcap records, not the disk. With no capture running the hot path tests one
attribute per batch (CryptoActor.tap), which is below what iperf3 can tell apart.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.nodes import MESHSUP, REPO, Node  # noqa: E402
from tests.topology import Underlay, assert_carried, iperf3, pair  # noqa: E402


def mbits(result: dict) -> float:
    assert_carried(result)
    return result["end"]["sum_received"]["bits_per_second"] / 1e6


def start_capture(node: Node, tmp: Path) -> tuple[subprocess.Popen[bytes], Path]:
    err = tmp / f"capture-{time.monotonic_ns()}.err"
    with open(err, "w") as stream:
        proc = subprocess.Popen(
            [*MESHSUP, "capture", "--state-dir", str(node.state_dir), "-w", os.devnull],
            stderr=stream,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
    while "capturing" not in err.read_text():
        if proc.poll() is not None:
            raise RuntimeError(err.read_text())
        time.sleep(0.05)
    return proc, err


def stop_capture(proc: subprocess.Popen[bytes], err: Path) -> tuple[int, int]:
    """(packets captured, packets dropped) as the CLI reports them."""
    proc.send_signal(signal.SIGINT)
    proc.wait(30)
    text = err.read_text()
    captured = re.search(r"(\d+) packets captured", text)
    dropped = re.search(r"(\d+) packets dropped", text)
    if not captured or not dropped:
        raise RuntimeError(text)
    return int(captured.group(1)), int(dropped.group(1))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=5, help="length of each iperf3 run")
    ap.add_argument("--rounds", type=int, default=2, help="runs with the capture off, and as many with it on")
    args = ap.parse_args()
    off: list[float] = []
    on: list[tuple[float, int, int]] = []
    u = Underlay()
    try:
        with tempfile.TemporaryDirectory() as tmp_dir:
            tmp = Path(tmp_dir)
            (ns_a, _, alpha), (ns_b, b, _) = pair(u, tmp, "meshsup")
            iperf3(ns_a, ns_b, b.v4, seconds=1)  # warm up: the handshake, the TCP window
            for _ in range(args.rounds):
                off.append(mbits(iperf3(ns_a, ns_b, b.v4, seconds=args.seconds)))
                proc, err = start_capture(alpha, tmp)
                try:
                    rate = mbits(iperf3(ns_a, ns_b, b.v4, seconds=args.seconds))
                finally:
                    captured, dropped = stop_capture(proc, err)
                on.append((rate, captured, dropped))
    finally:
        u.close()
    print(f"iperf3 TCP alpha -> bravo, {args.seconds} s a run, meshsup <-> meshsup, 2 crypto workers each")
    print(f"{'capture':<28} {'Mbit/s':>9}  {'captured':>10} {'dropped':>10}")
    for i in range(args.rounds):
        print(f"{'off':<28} {off[i]:>9.0f}")
        rate, captured, dropped = on[i]
        print(f"{'inner, every packet, alpha':<28} {rate:>9.0f}  {captured:>10} {dropped:>10}")
    mean_off = sum(off) / len(off)
    mean_on = sum(r for r, _, _ in on) / len(on)
    print(f"mean: off {mean_off:.0f} Mbit/s, capturing {mean_on:.0f} Mbit/s ({mean_on / mean_off:.0%} of off)")


if __name__ == "__main__":
    main()

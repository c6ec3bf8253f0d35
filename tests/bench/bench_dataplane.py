"""Tunnel figures for meshsup and wireguard-go, in one run, with ratios against wireguard-go.

Run as root: .venv/bin/python tests/bench/bench_dataplane.py [--seconds 4]

Every pair uses the same veth/bridge underlay. For each pairing it prints
iperf3 TCP both ways, ping RTT and the CPU seconds the tunnel processes of
both ends spent per GB carried (all of a node's processes; wireguard-go's
process), each against wireguard-go <-> wireguard-go measured in the same
run. RTTs are measured again with every CPU kept from idling by a
SCHED_IDLE busy loop: that shows what waking an idle CPU adds, which on a
VM whose idle vCPUs halt is much of a ping's time. Then iperf3 UDP at 200 Mbit/s through one peer with 2 crypto workers
(out-of-order datagrams, loss; wireguard-go alongside), and meshsup <->
meshsup TCP with 1, 2 and 4 crypto workers, each run profiled with py-spy:
every meshsup process's share of a CPU and where its samples fall (the
functions with the most samples of their own). Other load on the machine
moves every figure; the ratios, measured minutes apart, move less.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import os
import re
import statistics
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from meshsup.actors.base import Actor  # noqa: E402
from tests.nodes import Netns, Node  # noqa: E402
from tests.topology import Identity, Underlay, WgGo, iperf3, meshsup_config, ping  # noqa: E402

WG, MS = "wireguard-go", "meshsup"
TICK = os.sysconf("SC_CLK_TCK")
UDP_RATE = "200M"
UDP_LEN = 1392  # the largest datagram that fits the tunnel MTU (1420) unfragmented
UDP_SECONDS = 3
# Default buffers, then 4 MB: with those, a CPU too busy to run iperf3's
# reader at once does not count as loss, and what is left is the tunnel's.
UDP_BUFFERS = ("", "4M")
SPY = str(Path(sys.executable).with_name("py-spy"))


def _idle_frame() -> str:
    """How py-spy names the actor loop waiting in epoll."""
    lines, first = inspect.getsourcelines(Actor.run)
    wait = next(i for i, line in enumerate(lines) if "poller.poll(" in line)
    return f"Actor.run (actors/base.py:{first + wait})"


@dataclass
class Transfer:
    mbit: float
    cpu_per_gb: float  # CPU seconds of both ends' tunnel processes per GB received


@dataclass
class Pair:
    """Two tunnel ends (alpha, bravo) on one underlay; close() removes everything."""

    kinds: tuple[str, str]
    tmp: Path
    workers: int = 2
    underlay: Underlay = field(init=False)
    hosts: list[tuple[Netns, str]] = field(init=False)
    ids: list[Identity] = field(init=False)
    ends: list[Any] = field(init=False)

    def __post_init__(self) -> None:
        self.underlay = u = Underlay()
        self.ends = []
        try:
            self.hosts = [u.host(), u.host()]
            self.ids = [Identity("alpha", 1), Identity("bravo", 2)]
            for ident, (_, addr) in zip(self.ids, self.hosts):
                ident.endpoint = f"{addr}:51820"
            for i, kind in enumerate(self.kinds):
                ns, me, other = self.hosts[i][0], self.ids[i], self.ids[1 - i]
                if kind == WG:
                    wg = u.track(WgGo(ns, me, self.tmp))
                    wg.add_peer(other)
                    self.ends.append(wg)
                else:
                    config = meshsup_config(self.tmp, me, [other])
                    self.ends.append(
                        u.track(
                            Node(
                                self.tmp,
                                "--config",
                                str(config),
                                "--crypto-workers",
                                str(self.workers),
                                netns=ns,
                                faults=False,
                            )
                        )
                    )
            for end in self.ends:  # both nodes start at once
                if isinstance(end, Node):
                    end.wait_ready()
            if not ping(self.hosts[0][0], self.ids[1].v4):
                raise RuntimeError(f"{self.kinds} tunnel does not carry ping")
        except BaseException:
            u.close()
            raise

    def pids(self) -> list[int]:
        out = []
        for end in self.ends:
            if isinstance(end, WgGo):
                out.append(end.proc.pid)
            else:
                status = end.status()
                out += [status["node"]["pid"], *(a["pid"] for a in status["actors"] if a["pid"])]
        return out

    def iperf3(self, seconds: int, reverse: bool = False, extra: tuple[str, ...] = ()) -> dict[str, Any]:
        (a, _), (b, _) = self.hosts
        for _ in range(3):  # on a busy machine the server may not listen yet
            r = iperf3(a, b, self.ids[1].v4, seconds=seconds, reverse=reverse, extra=extra)
            if "unable to connect" not in r.get("error", ""):
                break
        if "error" in r:
            raise RuntimeError(f"iperf3 {self.kinds} {' '.join(extra)}: {r['error']}")
        return r

    def tcp(self, seconds: int, reverse: bool) -> Transfer:
        pids = self.pids()
        before = cpu_seconds(pids)
        r = self.iperf3(seconds, reverse)
        cpu = cpu_seconds(pids) - before
        received = r["end"]["sum_received"]
        return Transfer(received["bits_per_second"] / 1e6, cpu / (received["bytes"] / 1e9))

    def rtts(self, count: int) -> list[float]:
        """The RTTs of `count` pings 20 ms apart."""
        out = self.hosts[0][0].run("ping", "-c", str(count), "-i", "0.02", self.ids[1].v4, check=False).stdout
        return [float(t) for t in re.findall(r"time=([\d.]+)", out)]

    def udp(self, seconds: int, buffer: str) -> dict[str, Any]:
        extra = ("-u", "-b", UDP_RATE, "-l", str(UDP_LEN)) + (("-w", buffer) if buffer else ())
        before = self.drops()
        r = self.iperf3(seconds, extra=extra)
        drops = {k: v - before[k] for k, v in self.drops().items()}
        return {
            **r["end"]["sum"],
            "out_of_order": sum(s["udp"]["out_of_order"] for s in r["end"]["streams"]),
            "drops": {k: v for k, v in drops.items() if v},
        }

    def drops(self) -> dict[str, int]:
        """Where a datagram can be lost: the sender's TUN queue (kernel), the
        tunnel processes' own counters, and full UDP socket buffers at the
        receiver (its tunnel socket and iperf3's alike)."""
        (a, _), (b, _) = self.hosts
        sender = self.ends[0]
        iface = sender.iface if isinstance(sender, WgGo) else sender.status()["node"]["interface"]
        stat = a.run("cat", f"/sys/class/net/{iface}/statistics/tx_dropped", check=False).stdout.strip()
        out = {"sender_tun_queue": int(stat or 0), "tunnel_counted": 0}
        for end in self.ends:
            if isinstance(end, Node):
                counters = end.counters()
                out["tunnel_counted"] += sum(
                    c.get(k, 0)
                    for c in counters.values()
                    for k in ("bus_full", "tun_dropped", "tx_dropped", "udp_tx_dropped")
                )
        snmp = b.run("nstat", "-az", "UdpRcvbufErrors", check=False).stdout.split()
        out["receiver_udp_buffers"] = int(snmp[snmp.index("UdpRcvbufErrors") + 1]) if "UdpRcvbufErrors" in snmp else 0
        return out

    def meshsup_processes(self) -> dict[str, int]:
        """Every actor process of both nodes, by node and actor name."""
        out = {}
        for end, ident in zip(self.ends, self.ids):
            if isinstance(end, Node):
                out.update({f"{ident.name}/{a['name']}": a["pid"] for a in end.status()["actors"] if a["pid"]})
        return out

    def profiled_tcp(self, seconds: int) -> tuple[Transfer, dict[str, Profile]]:
        """iperf3 TCP alpha -> bravo with py-spy sampling every actor of both nodes."""
        procs = {
            name: pid
            for name, pid in self.meshsup_processes().items()
            if name.split("/")[1].startswith(("crypto", "tun-io", "magicsock"))
        }
        spies = {
            name: subprocess.Popen(
                [
                    SPY,
                    "record",
                    "--nonblocking",
                    "-p",
                    str(pid),
                    "-d",
                    str(seconds),
                    "-r",
                    "250",
                    "-f",
                    "raw",
                    "-o",
                    str(self.tmp / f"spy-{name.replace('/', '-')}.txt"),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for name, pid in procs.items()
        }
        before = {name: cpu_seconds([pid]) for name, pid in procs.items()}
        transfer = self.tcp(seconds, reverse=False)
        profiles = {}
        for name, spy in spies.items():
            spy.wait()
            cpu = (cpu_seconds([procs[name]]) - before[name]) / seconds
            profiles[name] = Profile(cpu, hot_spots(self.tmp / f"spy-{name.replace('/', '-')}.txt"))
        return transfer, profiles

    def close(self) -> None:
        self.underlay.close()


@dataclass
class Profile:
    cpu: float  # share of one CPU over the run
    top: list[tuple[str, float]]  # function, share of the busy samples taken in it (not in its callees)


IDLE = _idle_frame()


def hot_spots(path: Path, n: int = 4) -> list[tuple[str, float]]:
    """The functions holding most busy samples of their own in a py-spy raw (collapsed
    stacks) file. A sample in the actor loop's epoll wait is the process idling: left out."""
    own: Counter[str] = Counter()
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        stack, _, count = line.rpartition(" ")
        leaf = stack.rsplit(";", 1)[-1]
        if leaf == IDLE:
            continue
        own[leaf.split(" (")[0]] += int(count)
    total = sum(own.values())
    return [(fn, k / total) for fn, k in own.most_common(n)] if total else []


# Pinned to one CPU at SCHED_IDLE: it runs only when nothing else wants that
# CPU and yields to any wake-up at once, so it takes no time from the tunnels,
# but the CPU never goes idle (on a VM: its vCPU never halts).
_IDLE_SPINNER = (
    "import os, sys\n"
    "os.sched_setaffinity(0, {int(sys.argv[1])})\n"
    "os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))\n"
    "while True:\n    pass\n"
)


@contextlib.contextmanager
def cpus_kept_from_idle() -> Iterator[None]:
    """While inside, no CPU idles: RTTs without the wake-up from an idle (halted) CPU."""
    spinners: list[subprocess.Popen[bytes]] = []
    try:
        for cpu in sorted(os.sched_getaffinity(0)):
            spinners.append(subprocess.Popen([sys.executable, "-c", _IDLE_SPINNER, str(cpu)]))
        yield
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()


def ping_rounds(pairs: list[Pair], rounds: int = 6, count: int = 25) -> list[float]:
    """Median RTT of each pair, the pairs pinging in turns, round after round, so that a
    busy spell of the machine weighs on all of them alike."""
    times: list[list[float]] = [[] for _ in pairs]
    for _ in range(rounds):
        for pair, seen in zip(pairs, times):
            seen += pair.rtts(count)
    return [statistics.median(seen) if seen else float("nan") for seen in times]


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of the processes (all their threads) so far."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / TICK


def ratio(value: float, base: float) -> str:
    return f"({value / base:.2f}x)" if base else "(n/a)"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=4, help="length of each iperf3 run")
    args = ap.parse_args()
    s = args.seconds
    rows: list[tuple[str, Transfer, str, Transfer, float]] = []
    udp: dict[tuple[str, str, str], dict[str, Any]] = {}
    workers: dict[int, tuple[Transfer, dict[str, Profile]]] = {}
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        pairs: list[Pair] = []
        try:
            for kinds in [(WG, WG), (MS, WG), (MS, MS)]:
                pairs.append(Pair(kinds, tmp))
            rtts = ping_rounds(pairs)
            with cpus_kept_from_idle():
                awake_rtts = ping_rounds(pairs)
            for pair, rtt in zip(pairs, rtts):
                fwd, rev = pair.tcp(s, reverse=False), pair.tcp(s, reverse=True)
                a, b = pair.kinds
                rows.append((f"{a} -> {b}", fwd, f"{b} -> {a}", rev, rtt))
                if a == b:
                    for buffer in UDP_BUFFERS:
                        udp[(a, b, buffer)] = pair.udp(UDP_SECONDS, buffer)
        finally:
            for pair in pairs:
                pair.close()
        for n in (1, 2, 4):
            pair = Pair((MS, MS), tmp, workers=n)
            try:
                workers[n] = pair.profiled_tcp(s)
            finally:
                pair.close()

    (_, base_fwd, _, base_rev, base_rtt), *_ = rows
    print(f"iperf3 TCP, {s} s each way; CPU s/GB: both ends' tunnel processes per GB received")
    for name_fwd, fwd, name_rev, rev, _rtt in rows:
        print(
            f"  {name_fwd:<26} {fwd.mbit:6.0f} Mbit/s {ratio(fwd.mbit, base_fwd.mbit):>8} "
            f"{fwd.cpu_per_gb:5.1f} CPU s/GB {ratio(fwd.cpu_per_gb, base_fwd.cpu_per_gb):>8}   "
            f"{name_rev:<26} {rev.mbit:6.0f} Mbit/s {ratio(rev.mbit, base_rev.mbit):>8} "
            f"{rev.cpu_per_gb:5.1f} CPU s/GB {ratio(rev.cpu_per_gb, base_rev.cpu_per_gb):>8}"
        )
    print(
        "ping RTT (median of 150 pings 20 ms apart, the pairs taking turns); then with no CPU left idle "
        "(a SCHED_IDLE busy loop on each), which takes out the wake-up of an idle, on a VM halted, CPU"
    )
    for (name_fwd, *_, rtt), awake in zip(rows, awake_rtts):
        print(
            f"  {name_fwd.replace(' -> ', ' <-> '):<26} {rtt:6.3f} ms {ratio(rtt, base_rtt):>8}   "
            f"no CPU idle: {awake:6.3f} ms {ratio(awake, awake_rtts[0]):>8}"
        )
    print(
        f"iperf3 UDP {UDP_RATE}bit/s, {UDP_LEN}-byte datagrams, {UDP_SECONDS} s (meshsup: 2 crypto workers); "
        "iperf3's socket buffers at the default, then 4 MB"
    )
    for (a, b, buffer), u in udp.items():
        lost, total = u.get("lost_packets", 0), u.get("packets", 0)
        print(
            f"  {a} -> {b:<13} {buffer or 'default':>7}  {u['out_of_order']} out of order, "
            f"{lost}/{total} lost ({100 * lost / total if total else float('nan'):.3f} %)  dropped at: {u['drops']}"
        )
    print(
        "meshsup -> meshsup TCP by crypto workers (one peer: one owning worker), py-spy on every "
        "dataplane actor: its share of a CPU, and the functions with most samples of their own"
    )
    for n in sorted(workers):
        t, profiles = workers[n]
        print(
            f"  {n} worker{'s' if n > 1 else ' '}  {t.mbit:6.0f} Mbit/s {ratio(t.mbit, base_fwd.mbit):>8} "
            f"{t.cpu_per_gb:5.1f} CPU s/GB"
        )
        for name, prof in sorted(profiles.items(), key=lambda kv: -kv[1].cpu):
            if prof.cpu >= 0.02:
                spots = ", ".join(f"{fn} {share:.0%}" for fn, share in prof.top)
                print(f"      {name:<18} {prof.cpu:4.0%} CPU  {spots}")


if __name__ == "__main__":
    main()

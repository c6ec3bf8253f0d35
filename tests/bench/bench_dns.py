"""DNS figures: dnsperf against meshsup (1 and 2 dns workers) and dnsmasq, in one run.

Run as root: .venv/bin/python tests/bench/bench_dns.py [--seconds 5] [--rounds 3] [--cold 10000]
    [--workers 1,2] [--workloads local,cached,cold]

Everything runs in one throwaway network namespace: an upstream dnsmasq
(answers every name under example.test itself, no cache), a meshsup node
whose peers are the mesh names (a fresh one for each number of workers), and a caching dnsmasq serving the same mesh
names (--host-record) and forwarding example.test to the same upstream.
Workloads: local mesh names (A and AAAA), forwarded names already cached, and
forwarded names never asked before (a cold cache, each name once). The
servers take turns, round after round, so load from elsewhere on the machine
weighs on both alike. Each run gives q/s, mean latency and the server's CPU
time per answered query (user and system, all its processes, from /proc):
the figure other load on the machine moves least. Ratios are meshsup against
dnsmasq in the same rounds (medians: load from elsewhere comes and goes).
Memory is each server process's at the end: its resident set (RSS), its
proportional share (PSS: a page shared with N processes counts 1/N) and
the part that is its own alone (USS); a dns worker shares the rest with the
fork server it came from and the other actors. The last lines sum up the
issue's figures: cold forwarding with the most workers run, and the
workers' PSS, against dnsmasq's.
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.dns_fixtures import Dnsmasq, node_config, start_dnsmasq  # noqa: E402
from tests.nodes import Netns, Node  # noqa: E402
from tests.topology import Identity  # noqa: E402

PEERS = 50
CACHED_NAMES = 200
CLIENTS = 8  # dnsperf source ports: spread over the workers by SO_REUSEPORT
OUTSTANDING = 200
CACHE_SIZE = 100_000  # both caches hold every name of the run: cold means never asked, not evicted


@dataclass
class Figures:
    qps: float
    latency_ms: float
    cpu_us: float  # the server's CPU time (user and system, all its processes) per answered query
    user_us: float  # of that, user time: the server's own code, where system time is the kernel's
    lost: int
    errors: int

    def __str__(self) -> str:
        extra = f", {self.lost} lost" if self.lost else ""
        extra += f", {self.errors} not NOERROR" if self.errors else ""
        cpu = f"{self.cpu_us:6.1f} us CPU/q ({self.user_us:4.1f} user)"
        return f"{self.qps:8.0f} q/s {self.latency_ms:6.2f} ms {cpu}{extra}"


def cpu_seconds(pids: list[int]) -> tuple[float, float]:
    """User and system time of the processes so far."""
    user = system = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        user, system = user + int(fields[11]), system + int(fields[12])  # utime, stime
    tick = os.sysconf("SC_CLK_TCK")
    return user / tick, system / tick


def dnsperf(ns: Netns, server: Server, queries: list[str], tmp: Path, seconds: float, passes: int = 0) -> Figures:
    """One dnsperf run; passes=N stops after N passes through the queries (else after `seconds`)."""
    data = tmp / f"queries-{secrets.token_hex(3)}.txt"
    data.write_text("\n".join(queries) + "\n")
    argv = [
        "dnsperf",
        "-s",
        server.host,
        "-p",
        str(server.port),
        "-d",
        str(data),
        "-l",
        str(seconds),
        "-c",
        str(CLIENTS),
        "-q",
        str(OUTSTANDING),
        "-t",
        "2",
    ]
    if passes:
        argv += ["-n", str(passes)]
    pids = server.pids()
    user, system = cpu_seconds(pids)
    out = ns.run(*argv, timeout=seconds + 60).stdout
    user_after, system_after = cpu_seconds(pids)
    user, cpu = user_after - user, user_after + system_after - user - system

    def number(label: str) -> float:
        match = re.search(rf"{label}:\s+([\d.]+)", out)
        if match is None:
            raise RuntimeError(f"dnsperf printed no {label!r}:\n{out}")
        return float(match.group(1))

    codes = re.search(r"Response codes:\s+(.*)", out)
    errors = sum(
        int(n) for code, n in re.findall(r"(\w+) (\d+) \(", codes.group(1) if codes else "") if code != "NOERROR"
    )
    completed = max(1, int(number("Queries completed")))
    return Figures(
        number("Queries per second"),
        number("Average Latency \\(s\\)") * 1000,
        cpu / completed * 1e6,
        user / completed * 1e6,
        int(number("Queries lost")),
        errors,
    )


@dataclass
class Memory:
    rss: float  # MiB, pages shared with the fork server and other actors included
    pss: float  # MiB, each shared page counted 1/N for the N processes that map it
    uss: float  # MiB, the process's own pages (private clean and dirty)

    def __str__(self) -> str:
        return f"RSS {self.rss:.1f} PSS {self.pss:.1f} own {self.uss:.1f}"


def memory(pid: int) -> Memory:
    """The process's resident set, its proportional share, and the part of it no other process shares."""
    fields = dict(re.findall(r"(\w+):\s+(\d+) kB", Path(f"/proc/{pid}/smaps_rollup").read_text()))
    kib = {name: int(fields.get(name, 0)) for name in ("Rss", "Pss", "Private_Clean", "Private_Dirty")}
    return Memory(kib["Rss"] / 1024, kib["Pss"] / 1024, (kib["Private_Clean"] + kib["Private_Dirty"]) / 1024)


def workloads(peers: list[Identity]) -> dict[str, list[str]]:
    return {
        "local": [f"{p.name}.mesh {t}" for p in peers for t in ("A", "AAAA")],
        "cached": [f"w{i}.example.test A" for i in range(CACHED_NAMES)],
    }


def cold_names(tag: str, count: int) -> list[str]:
    return [f"c{tag}-{i}.example.test A" for i in range(count)]


@dataclass
class Server:
    name: str
    host: str
    port: int
    pids: Callable[[], list[int]]


def dns_workers(node: Node) -> list[int]:
    return [a["pid"] for a in node.status()["actors"] if a["kind"] == "dns" and a["state"] == "running"]


def run_rounds(
    ns: Netns,
    servers: list[Server],
    peers: list[Identity],
    tmp: Path,
    args: argparse.Namespace,
    results: dict[str, dict[str, list[Figures]]],
) -> None:
    """Each workload against each server in turn, round after round, so that
    whatever else the machine does weighs on all of them alike."""
    names = workloads(peers)
    if "cached" in args.workloads:
        for server in servers:
            dnsperf(ns, server, names["cached"], tmp, args.seconds, passes=3)  # warm the caches
    for round_ in range(args.rounds):
        order = servers if round_ % 2 == 0 else servers[::-1]
        for workload in args.workloads:
            for server in order:
                if workload == "cold":
                    figures = dnsperf(
                        ns, server, cold_names(secrets.token_hex(3), args.cold), tmp, args.seconds, passes=1
                    )
                else:
                    figures = dnsperf(ns, server, names[workload], tmp, args.seconds)
                results.setdefault(server.name, {}).setdefault(workload, []).append(figures)


def median(figures: list[Figures]) -> Figures:
    """Field by field."""

    def mid(values: list[float]) -> float:
        return sorted(values)[len(values) // 2]

    return Figures(
        mid([f.qps for f in figures]),
        mid([f.latency_ms for f in figures]),
        mid([f.cpu_us for f in figures]),
        mid([f.user_us for f in figures]),
        sum(f.lost for f in figures),
        sum(f.errors for f in figures),
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cold", type=int, default=10000, help="distinct names in each cold-cache run")
    ap.add_argument("--workers", default="1,2", help="dns workers of each meshsup run, in turn")
    ap.add_argument("--workloads", default="local,cached,cold", help="of local, cached, cold")
    args = ap.parse_args()
    args.workers = [int(n) for n in args.workers.split(",")]
    args.workloads = args.workloads.split(",")
    if not set(args.workloads) <= {"local", "cached", "cold"} or sorted(args.workers) != args.workers:
        ap.error("workloads: of local, cached, cold; workers: in rising order")
    ns = Netns("bd")
    results: dict[str, dict[str, list[Figures]]] = {}
    rss: dict[str, list[Memory]] = {}
    processes: list[Dnsmasq | Node] = []
    try:
        with tempfile.TemporaryDirectory() as tmp_name:
            tmp = Path(tmp_name)
            me = Identity("alpha", 1)
            peers = [Identity(f"peer{i}", i + 2) for i in range(PEERS)]
            upstream = start_dnsmasq(
                tmp, ["--address=/example.test/203.0.113.7"], ttl=3600, name="upstream", ns=ns, log_queries=False
            )
            processes.append(upstream)
            forward = f"{upstream.host}#{upstream.port}"
            records = [f"--host-record={p.name}.mesh,{p.v4},{p.v6}" for p in peers]
            dnsmasq = start_dnsmasq(
                tmp,
                [f"--server=/example.test/{forward}", "--dns-forward-max=1024", *records],
                ttl=600,
                name="dnsmasq",
                ns=ns,
                log_queries=False,
                cache_size=CACHE_SIZE,
            )
            processes.append(dnsmasq)
            config = node_config(
                tmp,
                me,
                peers,
                {
                    "listen": ["127.0.0.1:53"],
                    "upstreams": [f"udp://{upstream.host}:{upstream.port}"],
                    "cache_size": CACHE_SIZE,
                },
            )
            pairs: list[tuple[str, str]] = []  # dnsmasq's label in the rounds of each meshsup's
            for workers in args.workers:
                # A node of its own for each count: a worker's memory is then what it holds of
                # these rounds (its cache: about 200 bytes a name), not of the ones before.
                node = Node(tmp, "--config", str(config), "--dns-workers", str(workers), netns=ns, faults=False)
                processes.append(node)
                node.wait_ready()
                node.wait(lambda n=node, w=workers: len(dns_workers(n)) == w, what=f"{workers} dns workers")
                label = f"meshsup {workers} worker{'s' if workers > 1 else ''}"
                meshsup = Server(label, "127.0.0.1", 53, lambda n=node: dns_workers(n))
                reference = Server(
                    f"dnsmasq (vs {workers})", dnsmasq.host, dnsmasq.port, lambda: [dnsmasq.process.popen.pid]
                )
                run_rounds(ns, [reference, meshsup], peers, tmp, args, results)
                pairs.append((reference.name, label))
                rss[label] = [memory(pid) for pid in meshsup.pids()]
                processes.remove(node)
                node.close()
            rss["dnsmasq"] = [memory(dnsmasq.process.popen.pid)]
    finally:
        for process in reversed(processes):
            process.close() if isinstance(process, Node) else process.stop()
        ns.close()

    print(
        f"dnsperf, {CLIENTS} clients, {OUTSTANDING} outstanding, {args.seconds:g} s per run, medians of "
        f"{args.rounds} rounds; cold: {args.cold} names each asked once. Ratios against dnsmasq in the same "
        f"rounds: q/s, and CPU per query (dnsmasq's over ours: above 1, we use less)"
    )
    for reference, label in pairs:
        base = {workload: median(f) for workload, f in results[reference].items()}
        for server in (reference, label):
            for workload, runs in results[server].items():
                f = median(runs)
                print(
                    f"{server:>17}  {workload:<6} {f}  {f.qps / base[workload].qps:5.2f}x q/s  "
                    f"{base[workload].cpu_us / f.cpu_us:5.2f}x CPU  "
                    f"(q/s {min(r.qps for r in runs):.0f}..{max(r.qps for r in runs):.0f})"
                )
            memory_of = "dnsmasq" if server == reference else server
            print(f"{'':>17}  memory " + " + ".join(map(str, rss[memory_of])) + " MiB")
    if "cold" in args.workloads:
        reference, label = pairs[-1]
        ours, theirs = median(results[label]["cold"]), median(results[reference]["cold"])
        print(
            f"cold forwarding, {label}: {ours.qps:.0f} q/s against dnsmasq's {theirs.qps:.0f}: "
            f"{ours.qps / theirs.qps:.2f}x; CPU {ours.cpu_us:.1f} us/q against {theirs.cpu_us:.1f} us/q "
            f"(user {ours.user_us:.1f} against {theirs.user_us:.1f})"
        )
    workers = rss[pairs[-1][1]]
    print(
        f"memory, {pairs[-1][1]}: PSS "
        + " + ".join(f"{m.pss:.1f}" for m in workers)
        + " MiB (RSS "
        + " + ".join(f"{m.rss:.1f}" for m in workers)
        + f") against dnsmasq's PSS {rss['dnsmasq'][0].pss:.1f} "
        f"(RSS {rss['dnsmasq'][0].rss:.1f})"
    )


if __name__ == "__main__":
    main()

"""Flow-logging figures: counting on the hot path, shipping to rsyslog and nfcapd, netlog's CPU and memory.

Run as root: .venv/bin/python tests/bench/bench_netlog.py [--records 2000] [--windows 3] [--rounds 2]
             [--phase counting|shipping|node|loop]  (one of the figures below: 1, 2, 3 or 4)

1. Counting: what tun-io's per-packet tally costs, against the per-packet
   work tun-io already does (parse the destination, look up its peer); and
   iperf3 through a meshsup node (to wireguard-go) with flow logging on,
   against the same node with it off, alternating in the same run.
2. Shipping: records/s and connections/s from the shipper to a real rsyslog
   (spooled, fsynced, RFC 5424 over TCP, confirmed) and to a real nfcapd
   (IPFIX over UDP), against logger(1) sending the same messages to the
   same rsyslog and nfreplay(1) sending the same flows to the same nfcapd.
   The shipper is driven here by its own flush (rsyslog) or pump (nfcapd).
3. A real node's netlog fed the counts of N active connections once per
   window (5 s), shipping to rsyslog and nfcapd in its namespace: CPU per
   1,000 connections per window, and memory with 100,000 connections
   (netlog's RSS; tun-io's tally of them, measured in this process).
4. Shipping through netlog's loop: the same records spooled for one
   collector, shipped by a netlog actor running its own loop (the real
   Actor.run, in a child process: tests/netlog_loop.py), to a loopback HTTP
   collector in this process (keep-alive) and to rsyslog over TCP: records/s
   until the last one is at the collector, and the turns of the loop taken.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from meshsup.actors.bus.datapath import Outbox  # noqa: E402
from meshsup.actors.bus.endpoints import Runtime  # noqa: E402
from meshsup.actors.bus.messages import FlowCounts  # noqa: E402
from meshsup.actors.flowcount.tally import INNER, PacketTally, chunks  # noqa: E402
from meshsup.actors.netlog.flows import Classifier, FlowTable, Record, encode_record  # noqa: E402
from meshsup.actors.netlog.formats import flow_syslog  # noqa: E402
from meshsup.actors.netlog.shipper import Shipper  # noqa: E402
from meshsup.actors.netlog.syslog import encode_message  # noqa: E402
from meshsup.actors.routing.allowedips import AllowedIPs  # noqa: E402
from meshsup.actors.settings.collectors import parse_collectors  # noqa: E402
from meshsup.actors.wire import ip as packet  # noqa: E402
from tests.netlog_fixtures import HttpCollector, Nfcapd, Rsyslog, free_port, wait_until  # noqa: E402
from tests.netlog_loop import LoopRun, ship_through_loop  # noqa: E402
from tests.nodes import Netns, Node  # noqa: E402
from tests.topology import Identity, Underlay, WgGo, iperf3, meshsup_config, ping  # noqa: E402

CLASSIFIER = Classifier(["100.64.0.0/10"], [], [], anonymize_exit=False)


def tcp_packet(sport: int, size: int = 1420, src: int = 0x64400001) -> bytes:
    header = struct.pack("!BBHHHBBHI4s", 0x45, 0, size, 0, 0, 64, 6, 0, src, bytes([100, 64, 0, 2]))
    return header + struct.pack("!HH", sport, 5201) + bytes(size - 24)


def per_packet(work, batch: list[bytes], rounds: int = 400) -> float:
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(rounds):
            work(batch)
        best = min(best, (time.perf_counter() - start) / rounds / len(batch))
    return best * 1e9


def bench_counting() -> None:
    batch = [tcp_packet(40000 + i % 4) for i in range(256)]  # a TCP transfer's batch: few flows
    tally = PacketTally()
    tally.enabled = True
    routes = AllowedIPs()
    routes.insert(ipaddress.ip_network("100.64.0.2/32"), 0)

    def route(ps: list[bytes]) -> None:  # what tun-io does per packet already
        lookup = routes.lookup
        for p in ps:
            dst = packet.dst_addr(p)
            lookup(dst) if dst is not None else None

    counted, routed = per_packet(tally.add_packets, batch), per_packet(route, batch)
    print(
        f"counting on the hot path: {counted:.0f} ns/packet; tun-io's routing work {routed:.0f} ns/packet "
        f"(+{counted / routed:.0%})"
    )


def tunnel_mbits(workdir: Path, extra: str, seconds: int = 5) -> tuple[float, float]:
    """iperf3 both ways between a meshsup node (alpha) and wireguard-go, in Mbit/s."""
    u = Underlay()
    (ns_a, addr_a), (ns_b, addr_b) = u.host(), u.host()
    rsyslog = Rsyslog(workdir / f"rsyslog-{time.time()}", free_port(), ns_a)
    try:
        a, b = Identity("alpha", 1), Identity("bravo", 2)
        a.endpoint, b.endpoint = f"{addr_a}:51820", f"{addr_b}:51820"
        rsyslog.start()
        config = meshsup_config(workdir, a, [b], extra=extra.format(port=rsyslog.port))
        u.track(Node(workdir, "--config", str(config), netns=ns_a, faults=False)).wait_ready()
        u.track(WgGo(ns_b, b, workdir)).add_peer(a)
        ping(ns_a, b.v4)
        out = iperf3(ns_a, ns_b, b.v4, seconds=seconds)["end"]["sum_received"]["bits_per_second"]
        back = iperf3(ns_a, ns_b, b.v4, seconds=seconds, reverse=True)["end"]["sum_received"]["bits_per_second"]
        return out / 1e6, back / 1e6
    finally:
        u.close()
        rsyslog.stop()


def bench_tunnel(workdir: Path, rounds: int) -> None:
    on = '[netlog]\n[[netlog.collectors]]\nkind = "syslog"\naddress = "tcp://127.0.0.1:{port}"\n'
    runs: dict[str, list[tuple[float, float]]] = {"off": [], "on": []}
    for _ in range(rounds):
        for name, extra in (("off", ""), ("on", on)):
            runs[name].append(tunnel_mbits(workdir, extra))
    mean = {k: (sum(r[0] for r in v) / len(v), sum(r[1] for r in v) / len(v)) for k, v in runs.items()}
    print(
        f"tunnel, meshsup <-> wireguard-go, {rounds} rounds: flow logging off {mean['off'][0]:.0f} / "
        f"{mean['off'][1]:.0f} Mbit/s, on {mean['on'][0]:.0f} / {mean['on'][1]:.0f} Mbit/s "
        f"({mean['on'][0] / mean['off'][0]:.2f}x / {mean['on'][1] / mean['off'][1]:.2f}x)"
    )


def records(count: int, connections: int) -> list[Record]:
    table = FlowTable("bench-node", CLASSIFIER, start=time.time(), max_record_bytes=1 << 30)
    out: list[Record] = []
    for r in range(count):
        for c in range(connections):
            n = r * connections + c
            table.add(
                (6, f"100.64.{n >> 16 & 63}.{n >> 8 & 255}:{1024 + n % 60000}", "100.64.0.2:443"), 12, 15000, 9, 600
            )
        out += table.close_window(time.time())
    return out


def bench_rsyslog(workdir: Path, batch: list[Record], connections: int) -> None:
    ours = Rsyslog(workdir / "ours", free_port())
    ours.start()
    try:
        shipper = Shipper(
            parse_collectors([{"kind": "syslog", "address": f"tcp://127.0.0.1:{ours.port}"}]),
            workdir / "spool",
            "bench",
            confirm_delay=0.05,
        )
        start = time.perf_counter()
        shipper.submit(batch, time.time())
        assert shipper.flush(time.time() + 300)
        assert wait_until(lambda: len(ours.messages()) >= len(batch), 120)
        took = time.perf_counter() - start
        shipper.close()
    finally:
        ours.stop()
    theirs = Rsyslog(workdir / "logger", free_port())
    theirs.start()
    try:
        lines = workdir / "lines"
        lines.write_bytes(b"\n".join(encode_record(r) for r in batch) + b"\n")
        start = time.perf_counter()
        with open(lines, "rb") as stdin:
            subprocess.run(
                [
                    "logger",
                    "--tcp",
                    "--octet-count",
                    "--rfc5424",
                    "-n",
                    "127.0.0.1",
                    "-P",
                    str(theirs.port),
                    "-S",
                    "1000000",
                    "-t",
                    "meshsup",
                ],
                stdin=stdin,
                check=True,
            )
        assert wait_until(lambda: len(theirs.messages()) >= len(batch), 120)
        took_logger = time.perf_counter() - start
    finally:
        theirs.stop()
    size = sum(len(encode_message(flow_syslog(r, 0, "bench"))) for r in batch) / len(batch)
    rate, rate_logger = len(batch) / took, len(batch) / took_logger
    print(
        f"rsyslog, {connections:>5} connections/record ({size / 1024:.1f} KiB): {rate:8.0f} records/s "
        f"{rate * connections:9.0f} connections/s   logger(1): {rate_logger:8.0f} records/s ({rate / rate_logger:.2f}x)"
    )


def bench_nfcapd(workdir: Path, batch: list[Record], connections: int) -> None:
    ours = Nfcapd(workdir / "ours", free_port())
    ours.start()
    try:
        shipper = Shipper(
            parse_collectors([{"kind": "ipfix", "address": f"udp://127.0.0.1:{ours.port}"}]), workdir / "spool", "bench"
        )
        start = time.perf_counter()
        sender = shipper.senders[0]
        for r in batch:  # record by record, as windows close, so the queue never overflows
            shipper.submit([r], time.time())
            while not sender.idle():
                shipper.pump(time.time())
        took = time.perf_counter() - start
        shipper.close()
        time.sleep(0.5)
    finally:
        ours.stop()
        path = ours.last_file()
    stats = ours.stats(path)
    theirs = Nfcapd(workdir / "nfreplay", free_port())
    theirs.start()
    try:
        start = time.perf_counter()
        subprocess.run(
            ["nfreplay", "-r", str(path), "-H", "127.0.0.1", "-p", str(theirs.port), "-v", "9", "-d", "0"],
            check=True,
            capture_output=True,
        )
        took_replay = time.perf_counter() - start
        time.sleep(0.5)
    finally:
        theirs.stop()
        replayed = theirs.stats(theirs.last_file())
    flows, rate = int(stats["Flows"]), len(batch) * connections / took
    print(
        f"nfcapd,  {connections:>5} connections/record: {len(batch) / took:8.0f} records/s {rate:9.0f} connections/s "
        f"(received {flows}/{len(batch) * connections}, sequence failures {stats['Sequence failures']})   "
        f"nfreplay(1): {int(replayed['Flows']) / took_replay:9.0f} flows/s "
        f"({rate * took_replay / int(replayed['Flows']):.2f}x)"
    )


def bench_loop(workdir: Path, batch: list[Record], connections: int) -> None:
    http = HttpCollector(keep_alive=True)
    try:
        run = ship_through_loop(
            workdir / "http", [{"kind": "http", "address": f"http://127.0.0.1:{http.port}/"}], batch
        )
        assert len(http.accepted()) == len(batch), (len(http.accepted()), len(batch))
        report_loop("http", batch, connections, run, http.requests[-1].at - run.started)
    finally:
        http.close()
    rsyslog = Rsyslog(workdir / "rsyslog", free_port())
    rsyslog.start()
    try:
        run = ship_through_loop(
            workdir / "syslog", [{"kind": "syslog", "address": f"tcp://127.0.0.1:{rsyslog.port}"}], batch
        )
        assert wait_until(lambda: len(rsyslog.messages()) >= len(batch), 60)
        report_loop("rsyslog", batch, connections, run, rsyslog.output.stat().st_mtime - run.started)
    finally:
        rsyslog.stop()


def report_loop(name: str, batch: list[Record], connections: int, run: LoopRun, took: float) -> None:
    """`took`: from the loop's start to the last record at the collector (rsyslog: its output's last write)."""
    print(
        f"netlog's loop -> {name:<7} {connections:>5} connections/record: {len(batch) / took:8.0f} records/s "
        f"({len(batch)} in {took:.2f} s, {run.ticks} turns of the loop; spool empty after {run.seconds:.2f} s)"
    )


def proc_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_memory(pid: int) -> tuple[int, int]:
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return int(status["VmRSS"].split()[0]) * 1024, int(status["VmHWM"].split()[0]) * 1024


def connection_entries(count: int) -> tuple[list[list[object]], list[list[object]]]:
    tx, rx = [], []
    for n in range(count):
        local = bytes([100, 64, 0, 1]) + bytes([100, 64 + (n >> 16 & 63), n >> 8 & 255, n & 255])
        tx.append([b"\x06" + local + struct.pack("!HH", 1024 + n % 60000, 443), 12, 15000])
        rx.append([b"\x06" + local[4:] + local[:4] + struct.pack("!HH", 443, 1024 + n % 60000), 9, 600])
    return tx, rx


def bench_node(workdir: Path, sizes: list[int], windows: int) -> None:
    ns = Netns("nb")
    rsyslog = Rsyslog(workdir / "node-rsyslog", free_port(), ns)
    nfcapd = Nfcapd(workdir / "node-nfcapd", free_port(), ns)
    node = None
    try:
        rsyslog.start()
        nfcapd.start()
        extra = (
            f"[netlog]\ninterval = 5\nanonymize_exit = false\n"
            f'[[netlog.collectors]]\nkind = "syslog"\naddress = "tcp://127.0.0.1:{rsyslog.port}"\n'
            f'[[netlog.collectors]]\nkind = "ipfix"\naddress = "udp://127.0.0.1:{nfcapd.port}"\n'
        )
        node = Node(
            workdir,
            "--config",
            str(meshsup_config(workdir, Identity("alpha", 1), [], extra=extra)),
            netns=ns,
            faults=False,
        )
        node.wait_ready()
        pid = node.actors()["netlog"]["pid"]
        push = Outbox(Runtime(node.state_dir).inbox)  # the data path tun-io and magicsock use
        idle_before = proc_cpu(pid)
        time.sleep(5)
        idle = proc_cpu(pid) - idle_before
        print(f"netlog idle: {idle / 5 * 1000:.1f} ms CPU per second")
        seq = 0
        for size in sizes:
            tx, rx = connection_entries(size)
            parts = chunks(tx, rx)
            before, start = proc_cpu(pid), time.time()
            for w in range(windows):
                for t, r in parts:
                    seq += 1
                    msg = FlowCounts(source="bench", epoch=1, seq=seq, layer=INNER, tx=t, rx=r)
                    while not push.send("netlog", msg):  # netlog's queue is full: wait, lose nothing
                        time.sleep(0.001)
                time.sleep(max(0.0, start + 5 * (w + 1) - time.time()))
            used = proc_cpu(pid) - before - idle / 5 * (time.time() - start)
            rss, peak = proc_memory(pid)
            print(
                f"netlog, {size:>6} active connections per 5 s window: "
                f"{used / windows / (size / 1000) * 1000:6.1f} ms CPU per 1,000 connections per window "
                f"({used / windows / 5:.0%} of a core); RSS {rss / 2**20:.0f} MiB, peak {peak / 2**20:.0f} MiB"
            )
        push.close()
        made = node.counters()["netlog"].get("records", 0)
        start = time.time()
        wait_until(lambda: sum(1 for m in rsyslog.messages() if m["msgid"] == "flowlog") >= made, 120, 0.5)
        delivered = sum(1 for m in rsyslog.messages() if m["msgid"] == "flowlog")
        print(
            f"  records made {made}, at rsyslog {delivered} ({time.time() - start:.1f} s after the last window), "
            f"netlog restarts {node.actors()['netlog']['restarts']}"
        )
    finally:
        if node is not None:
            node.close()
        rsyslog.stop()
        nfcapd.stop()
        ns.close()


def bench_tally_memory(count: int) -> None:
    tracemalloc.start()
    tally = PacketTally()
    tally.enabled = True
    for start in range(0, count, 256):
        tally.add_packets([tcp_packet(40000, 64, src=0x64400000 + n) for n in range(start, min(count, start + 256))])
    size = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    print(f"tun-io's tally of {count} connections (one direction): {size / 2**20:.1f} MiB")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=2000, help="small records shipped per collector")
    ap.add_argument("--windows", type=int, default=3, help="windows per size fed to the real netlog")
    ap.add_argument("--rounds", type=int, default=2, help="tunnel runs with flow logging off and on")
    ap.add_argument("--phase", choices=("counting", "shipping", "node", "loop"), help="only this phase")
    args = ap.parse_args()
    for tool in ("rsyslogd", "nfcapd", "nfdump", "nfreplay", "logger"):
        if shutil.which(tool) is None:
            sys.exit(f"needs {tool} (deploy/setup.sh installs it)")
    phases = {args.phase} if args.phase else {"counting", "shipping", "loop", "node"}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if "counting" in phases:
            bench_counting()
            bench_tally_memory(100_000)
            bench_tunnel(work, args.rounds)
        for count, connections in ((args.records, 10), (max(20, args.records // 50), 1500)):
            batch = records(count, connections) if phases & {"shipping", "loop"} else []
            if "shipping" in phases:
                bench_rsyslog(work / f"rsyslog-{connections}", batch, connections)
                bench_nfcapd(work / f"nfcapd-{connections}", batch, connections)
            if "loop" in phases:
                bench_loop(work / f"loop-{connections}", batch, connections)
        if "node" in phases:
            bench_node(work, [1_000, 10_000, 100_000], args.windows)


if __name__ == "__main__":
    main()

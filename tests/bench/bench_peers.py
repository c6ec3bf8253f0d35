"""Memory and control-path figures with many configured peers, against wireguard-go.

Run as root: .venv/bin/python tests/bench/bench_peers.py [--peers 1000]
Prints the node's total memory (RSS and PSS over the supervisor and every
actor: actors are forked from one preloaded server, so PSS counts shared pages
once) and each process's, start-up time, `wg show` time and one-peer `wg set`
time (the median of a new peer and a change of its allowed IPs, SET_ROUNDS
times each), and the same for wireguard-go configured with the same peers, in
the same run.

With --coordinated the node has no [[peers]] but [coordination]: the peers are
node records written straight into the mesh's bucket (a nats-server in a
namespace) before it starts. Then also: the time to all peers applied, and from
one record's write (an address changed, an endpoint changed, a record added, one
deleted; SET_ROUNDS times each) until `wg show` shows it and until every actor
has it (the supervisor's log says when: polling `wg show` would load what it
measures), and until the route is there (the router's step).
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from meshsup.actors.coord.record import NodeRecord, node_key  # noqa: E402
from meshsup.actors.settings.keys import b64, generate_private, parse_key, public_of  # noqa: E402
from meshsup.actors.settings.node import parse_endpoint  # noqa: E402
from tests.actors.coord.natsrv import NatsServer, Writer  # noqa: E402
from tests.actors.coord.test_coord_netns import events_after  # noqa: E402
from tests.nodes import Netns, Node  # noqa: E402
from tests.topology import Identity, Underlay, WgGo, meshsup_config  # noqa: E402

SET_ROUNDS = 5
APPLYING = "applying the mesh's peers"  # the supervisor's log: from then on `wg show` shows them
APPLIED = "mesh peers applied"  # ... and when every actor has them


def memory_kib(pids: list[int]) -> tuple[int, int]:
    """Summed RSS and PSS (KiB) of these processes."""
    rss = pss = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                key, _, value = line.partition(":")
                if key == "Rss":
                    rss += int(value.split()[0])
                elif key == "Pss":
                    pss += int(value.split()[0])
        except OSError:
            continue
    return rss, pss


def peers_toml(n: int) -> tuple[str, list[tuple[str, str]]]:
    peers = []
    lines = []
    for i in range(n):
        key = b64(public_of(generate_private()))
        allowed = f"100.65.{i // 250}.{i % 250 + 1}/32"
        peers.append((key, allowed))
        lines.append(
            f'[[peers]]\npublic_key = "{key}"\nallowed_ips = ["{allowed}"]\n'
            f'endpoints = ["198.51.100.{i % 250 + 2}:51820"]\n'
        )
    return "\n".join(lines), peers


def timed(fn) -> float:
    t = time.monotonic()
    fn()
    return time.monotonic() - t


def one_peer_sets(wg_set: Callable[..., object], rounds: int = SET_ROUNDS) -> float:
    """The median time of a one-peer `wg set` (a new peer, then its allowed IPs changed), over rounds."""
    times = []
    for i in range(rounds):
        extra = b64(public_of(generate_private()))
        times.append(timed(lambda: wg_set("peer", extra, "allowed-ips", f"100.66.{i}.1/32")))
        times.append(timed(lambda: wg_set("peer", extra, "allowed-ips", f"100.66.{i}.2/32")))
    return statistics.median(times)


def bench_meshsup(tmp: Path, stanzas: str) -> dict[str, Any]:
    conf = tmp / "node.toml"
    conf.write_text('[node]\naddresses = ["100.64.0.1/32"]\n' + stanzas)
    ns = Netns("bp")
    node = Node(tmp, "--config", str(conf), netns=ns, faults=False)
    try:
        t0 = time.monotonic()
        node.wait_ready(timeout=120)
        start = time.monotonic() - t0
        return figures(start, lambda: [node.proc.pid, *descendants(node.proc.pid)], ns, node.iface)
    finally:
        node.close()
        ns.close()


def mesh_record(i: int, key: str, allowed: str, port: int = 51820) -> tuple[str, bytes]:
    """Peer `i` of peers_toml as a node record in the mesh's bucket (with a disco key and a home
    relay, as a node's has: they go to magicsock as hints)."""
    record = NodeRecord(
        name=f"p{i}",
        public_key=parse_key(key),
        disco_key=generate_private(),
        addresses=(
            ipaddress.ip_network(allowed),
            ipaddress.ip_network(f"fd7a:115c:a1e0::{i // 65536 + 1}:{i % 65536:x}/128"),
        ),
        endpoints=(parse_endpoint(f"198.51.100.{i % 250 + 2}:{port}"),),
        relay="r1",
    )
    return node_key(record.name), record.encode()


def dump_lines(ns: Netns, iface: str) -> list[str]:
    return ns.run("wg", "show", iface, "dump").stdout.splitlines()[1:]


def until_shown(ns: Netns, iface: str, shown: Callable[[list[str]], bool], since: float) -> float:
    """Seconds from `since` (time.time) until `wg show` (its lines) says `shown`, each poll included;
    polled twice a second (a dump of thousands of peers keeps the supervisor busy)."""
    while time.time() < since + 120:
        if shown(dump_lines(ns, iface)):
            return time.time() - since
        time.sleep(0.5)
    raise TimeoutError("wg show never showed the change")


def routed(ns: Netns, address: str) -> bool:
    return " dev ms" in ns.run("ip", "route", "get", address, check=False).stdout


def until(probe: Callable[[], Any], since: float, what: str) -> float:
    """Seconds from `since` (time.time) until `probe` says so."""
    while time.time() < since + 60:
        if probe():
            return time.time() - since
    raise TimeoutError(what)


def mesh_changes(writer: Writer, node: Node, peers: list[tuple[str, str]]) -> dict[str, float]:
    """From one record's write, by kind of change (the median of SET_ROUNDS): until the supervisor
    applies it, so `wg show` shows it, and until every actor acked it, as a `wg set` returns (its
    log; polling `wg show` itself, each dump of thousands of peers keeps the supervisor busy a
    tenth of a second, delaying what it measures); for a change of addresses until the route is
    there (the router's step, polled from outside); then once `wg show` to confirm."""
    ns, times = node.netns, {}

    def change(
        kind: str, entry: tuple[str, bytes | None], route: Callable[[], bool] | None, shown: Callable[[str], bool]
    ) -> None:
        t = writer.write([entry])
        if route is not None:
            times.setdefault(f"{kind}_routed_s", []).append(until(route, t, "routed"))
        until(lambda: APPLIED in events_after(node, t, (APPLIED,)), t, "applied")
        events = events_after(node, t, (APPLYING, APPLIED))
        times.setdefault(f"{kind}_shown_s", []).append(events[APPLYING])
        times.setdefault(f"{kind}_applied_s", []).append(events[APPLIED])
        assert shown("\n".join(dump_lines(ns, node.iface))), kind

    for r in range(SET_ROUNDS):
        key, allowed = peers[r]
        moved, port, extra = f"100.66.{r}.1", f":{51821 + r}\t", b64(public_of(generate_private()))
        change("addr", mesh_record(r, key, f"{moved}/32"), lambda: routed(ns, moved), lambda x: moved in x)
        change("endpoint", mesh_record(r, key, f"{moved}/32", 51821 + r), None, lambda x: port in x)
        new = f"100.66.{r}.2"
        change("add", mesh_record(100_000 + r, extra, f"{new}/32"), lambda: routed(ns, new), lambda x: extra in x)
        gone = (node_key(f"p{100_000 + r}"), None)
        change("del", gone, lambda: not routed(ns, new), lambda x: extra not in x)
    return {k: statistics.median(v) for k, v in times.items()}


def settle(node: Node) -> None:
    """Until the mesh's peers went through every actor and every actor runs (one that took the
    first peers too slowly was restarted)."""

    def settled() -> bool:
        status = node.status()
        return not status["coordination"]["applied"]["applying"] and all(
            a["state"] == "running" for a in status["actors"]
        )

    node.wait(settled, 120, "the mesh's peers applied")


def bench_coordinated(tmp: Path, peers: list[tuple[str, str]]) -> dict[str, Any]:
    """A node with [coordination] alone, its peers records in the bucket before it starts."""
    u = Underlay()
    try:
        ns_n, addr_n = u.host()
        server = u.track(NatsServer(ns_n, addr_n, tmp, "n1"))
        server.wait_ready()
        writer = u.track(Writer(ns_n, server.url))
        t = time.monotonic()
        writer.write([mesh_record(i, k, a) for i, (k, a) in enumerate(peers)])
        written = time.monotonic() - t
        ns, addr = u.host()
        ident = Identity("bench", 1)
        ident.endpoint = f"{addr}:51820"
        mesh = f'\n[coordination]\nservers = ["{server.url}"]\nmesh = "test"\nlifetime = 3600\n'
        t0 = time.time()
        node = u.track(Node(tmp, "--config", str(meshsup_config(tmp, ident, [], extra=mesh)), netns=ns, faults=False))
        node.wait_ready(timeout=120)
        start = time.time() - t0
        applied = until_shown(ns, node.iface, lambda lines: len(lines) == len(peers), t0)
        settle(node)
        try:
            out = figures(start, lambda: [node.proc.pid, *descendants(node.proc.pid)], ns, node.iface)
        except subprocess.CalledProcessError as err:
            raise RuntimeError(f"{err.stderr.strip()}; the node said: {node.stderr().splitlines()[-12:]}") from None
        out.update(mesh_changes(writer, node, peers), applied_s=applied, written_s=written)
        out["died"] = node.stderr().count('"actor died"')
        return out
    finally:
        u.close()


def bench_wireguard_go(tmp: Path, peers: list[tuple[str, str]]) -> dict[str, Any]:
    ns = Netns("bp")
    wg = WgGo(ns, Identity("wg", 1), tmp)
    try:
        conf = tmp / "wg.conf"
        conf.write_text(
            "".join(
                f"[Peer]\nPublicKey = {k}\nAllowedIPs = {a}\nEndpoint = 198.51.100.{i % 250 + 2}:51820\n\n"
                for i, (k, a) in enumerate(peers)
            )
        )
        start = timed(lambda: ns.run("wg", "addconf", wg.iface, str(conf)))
        return figures(start, lambda: [wg.proc.pid, *descendants(wg.proc.pid)], ns, wg.iface)
    finally:
        wg.close()
        ns.close()


def figures(start: float, processes: Callable[[], list[int]], ns: Netns, iface: str) -> dict[str, Any]:
    """A configured interface's figures, once it settled: its processes' memory (each's too),
    `wg show` and one-peer `wg set` times; `start` as measured by the caller."""
    time.sleep(2)
    pids = processes()
    each = [(title(pid), *memory_kib([pid])) for pid in pids]
    return {
        "start_s": start,
        "rss_mib": sum(rss for _, rss, _ in each) / 1024,
        "pss_mib": sum(pss for _, _, pss in each) / 1024,
        "processes": len(pids),
        "wg_show_s": timed(lambda: ns.run("wg", "show", iface, "dump")),
        "wg_set_s": one_peer_sets(lambda *args: ns.run("wg", "set", iface, *args)),
        "each": each,
    }


def title(pid: int) -> str:
    """What a process calls itself: an actor's title (meshsup: NAME), else its program's name."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "?"
    first, line = argv[0].decode(errors="replace"), b" ".join(argv)
    if first.startswith("meshsup: "):
        return first.removeprefix("meshsup: ")
    for module, name in ((b"multiprocessing.forkserver", "fork server"), (b"resource_tracker", "resource tracker")):
        if module in line:
            return name
    return "supervisor" if b"meshsup" in line else Path(first).name


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (actors retitle themselves, so follow parent links)."""
    parent: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    out, frontier = [], [pid]
    while frontier:
        kids = [p for p, pp in parent.items() if pp in frontier]
        out += kids
        frontier = kids
    return out


def bench_args(
    default_peers: int, ap: argparse.ArgumentParser | None = None
) -> tuple[argparse.Namespace, str, list[tuple[str, str]]]:
    """The command line (`ap`'s, with --peers), checked to run as root, and that many peers
    (peers_toml): what a bench of many peers starts with."""
    ap = ap or argparse.ArgumentParser()
    ap.add_argument("--peers", type=int, default=default_peers)
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root")
    return (args, *peers_toml(args.peers))


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--coordinated", action="store_true", help="the peers from the mesh's bucket, not [[peers]]")
    args, stanzas, peers = bench_args(1000, ap)
    print("load before:", uptime())
    with tempfile.TemporaryDirectory() as tmp:
        tmp_dir = Path(tmp)
        tmp_dir.chmod(0o755)  # nats-server's store and the node's files
        ours = bench_coordinated(tmp_dir, peers) if args.coordinated else bench_meshsup(tmp_dir, stanzas)
        theirs = bench_wireguard_go(tmp_dir, peers)
    print(f"{args.peers} {'coordinated' if args.coordinated else 'configured'} peers; load after:", uptime())
    print(f"{'':<16}{'meshsup':>12}{'wireguard-go':>14}{'ratio':>8}")
    for key in ("rss_mib", "pss_mib", "start_s", "wg_show_s", "wg_set_s"):
        ratio = ours[key] / theirs[key] if theirs[key] else float("nan")
        print(f"{key:<16}{ours[key]:>12.3f}{theirs[key]:>14.3f}{ratio:>7.1f}x")
    if args.coordinated:
        print(
            f"records written in {ours['written_s']:.2f} s; all in `wg show` {ours['applied_s']:.2f} s from launch;"
            f" actors restarted on the way: {ours['died']}"
        )
        print("from one record's write (median): until `wg show` shows it; every actor has it; routed")
        for kind in ("addr", "endpoint", "add", "del"):
            routed_s = ours.get(f"{kind}_routed_s")
            print(
                f"{kind:<16}{ours[f'{kind}_shown_s']:>12.3f}{ours[f'{kind}_applied_s']:>14.3f}"
                f"{'-' if routed_s is None else f'{routed_s:.3f}':>8}"
            )
    print(f"meshsup processes: {ours['processes']:.0f} (start_s for wireguard-go is `wg addconf` alone)")
    print(
        "meshsup per process, RSS / PSS MiB: "
        + ", ".join(f"{t} {r / 1024:.0f}/{p / 1024:.0f}" for t, r, p in ours["each"])
    )


if __name__ == "__main__":
    main()

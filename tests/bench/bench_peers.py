"""Memory and control-path figures with many configured peers, against wireguard-go.

Run as root: .venv/bin/python tests/bench/bench_peers.py [--peers 1000]
Prints the node's total memory (RSS and PSS over the supervisor and every
actor: actors are forked from one preloaded server, so PSS counts shared pages
once) and each process's, start-up time, `wg show` time and one-peer `wg set`
time (the median of a new peer and a change of its allowed IPs, SET_ROUNDS
times each), and the same for wireguard-go configured with the same peers, in
the same run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from meshsup.actors.settings.keys import b64, generate_private, public_of  # noqa: E402
from tests.nodes import Netns, Node  # noqa: E402
from tests.topology import Identity, WgGo  # noqa: E402

SET_ROUNDS = 5


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


def main() -> None:
    args, stanzas, peers = bench_args(1000)
    with tempfile.TemporaryDirectory() as tmp:
        ours = bench_meshsup(Path(tmp), stanzas)
        theirs = bench_wireguard_go(Path(tmp), peers)
    print(f"{args.peers} configured peers")
    print(f"{'':<14}{'meshsup':>12}{'wireguard-go':>14}{'ratio':>8}")
    for key in ("rss_mib", "pss_mib", "start_s", "wg_show_s", "wg_set_s"):
        ratio = ours[key] / theirs[key] if theirs[key] else float("nan")
        print(f"{key:<14}{ours[key]:>12.3f}{theirs[key]:>14.3f}{ratio:>7.1f}x")
    print(f"meshsup processes: {ours['processes']:.0f} (start_s for wireguard-go is `wg addconf` alone)")
    print(
        "meshsup per process, RSS / PSS MiB: "
        + ", ".join(f"{t} {r / 1024:.0f}/{p / 1024:.0f}" for t, r, p in ours["each"])
    )


if __name__ == "__main__":
    main()

"""A real mesh: 3 clustered NATS servers and 20 nodes in namespaces, configured by nothing but
[coordination] (issue #18, item 7). Prints the memory it took (PSS of every process)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.actors.coord.natsrv import NatsServer
from tests.actors.coord.test_coord_netns import (
    LIFETIME,
    MILESTONES,
    cluster,
    events_after,
    kill_node,
    peer_names,
    process_tree,
)
from tests.actors.coord.test_coord_netns import launch as coord_launch
from tests.topology import Identity, Netns, Node, Underlay, have

pytestmark = [
    pytest.mark.netns,
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
    pytest.mark.skipif(bool(have("nats-server", "ping")), reason=str(have("nats-server", "ping"))),
]

NODES = 20


WORKERS = ("--crypto-workers", "1", "--dns-workers", "1")


def launch(u: Underlay, tmp: Path, ident: Identity, servers: list[NatsServer]) -> tuple[Netns, Node]:
    return coord_launch(u, tmp, ident, servers, args=WORKERS, replicas=3)


def unreachable(ns: Netns, targets: list[str]) -> list[str]:
    """The targets that answer no ping from `ns` (each tried for a few seconds, all at once)."""
    script = " ".join(f"(ping -c1 -W1 -w4 {a} >/dev/null || echo {a}) &" for a in targets) + " wait"
    return ns.run("sh", "-c", script, check=False, timeout=30).stdout.split()


def pss_kib(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total


def test_twenty_nodes_three_servers(underlay: Underlay, tmp_path: Path) -> None:
    u = underlay
    servers = cluster(u, tmp_path)
    idents = [Identity(f"n{i:02d}", i) for i in range(1, NODES + 1)]
    nodes = []
    for ident in idents:  # one at a time: 20 starting at once swamp two cores
        nodes.append(launch(u, tmp_path, ident, servers))
        nodes[-1][1].wait_ready(120)
    names = {i.name for i in idents}
    servers[0].stop()  # one server killed while the mesh forms: changes nothing
    for ident, (_, node) in zip(idents, nodes):
        node.wait(lambda node=node, ident=ident: peer_names(node) == names - {ident.name}, 90, f"{ident.name}'s peers")
    failed = {}
    for ident, (ns, _) in zip(idents, nodes):
        missing = unreachable(ns, [i.v4 for i in idents if i is not ident])
        missing = unreachable(ns, missing) if missing else []  # a first handshake may lose its first echo
        if missing:
            failed[ident.name] = missing
    if failed:  # what the nodes that failed say of themselves: actors restarted, handshakes, drops
        by_name = {ident.name: node for ident, (_, node) in zip(idents, nodes)}
        said = {n: (by_name[n].actors(), by_name[n].counters().get("crypto")) for n in failed}
        raise AssertionError(f"pairs that do not ping: {failed}\n{said}")
    node_pids = [p for _, node in nodes for p in process_tree(node.proc.pid)]
    nats_pids = [s.proc.pid for s in servers if s.proc is not None]
    coord_pids = [a["pid"] for _, node in nodes for a in node.status()["actors"] if a["kind"] == "coord"]
    mesh_kib, nats_kib, coord_kib = pss_kib(node_pids), pss_kib(nats_pids), pss_kib(coord_pids)
    print(
        f"\nmemory: {NODES} nodes {mesh_kib / 1024:.0f} MiB PSS ({mesh_kib / 1024 / NODES:.1f} MiB a node, "
        f"{len(node_pids)} processes; of it the coord actors {coord_kib / 1024 / NODES:.1f} MiB a node); "
        f"{len(nats_pids)} nats-servers {nats_kib / 1024:.0f} MiB"
    )
    # A node that stops (killed: nothing takes its record away) is gone from the others within its lifetime.
    kill_node(nodes[-1][1])
    killed = time.monotonic()
    first = nodes[0][1]
    first.wait(lambda: idents[-1].name not in peer_names(first), LIFETIME + 10, "expired")
    print(f"killed node gone after {time.monotonic() - killed:.1f} s (lifetime {LIFETIME} s; status polled)")
    for _, node in nodes[1:-1]:
        node.wait(lambda node=node: idents[-1].name not in peer_names(node), 5, "expired everywhere")
    # A newcomer: every other node pings it from the moment it starts; each first answer is timed.
    newcomer = Identity("n99", 99)
    started, started_wall = time.monotonic(), time.time()
    ns_new, node_new = launch(u, tmp_path, newcomer, servers)
    # (ping gives up at once while there is no route yet: it is run again until it is answered)
    until = f"until ping -c1 -W1 {newcomer.v4} >/dev/null 2>&1; do sleep 0.1; done"
    pings = [ns.popen("timeout", "30", "sh", "-c", until, stdout=subprocess.DEVNULL) for ns, _ in nodes[:-1]]
    times = []
    try:
        for p in pings:
            p.wait(40)
            times.append(time.monotonic() - started)
        codes = [p.returncode for p in pings]
    finally:
        for p in pings:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGKILL)
                p.wait()
    ready = node_new.wait_ready()["node"]["ready"]
    assert ready and codes == [0] * len(pings)
    marks = events_after(node_new, started_wall, MILESTONES)
    applied = [events_after(n, started_wall, ("applying the mesh's peers",)) for _, n in nodes[:-1]]
    applied_at = [a["applying the mesh's peers"] for a in applied if a]
    print(
        f"newcomer answered all {len(pings)} nodes {max(times):.1f} s after its launch "
        f"({max(times) - marks['node ready']:.1f} s after it was ready); from its launch: "
        + ", ".join(f"{k} {v:.1f} s" for k, v in sorted(marks.items(), key=lambda kv: kv[1]))
        + f"; the others began applying it {min(applied_at):.1f}..{max(applied_at):.1f} s"
    )
    # 1.5-2 s from launch on a quiet machine (tests/bench/bench_mesh.py); here 20 nodes share 2 cores
    assert max(times) - marks["node ready"] < 5.0

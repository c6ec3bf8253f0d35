"""How soon a newcomer to a coordinated mesh is reached by every other node (issue #18, item 7).

Run as root: .venv/bin/python tests/bench/bench_mesh.py [--nodes 5] [--rounds 3]
One nats-server and N nodes with nothing but [coordination] (no [[peers]]), each in its own
namespace; then, each round, a newcomer starts while every other node pings it without pause.
Prints, from the newcomer's process launch: (a) its "node ready", (b) the first answered ping of
any node, (c) the last; then where the time went (the newcomer's own log, and when the others
began applying it); and the load (`uptime`) before and after.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.actors.coord.natsrv import NatsServer  # noqa: E402
from tests.actors.coord.test_coord_netns import MILESTONES, events_after  # noqa: E402
from tests.actors.coord.test_coord_netns import launch as coord_launch  # noqa: E402
from tests.topology import Identity, Netns, Node, Underlay  # noqa: E402

WORKERS = ("--crypto-workers", "1", "--dns-workers", "1")


def launch(u: Underlay, tmp: Path, ident: Identity, server: NatsServer) -> tuple[Netns, Node]:
    return coord_launch(u, tmp, ident, [server], args=WORKERS)


def round_once(u: Underlay, tmp: Path, server: NatsServer, nodes: list[tuple[Netns, Node]], index: int) -> dict:
    newcomer = Identity(f"new{index}", 200 + index)
    until = f"until ping -c1 -W1 {newcomer.v4} >/dev/null 2>&1; do sleep 0.05; done"
    # The pingers start first: each first answer is timed from the launch, not from when a pinger began.
    pings = [ns.popen("timeout", "60", "sh", "-c", until, stdout=subprocess.DEVNULL) for ns, _ in nodes]
    started, wall = time.monotonic(), time.time()
    ns_new, node_new = launch(u, tmp, newcomer, server)
    answered = []
    try:
        waiting = list(pings)
        while waiting:
            for p in [p for p in waiting if p.poll() is not None]:
                answered.append((time.monotonic() - started, p.returncode))
                waiting.remove(p)
            time.sleep(0.01)
    finally:
        for p in pings:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGKILL)
                p.wait()
    node_new.wait_ready(60)
    mine = events_after(node_new, wall, MILESTONES)
    others = [events_after(n, wall, ("applying the mesh's peers",)).get("applying the mesh's peers") for _, n in nodes]
    node_new.close()  # its record goes with it: the next round's newcomer is the only change
    for _, node in nodes:
        node.wait(lambda node=node: newcomer.name not in {p["name"] for p in node.status()["peers"]}, 20, "gone")
    times = [t for t, code in answered if code == 0]
    return {
        "ready": mine.get("node ready"),
        "first": min(times) if times else None,
        "last": max(times) if len(times) == len(nodes) else None,
        "milestones": mine,
        "others_apply": [t for t in others if t is not None],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print("load before:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    u = Underlay()
    tmp = Path(tempfile.mkdtemp(prefix="benchmesh"))
    try:
        ns_n, addr_n = u.host()
        server = u.track(NatsServer(ns_n, addr_n, tmp, "n1"))
        server.wait_ready()
        idents = [Identity(f"n{i:02d}", i) for i in range(1, args.nodes + 1)]
        nodes = []
        for ident in idents:
            nodes.append(launch(u, tmp, ident, server))
            nodes[-1][1].wait_ready(120)
        names = {i.name for i in idents}
        for ident, (_, node) in zip(idents, nodes):
            want = names - {ident.name}
            node.wait(lambda node=node, want=want: {p["name"] for p in node.status()["peers"]} == want, 60, "peers")
        results = []
        for r in range(args.rounds):
            res = round_once(u, tmp, server, nodes, r)
            results.append(res)
            fmt = lambda t: "-" if t is None else f"{t:.2f}"  # noqa: E731
            marks = ", ".join(f"{k} {v:.2f}" for k, v in sorted(res["milestones"].items(), key=lambda kv: kv[1]))
            applied = res["others_apply"]
            print(
                f"round {r + 1}: from launch: ready {fmt(res['ready'])} s, first answer {fmt(res['first'])} s, "
                f"last answer {fmt(res['last'])} s ({args.nodes} nodes)\n"
                f"  newcomer: {marks}\n"
                f"  others began applying it: {fmt(min(applied) if applied else None)}"
                f"..{fmt(max(applied) if applied else None)} s"
            )
        lasts = [r["last"] for r in results if r["last"] is not None]
        if lasts:
            print(f"last answer: median {statistics.median(lasts):.2f} s, worst {max(lasts):.2f} s")
    finally:
        u.close()
        shutil.rmtree(tmp, ignore_errors=True)
        print("load after:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())


if __name__ == "__main__":
    main()

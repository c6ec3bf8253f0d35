"""A netlog actor's own loop (actors.base.Actor.run) in a child process: no supervisor, no node.

The child configures a NetlogActor for the given flow collectors, spools the given records for
them, then runs the loop until every collector has them all (its senders idle), and reports how
many turns of the loop (each ends with a tick) and how long that took. The tests use it to see
what drives shipping; tests/bench/bench_netlog.py to measure it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meshsup.actors.netlog.flows import Record
from tests.nodes import REPO


@dataclass
class LoopRun:
    ticks: int  # turns of the loop from its start until every collector had every record
    seconds: float  # the same, in time
    started: float  # time.time() when the loop started


def ship_through_loop(
    workdir: Path,
    collectors: list[dict[str, Any]],
    records: list[Record],
    *,
    heartbeat: float | None = None,
    timeout: float = 120.0,
) -> LoopRun:
    """Run the loop in a child; `heartbeat` replaces the loop's heartbeat interval (the pace of its ticks)."""
    workdir.mkdir(parents=True, exist_ok=True)
    job = workdir / "job.json"
    job.write_text(json.dumps({"collectors": collectors, "records": records, "heartbeat": heartbeat}))
    done = subprocess.run(
        [sys.executable, "-m", "tests.netlog_loop", str(job)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if done.returncode != 0 or not done.stdout.strip():
        raise RuntimeError(f"the netlog loop failed ({done.returncode}): {done.stderr[-2000:]}")
    return LoopRun(**json.loads(done.stdout.splitlines()[-1]))


def _child(job_path: Path) -> None:
    from meshsup.actors import base
    from meshsup.actors.bus.endpoints import Runtime
    from meshsup.actors.netlog.actor import NetlogActor
    from meshsup.actors.settings import parse

    job = json.loads(job_path.read_text())
    if job["heartbeat"] is not None:
        base.HEARTBEAT_INTERVAL = job["heartbeat"]

    class Probe(NetlogActor):
        ticks = 0
        started = done = 0.0

        def tick(self, now: float) -> None:
            super().tick(now)
            self.ticks += 1
            assert self.flow_shipper is not None
            if self.flow_shipper.idle():
                self.done = time.monotonic()
                self._request_stop()

    runtime = Runtime(job_path.parent / "state")
    runtime.create()
    actor = Probe("netlog", runtime)
    doc = {"node": {"name": "probe"}, "netlog": {"interval": 3600, "collectors": job["collectors"]}}  # no window closes
    actor.configure(parse("probe.toml", doc, job_path.parent, runtime.state_dir))
    assert actor.flow_shipper is not None
    actor.flow_shipper.submit(job["records"], time.time())
    started, actor.started = time.time(), time.monotonic()
    actor.run()
    print(json.dumps({"ticks": actor.ticks, "seconds": actor.done - actor.started, "started": started}), flush=True)


if __name__ == "__main__":
    _child(Path(sys.argv[1]))

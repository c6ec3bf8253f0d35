"""nats-server with JetStream for tests: in a namespace of the test's underlay (or on loopback),
alone or clustered; stopped by its own PID."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from meshsup.supervisor.lab import ROOT, Netns

CLIENT_PORT, CLUSTER_PORT = 4222, 6222


class NatsServer:
    def __init__(
        self, ns: Netns, addr: str, tmp: Path, name: str, routes: list[str] = (), users: list[dict[str, Any]] = ()
    ) -> None:
        """`routes`: the other servers' addresses, for a cluster (JetStream's Raft needs 3);
        `users`: nats-server's authorization users (user, password, permissions)."""
        self.ns, self.addr, self.name = ns, addr, name
        self.url = f"nats://{addr}:{CLIENT_PORT}"
        self.log_path = tmp / f"nats-{name}.log"
        conf = tmp / f"nats-{name}.conf"
        text = (
            f'server_name: "{name}"\nlisten: "{addr}:{CLIENT_PORT}"\n'
            f'jetstream {{ store_dir: "{tmp / f"nats-{name}"}", max_memory_store: 64MB, max_file_store: 256MB }}\n'
        )
        if routes:
            urls = ", ".join(f'"nats://{r}:{CLUSTER_PORT}"' for r in routes)
            text += f'cluster {{ name: "mesh", listen: "{addr}:{CLUSTER_PORT}", routes: [{urls}] }}\n'
        if users:
            text += f"authorization: {json.dumps({'users': list(users)})}\n"  # nats-server reads JSON too
        conf.write_text(text)
        self.conf = conf
        self.proc: subprocess.Popen[str] | None = None
        self.start()

    def start(self) -> None:
        log = open(self.log_path, "a")
        self.proc = self.ns.popen("nats-server", "-c", str(self.conf), stdout=log, stderr=subprocess.STDOUT)
        log.close()

    def wait_ready(self, timeout: float = 20.0) -> None:
        """Until it serves clients (and, clustered, JetStream has its meta leader)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log_path.read_text()
            if "Server is ready" in text and self.proc is not None and self.proc.poll() is None:
                return
            time.sleep(0.1)
        raise AssertionError(f"nats-server {self.name} not ready: {self.log_path.read_text()[-2000:]}")

    def stop(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
            self.proc.wait(10)
        self.proc = None

    def close(self) -> None:
        self.stop(signal.SIGTERM)


def client(ns: Netns, url: str, body: str, user: str | None = None, password: str | None = None) -> str:
    """Run `body` (async Python, `kv` the mesh "test"'s bucket, `api` nats.js.api) as a NATS client
    in `ns`; what it prints. The bucket is made if missing (an operator's job)."""
    script = f"""
import asyncio, nats
from nats.js import api
async def main():
    nc = await nats.connect({url!r}, user={user!r}, password={password!r}, connect_timeout=3)
    js = nc.jetstream(timeout=3)
    try:
        kv = await js.key_value("meshsup-test")
    except Exception:
        kv = await js.create_key_value(api.KeyValueConfig(bucket="meshsup-test", history=1))
{"".join("    " + line + chr(10) for line in body.splitlines())}
    await nc.close()
asyncio.run(main())
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return ns.run(sys.executable, "-c", script, env=env, timeout=30).stdout

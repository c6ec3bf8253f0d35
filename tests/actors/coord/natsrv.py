"""NATS clients for tests: the operator's or a node's, run inside a namespace. The server is
supervisor.lab's NatsServer (the demo starts one too)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from meshsup.supervisor.lab import ROOT, NatsServer, Netns

__all__ = ["NatsServer", "Writer", "client"]

BUCKET = "meshsup-test"  # the mesh "test"'s
# Open the bucket, making it if missing (an operator's job); `url`, `user`, `password` are given.
_OPEN = f"""
import asyncio, json, sys, time, nats
from nats.js import api
async def open_kv(url, user=None, password=None):
    nc = await nats.connect(url, user=user, password=password, connect_timeout=3)
    js = nc.jetstream(timeout=3)
    try:
        kv = await js.key_value({BUCKET!r})
    except Exception:
        kv = await js.create_key_value(api.KeyValueConfig(bucket={BUCKET!r}, history=1))
    return nc, kv
"""


def client(ns: Netns, url: str, body: str, user: str | None = None, password: str | None = None) -> str:
    """Run `body` (async Python, `kv` the mesh "test"'s bucket, `api` nats.js.api) as a NATS client
    in `ns`; what it prints. The bucket is made if missing (an operator's job)."""
    script = f"""{_OPEN}
async def main():
    nc, kv = await open_kv({url!r}, {user!r}, {password!r})
{"".join("    " + line + chr(10) for line in body.splitlines())}
    await nc.close()
asyncio.run(main())
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return ns.run(sys.executable, "-c", script, env=env, timeout=30).stdout


# One batch a line in: [[key, value or null (delete)], ...]; out: the time (the machine's clock)
# its first write went, once every write of it is acknowledged.
_WRITER = f"""{_OPEN}
async def main():
    nc, kv = await open_kv(sys.argv[1])
    loop = asyncio.get_running_loop()
    limit = asyncio.Semaphore(256)  # writes in flight
    async def write(key, value):
        async with limit:
            await (kv.delete(key) if value is None else kv.put(key, value.encode()))
    while line := await loop.run_in_executor(None, sys.stdin.readline):
        started = time.time()
        await asyncio.gather(*(write(k, v) for k, v in json.loads(line)))
        print(started, flush=True)
    await nc.close()
asyncio.run(main())
"""


class Writer:
    """A NATS client kept running in `ns` that writes batches to the mesh "test"'s bucket, many
    writes in flight: thousands of records in a second or two, or one with its time taken."""

    def __init__(self, ns: Netns, url: str) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.proc = ns.popen(sys.executable, "-c", _WRITER, url, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)

    def write(self, entries: list[tuple[str, bytes | None]]) -> float:
        """Put each (key, value), or delete it (value None); the time (time.time) the first write went."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        batch = [(k, None if v is None else v.decode()) for k, v in entries]
        self.proc.stdin.write(json.dumps(batch) + "\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline()
        if not answer:
            raise RuntimeError(f"the NATS writer ended ({self.proc.wait()})")
        return float(answer)

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()  # its end of input: it closes the connection and ends
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

"""NATS clients for tests: the operator's or a node's, run inside a namespace. The server is
supervisor.lab's NatsServer (the demo starts one too)."""

from __future__ import annotations

import os
import sys

from meshsup.supervisor.lab import ROOT, NatsServer, Netns

__all__ = ["NatsServer", "client"]


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

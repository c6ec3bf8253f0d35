"""The CLI's side of the control socket: one request, one reply, a deadline."""
from __future__ import annotations

from typing import Any

import zmq

from meshsup.actors.bus.codec import DecodeError, decode, encode
from meshsup.actors.bus.endpoints import Runtime
from meshsup.actors.bus.messages import CliReply, CliRequest


class NotRunning(Exception):
    pass


def call(runtime: Runtime, command: str, args: dict[str, Any] | None = None,
         timeout: float = 15.0) -> CliReply:
    if not (runtime.dir / "cli.sock").exists():
        raise NotRunning(f"no node is running with state dir {runtime.state_dir}")
    ctx = zmq.Context()
    try:
        s = ctx.socket(zmq.REQ)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(runtime.cli)
        s.send(encode(CliRequest(command=command, args=args or {})))
        if not s.poll(int(timeout * 1000)):
            raise NotRunning(f"the node under {runtime.state_dir} did not answer within {timeout:g} s")
        try:
            reply = decode(s.recv())
        except DecodeError as err:
            raise NotRunning(f"bad reply from the node: {err}") from None
        if not isinstance(reply, CliReply):
            raise NotRunning(f"unexpected reply {reply.TAG}")
        return reply
    finally:
        ctx.destroy(linger=0)

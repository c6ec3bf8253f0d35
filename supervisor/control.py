"""The CLI's side of the control socket: one request, one reply, a deadline."""

from __future__ import annotations

import os
import stat
from typing import Any

import zmq

from meshsup.actors.bus.codec import DecodeError, decode, encode
from meshsup.actors.bus.endpoints import Runtime
from meshsup.actors.bus.messages import CliReply, CliRequest
from meshsup.actors.kernel.files import UnsafePath


class NotRunning(Exception):
    pass


def call(runtime: Runtime, command: str, args: dict[str, Any] | None = None, timeout: float = 15.0) -> CliReply:
    """The node's reply; NotRunning if it does not give one, UnsafePath if the
    state dir or the socket could be another user's (the request would go to them)."""
    runtime.check()
    sock = runtime.dir / "cli.sock"
    try:
        st = os.lstat(sock)
    except FileNotFoundError:
        raise NotRunning(f"no node is running with state dir {runtime.state_dir}") from None
    if not stat.S_ISSOCK(st.st_mode):
        found = "a symlink" if stat.S_ISLNK(st.st_mode) else "not a socket"
        raise UnsafePath("control socket", sock, st, f"is {found}", "remove it")
    if st.st_uid != os.geteuid():
        raise UnsafePath("control socket", sock, st, f"is not owned by uid {os.geteuid()}", "remove it")
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

"""A connection to the relay before its client is known (sans-IO): the HTTP request,
then DERP's login. Bytes in; out, the bytes to answer and what happens next.

    GET /derp/probe, /derp/latency-check  -> 200, closed (what clients time for latency)
    GET /derp + Upgrade: DERP              -> 101 (unless Derp-Fast-Start: 1) + ServerKey
      ClientInfo whose box opens             -> logged in: the client proved its key
    anything else                          -> an HTTP refusal or a plain close, with a reason

Every refusal has a reason the worker counts as bad input; a probe closes
with no reason. A login must finish within LOGIN_TIMEOUT, as Tailscale's
server allows 10 s for the greeting and the client's proof.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from meshsup.actors.kernel.types import Buffer
from meshsup.actors.wire import derp
from meshsup.actors.wire.derp import FrameError, FrameReader, FrameType

LOGIN_TIMEOUT = 10.0


@dataclass
class Login:
    key: bytes
    info: dict[str, Any]  # ClientInfo's JSON, keys lower-cased


@dataclass
class Step:
    send: bytes = b""
    login: Login | None = None
    close: str | None = None  # after `send`, end the connection; "" for a clean end, else the bad input's reason


@dataclass
class Handshake:
    private: bytes
    public: bytes
    started: float
    reader: FrameReader = field(default_factory=FrameReader)
    _head: bytearray = field(default_factory=bytearray)
    _upgraded: bool = False

    def expired(self, now: float) -> bool:
        return now - self.started > LOGIN_TIMEOUT

    def receive(self, data: Buffer) -> Step:
        if self._upgraded:
            self.reader.feed(data)
            return self._login()
        self._head += data
        try:
            split = derp.split_head(self._head)
        except FrameError as err:
            return Step(derp.plain_response(400, "Bad Request", f"{err}\n"), close=err.reason)
        if split is None:
            return Step()
        head, size = split
        step = self._answer(head)
        if step.close is not None:
            return step
        self._upgraded = True
        self.reader.feed(self._head[size:])
        self._head.clear()
        after = self._login()
        return Step(step.send + after.send, after.login, after.close)

    def _answer(self, head: derp.Head) -> Step:
        method, target, _ = head.first
        path = target.split("?", 1)[0]
        if path in derp.PROBE_PATHS:
            if method not in ("GET", "HEAD"):
                return Step(derp.plain_response(405, "Method Not Allowed", "bogus probe method\n"), close="bad_method")
            return Step(derp.plain_response(200, "OK", extra=("Access-Control-Allow-Origin: *",)), close="")
        if path != "/derp":
            return Step(derp.plain_response(404, "Not Found", "not found\n"), close="not_found")
        if method != "GET":
            return Step(derp.plain_response(405, "Method Not Allowed", "GET only\n"), close="bad_method")
        if head.header("upgrade").lower() != "derp":
            return Step(
                derp.plain_response(426, "Upgrade Required", "DERP requires connection upgrade\n"), close="not_upgrade"
            )
        hello = b"" if head.header(derp.FAST_START_HEADER) == "1" else derp.upgrade_response(self.public)
        return Step(hello + derp.server_key(self.public))

    def _login(self) -> Step:
        try:
            frame = self.reader.next()
            if frame is None:
                return Step()
            ftype, payload = frame
            if ftype != FrameType.CLIENT_INFO:
                return Step(close="login_wrong_frame")
            key, info = derp.open_client_info(self.private, payload)
        except FrameError as err:
            return Step(close=err.reason)
        return Step(login=Login(key, info))

"""structlog set-up shared by the supervisor and every actor.

JSON lines when stdout is not a terminal, readable lines on a terminal;
every line carries the actor's name and PID. Keys that hold secrets are
masked whatever their value, so a careless log call cannot leak a key.
Every event is also pushed to the node's netlog actor, which ships it to
the [logging] collectors.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
from typing import Any

import structlog
import zmq

from meshsup.actors.bus.codec import encode
from meshsup.actors.bus.endpoints import Runtime
from meshsup.actors.bus.messages import LogLine

SECRET_KEYS = frozenset({"private_key", "preshared_key", "psk", "secret", "key_material"})


def _mask_secrets(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
    for k in SECRET_KEYS & event.keys():
        event[k] = "(hidden)"
    return event


class LogPush:
    """A structlog processor pushing each event to netlog's log socket, never blocking.

    Events wait in the socket's queue while netlog is not there yet (the
    supervisor logs before netlog starts); when the queue is full they are
    dropped and counted, and the gap in the sequence numbers tells netlog.
    """

    HWM = 1000

    def __init__(self, runtime: Runtime) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.PUSH)
        self.sock.setsockopt(zmq.SNDHWM, self.HWM)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(log_endpoint(runtime))
        self.seq = 0
        self.dropped = 0
        self._lock = threading.Lock()  # the DNS actor logs from its asyncio thread too

    def __call__(self, _: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
        frame = json.dumps(event, default=repr)
        with self._lock:
            try:
                self.sock.send(encode(LogLine(seq=self.seq, line=frame)), zmq.NOBLOCK)
            except zmq.ZMQError:
                self.dropped += 1
            self.seq += 1
        return event


def log_endpoint(runtime: Runtime, unprivileged: bool | None = None) -> str:
    """netlog's PULL socket for the log events of the node's processes: one root's alone, one the
    unprivileged actors reach, whose lines may name none but an unprivileged actor (else a DNS
    worker taken over could write the router's logs). By default, the one this process uses."""
    own = runtime.drop is not None if unprivileged is None else unprivileged
    return f"ipc://{runtime.dir / ('logs-u.sock' if own else 'logs.sock')}"


def setup(actor: str, runtime: Runtime | None = None) -> structlog.stdlib.BoundLogger:
    """Configure logging for this process; events are also pushed to the netlog of `runtime`'s node."""
    pid = os.getpid()
    shipping: list[Any] = [LogPush(runtime)] if runtime is not None else []

    def _identity(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
        event.setdefault("actor", actor)
        event.setdefault("pid", pid)
        return event

    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=False) if sys.stderr.isatty() else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _identity,
            _mask_secrets,
            *shipping,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            getattr(logging, os.environ.get("MESHSUP_LOG_LEVEL", "INFO").upper(), logging.INFO)
        ),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=False,
    )
    return structlog.get_logger()


class RateLimited:
    """Log a recurring problem at most once per `interval` seconds, with a count."""

    def __init__(self, interval: float = 5.0) -> None:
        self.interval = interval
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def should_log(self, key: str, now: float) -> int | None:
        """None to stay quiet, else how many were suppressed since the last line."""
        last = self._last.get(key)
        if last is not None and now - last < self.interval:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return None
        self._last[key] = now
        return self._suppressed.pop(key, 0)

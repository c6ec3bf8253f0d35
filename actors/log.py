"""structlog set-up shared by the supervisor and every actor.

JSON lines when stdout is not a terminal, readable lines on a terminal;
every line carries the actor's name and PID. Keys that hold secrets are
masked whatever their value, so a careless log call cannot leak a key.
"""
from __future__ import annotations

import logging
import os
import sys
from typing import Any

import structlog

SECRET_KEYS = frozenset({"private_key", "preshared_key", "psk", "secret", "key_material"})


def _mask_secrets(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
    for k in SECRET_KEYS & event.keys():
        event[k] = "(hidden)"
    return event


def setup(actor: str) -> structlog.stdlib.BoundLogger:
    pid = os.getpid()

    def _identity(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
        event.setdefault("actor", actor)
        event.setdefault("pid", pid)
        return event

    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=False)
        if sys.stderr.isatty()
        else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _identity,
            _mask_secrets,
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

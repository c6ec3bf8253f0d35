"""The node's own logs as records for the [logging] collectors (sans-IO).

Every process of the node pushes its structured log events to netlog as
JSON lines with a per-process sequence number (actors.log). Here they are
filtered by level and rate, and turned into records: the event's own
fields, plus "dropped" when lines were lost before it (a gap in a process's
sequence, or the rate limit), as flow records carry it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

from meshsup.actors.netlog.flows import Record
from meshsup.actors.settings.netlog import LEVELS

_ALIASES = {"exception": "error", "warn": "warning", "fatal": "critical"}
_MAX_SENDERS = 1024


def level_of(record: Record) -> str:
    name = str(record.get("level", "info")).lower()
    name = _ALIASES.get(name, name)
    return name if name in LEVELS else "info"


@dataclass
class IntakeCounters:
    received: int = 0
    malformed: int = 0  # not a JSON object: dropped
    filtered: int = 0  # below the configured level
    lost: int = 0  # gaps in the senders' sequences: dropped on the way here
    impersonating: int = 0  # naming an actor its sender may not speak for: dropped
    rate_limited: int = 0


class LogIntake:
    """Lines in, records out; at most `rate` records per second on average, `burst` at once."""

    def __init__(self, level: str = "info", rate: float = 100.0, burst: float = 500.0) -> None:
        self.min_level = LEVELS[level]
        self.rate, self.burst = rate, burst
        self.counters = IntakeCounters()
        self._tokens = burst
        self._refilled: float | None = None
        self._next_seq: dict[tuple[str, int], int] = {}  # (process name, pid) -> next sequence number
        self._pending_dropped = 0

    def feed(
        self, seq: int, line: str, now: float, may_name: Callable[[str], bool] = lambda actor: True
    ) -> Record | None:
        """The record for one line, or None when it is dropped or filtered (counted). `may_name`
        says which actors the line's sender may speak for (its "actor" field)."""
        self.counters.received += 1
        try:
            event = json.loads(line)
        except ValueError:
            event = None
        if not isinstance(event, dict):
            self.counters.malformed += 1
            return None
        if not may_name(str(event.get("actor", ""))):
            self.counters.impersonating += 1
            return None
        self._note_sequence(event, seq)
        if LEVELS[level_of(event)] < self.min_level:
            self.counters.filtered += 1
            return None
        if not self._take_token(now):
            self.counters.rate_limited += 1
            self._pending_dropped += 1
            return None
        if self._pending_dropped:
            event["dropped"] = self._pending_dropped
            self._pending_dropped = 0
        return event

    def _note_sequence(self, event: Record, seq: int) -> None:
        sender = (str(event.get("actor", "")), event.get("pid") if type(event.get("pid")) is int else 0)
        expected = self._next_seq.get(sender)
        # A sender new to this netlog (its first lines, or netlog restarted) has no gap yet.
        if expected is not None and seq > expected:
            self.counters.lost += seq - expected
            self._pending_dropped += seq - expected
        if expected is None and len(self._next_seq) >= _MAX_SENDERS:
            self._next_seq.clear()  # processes come and go with restarts; forget the old ones
        self._next_seq[sender] = max(seq + 1, expected or 0)

    def _take_token(self, now: float) -> bool:
        if self._refilled is not None:
            self._tokens = min(self.burst, self._tokens + (now - self._refilled) * self.rate)
        self._refilled = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True

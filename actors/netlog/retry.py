"""Retry timing for collectors (sans-IO): capped exponential backoff with jitter.

Jitter spreads the retries of many nodes after a shared collector comes
back. A server's Retry-After hint replaces the computed delay (bounded, so a
bad hint cannot stall shipping for days).
"""

from __future__ import annotations

import random
from email.utils import parsedate_to_datetime


class Backoff:
    def __init__(
        self,
        base: float = 0.5,
        cap: float = 60.0,
        factor: float = 2.0,
        jitter: float = 0.5,
        max_hint: float = 600.0,
        rng: random.Random | None = None,
    ) -> None:
        if not (0 < base <= cap and factor >= 1 and 0 <= jitter <= 1 and max_hint >= 0):
            raise ValueError("need 0 < base <= cap, factor >= 1, 0 <= jitter <= 1, max_hint >= 0")
        self.base, self.cap, self.factor, self.jitter, self.max_hint = base, cap, factor, jitter, max_hint
        self.rng = rng or random.Random()
        self.failures = 0  # consecutive failures since the last success
        self.next_attempt = 0.0

    def ready(self, now: float) -> bool:
        return now >= self.next_attempt

    def failure(self, now: float, retry_after: float | None = None) -> float:
        """Record a failed attempt; returns the delay before the next one."""
        if retry_after is not None:
            delay = min(max(retry_after, 0.0), self.max_hint)
        else:
            full = min(self.cap, self.base * self.factor ** min(self.failures, 64))
            delay = full * (1 - self.jitter * self.rng.random())
        self.failures += 1
        self.next_attempt = now + delay
        return delay

    def success(self) -> None:
        self.failures = 0
        self.next_attempt = 0.0


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from an HTTP Retry-After value (delay-seconds or HTTP-date)."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    return max(when.timestamp() - now, 0.0)

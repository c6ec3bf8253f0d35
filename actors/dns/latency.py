"""Upstream latency in buckets, for Prometheus's histogram: a count per upper bound, their sum.

Counted once an upstream answers a forward, with the time since it was first
forwarded (failovers included): what a client waited beyond the cache. An
observation is a bisect and two additions; status sends the cumulative counts.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Any

# Seconds: from a nearby resolver's cache (a millisecond) to a DNS timeout.
BOUNDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class LatencyBuckets:
    def __init__(self, bounds: tuple[float, ...] = BOUNDS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last: above every bound
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(self.bounds, seconds)] += 1
        self.sum += seconds

    def snapshot(self) -> dict[str, Any]:
        """Cumulative counts per bound (Prometheus's `le`), the total count and the sum."""
        cumulative, running = [], 0
        for n in self.counts[:-1]:
            running += n
            cumulative.append(running)
        return {"bounds": list(self.bounds), "cumulative": cumulative, "count": sum(self.counts), "sum": self.sum}

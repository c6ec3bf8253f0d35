"""In-flight forwards: identical queries merge, and their number is capped.

As dae, no two identical lookups run in parallel: a query whose key is
already being forwarded waits for that answer. As Docker, at most `cap`
forwards run at once (default 1024); a query beyond that is refused and the
refusal is logged at most once per interval. One owner (a client prefix,
access.py) may start at most `share` of them, so a flood of distinct names
from one client leaves room for the others.
"""

from __future__ import annotations

import enum
import math
from collections import Counter
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

from meshsup.actors.dns.upstream import FailoverPlan

W = TypeVar("W")


class Elsewhere(Protocol):
    """Forwards under way outside the table (the native forwarder, forwarder.c), counted
    against its cap and share; what it counted, for status."""

    def __len__(self) -> int: ...

    def owned(self, owner: Hashable) -> int: ...

    def counters(self) -> dict[str, int]: ...

    def rcodes(self) -> dict[int, int]: ...


DEFAULT_CAP = 1024
LOG_INTERVAL = 2.0  # seconds, as Docker's rate.Sometimes for the same message


@dataclass(slots=True)
class Flight(Generic[W]):
    query: bytes  # what goes upstream, the same for every attempt
    plan: FailoverPlan
    started: float
    waiters: list[W] = field(default_factory=list)
    owner: Hashable | None = None  # who started it (None: nobody held to a share)


class Admission(enum.Enum):
    STARTED = "started"  # the caller must forward
    MERGED = "merged"  # an identical forward is under way
    FULL = "full"  # over the cap: refuse
    OWNER_FULL = "owner_full"  # over the owner's share: refuse


class InflightTable(Generic[W]):
    def __init__(self, cap: int = DEFAULT_CAP, share: int = DEFAULT_CAP) -> None:
        self.cap = cap
        self.share = share
        self._flights: dict[Hashable, Flight[W]] = {}
        self._owned: Counter[Hashable] = Counter()
        self.elsewhere: Elsewhere | None = None

    def __len__(self) -> int:
        return len(self._flights)

    def tables(self) -> tuple[dict[Hashable, Flight[W]], Counter[Hashable]]:
        """The flights by key and their count by owner, for the native forwarder to count against cap and share."""
        return self._flights, self._owned

    def get(self, key: Hashable) -> Flight[W] | None:
        return self._flights.get(key)

    def admit(
        self,
        key: Hashable,
        waiter: W,
        make_flight: Callable[..., Flight[W]],
        *args: Any,
        owner: Hashable | None = None,
    ) -> Admission:
        """make_flight(*args) makes the flight, if one starts (args rather than a closure: one per query)."""
        flight = self._flights.get(key)
        if flight is not None:
            flight.waiters.append(waiter)
            return Admission.MERGED
        elsewhere = self.elsewhere
        if len(self._flights) + (len(elsewhere) if elsewhere is not None else 0) >= self.cap:
            return Admission.FULL
        if owner is not None:
            if self._owned[owner] + (elsewhere.owned(owner) if elsewhere is not None else 0) >= self.share:
                return Admission.OWNER_FULL
            self._owned[owner] += 1
        flight = make_flight(*args)
        flight.owner = owner
        flight.waiters.append(waiter)
        self._flights[key] = flight
        return Admission.STARTED

    def finish(self, key: Hashable) -> Flight[W] | None:
        """Remove the flight; its waiters are the caller's to answer."""
        flight = self._flights.pop(key, None)
        if flight is not None and flight.owner is not None:
            self._owned[flight.owner] -= 1
            if not self._owned[flight.owner]:
                del self._owned[flight.owner]
        return flight


class RateLimiter:
    """Allows one event per interval: logs that cannot flood."""

    def __init__(self, interval: float = LOG_INTERVAL) -> None:
        self._interval = interval
        self._next = -math.inf
        self.suppressed = 0

    def allow(self, now: float) -> bool:
        if now < self._next:
            self.suppressed += 1
            return False
        self._next = now + self._interval
        return True

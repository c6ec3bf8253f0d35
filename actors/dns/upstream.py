"""Upstream resolvers: the sans-IO failover plan (an upstream itself is settings:
actors.settings.dnstypes)."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import dns.rcode

from meshsup.actors.settings.dnstypes import Upstream

# Docker tries at most three external servers per query (maxExtDNS).
MAX_ATTEMPTS = 3
# A SERVFAIL or REFUSED may be local to that server: ask the next one.
FAILOVER_RCODES = frozenset({dns.rcode.SERVFAIL, dns.rcode.REFUSED})


def is_own_address(upstream: Upstream, listen: Iterable[tuple[str, int]]) -> bool:
    """True if sending to upstream would reach one of our own listeners."""
    if upstream.scheme not in ("udp", "tcp"):
        return False
    target = ipaddress.ip_address(upstream.host)
    for host, port in listen:
        if port != upstream.port:
            continue
        own = ipaddress.ip_address(host)
        if own == target or (own.is_unspecified and target.is_loopback and own.version == target.version):
            return True
    return False


def without_own(upstreams: Sequence[Upstream], listen: Iterable[tuple[str, int]]) -> tuple[Upstream, ...]:
    """Drop upstreams that are the controller itself (a forwarding loop)."""
    listen = tuple(listen)
    return tuple(u for u in upstreams if not is_own_address(u, listen))


def should_failover(rcode: int) -> bool:
    return rcode in FAILOVER_RCODES


class FailoverPlan:
    """The upstreams one query may try, in order, at most MAX_ATTEMPTS."""

    def __init__(self, upstreams: Sequence[Upstream]) -> None:
        self._remaining = list(upstreams[:MAX_ATTEMPTS])
        self.current: Upstream | None = None
        self.attempts = 0

    def next(self) -> Upstream | None:
        """The next upstream to try, or None when the plan is exhausted."""
        self.current = self._remaining.pop(0) if self._remaining else None
        if self.current is not None:
            self.attempts += 1
        return self.current


@dataclass(slots=True)
class UpstreamState:
    ok: bool  # its last query answered
    at: float  # when (the caller's monotonic clock, one for every process of the host)
    error: str  # why its last failed query failed
    failures: int  # failed queries since its last answer


class UpstreamHealth:
    """How each upstream did in its last query: the node's health warns when all fail."""

    def __init__(self) -> None:
        self._states: dict[Upstream, UpstreamState] = {}

    def answered(self, upstream: Upstream, now: float) -> None:
        state = self._states.get(upstream)
        if state is None:
            self._states[upstream] = UpstreamState(True, now, "", 0)
        else:
            state.ok, state.at, state.failures = True, now, 0

    def failed(self, upstream: Upstream, reason: str, now: float) -> None:
        state = self._states.setdefault(upstream, UpstreamState(False, now, reason, 0))
        state.ok, state.at, state.error = False, now, reason
        state.failures += 1

    def keep(self, upstreams: Iterable[Upstream]) -> None:
        """Forget the upstreams no longer configured."""
        wanted = set(upstreams)
        self._states = {u: s for u, s in self._states.items() if u in wanted}

    def status(self) -> dict[str, dict[str, Any]]:
        return {str(u): asdict(s) for u, s in self._states.items()}

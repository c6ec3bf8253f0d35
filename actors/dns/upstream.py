"""Upstream resolvers: the sans-IO failover plan (an upstream itself is settings:
actors.settings.dnstypes; which upstreams a plan holds, and in what order, is choice.py's)."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence

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


class FailoverPlan:
    """The upstreams one query may try, in order, at most MAX_ATTEMPTS."""

    __slots__ = ("_upstreams", "current", "attempts", "sent")

    def __init__(self, upstreams: Sequence[Upstream]) -> None:
        self._upstreams = upstreams  # the first MAX_ATTEMPTS of them: a slice would copy them per query
        self.current: Upstream | None = None
        self.attempts = 0  # also the index of the next one
        self.sent = 0.0  # when the current one was asked: its answer's round trip

    @classmethod
    def after(cls, upstreams: Sequence[Upstream], tried: Upstream) -> FailoverPlan:
        """The plan of a forward whose first attempt, at tried, was made elsewhere
        (the native forwarder, forwarder.c): it goes on from the next one."""
        plan = cls((tried, *(u for u in upstreams if u != tried)))
        plan.current, plan.attempts = tried, 1
        return plan

    def next(self, now: float) -> Upstream | None:
        """The next upstream to try (asked now), or None when the plan is exhausted."""
        attempts = self.attempts
        if attempts >= MAX_ATTEMPTS or attempts >= len(self._upstreams):
            self.current = None
            return None
        self.current = self._upstreams[attempts]
        self.attempts = attempts + 1
        self.sent = now
        return self.current

"""The crypto worker's side of disco (sans-IO): a disco peer's direct path, and the news for magicsock.

magicsock pings a peer's candidate endpoints and names the one to use in a
PathSet, trusted for a while (a pong's 6.5 s, refreshed by each heartbeat's
pong). A disco answer does not prove the path carries WireGuard (tailscale#19457),
so the worker watches that: a direct path on which we keep sending while
nothing authenticated comes back from it for ``Timing.data_timeout`` is
demoted to the relay for ``Timing.demoted_for``, or until magicsock names
another endpoint. What magicsock needs to steer its pings (which peers are
active, whose handshakes completed, which paths were demoted) it gets in a
PathReport at most once a second.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from meshsup.actors.bus.messages import PathReport
from meshsup.actors.kernel.types import Endpoint

REPORT_INTERVAL = 1.0
INF = float("inf")


@dataclass(slots=True)
class DiscoPath:
    """The direct path magicsock set for a peer, and whether WireGuard answers on it."""

    trusted_until: float = -INF
    unanswered_since: float = INF  # the first direct send owed an answer since the endpoint was last heard
    demoted: Endpoint | None = None
    demoted_until: float = -INF
    reason: str | None = None

    def set(self, old: Endpoint | None, endpoint: Endpoint | None, trusted_for: float, now: float) -> None:
        self.trusted_until = now + trusted_for
        if endpoint != old:
            self.unanswered_since = INF
        if endpoint is not None and endpoint != self.demoted:  # another path: the demotion was about the old one
            self.demoted, self.demoted_until, self.reason = None, -INF, None

    def usable(self, endpoint: Endpoint | None, now: float) -> bool:
        """Trusted by magicsock and not demoted here."""
        return (
            endpoint is not None
            and now < self.trusted_until
            and not (endpoint == self.demoted and now < self.demoted_until)
        )

    def sent(self, answer_expected: bool, now: float, timeout: float) -> bool:
        """We send on the path now; True when it has owed us an answer for `timeout` (demote it)."""
        since = self.unanswered_since
        if since == INF:
            if answer_expected:
                self.unanswered_since = now
            return False
        return now - since >= timeout

    def settle(self) -> None:
        """Nothing is owed on the path: an authenticated datagram came from it, or we stopped sending on it
        (the clock starts again when we come back)."""
        self.unanswered_since = INF

    def demote(self, endpoint: Endpoint, reason: str, now: float, hold: float) -> None:
        self.demoted, self.demoted_until, self.reason = endpoint, now + hold, reason

    def demotion(self, now: float) -> str | None:
        """The reason the path is demoted, while it is."""
        return self.reason if now < self.demoted_until else None


@dataclass(slots=True)
class PathNews:
    """What happened since the last PathReport. Peers are recorded once per batch, not per packet."""

    active: set[bytes] = field(default_factory=set)  # data sent or received (a keepalive is no data)
    handshakes: set[bytes] = field(default_factory=set)
    demoted: list[list[Any]] = field(default_factory=list)  # [peer, host, port, reason]
    next_report: float = -INF
    reported_active: set[bytes] = field(default_factory=set)  # the peers the last report named active

    def report(self, now: float) -> PathReport | None:
        """The news, only when there is some: at once for a handshake, a demotion or a peer that has
        become active (each starts disco's work: an advertisement, a new path, hole punching); else
        at most once every REPORT_INTERVAL, since a peer that stays busy only needs keeping active."""
        if not self.active and now >= self.next_report:
            self.reported_active = set()  # a quiet interval: the next data is news again
        urgent = self.handshakes or self.demoted or not self.active <= self.reported_active
        if not (urgent or (self.active and now >= self.next_report)):
            return None
        self.next_report = now + REPORT_INTERVAL
        report = PathReport(active=list(self.active), handshakes=list(self.handshakes), demoted=self.demoted)
        self.reported_active = self.active
        self.active, self.handshakes, self.demoted = set(), set(), []
        return report

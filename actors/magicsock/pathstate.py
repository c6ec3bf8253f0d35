"""One peer's direct-path state for the disco engine (paths.py): its candidate endpoints, what pings
and pongs taught about each, the trusted one, and the timings, which are Tailscale's
(wgengine/magicsock: magicsock.go's constants, endpoint.go's use of them)."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Final

from meshsup.actors.kernel.types import Endpoint
from meshsup.actors.wire.disco import SharedKey

HEARTBEAT: Final = 3.0  # heartbeatInterval: the best path is pinged this often while the peer is active
SESSION_ACTIVE: Final = 45.0  # sessionActiveTimeout: a peer is active this long after its data moved
TRUST: Final = 6.5  # trustUDPAddrDuration: a path is trusted this long after a pong (two heartbeats and a half second)
PING_TIMEOUT: Final = 5.0  # pingTimeoutDuration: a pong later than this is no answer
PING_INTERVAL: Final = 5.0  # discoPingInterval: least time between pings to one endpoint, heartbeats aside
UPGRADE_INTERVAL: Final = 60.0  # upgradeInterval: a full round seeks a better path this often even while one works
CALL_ME_MAYBE_INTERVAL: Final = PING_INTERVAL  # Tailscale sends one with a round that pinged: at most as often

# Bounds on what a peer's messages can make us hold and send (Tailscale prunes at 100 candidates).
MAX_CALL_ME_MAYBE: Final = 32  # endpoints taken from one call-me-maybe
MAX_PING_SOURCES: Final = 16  # endpoints learnt from where the peer's pings came from
MAX_IN_FLIGHT: Final = 64  # our pings to the peer awaiting a pong
RECENT_PINGS: Final = 32  # the peer's ping TxIDs remembered, to answer each once
EARLY_HELD: Final = 4  # disco through the relay before the peer's key is known, kept for when it is
EARLY_FOR: Final = 5.0  # seconds such a datagram is worth opening


@dataclass(slots=True)
class Candidate:
    """A direct endpoint the peer may be reached at, and why it is one."""

    configured: bool = False
    call_me_maybe: bool = False  # named in the peer's last call-me-maybe
    got_ping_at: float | None = None  # the peer's authenticated ping came from it (its NAT's mapping, say)
    last_ping: float | None = None  # our last ping to it
    latency: float | None = None  # the round trip of its last pong
    pong_at: float | None = None
    pinged_back: float | None = None  # when a ping from it last made us ping it out of turn

    def owes_ping_back(self, now: float) -> bool:
        """A ping came from here: ping it now if we have not within 5 s, or if our last ping went
        unanswered (it likely died at the peer's NAT before the peer's own ping opened it), but
        that out of turn at most once per 5 s, so two nodes never ping each other in a loop."""
        if self.last_ping is None or now - self.last_ping >= PING_INTERVAL:
            return True
        unanswered = self.pong_at is None or self.pong_at < self.last_ping
        if unanswered and (self.pinged_back is None or now - self.pinged_back >= PING_INTERVAL):
            self.pinged_back = now
            return True
        return False

    def wanted(self, now: float) -> bool:
        """A ping source stays a candidate while the peer keeps pinging from it, as in Tailscale."""
        if self.configured or self.call_me_maybe:
            return True
        return self.got_ping_at is not None and now - self.got_ping_at <= SESSION_ACTIVE


@dataclass(eq=False, slots=True)
class PeerPaths:
    """A peer (by WireGuard key) and its direct paths. `reset` forgets what a disco key change makes
    stale; activity and timers stay."""

    key: bytes
    configured: tuple[Endpoint, ...]
    disco: SharedKey | None = None
    last_active: float | None = None  # data moved (the crypto worker's report)
    heartbeat_at: float | None = None  # None: no heartbeats (idle, or no disco key)
    due: float | None = None  # the time of its live entry in the engine's timer heap
    in_flight: int = 0
    candidates: dict[Endpoint, Candidate] = field(default_factory=dict)
    best: Endpoint | None = None
    best_latency: float = 0.0
    trusted_until: float = 0.0
    last_full_ping: float | None = None
    call_me_maybe_at: float | None = None  # our last call-me-maybe to it
    call_me_maybe_due: bool = False  # one is owed, held back by the rate limit or unknown local endpoints
    demoted: dict[Endpoint, tuple[str, float]] = field(default_factory=dict)  # reason, until
    pinged_us_directly: bool = False
    recent_pings: deque[bytes] = field(default_factory=lambda: deque(maxlen=RECENT_PINGS))
    # Its disco through the relay that came before its key did (the two travel different ways):
    # opened once the key is learnt, so a call-me-maybe is not lost to the race.
    early: deque[tuple[bytes, float]] = field(default_factory=lambda: deque(maxlen=EARLY_HELD))

    def __post_init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Back to the configured endpoints, nothing measured: a new disco key is a new instance of the peer."""
        self.candidates = {ep: Candidate(configured=True) for ep in self.configured}
        self.best, self.best_latency, self.trusted_until = None, 0.0, 0.0
        self.last_full_ping = self.call_me_maybe_at = None
        self.call_me_maybe_due = self.pinged_us_directly = False
        self.demoted.clear()
        self.recent_pings.clear()

    def active(self, now: float) -> bool:
        return self.last_active is not None and now - self.last_active <= SESSION_ACTIVE

    def trusted(self, now: float) -> bool:
        return self.best is not None and now < self.trusted_until

    def demotion(self, endpoint: Endpoint, now: float) -> str | None:
        """Why the crypto worker stopped using this endpoint, while that keeps it from being chosen."""
        reason, until = self.demoted.get(endpoint, ("", 0.0))
        return reason if now < until else None

    def set_configured(self, endpoints: tuple[Endpoint, ...], now: float) -> None:
        self.configured = endpoints
        for ep, candidate in self.candidates.items():
            candidate.configured = ep in endpoints
        for ep in endpoints:
            self.candidates.setdefault(ep, Candidate()).configured = True
        self.prune(now)

    def set_call_me_maybe(self, endpoints: tuple[Endpoint, ...], now: float) -> None:
        """A call-me-maybe replaces the previous one's endpoints."""
        for ep, candidate in self.candidates.items():
            candidate.call_me_maybe = ep in endpoints
        for ep in endpoints:
            self.candidates.setdefault(ep, Candidate()).call_me_maybe = True
        self.prune(now)

    def ping_source(self, endpoint: Endpoint, now: float) -> Candidate:
        """The candidate for where the peer's ping came from, added if new (the stalest such one goes
        when there are too many, so spoofed sources cannot grow the set)."""
        candidate = self.candidates.get(endpoint)
        if candidate is None:
            learnt = [
                (c.got_ping_at, ep)
                for ep, c in self.candidates.items()
                if c.got_ping_at is not None and not (c.configured or c.call_me_maybe) and ep != self.best
            ]
            if len(learnt) >= MAX_PING_SOURCES:
                del self.candidates[min(learnt)[1]]
            candidate = self.candidates[endpoint] = Candidate()
        candidate.got_ping_at = now
        return candidate

    def seen_ping(self, txid: bytes) -> bool:
        """Whether the peer's ping was answered already (a replay); remembers it if not."""
        if txid in self.recent_pings:
            return True
        self.recent_pings.append(txid)
        return False

    def prune(self, now: float) -> None:
        """Forgets candidates nothing names any more and demotions past. Not the best path: its pongs show
        it works (Tailscale drops it too); it goes once it stops answering."""
        for ep in [ep for ep, c in self.candidates.items() if not c.wanted(now) and ep != self.best]:
            del self.candidates[ep]
        for ep in [ep for ep, (_, until) in self.demoted.items() if until <= now]:
            del self.demoted[ep]

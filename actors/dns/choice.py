"""Which upstreams a query goes to, and in what order: a group's policy over what each
upstream has shown so far, sans-IO (dae's dialer groups, for DNS upstreams).

Each configured upstream has one record, shared by every group naming it (its
latency and liveness are its own, not a group's):

- latency: a moving average (EWMA) of its answers' round trips, from live
  forwards and probes alike;
- alive or dead: DEAD_AFTER exchanges in a row that got no answer at all
  (timeouts, refused connections) make it dead; an answer of any rcode proves
  it alive. A dead upstream is left out of every plan while any other of its
  group lives (with all of them dead, they are tried anyway, in order: a plan
  of nothing would only SERVFAIL), and returns once it answers a probe;
- probes: a dead upstream is probed one probe at a time, PROBE_MIN after it was
  found dead, then twice the gap after each unanswered probe, up to PROBE_MAX.
  Live traffic never hastens a probe, so an upstream coming back sees a trickle
  of probes, never the queries that pile up meanwhile. Upstreams of a
  min_latency group that no answer has measured for IDLE_PROBE are probed too,
  so that the policy compares fresh figures. Gaps are jittered: workers started
  together do not probe in step.

Policies: failover keeps the configured order; min_latency puts the lowest
moving average first (upstreams not measured yet after the measured ones, in
their order); random shuffles. Each DNS worker keeps its own view: N workers
probe a dead upstream N times as often, and each learns latencies from its
own share of the queries.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import dns.message

from meshsup.actors.settings.dnstypes import FAILOVER, MIN_LATENCY, RANDOM, Upstream

DEAD_AFTER = 2  # exchanges in a row without an answer (one lost datagram is no death)
EWMA_WEIGHT = 0.3  # of the newest round trip
PROBE_MIN = 1.0  # seconds from being found dead to the first probe
PROBE_MAX = 30.0  # the longest gap between probes of a dead upstream
IDLE_PROBE = 10.0  # a min_latency upstream unmeasured this long is probed
JITTER = 0.2  # probe gaps vary by this fraction either way
# The root's NS: any resolver answers it (or refuses it, which proves it alive as well).
PROBE_QUERY = dns.message.make_query(".", "NS", use_edns=False).to_wire()


@dataclass(slots=True)
class UpstreamState:
    # The last query's outcome, for the node's health (supervisor/health.py):
    ok: bool = True  # it answered, and not with SERVFAIL or REFUSED
    at: float | None = None  # when (the caller's monotonic clock, one for every process of the host); None: never
    error: str = ""  # why its last failed query failed
    failures: int = 0  # failed queries since its last good answer
    # What choosing needs:
    alive: bool = True
    unanswered: int = 0  # exchanges in a row with no answer
    latency: float | None = None  # moving average of round trips, seconds; None: never answered
    answered_at: float = float("-inf")
    chosen: int = 0  # forwards sent to it
    probes: int = 0  # probes sent to it
    probe_due: float = 0.0  # the first is due at once (for a min_latency group's)
    probe_gap: float = PROBE_MIN
    probe_sent: float | None = None  # a probe is out, since then


class Upstreams:
    """Every configured upstream as this worker has seen it."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()
        self._states: dict[Upstream, UpstreamState] = {}
        self._measured: set[Upstream] = set()  # in a min_latency group: probed when idle
        self._dead: set[Upstream] = set()

    def keep(self, groups: Iterable[tuple[Sequence[Upstream], str]]) -> None:
        """The upstreams configured now, with their groups' policies: new ones start
        alive and unmeasured, the others are forgotten."""
        wanted: dict[Upstream, None] = {}
        measured: set[Upstream] = set()
        for upstreams, policy in groups:
            wanted.update(dict.fromkeys(upstreams))
            if policy == MIN_LATENCY:
                measured.update(upstreams)
        self._states = {u: self._states.get(u) or UpstreamState() for u in wanted}
        self._measured = measured
        self._dead &= set(wanted)

    def order(self, upstreams: tuple[Upstream, ...], policy: str) -> Sequence[Upstream]:
        """The upstreams a query for this group tries, first choice first."""
        if policy == FAILOVER and not self._dead:
            return upstreams
        dead = self._dead
        alive = [u for u in upstreams if u not in dead]
        if not alive:
            return upstreams
        if policy == MIN_LATENCY:
            alive.sort(key=self._speed)  # stable: the unmeasured keep their order
        elif policy == RANDOM:
            self._rng.shuffle(alive)
        return alive

    def _speed(self, upstream: Upstream) -> tuple[bool, float]:
        """Measured first, fastest first."""
        state = self._states.get(upstream)
        latency = state.latency if state is not None else None
        return latency is None, latency or 0.0

    def sent(self, upstream: Upstream) -> None:
        state = self._states.get(upstream)
        if state is not None:
            state.chosen += 1

    def answered(self, upstream: Upstream, rtt: float, now: float, error: str = "") -> None:
        """It answered after rtt seconds; error: why the answer would not do (a SERVFAIL, a
        malformed message), "" if it did."""
        state = self._states.get(upstream)
        if state is None:
            return
        if error:
            state.ok, state.error = False, error
            state.failures += 1
        else:
            state.ok, state.failures = True, 0
        state.at = state.answered_at = now
        state.unanswered = 0
        if not state.alive:  # back: its old figure says nothing now
            state.alive, state.latency = True, None
            self._dead.discard(upstream)
        rtt = rtt if rtt > 0.0 else 0.0  # not max(): a call that parses keywords, per answer
        state.latency = rtt if state.latency is None else state.latency + EWMA_WEIGHT * (rtt - state.latency)
        state.probe_gap = PROBE_MIN

    def failed(self, upstream: Upstream, reason: str, now: float) -> None:
        """No answer came: a timeout, a refused connection, a network error."""
        state = self._states.get(upstream)
        if state is None:
            return
        state.ok, state.at, state.error = False, now, reason
        state.failures += 1
        state.unanswered += 1
        if state.alive and state.unanswered >= DEAD_AFTER:
            state.alive = False
            self._dead.add(upstream)
            state.probe_gap = PROBE_MIN
            if state.probe_sent is None:
                state.probe_due = now + self._jittered(PROBE_MIN)

    def probes(self, now: float) -> list[Upstream]:
        """The upstreams to probe now (with PROBE_QUERY); each must be reported
        to probed(), answered or not."""
        due = []
        for upstream, state in self._states.items():
            if state.probe_sent is not None or now < state.probe_due:
                continue
            if state.alive and (upstream not in self._measured or now - state.answered_at < IDLE_PROBE):
                continue
            state.probe_sent = now
            state.probes += 1
            due.append(upstream)
        return due

    def probed(self, upstream: Upstream, now: float, reason: str = "") -> None:
        """A probe's outcome: answered ("") or why not."""
        state = self._states.get(upstream)
        if state is None or state.probe_sent is None:
            return
        rtt, state.probe_sent = now - state.probe_sent, None
        if not reason:
            self.answered(upstream, rtt, now)
            state.probe_due = now + self._jittered(IDLE_PROBE)
            return
        self.failed(upstream, f"probe_{reason}", now)
        if state.alive:  # not dead yet: ask again soon
            state.probe_due = now + self._jittered(PROBE_MIN)
        else:
            state.probe_due = now + self._jittered(state.probe_gap)
            state.probe_gap = min(2 * state.probe_gap, PROBE_MAX)

    def _jittered(self, gap: float) -> float:
        return gap * self._rng.uniform(1 - JITTER, 1 + JITTER)

    def status(self) -> dict[str, dict[str, Any]]:
        return {
            str(u): {
                "ok": s.ok,
                "at": s.at,
                "error": s.error,
                "failures": s.failures,
                "state": "alive" if s.alive else "dead",
                "latency_ms": None if s.latency is None else round(s.latency * 1000, 3),
                "chosen": s.chosen,
                "probes": s.probes,
            }
            for u, s in self._states.items()
        }

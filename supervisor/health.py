"""The node's health warnings, sans-IO, raised as Tailscale's health package raises its Warnables.

The supervisor's loop feeds `Health.update` what it already holds (each actor's
last heartbeat status, the peers' merged status) with the wall clock's `now`;
`meshsup status` reads `warnings()`. A warning is keyed by its code and subject
(a peer, an actor, a collector; "" for the node): while the condition stands
it keeps the `since` of its first update, with the message of its last; when
the condition goes, it goes.

Codes:
- peer-no-handshake: a peer with packets waiting for a session and no handshake
  for `no_handshake_after` (WireGuard's Reject-After-Time: past it, no session
  of the last handshake could carry them);
- dns-forward-failing: every DNS upstream failed its last query (Tailscale's code);
- collector-unreachable: a syslog or http collector of flow records or logs
  failing, with what waits in its spool;
- actor-restarting: an actor restarted RESTARTS_WARN times within the
  supervisor's period;
- listen-port-lost: magicsock is not listening on the configured UDP port;
- coordination-unreachable: the coord actor has not reached the mesh's NATS servers for
  COORDINATION_GRACE (the mesh runs on as it was meanwhile).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from meshsup.supervisor.supervision import ActorProc

PEER_NO_HANDSHAKE = "peer-no-handshake"
DNS_FORWARD_FAILING = "dns-forward-failing"
COLLECTOR_UNREACHABLE = "collector-unreachable"
ACTOR_RESTARTING = "actor-restarting"
LISTEN_PORT_LOST = "listen-port-lost"
COORDINATION_UNREACHABLE = "coordination-unreachable"

NO_HANDSHAKE_AFTER = 180.0  # WireGuard's Reject-After-Time
RESTARTS_WARN = 3  # restarts of one actor within the supervisor's period
# A worker drops what waits when it gives up handshaking (after ~90 s) and stages the next
# packet at once: "packets wait" holds this long past the last sight of one.
WAITING_GRACE = 5.0
UPDATE_INTERVAL = 0.5  # how often the supervisor's loop updates it
COORDINATION_GRACE = 10.0  # seconds without the NATS servers before it is a warning (a reconnect takes ~1)
TIMING_ENV = "MESHSUP_TEST_TIMING"  # the crypto workers' test timing; its reject_after_time shortens ours


def no_handshake_after(env: Mapping[str, str]) -> float:
    """The peer-no-handshake threshold: tests shorten it with the crypto workers' timing
    (reject_after_time in MESHSUP_TEST_TIMING, honoured only with MESHSUP_TEST_FAULTS=1)."""
    if env.get("MESHSUP_TEST_FAULTS") != "1":
        return NO_HANDSHAKE_AFTER
    spec = dict(kv.split("=", 1) for kv in env.get(TIMING_ENV, "").split(",") if "=" in kv)
    return float(spec.get("reject_after_time", NO_HANDSHAKE_AFTER))


@dataclass(frozen=True)
class HealthWarning:
    code: str
    subject: str  # the peer, actor or collector it is about; "" for the node
    message: str
    since: float  # unix seconds: when it was first raised

    def to_json(self) -> dict[str, Any]:
        return {"code": self.code, "subject": self.subject, "message": self.message, "since": int(self.since)}


class Health:
    def __init__(self, no_handshake_after: float = NO_HANDSHAKE_AFTER) -> None:
        self.no_handshake_after = no_handshake_after
        self._warnings: dict[tuple[str, str], HealthWarning] = {}
        self._never_since: dict[str, float] = {}  # peer key -> first seen with no handshake
        self._staged_seen: dict[str, float] = {}  # peer key -> last seen with packets waiting
        self._restarts: dict[str, tuple[int, deque[float]]] = {}  # actor -> (count seen, times of new ones)

    def warnings(self) -> list[HealthWarning]:
        return sorted(self._warnings.values(), key=lambda w: (w.since, w.code, w.subject))

    def update(
        self,
        now: float,
        actors: Iterable[ActorProc],
        period: float,
        peers: Iterable[Mapping[str, Any]] = (),
        listen_port: int | None = None,
    ) -> None:
        """`now`: unix seconds; `peers`: wgapi.peer_status of a node; `listen_port`: a node's
        configured port (None for a relay); `period`: the supervisor's restart period."""
        actors = list(actors)
        raised: dict[tuple[str, str], str] = {}
        raised.update(self._peers(now, peers))
        raised.update(self._restarting(now, actors, period))
        for a in actors:
            if a.kind == "netlog":
                raised.update(_collectors(a.status.get("collectors", [])))
            elif a.kind == "magicsock" and listen_port is not None:
                raised.update(_listen_port(a.status, listen_port))
            elif a.kind == "coord" and a.status.get("down_for", 0) >= COORDINATION_GRACE:
                raised[(COORDINATION_UNREACHABLE, "")] = (
                    f"the mesh's NATS servers unreachable for {_duration(a.status['down_for'])}: the mesh runs on"
                    f" its last known state (last error: {a.status.get('last_error') or 'none'})"
                )
        raised.update(_dns([a.status.get("upstreams", {}) for a in actors if a.kind == "dns"]))
        self._warnings = {
            key: HealthWarning(key[0], key[1], message, old.since if (old := self._warnings.get(key)) else now)
            for key, message in raised.items()
        }

    def _peers(self, now: float, peers: Iterable[Mapping[str, Any]]) -> dict[tuple[str, str], str]:
        out = {}
        known = set()
        for p in peers:
            key = p["public_key"]
            known.add(key)
            if p["last_handshake"]:
                self._never_since.pop(key, None)
                quiet_since = float(p["last_handshake"])
            else:  # never, or not since its worker restarted
                quiet_since = self._never_since.setdefault(key, now)
            if p.get("staged"):
                self._staged_seen[key] = now
            waiting = now - self._staged_seen.get(key, float("-inf")) <= WAITING_GRACE
            if waiting and now - quiet_since >= self.no_handshake_after:
                last = _clock(p["last_handshake"]) if p["last_handshake"] else "never"
                out[(PEER_NO_HANDSHAKE, p["name"])] = (
                    f"peer {p['name']}: no handshake for {_duration(now - quiet_since)} while packets wait for it "
                    f"({p.get('staged', 0)} queued; last handshake {last}; endpoint {p['endpoint'] or 'none'})"
                )
        for gone in set(self._never_since) - known:
            del self._never_since[gone]
        for gone in set(self._staged_seen) - known:
            del self._staged_seen[gone]
        return out

    def _restarting(self, now: float, actors: list[ActorProc], period: float) -> dict[tuple[str, str], str]:
        out = {}
        for a in actors:
            seen, times = self._restarts.get(a.name, (a.restarts, deque()))
            times.extend([now] * max(0, a.restarts - seen))
            while times and now - times[0] > period:
                times.popleft()
            self._restarts[a.name] = (a.restarts, times)
            if len(times) >= RESTARTS_WARN:
                out[(ACTOR_RESTARTING, a.name)] = (
                    f"actor {a.name} restarted {len(times)} times in the last {period:g} s"
                    f" (last: {a.exit_reason or 'unknown'})"
                )
        for gone in set(self._restarts) - {a.name for a in actors}:  # scaled down
            del self._restarts[gone]
        return out


def _collectors(collectors: Iterable[Mapping[str, Any]]) -> dict[tuple[str, str], str]:
    out = {}
    for c in collectors:
        if c.get("failures"):
            what = "flow-log" if c["what"] == "flows" else "log"
            unit = "records" if c["what"] == "flows" else "log lines"
            out[(COLLECTOR_UNREACHABLE, f"{c['what']}/{c['name']}")] = (
                f"{what} collector {c['name']} ({c['address']}) unreachable: {c['error'] or 'failing'};"
                f" {c['spooled']} {unit} spooled"
            )
    return out


def _listen_port(status: Mapping[str, Any], port: int) -> dict[tuple[str, str], str]:
    """magicsock's status has the port its socket is bound to (none before its first configure)."""
    bound = status.get("port")
    if bound is None or not port or bound == port:
        return {}
    return {
        (LISTEN_PORT_LOST, ""): (
            f"not listening on UDP port {port}: magicsock could not bind it (still on {bound});"
            " another program may hold it"
        )
    }


def _dns(workers: list[Mapping[str, Mapping[str, Any]]]) -> dict[tuple[str, str], str]:
    """Each upstream as the DNS worker that asked it last saw it (their `at`: one monotonic clock)."""
    latest: dict[str, Mapping[str, Any]] = {}
    for upstreams in workers:
        for url, state in upstreams.items():
            if state["at"] is None:  # never asked by this worker
                continue
            if url not in latest or state["at"] > latest[url]["at"]:
                latest[url] = state
    if not latest or any(s["ok"] for s in latest.values()):
        return {}
    failing = ", ".join(f"{url} ({s['error']})" for url, s in sorted(latest.items()))
    return {(DNS_FORWARD_FAILING, ""): f"DNS unavailable: every upstream failed its last query: {failing}"}


def _duration(seconds: float) -> str:
    minutes, s = divmod(int(seconds), 60)
    return f"{minutes} min {s} s" if minutes else f"{s} s"


def _clock(unix: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(unix))

"""The disco path engine (sans-IO): per peer, which direct UDP endpoint, if any, its data may take.

As Tailscale's magicsock endpoint (wgengine/magicsock/endpoint.go), with its
timings (pathstate.py) and its path preference (quality.py):

- An active peer (data moved within 45 s) with a disco key and no trusted path
  is hole punched: a call-me-maybe with our endpoints goes to it through the
  relay, and every candidate endpoint is pinged at once. The peer, on the
  call-me-maybe, pings ours: whichever ping leaves first opens its side's
  NAT or firewall for the other's (simultaneous open).
- A pong trusts its endpoint for 6.5 s; the best of them, by betterAddr, is
  the path (PathUpdate to the crypto worker). While the peer is active the
  best is pinged every 3 s (heartbeat), which keeps it trusted; a full round
  of all candidates looks for a better one every minute. Two lost heartbeats
  and the trust lapses: PathUpdate(None), and the relay carries the data
  until a round finds a path again.
- An authenticated ping from an address we did not know makes it a candidate,
  and is pinged back: that is how a node behind endpoint-dependent NAT, whose
  mapping toward us nobody could predict, gets a path to a public one.

A disco key is trusted only when the crypto worker learnt it inside the
peer's WireGuard session (set_disco_key); a datagram naming any other key
costs a dict lookup and a counter, no box open. Every refusal is counted by
reason in `counters` and changes nothing.
"""

from __future__ import annotations

import heapq
import itertools
import os
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from nacl.public import PrivateKey

from meshsup.actors.kernel.types import RELAY_HOST, Buffer, Endpoint
from meshsup.actors.magicsock.pathstate import (
    CALL_ME_MAYBE_INTERVAL,
    EARLY_FOR,
    EARLY_HELD,
    HEARTBEAT,
    MAX_CALL_ME_MAYBE,
    MAX_IN_FLIGHT,
    PING_INTERVAL,
    PING_TIMEOUT,
    TRUST,
    UPGRADE_INTERVAL,
    PeerPaths,
)
from meshsup.actors.magicsock.quality import better, canonical, pingable
from meshsup.actors.settings.node import format_endpoint
from meshsup.actors.wire import disco
from meshsup.actors.wire.disco import CallMeMaybe, DiscoError, Ping, Pong, SharedKey

Destination = Endpoint | bytes  # an UDP address, or a peer's WireGuard key: send through the relay to it

NO_DISCO_KEY = "no disco key from the peer yet (it is advertised inside the tunnel once a session exists)"
IDLE = "idle: paths are sought while traffic flows"
NO_CANDIDATES = "no candidate endpoints (no call-me-maybe from the peer and none configured)"


@dataclass(frozen=True)
class PathUpdate:
    """For the crypto worker owning `peer`."""

    peer: bytes  # WireGuard public key
    endpoint: Endpoint | None  # None: no direct path, use the relay
    trusted_for: float  # seconds the path stays trusted from now (6.5 after a pong); 0 with None


@dataclass(frozen=True)
class PingResult:
    """The answer to a user's `meshsup ping --type disco`."""

    request: int
    peer: bytes
    endpoint: Endpoint | None  # the direct endpoint that answered; None when it went through the relay
    latency: float | None  # seconds; None: no pong within the ping timeout


@dataclass(slots=True)
class _SentPing:
    peer: PeerPaths
    to: Destination
    at: float
    request: int | None  # a user's ping


class Paths:
    """The engine: calls in with `now`, datagrams, path updates and ping results out (drained by the
    caller), and `get_timer`/`handle_timer` for what is due. Only peers with something pending
    (heartbeats while active, a trusted path's expiry, an owed call-me-maybe) are in the timer heap."""

    def __init__(
        self,
        disco_private: bytes,
        *,
        rng: Callable[[int], bytes] = os.urandom,
        node_key: bytes | None = None,  # our WireGuard key, put in pings as Tailscale does
    ) -> None:
        self._private = disco_private
        self.public_key: bytes = PrivateKey(disco_private).public_key.encode()
        self._rng = rng
        self._node_key = node_key
        self.counters: Counter[str] = Counter()
        self._configured: dict[bytes, Sequence[Endpoint]] = {}  # every peer: its configured endpoints
        self._peers: dict[bytes, PeerPaths] = {}  # those disco concerned since
        self._by_disco: dict[bytes, PeerPaths] = {}  # the dict lookup before any crypto
        self._heartbeating: set[bytes] = set()
        self._local: tuple[Endpoint, ...] = ()
        self._nat_varies: bool | None = None
        self._pending: dict[bytes, _SentPing] = {}  # TxID -> our ping awaiting its pong
        self._expiry: deque[tuple[float, bytes]] = deque()  # in send order, so in expiry order
        self._timers: list[tuple[float, int, bytes]] = []  # (due, seq, peer key), stale entries skipped
        self._seq = itertools.count()
        self._datagrams: list[tuple[Destination, bytes]] = []
        self._updates: list[PathUpdate] = []
        self._results: list[PingResult] = []

    # --- what the node tells the engine --------------------------------------------------

    def set_peers(self, configured: Mapping[bytes, Sequence[Endpoint]], now: float) -> None:
        """The node's peers, WireGuard key -> configured endpoints (maybe none). Removed peers' state
        goes; the others keep theirs."""
        self.change_peers(configured, [k for k in self._configured if k not in configured], now)

    def change_peers(self, changed: Mapping[bytes, Sequence[Endpoint]], removed: Sequence[bytes], now: float) -> None:
        """Some peers added or changed (key -> configured endpoints), some removed; the rest untouched.
        A peer's path state is made when disco first concerns it (``_state``): until then the
        configured endpoints are all it costs, as idle peers of a large mesh stay."""
        for key in removed:
            self._configured.pop(key, None)
            peer = self._peers.pop(key, None)
            if peer is None:
                continue
            if peer.disco is not None:
                del self._by_disco[peer.disco.peer]
            self._heartbeating.discard(key)
        for key, endpoints in changed.items():
            self._configured[key] = endpoints
            peer = self._peers.get(key)
            if peer is not None and peer.configured != (wanted := _canonical(endpoints)):
                peer.set_configured(wanted, now)

    def _state(self, key: bytes) -> PeerPaths | None:
        """A configured peer's path state, made on first use; None for a key that is no peer."""
        state = self._peers.get(key)
        if state is None and key in self._configured:
            state = self._peers[key] = PeerPaths(key, _canonical(self._configured[key]))
        return state

    def set_disco_key(self, peer: bytes, disco_key: bytes, now: float) -> bool:
        """The peer's disco key as its WireGuard session told it (TSMP). True when new or changed: the
        caller then advertises ours back. A change resets the peer's path state."""
        state = self._state(peer)
        if state is None:
            self.counters["unknown_peer"] += 1
            return False
        if state.disco is not None and state.disco.peer == disco_key:
            return False
        if disco_key in self._by_disco:
            # Another peer's: two peers cannot share one, or either could be told the other's path.
            self.counters["disco_key_in_use"] += 1
            return False
        try:
            shared = SharedKey(self._private, disco_key)
        except DiscoError as err:
            self.counters[err.reason] += 1
            return False
        if state.disco is not None:
            del self._by_disco[state.disco.peer]
        self._drop_best(state)
        state.reset()
        state.disco = shared
        self._by_disco[disco_key] = state
        if state.active(now):
            self._start_heartbeat(state, now)
            self._round(state, now, call_me_maybe=True)
        self._schedule(state)
        held, state.early = list(state.early), deque(maxlen=EARLY_HELD)
        for datagram, at in held:
            if now - at < EARLY_FOR:
                self.receive(datagram, peer, now)
        return True

    def disco_key(self, peer: bytes) -> bytes | None:
        state = self._peers.get(peer)
        return state.disco.peer if state is not None and state.disco is not None else None

    def set_local_endpoints(self, endpoints: Sequence[Endpoint], now: float) -> None:
        """Our own candidates (interface addresses, STUN's reflexive one): a change is told to every
        active peer in a call-me-maybe (as soon as its rate limit allows)."""
        local = tuple(dict.fromkeys(canonical(ep) for ep in endpoints))
        if local == self._local:
            return
        self._local = local
        for key in self._heartbeating:
            peer = self._peers[key]
            self._call_me_maybe(peer, now)
            self._schedule(peer)

    def set_nat(self, mapping_varies: bool | None) -> None:
        """STUN's finding: whether this node's NAT maps per destination (endpoint-dependent), for `why`."""
        self._nat_varies = mapping_varies

    def activity(self, peer: bytes, now: float) -> None:
        """Data moved for the peer: it is active for 45 s, and without a trusted path hole punching starts."""
        state = self._state(peer)
        if state is None:
            self.counters["unknown_peer"] += 1
            return
        state.last_active = now
        if state.disco is None:
            return
        self._start_heartbeat(state, now)
        if not state.trusted(now):
            self._round(state, now, call_me_maybe=True)
        self._schedule(state)

    def demote(self, peer: bytes, endpoint: Endpoint, reason: str, now: float) -> None:
        """The crypto worker stopped using this direct path (no data came on it though disco answered):
        it is not chosen again until the next upgrade round's time (60 s); `why` tells the reason."""
        state = self._peers.get(peer)
        if state is None:
            self.counters["unknown_peer"] += 1
            return
        endpoint = canonical(endpoint)
        state.demoted[endpoint] = (reason, now + UPGRADE_INTERVAL)
        if state.best == endpoint:
            self._drop_best(state)
            self._schedule(state)

    def ping(self, peer: bytes, request: int, now: float) -> None:
        """A user's ping: one disco ping on the trusted direct path, else through the relay. As Tailscale's
        `tailscale ping`, it counts as activity, so it also starts hole punching toward an idle peer."""
        state = self._peers.get(peer)
        if state is None or state.disco is None:
            self._results.append(PingResult(request, peer, None, None))
            return
        best = state.best if state.trusted(now) else None
        self._send_ping(state, best or peer, now, request)
        self.activity(peer, now)

    # --- datagrams -------------------------------------------------------------------------

    def receive(self, datagram: Buffer, source: Destination, now: float) -> None:
        """A disco datagram from an UDP address, or through the relay from the peer key the relay
        authenticated. Never raises: what cannot be used is counted by reason."""
        try:
            sender = disco.sender(datagram)
        except DiscoError as err:
            self.counters[err.reason] += 1
            return
        peer = self._by_disco.get(sender)
        if peer is None:
            early = self._state(source) if isinstance(source, bytes) else None
            if early is not None and early.disco is None:
                # The relay vouches it is the peer's; its TSMP advertisement may still be on its way.
                early.early.append((bytes(datagram), now))
                self.counters["held_until_key"] += 1
            else:
                self.counters["unknown_sender"] += 1
            return
        relayed = isinstance(source, bytes)
        if relayed and source != peer.key:
            self.counters["relay_key_mismatch"] += 1
            return
        assert peer.disco is not None  # only peers with a disco key are in _by_disco
        try:
            message = peer.disco.open(datagram)
        except DiscoError as err:
            self.counters[err.reason] += 1
            return
        self._expire(now)
        if isinstance(message, Ping):
            self._on_ping(peer, message, source, now)
        elif isinstance(message, Pong):
            self._on_pong(peer, message, source, now)
        elif relayed:
            self._on_call_me_maybe(peer, message, now)
        else:
            # Only the relay vouches that it comes from the peer, and only the peer may name its endpoints.
            self.counters["call_me_maybe_not_via_relay"] += 1

    def _on_ping(self, peer: PeerPaths, ping: Ping, source: Destination, now: float) -> None:
        assert peer.disco is not None
        self.counters["pings_received"] += 1
        if peer.seen_ping(ping.txid):
            self.counters["ping_replayed"] += 1
            return
        if isinstance(source, bytes):
            self._send(peer.key, peer.disco.seal(Pong(ping.txid, (RELAY_HOST, 0))), "pongs_sent")
            return
        self._send(source, peer.disco.seal(Pong(ping.txid, source)), "pongs_sent")
        peer.pinged_us_directly = True
        if peer.ping_source(source, now).owes_ping_back(now):
            self._send_ping(peer, source, now)

    def _on_pong(self, peer: PeerPaths, pong: Pong, source: Destination, now: float) -> None:
        self.counters["pongs_received"] += 1
        sent = self._pending.get(pong.txid)
        if sent is None:
            self.counters["unknown_txid"] += 1  # never sent, timed out, or answered already (a replay)
            return
        if sent.peer is not peer:
            self.counters["pong_wrong_key"] += 1
            return
        if sent.to != source:
            self.counters["pong_wrong_source"] += 1
            return
        del self._pending[pong.txid]
        peer.in_flight -= 1
        latency = now - sent.at
        direct = sent.to if isinstance(sent.to, tuple) else None
        if sent.request is not None:
            self._results.append(PingResult(sent.request, peer.key, direct, latency))
        candidate = peer.candidates.get(direct) if direct is not None else None
        if direct is None or candidate is None:
            return
        candidate.latency, candidate.pong_at = latency, now
        if peer.demotion(direct, now) is not None:
            return  # it answers, but the crypto worker saw no data on it: not chosen until the demotion ends
        if peer.best is None or better(direct, latency, peer.best, peer.best_latency):
            peer.best = direct
        if peer.best == direct:
            peer.best_latency, peer.trusted_until = latency, now + TRUST
            self._updates.append(PathUpdate(peer.key, direct, TRUST))
            self._schedule(peer)

    def _on_call_me_maybe(self, peer: PeerPaths, message: CallMeMaybe, now: float) -> None:
        """The peer pinged our endpoints (its side is open now) and names its own: ping them all, at once."""
        self.counters["call_me_maybe_received"] += 1
        endpoints = tuple(dict.fromkeys(ep for ep in message.endpoints if pingable(ep)))[:MAX_CALL_ME_MAYBE]
        peer.set_call_me_maybe(endpoints, now)
        for candidate in peer.candidates.values():
            candidate.last_ping = None  # its earlier pings likely met a closed NAT: ping again now
        self._round(peer, now, call_me_maybe=False)
        self._schedule(peer)

    # --- timers ----------------------------------------------------------------------------

    def get_timer(self) -> float | None:
        """When handle_timer next has work; None: nothing pending."""
        while self._timers and not self._live(self._timers[0]):
            heapq.heappop(self._timers)
        while self._expiry and self._expiry[0][1] not in self._pending:
            self._expiry.popleft()
        times = [self._timers[0][0]] if self._timers else []
        if self._expiry:
            times.append(self._expiry[0][0])
        return min(times, default=None)

    def handle_timer(self, now: float) -> None:
        self._expire(now)
        while self._timers and self._timers[0][0] <= now:
            entry = heapq.heappop(self._timers)
            if not self._live(entry):
                continue
            peer = self._peers[entry[2]]
            peer.due = None
            if peer.best is not None and now >= peer.trusted_until:
                self._drop_best(peer)  # no pong for 6.5 s
            if peer.heartbeat_at is not None and now >= peer.heartbeat_at:
                self._heartbeat(peer, now)
            if peer.call_me_maybe_due:
                self._call_me_maybe(peer, now)
            self._schedule(peer)

    def _live(self, entry: tuple[float, int, bytes]) -> bool:
        peer = self._peers.get(entry[2])
        return peer is not None and peer.due == entry[0]

    def _schedule(self, peer: PeerPaths) -> None:
        """Keeps the peer's one live heap entry at its next due time (none: it costs nothing)."""
        times = [peer.heartbeat_at] if peer.heartbeat_at is not None else []
        if peer.best is not None:
            times.append(peer.trusted_until)
        if peer.call_me_maybe_due and self._local and peer.call_me_maybe_at is not None:
            times.append(peer.call_me_maybe_at + CALL_ME_MAYBE_INTERVAL)
        due = min(times, default=None)
        if due != peer.due:
            peer.due = due
            if due is not None:
                heapq.heappush(self._timers, (due, next(self._seq), peer.key))

    def _start_heartbeat(self, peer: PeerPaths, now: float) -> None:
        if peer.heartbeat_at is None:
            peer.heartbeat_at = now + HEARTBEAT
            self._heartbeating.add(peer.key)

    def _heartbeat(self, peer: PeerPaths, now: float) -> None:
        if not peer.active(now):
            peer.heartbeat_at = None  # idle: no more heartbeats, the trusted path lapses on its own
            self._heartbeating.discard(peer.key)
            return
        peer.heartbeat_at = now + HEARTBEAT
        if peer.best is not None:
            self._send_ping(peer, peer.best, now)
        if self._want_round(peer, now):
            self._round(peer, now, call_me_maybe=True)

    @staticmethod
    def _want_round(peer: PeerPaths, now: float) -> bool:
        # Tailscale skips the upgrade round below 5 ms (goodEnoughLatency); here it runs every minute regardless:
        # a few pings, and a peer's better path (on its LAN, say) is found even then.
        if not peer.trusted(now) or peer.last_full_ping is None:
            return True
        return now - peer.last_full_ping >= UPGRADE_INTERVAL

    def _expire(self, now: float) -> None:
        """Pings unanswered for 5 s are forgotten (so a flood cannot grow them), a user's with its result."""
        while self._expiry and self._expiry[0][0] <= now:
            sent = self._pending.pop(self._expiry.popleft()[1], None)
            if sent is None:
                continue
            sent.peer.in_flight -= 1
            self.counters["ping_timeouts"] += 1
            if sent.request is not None:
                self._results.append(PingResult(sent.request, sent.peer.key, None, None))

    # --- sending ---------------------------------------------------------------------------

    def _round(self, peer: PeerPaths, now: float, *, call_me_maybe: bool) -> None:
        """Pings every candidate not pinged within 5 s (Tailscale's sendDiscoPingsLocked), and with
        `call_me_maybe` asks the peer, through the relay, to ping ours."""
        peer.last_full_ping = now
        peer.prune(now)
        for endpoint, candidate in list(peer.candidates.items()):
            if candidate.last_ping is None or now - candidate.last_ping >= PING_INTERVAL:
                self._send_ping(peer, endpoint, now)
        if call_me_maybe:
            self._call_me_maybe(peer, now)

    def _call_me_maybe(self, peer: PeerPaths, now: float) -> None:
        """One call-me-maybe per 5 s at most; one asked for sooner, or before we know an endpoint of our
        own (Tailscale waits for STUN too), is owed and goes when it may."""
        assert peer.disco is not None
        held = peer.call_me_maybe_at is not None and now - peer.call_me_maybe_at < CALL_ME_MAYBE_INTERVAL
        if held or not self._local:
            peer.call_me_maybe_due = True
            return
        peer.call_me_maybe_at, peer.call_me_maybe_due = now, False
        self._send(peer.key, peer.disco.seal(CallMeMaybe(self._local)), "call_me_maybe_sent")

    def _send_ping(self, peer: PeerPaths, to: Destination, now: float, request: int | None = None) -> None:
        assert peer.disco is not None
        if request is None and peer.in_flight >= MAX_IN_FLIGHT:
            self.counters["ping_in_flight_limit"] += 1
            return
        txid = self._rng(disco.TXID_LEN)
        self._pending[txid] = _SentPing(peer, to, now, request)
        self._expiry.append((now + PING_TIMEOUT, txid))
        peer.in_flight += 1
        if isinstance(to, tuple) and (candidate := peer.candidates.get(to)) is not None:
            candidate.last_ping = now
        self._send(to, peer.disco.seal(Ping(txid, self._node_key)), "pings_sent")

    def _send(self, to: Destination, datagram: bytes, counter: str) -> None:
        self._datagrams.append((to, datagram))
        self.counters[counter] += 1

    def _drop_best(self, peer: PeerPaths) -> None:
        if peer.best is not None:
            peer.best, peer.trusted_until = None, 0.0
            self._updates.append(PathUpdate(peer.key, None, 0.0))

    # --- what the engine tells ---------------------------------------------------------------

    def datagrams_to_send(self) -> list[tuple[Destination, bytes]]:
        out, self._datagrams = self._datagrams, []
        return out

    def path_updates(self) -> list[PathUpdate]:
        out, self._updates = self._updates, []
        return out

    def ping_results(self) -> list[PingResult]:
        out, self._results = self._results, []
        return out

    def status(self, peer: bytes, now: float) -> dict[str, Any]:
        """The peer's path for `meshsup status`: the trusted direct endpoint in use, the candidates with
        their last round trip, and why there is no direct path, in a sentence."""
        state = self._peers.get(peer)
        if state is None:
            why = NO_DISCO_KEY if peer in self._configured else "not a configured peer"  # no disco yet, or none
            return {"endpoint": None, "latency_ms": None, "candidates": [], "why": why}
        best = state.best if state.trusted(now) else None
        return {
            "endpoint": format_endpoint(*best) if best else None,
            "latency_ms": _ms(state.best_latency) if best else None,
            "candidates": [
                {"endpoint": format_endpoint(*ep), "latency_ms": None if c.latency is None else _ms(c.latency)}
                for ep, c in state.candidates.items()
            ],
            "why": None if best else self._why(state, now),
        }

    def _why(self, peer: PeerPaths, now: float) -> str:
        if peer.disco is None:
            return NO_DISCO_KEY
        for endpoint in peer.demoted:
            if (reason := peer.demotion(endpoint, now)) is not None:
                return f"direct path {format_endpoint(*endpoint)} carried no data: {reason}"
        if not peer.active(now):
            return IDLE
        if not peer.candidates:
            return NO_CANDIDATES
        total = len(peer.candidates)
        answered = sum(c.pong_at is not None and now - c.pong_at < TRUST for c in peer.candidates.values())
        if answered:
            # The trusted path lapsed while another still answered: the next round (within 3 s) takes it.
            return f"{answered} of {total} candidates answered; the next round picks one"
        why = f"no pong from any of {total} candidates" if total > 1 else "no pong from the one candidate"
        if self._nat_varies and not peer.pinged_us_directly:
            why += "; both sides behind endpoint-dependent NAT (no ping from the peer ever reached this node directly)"
        elif self._nat_varies:
            why += "; this node is behind endpoint-dependent NAT"
        return why


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


def _canonical(endpoints: Sequence[Endpoint]) -> tuple[Endpoint, ...]:
    return tuple(dict.fromkeys(canonical(ep) for ep in endpoints))

"""magicsock's DERP relays: a connection to every [[relays]] entry, the home among them, and
which one reaches a peer.

Each relay has a RelayLink: a non-blocking TCP socket (TLS for https, verified
against the system's CAs or the entry's ca_file, for the url's host) watched by
the actor's loop, driving a DerpClient (sans-IO). A host name is resolved by a
thread (kernel/resolve.py) and polled at each tick until it answers, so a slow
resolver never blocks the loop; the first address is dialled. A link that fails
(a name that does not resolve, refused, reset, bad input, a stalled relay) is
closed, the reason counted, and dialled again after a backoff: 0.1 s doubling
to 5 s, with jitter, as Tailscale's (or when a restarting relay said to come
back), back to 0.1 s once logged in.

Every link stays connected: its Pings measure the relay's latency, and a peer
homed on another relay is reached there. The home relay is the connected one
with the lowest latency, told so with NotePreferred; another takes over when
the home fails or is clearly slower (by a third). A peer is sent to through
the relay its packets last came through while that is up, else the relay its
mesh record names as its home (a hint, for a peer not heard from yet), else our
home, else any other up relay that has not said the peer is not there (PeerGone).

A worker's batch for a peer becomes one run of SendPacket frames on the
link's send queue (256 KiB past the kernel's buffer; what does not fit is
dropped from the tail and counted, as a NIC's full ring drops); `flush`
writes each link's queue at the end of the loop's turn, many frames a syscall.
"""

from __future__ import annotations

import errno
import random
import socket
import ssl
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from meshsup.actors.kernel.mark import set_mark
from meshsup.actors.kernel.resolve import Resolver
from meshsup.actors.kernel.stream import SEND_QUEUE_BYTES, Transport
from meshsup.actors.kernel.types import RELAY_HOST, Buffer, Endpoint
from meshsup.actors.magicsock.derpclient import DerpClient, PeerGone, Restarting, Timing
from meshsup.actors.settings.relay import RelayEntry
from meshsup.actors.wire.derp import FRAME_HEADER_LEN, KEY_LEN, PeerGoneReason

READ_BUDGET = 8  # socket reads per wake-up, so one busy relay never starves the loop
HOME_MARGIN = 2 / 3  # another relay becomes home when its latency is below this share of the home's
FRAME_OVERHEAD = FRAME_HEADER_LEN + KEY_LEN  # a SendPacket's bytes besides its packet

Watch = Callable[..., None]  # Actor.watch(fd, handler, read=, write=)
Packets = Callable[["RelayLink", dict[bytes, list[Buffer]]], None]


class Backoff:
    """Delays between dials of a failing relay: first, doubling to cap, each drawn from its upper half."""

    def __init__(self, first: float = 0.1, cap: float = 5.0, rng: Callable[[], float] = random.random) -> None:
        self.first, self.cap, self.rng = first, cap, rng
        self.failures = 0

    def next(self) -> float:
        delay = min(self.cap, self.first * 2**self.failures)
        self.failures += 1
        return delay * (0.5 + self.rng() / 2)

    def reset(self) -> None:
        self.failures = 0


def tls_context(relay: RelayEntry) -> ssl.SSLContext | None:
    if not relay.tls:
        return None
    ctx = ssl.create_default_context(cafile=str(relay.ca_file) if relay.ca_file else None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


class RelayLink:
    """One relay's connection, redialled while it fails."""

    def __init__(
        self,
        index: int,
        relay: RelayEntry,
        keys: tuple[bytes, bytes],
        watch: Watch,
        unwatch: Callable[[int], None],
        on_packets: Packets,
        log: Any,
        resolver: Resolver,
        timing: Timing = Timing(),
    ) -> None:
        self.index, self.relay, self.keys, self.resolver = index, relay, keys, resolver
        self.address: Endpoint = (RELAY_HOST, index)  # how flow records name this relay
        self._watch, self._unwatch, self._on_packets, self.log, self.timing = watch, unwatch, on_packets, log, timing
        self.tls = tls_context(relay)
        self.client: DerpClient | None = None
        self.transport: Transport | None = None
        self.connecting = False  # the TCP connect is under way
        self.retry_at = 0.0  # when to dial again, while there is no client
        self.backoff = Backoff()
        self.told_preferred = False  # what NotePreferred last said on this connection
        self.gone: list[bytes] = []  # keys the relay said are not (or no longer) there, for the owner to take
        self.failures: Counter[str] = Counter()  # why connections ended, by reason
        self.counters: Counter[str] = Counter()
        self._writing = False  # watched for writability
        self._was_up = False
        self.mark = 0  # the firewall mark on the connection (kernel.mark)

    @property
    def up(self) -> bool:
        return self.client is not None and self.client.up

    @property
    def rtt(self) -> float | None:
        return self.client.rtt if self.client is not None and self.client.up else None

    @property
    def state(self) -> str:
        if self.client is None:
            return "waiting"  # for its next dial
        return "connecting" if self.connecting else self.client.phase.value

    # --- connecting and failing -----------------------------------------------------
    def dial(self, now: float) -> None:
        """Connect to the relay's first address; nothing while its name is being resolved (tick asks again)."""
        host = self.relay.host
        try:
            addresses = self.resolver.lookup(host, self.relay.port, socket.SOCK_STREAM)
        except OSError:  # the cached failure for FAILURE_TTL: each retry meanwhile is counted, none starts a lookup
            self._retry(now, "resolve_failed")
            return
        if addresses is None:
            return
        family, address = addresses[0]
        try:
            sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        except OSError as err:  # out of descriptors, say: try again later
            self._retry(now, _reason("socket", err.errno))
            return
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # frames are small; Go's default too
        try:
            if self.mark:
                set_mark(sock, self.mark)
        except OSError as err:
            sock.close()
            self._retry(now, _reason("mark", err.errno))
            return
        err = sock.connect_ex(address)
        if err not in (0, errno.EINPROGRESS):
            sock.close()
            self._retry(now, _reason("connect", err))
            return
        self.counters["dials"] += 1
        self.transport = Transport(sock, self.tls, now, server_hostname=host if self.tls else None)
        self.client = DerpClient(*self.keys, self.relay.hostport, now, self.timing, self.counters)
        self.connecting, self._writing = True, True
        self._watch(sock.fileno(), self._on_io, read=True, write=True)

    def fail(self, now: float, reason: str) -> None:
        """End the connection (counted by `reason`) and dial again after the backoff."""
        if self.transport is not None:
            self._unwatch(self.transport.fileno())
            self.transport.close()
        if self._was_up:
            self.log.warning("relay connection lost", relay=self.relay.name, reason=reason)
        self.transport, self.client, self.connecting, self._was_up = None, None, False, False
        self._retry(now, reason)

    def _retry(self, now: float, reason: str, delay: float | None = None) -> None:
        self.failures[reason] += 1
        self.told_preferred = False
        self.retry_at = now + (self.backoff.next() if delay is None else delay)

    def set_mark(self, mark: int) -> None:
        """Mark this connection and the next ones (a live one is rerouted when the rules change)."""
        if mark != self.mark and self.transport is not None:
            set_mark(self.transport.sock, mark)
        self.mark = mark

    def close(self) -> None:
        if self.transport is not None:
            self._unwatch(self.transport.fileno())
            self.transport.close()
        self.transport, self.client = None, None

    # --- the loop -------------------------------------------------------------------
    def _on_io(self) -> None:
        now = time.monotonic()
        transport, client = self.transport, self.client
        assert transport is not None and client is not None
        try:
            if self.connecting:
                err = transport.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    self.fail(now, _reason("connect", err))
                    return
                self.connecting = False
                transport.start()
            for _ in range(READ_BUDGET):
                data = transport.read()
                if data is None:
                    self.fail(now, "closed_by_relay" if client.up else "closed_at_login")
                    return
                if not data:
                    break
                client.receive_data(data, now)
                if client.closed:
                    break
        except ssl.SSLError as err:
            self.fail(now, "tls_" + (err.reason or "error").lower())
            return
        except OSError as err:
            if err.errno == errno.ENOTCONN:  # the connect is still under way
                return
            self.fail(now, _reason("socket", err.errno))
            return
        self._after(now)

    def _after(self, now: float) -> None:
        """What the client did with the input: packets up, events seen, a close carried out, bytes out."""
        client = self.client
        assert client is not None
        if client.packets:
            self._on_packets(self, client.take_packets())
        for event in client.take_events():
            if isinstance(event, PeerGone):
                self.gone.append(event.key)
                self.counters["peer_gone" if event.reason == PeerGoneReason.DISCONNECTED else "not_here"] += 1
            elif isinstance(event, Restarting):
                self.log.info("relay restarting", relay=self.relay.name, reconnect_in=event.reconnect_in)
                self.fail(now, "restarting")
                self.retry_at = now + event.reconnect_in
                return
            else:
                self.log.warning("relay health", relay=self.relay.name, problem=event.problem)
        if client.closed:
            self.fail(now, client.close_reason or "closed")
            return
        if client.up and not self._was_up:
            self._was_up = True
            self.backoff.reset()
            self.log.info("relay connected", relay=self.relay.name, url=self.relay.url)
        self.flush(now)

    def send(self, key: bytes, datagrams: list[bytes], now: float) -> int:
        """Queue datagrams for `key` as one run of frames (the socket write waits for `flush`); how many
        were refused: not up, too long for DERP, or past the send queue's bound (all of the run)."""
        client, transport = self.client, self.transport
        if client is None or transport is None or not transport.ready:
            return len(datagrams)
        room, fit = SEND_QUEUE_BYTES - transport.queued, 0
        for d in datagrams:  # drop from the tail, packet by packet, as a NIC's full ring does
            room -= len(d) + FRAME_OVERHEAD
            if room < 0:
                break
            fit += 1
        refused = client.send_packets(key, datagrams[:fit] if fit < len(datagrams) else datagrams)
        transport.queue(client.data_to_send(), now)
        self.counters["tx_dropped"] += len(datagrams) - fit
        self.counters["tx_packets"] += fit - refused
        return refused + len(datagrams) - fit

    def note_preferred(self, preferred: bool) -> None:
        if self.client is not None and self.client.up and preferred != self.told_preferred:
            self.client.note_preferred(preferred)
            self.told_preferred = preferred

    def flush(self, now: float) -> None:
        """Write what the client has queued, as much as the socket takes; watch for room if some is left."""
        transport, client = self.transport, self.client
        if transport is None or client is None or self.connecting:
            return
        if transport.ready:
            frames = client.data_to_send()
            if frames:
                self.counters["tx_dropped"] += transport.queue(frames, now)  # control frames: never in practice
        try:
            done = transport.flush(now)
        except OSError as err:
            self.fail(now, _reason("socket", err.errno))
            return
        if done == self._writing:  # watch for room only while something waits
            self._writing = not done
            self._watch(transport.fileno(), self._on_io, read=True, write=self._writing)

    def tick(self, now: float) -> None:
        if self.client is None:
            if now >= self.retry_at:
                self.dial(now)
            return
        if self.transport is not None and self.transport.stalled(now):
            self.fail(now, "write_stalled")
            return
        timer = self.client.get_timer()
        if timer is not None and now >= timer:
            self.client.handle_timer(now)
            self._after(now)

    def status(self, home: bool) -> dict[str, Any]:
        rtt = self.rtt
        return {
            "name": self.relay.name,
            "url": self.relay.url,
            "address": f"{RELAY_HOST}:{self.index}",
            "state": self.state,
            "home": home,
            "latency_ms": None if rtt is None else round(rtt * 1000, 2),
            "failures": dict(self.failures),
            **self.counters,
        }


class Relays:
    """The links, the home among them, and the relay each peer is reached through."""

    def __init__(self, links: list[RelayLink]) -> None:
        self.links = links
        self.home: RelayLink | None = None  # kept while it is down, until another is up: status names it
        self.heard_via: dict[bytes, RelayLink] = {}  # peer -> the relay its packets last came through
        self.not_at: dict[bytes, set[int]] = {}  # peer -> relays that said it is not there
        self.hinted: dict[bytes, RelayLink] = {}  # peer -> its home relay, as its mesh record says

    def hint(self, homes: dict[bytes, str]) -> None:
        """Peers' home relays by name (from the mesh's records); names of no relay of ours are left out."""
        by_name = {link.relay.name: link for link in self.links}
        self.hinted = {key: by_name[name] for key, name in homes.items() if name in by_name}

    def heard(self, key: bytes, link: RelayLink) -> None:
        if self.heard_via.get(key) is not link:
            self.heard_via[key] = link
        self.not_at.pop(key, None)

    def route(self, key: bytes) -> RelayLink | None:
        link = self.heard_via.get(key)
        if link is not None and link.up:
            return link
        absent = self.not_at.get(key, ())
        hinted = self.hinted.get(key)
        if hinted is not None and hinted.up and hinted.index not in absent:
            return hinted
        home = self.home if self.home is not None and self.home.up else None
        if home is not None and home.index not in absent:
            return home
        candidates = sorted((lk for lk in self.links if lk.up and lk.index not in absent), key=_latency)
        return candidates[0] if candidates else home  # all said it is not there: the home, should it come

    def tick(self, now: float) -> None:
        for link in self.links:
            link.tick(now)
            for key in link.gone:
                if self.heard_via.get(key) is link:
                    del self.heard_via[key]
                self.not_at.setdefault(key, set()).add(link.index)
            link.gone.clear()
        self.elect()

    def elect(self) -> None:
        measured = [lk for lk in self.links if lk.up and lk.rtt is not None]
        if measured:
            best = min(measured, key=_latency)
            home = self.home
            if home is None or not home.up or home.rtt is None or _latency(best) < _latency(home) * HOME_MARGIN:
                self.home = best
        for link in self.links:
            link.note_preferred(link is self.home)

    def flush(self, now: float) -> None:
        for link in self.links:
            link.flush(now)

    def close(self) -> None:
        for link in self.links:
            link.close()

    def status(self) -> list[dict[str, Any]]:
        return [link.status(link is self.home) for link in self.links]


def _reason(what: str, err: int | None) -> str:
    """connect_econnrefused, socket_econnreset: a failure's label, by its errno."""
    return f"{what}_{errno.errorcode.get(err or 0, 'error')}".lower()


def _latency(link: RelayLink) -> float:
    rtt = link.rtt
    return float("inf") if rtt is None else rtt

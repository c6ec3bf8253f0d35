"""The supervisor's end of the bus: the control sockets every actor's DEALER
connects to (one for the actors running as root, one for the unprivileged
ones), requests to actors with acks and deadlines, counted drops of bad
frames, and the event proxy (XSUB/XPUB: the root actors publish on a socket
of root's, the unprivileged ones on their own, from which only the topics
they may publish pass). All pumped from the supervisor's one poll loop.

An actor is known on its control socket by an identity the supervisor makes
for each launch (`admit`): random, handed to the process at its fork, never
on a command line. The unprivileged actors share a control socket and may
connect as anything they like; since none knows another's identity, none
can take over another's connection (its Configure) or speak for it. A frame
from an identity not given out, or not given out for that socket, is a
counted drop (`unknown_sender`), and a second connection with a live
identity is refused (no ROUTER_HANDOVER: a restarted actor gets a new one).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import zmq

from meshsup.actors.bus.codec import DecodeError, Message, decode, encode
from meshsup.actors.bus.endpoints import Runtime, grant
from meshsup.actors.bus.messages import Ack, NameLearned
from meshsup.actors.log import RateLimited
from meshsup.actors.registry import kind_of, unprivileged

REQUEST_TIMEOUT = 5.0  # deadline for an actor's ack
# What an unprivileged actor may publish: the names DNS learned (for `meshsup` CLIs that watch them).
UNPRIVILEGED_TOPICS = frozenset({NameLearned.TAG.encode()})

A = TypeVar("A")


@dataclass
class Pending:
    actor: str
    deadline: float
    done: Callable[[Ack | None], None]


def bind(ctx: zmq.Context, kind: int, endpoint: str) -> zmq.Socket:
    s = ctx.socket(kind)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.MAXMSGSIZE, 64 * 1024 * 1024)
    s.bind(endpoint)
    return s


class Hub:
    def __init__(self, ctx: zmq.Context, runtime: Runtime, log: Any) -> None:
        self.log = log
        self.pending: dict[int, Pending] = {}
        self.next_req = 1
        self.bus_dropped: dict[str, int] = {}
        self._ratelimit = RateLimited()
        self._routes: dict[str, bytes] = {}  # actor -> the identity of its current launch
        self._senders: dict[bytes, str] = {}  # and back
        self.control = bind(ctx, zmq.ROUTER, runtime.control)
        self.unprivileged = bind(ctx, zmq.ROUTER, runtime.unprivileged_control)
        self.xsub = bind(ctx, zmq.XSUB, runtime.events_in)
        self.unprivileged_xsub = bind(ctx, zmq.XSUB, runtime.unprivileged_events_in)
        self.xpub = bind(ctx, zmq.XPUB, runtime.events_out)
        for endpoint in (runtime.control, runtime.events_in):
            grant(endpoint, unprivileged=False)
        for endpoint in (runtime.unprivileged_control, runtime.unprivileged_events_in, runtime.events_out):
            grant(endpoint, unprivileged=True)

    @property
    def controls(self) -> tuple[zmq.Socket, zmq.Socket]:
        return self.control, self.unprivileged

    def _control_of(self, actor: str) -> zmq.Socket:
        """The control socket the actor connects to (actors.registry.unprivileged)."""
        return self.unprivileged if unprivileged(kind_of(actor)) else self.control

    def admit(self, actor: str) -> bytes:
        """A new identity for a launch of `actor`, the only one it is routed to and heard by from now
        on (the previous launch's frames still queued are dropped)."""
        self._senders.pop(self._routes.get(actor, b""), None)
        identity = secrets.token_hex(16).encode()  # ZeroMQ reserves identities starting with a zero byte
        self._routes[actor], self._senders[identity] = identity, actor
        return identity

    @property
    def event_sockets(self) -> tuple[zmq.Socket, zmq.Socket, zmq.Socket]:
        return self.xsub, self.unprivileged_xsub, self.xpub

    def pump(self, src: zmq.Socket) -> None:
        """The event proxy: events out to the subscribers, subscriptions back to the publishers. Of
        the unprivileged publishers' events only UNPRIVILEGED_TOPICS pass: a DNS worker taken over
        must not tell the crypto workers a link changed."""
        for _ in range(1024):
            try:
                frames = src.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if src is self.unprivileged_xsub and frames[0] not in UNPRIVILEGED_TOPICS:
                self.count_drop("unprivileged_topic", frames[0].decode(errors="replace"))
                continue
            for dst in (self.xsub, self.unprivileged_xsub) if src is self.xpub else (self.xpub,):
                try:
                    dst.send_multipart(frames, zmq.NOBLOCK)
                except zmq.Again:
                    self.count_drop("events_full", frames[0][:64].decode(errors="replace"))

    def count_drop(self, reason: str, detail: str) -> None:
        self.bus_dropped[reason] = self.bus_dropped.get(reason, 0) + 1
        if self._ratelimit.should_log(reason, time.monotonic()) is not None:
            self.log.warning("bus frame dropped", reason=reason, detail=detail[:120])

    def drain_control(
        self, sock: zmq.Socket, actors: Mapping[str, A], on_message: Callable[[A, Message], None]
    ) -> None:
        """Each frame from a known actor, on its control socket, to `on_message`; anything else counted as dropped."""
        for _ in range(1024):
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(frames) != 2:
                self.count_drop("malformed", "frame count")
                continue
            ident, frame = frames
            try:
                msg = decode(frame)
            except DecodeError as err:
                self.count_drop(err.reason, str(err))
                continue
            name = self._senders.get(ident, "")
            a = actors.get(name)
            if a is None or self._control_of(name) is not sock:
                self.count_drop("unknown_sender", ident[:32].hex())
                continue
            on_message(a, msg)

    # --- requests and their acks ----------------------------------------------
    def request(
        self,
        actor: str,
        make: Callable[[int], Message],
        done: Callable[[Ack | None], None],
        timeout: float = REQUEST_TIMEOUT,
    ) -> None:
        """Send `make(req)`; `done` gets the ack, or None at the deadline or if the actor dies."""
        req = self.next_req
        self.next_req += 1
        self.pending[req] = Pending(actor, time.monotonic() + timeout, done)
        self._send(actor, encode(make(req)), 0)

    def tell(self, actor: str, msg: Message) -> None:
        """Send without waiting for an ack, or for room in the queue (shutdown)."""
        try:
            self._send(actor, encode(msg), zmq.NOBLOCK)
        except zmq.ZMQError:
            pass

    def _send(self, actor: str, frame: bytes, flags: int) -> None:
        identity = self._routes.get(actor)
        if identity is not None:  # else never launched: a request times out
            self._control_of(actor).send_multipart([identity, frame], flags)

    def acked(self, msg: Ack) -> None:
        p = self.pending.pop(msg.req, None)
        if p is not None:
            p.done(msg)

    def check_deadlines(self, now: float) -> None:
        for req, p in list(self.pending.items()):
            if now > p.deadline:
                del self.pending[req]
                p.done(None)

    def fail_pending(self, actor: str) -> None:
        for req, p in list(self.pending.items()):
            if p.actor == actor:
                del self.pending[req]
                p.done(None)

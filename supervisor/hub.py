"""The supervisor's end of the bus: the control sockets every actor's DEALER
connects to (one for the actors running as root, one for the unprivileged
ones), requests to actors with acks and deadlines, counted drops of bad
frames, and the event proxy (XSUB/XPUB). All pumped from the supervisor's
one poll loop.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import zmq

from meshsup.actors.bus.codec import DecodeError, Message, decode, encode
from meshsup.actors.bus.endpoints import Runtime, grant
from meshsup.actors.bus.messages import Ack
from meshsup.actors.log import RateLimited
from meshsup.actors.registry import kind_of, unprivileged

REQUEST_TIMEOUT = 5.0  # deadline for an actor's ack

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
        self.control = bind(ctx, zmq.ROUTER, runtime.control)
        self.unprivileged = bind(ctx, zmq.ROUTER, runtime.unprivileged_control)
        for sock in self.controls:
            sock.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a restarted actor reuses its identity
        self.xsub = bind(ctx, zmq.XSUB, runtime.events_in)
        self.xpub = bind(ctx, zmq.XPUB, runtime.events_out)
        grant(runtime.control, unprivileged=False)
        for endpoint in (runtime.unprivileged_control, runtime.events_in, runtime.events_out):
            grant(endpoint, unprivileged=True)

    @property
    def controls(self) -> tuple[zmq.Socket, zmq.Socket]:
        return self.control, self.unprivileged

    def _control_of(self, actor: str) -> zmq.Socket:
        """The control socket the actor connects to (actors.registry.unprivileged)."""
        return self.unprivileged if unprivileged(kind_of(actor)) else self.control

    def pump(self, src: zmq.Socket) -> None:
        """The event proxy: what came in on one side out on the other."""
        dst = self.xpub if src is self.xsub else self.xsub
        for _ in range(1024):
            try:
                dst.send_multipart(src.recv_multipart(zmq.NOBLOCK), zmq.NOBLOCK)
            except zmq.Again:
                return

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
            name = ident.decode(errors="replace")
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
        self._control_of(actor).send_multipart([actor.encode(), encode(make(req))])

    def tell(self, actor: str, msg: Message) -> None:
        """Send without waiting for an ack, or for room in the queue (shutdown)."""
        try:
            self._control_of(actor).send_multipart([actor.encode(), encode(msg)], zmq.NOBLOCK)
        except zmq.ZMQError:
            pass

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

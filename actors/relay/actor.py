"""A relay worker: the thin loop around core.Core.

Every worker listens on the relay's TCP port and STUN's UDP port itself
(SO_REUSEPORT: the kernel spreads connections and datagrams over the
workers, and a worker's restart closes only its own connections). Its client
sockets sit in one epoll of its own, watched by the actor loop as a single
descriptor, so a thousand idle clients cost the loop nothing.

A packet for a client of another worker joins that worker's batch: after
each turn, one data-path message (actors/bus/datapath.py) per worker carries
all of them, so crossing workers costs a syscall per batch, not per packet.
Who is on which worker comes from the other workers' events on the bus.
"""

from __future__ import annotations

import ipaddress
import select
import socket
import ssl
import time
from typing import Any

from meshsup.actors.base import Actor, ConfigError
from meshsup.actors.bus.codec import Message
from meshsup.actors.bus.endpoints import Runtime
from meshsup.actors.bus.messages import RelayFrames, RelayWorkerUp
from meshsup.actors.kernel.stream import Transport
from meshsup.actors.kernel.types import Endpoint
from meshsup.actors.registry import actor_name
from meshsup.actors.relay.core import Core, Settings
from meshsup.actors.settings.relay import RelayConf, RelaySettings
from meshsup.actors.wire import stun

TURN_EVENTS = 256  # socket events handled per turn of the actor loop
ACCEPT_BUDGET = 64
STUN_BUDGET = 64
ANNOUNCE_AFTER = (0.5, 2.0)  # RelayWorkerUp again while the bus's subscriptions settle
RESTART_TRY_FOR_MS = 5000


def _listen(kind: int, where: Endpoint) -> socket.socket:
    host, port = where
    family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    s = socket.socket(family, kind | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if kind == socket.SOCK_STREAM:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        s.bind((host, port))
        if kind == socket.SOCK_STREAM:
            s.listen(1024)
    except OSError:
        s.close()
        raise
    return s


def _endpoint(addr: Any) -> Endpoint:
    ip = ipaddress.ip_address(addr[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return str(ip), addr[1]


class RelayActor(Actor):
    kind = "relay"
    settings_class = RelaySettings

    def __init__(self, name: str, runtime: Runtime) -> None:
        super().__init__(name, runtime)
        self.core: Core | None = None
        self.epoll = select.epoll()
        self.add_reader(self.epoll.fileno(), self._turn)
        self.listener: socket.socket | None = None
        self.stun: socket.socket | None = None
        self.tls: ssl.SSLContext | None = None
        self.conns: dict[int, Transport] = {}
        self.fd_conn: dict[int, int] = {}
        self.masks: dict[int, int] = {}
        self.next_conn = 1
        self.born = time.monotonic()
        self.announce = list(ANNOUNCE_AFTER)
        self.subscribe("relay.")

    # --- configuration ---------------------------------------------------------
    def configure(self, settings: RelaySettings) -> None:
        relay = settings.relay
        try:
            tls = _tls_context(relay)
        except (OSError, ssl.SSLError) as err:
            raise ConfigError(f"TLS certificate: {err}") from None
        if self.core is None:
            try:
                self.listener = _listen(socket.SOCK_STREAM, relay.listen)
                if relay.stun_listen is not None:
                    self.stun = _listen(socket.SOCK_DGRAM, relay.stun_listen)
            except OSError as err:
                raise ConfigError(f"cannot listen: {err}") from None
            for s in (self.listener, self.stun):
                if s is not None:
                    self.epoll.register(s.fileno(), select.EPOLLIN)
            self.core = Core(Settings(self.name, relay.private_key, relay.public_key), time.monotonic())
        self.tls = tls
        self.core.keep_workers({actor_name("relay", i) for i in range(settings.actors.relay)})
        self.core.s.rate, self.core.s.burst, self.core.s.mesh_key = relay.rate, relay.burst, relay.mesh_key
        self._apply()

    # --- the loop's hooks --------------------------------------------------------
    def _turn(self) -> None:
        """Socket events of this worker's epoll, a bounded number per turn."""
        assert self.core is not None
        now = time.monotonic()
        listener = self.listener.fileno() if self.listener else -1
        stun_fd = self.stun.fileno() if self.stun else -1
        for fd, ev in self.epoll.poll(0, TURN_EVENTS):
            if fd == listener:
                self._accept(now)
            elif fd == stun_fd:
                self._stun()
            elif (conn := self.fd_conn.get(fd)) is not None:
                if ev & select.EPOLLOUT:
                    self._flush(conn, now)
                if ev & (select.EPOLLIN | select.EPOLLERR | select.EPOLLHUP) and conn in self.conns:
                    self._read(conn, now)
        self._apply()

    def on_message(self, msg: Message) -> None:
        assert self.core is not None
        if isinstance(msg, RelayFrames):
            self.core.counters["batches_from_workers"] += 1
            self.core.on_frames(msg.frames)
        else:
            self.core.on_event(msg, time.monotonic())
        self._apply()

    def tick(self, now: float) -> None:
        if self.core is None:
            return
        self.core.tick(now)
        if self.announce and now - self.born >= self.announce[0]:
            self.announce.pop(0)
            self.publish(RelayWorkerUp(worker=self.name, started=self.core.started))
        for conn, t in list(self.conns.items()):
            if t.stalled(now):
                self.core.bad["write_timeout"] += 1
                self.core.ended(conn, now, error=True)
                self._close(conn)
        self._apply()

    def status(self) -> dict[str, Any]:
        return self.core.status() if self.core is not None else {}

    def close(self) -> None:
        if self.core is not None:  # stopped (or scaled down): clients come back to another worker
            now = time.monotonic()
            self.core.restarting(0, RESTART_TRY_FOR_MS)
            for conn in list(self.core.clients):
                self.core.ended(conn, now, error=True)
            self._apply()
        for conn in list(self.conns):
            self._close(conn)
        for s in (self.listener, self.stun):
            if s is not None:
                s.close()
        self.epoll.close()

    # --- sockets -----------------------------------------------------------------
    def _accept(self, now: float) -> None:
        assert self.core is not None and self.listener is not None
        for _ in range(ACCEPT_BUDGET):
            try:
                sock, addr = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # out of descriptors, or the client gave up: the next accept may work
                self.core.bad["accept_failed"] += 1
                return
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn, self.next_conn = self.next_conn, self.next_conn + 1
            self.conns[conn] = Transport(sock, self.tls, now)
            self.fd_conn[sock.fileno()] = conn
            self.masks[conn] = select.EPOLLIN
            self.epoll.register(sock.fileno(), select.EPOLLIN)
            self.core.accept(conn, _endpoint(addr), now)

    def _read(self, conn: int, now: float) -> None:
        assert self.core is not None
        t = self.conns[conn]
        try:
            data = t.read()
            if t.raw:  # TLS's own records: the handshake's answers
                self._flush(conn, now)
        except ssl.SSLError:
            self.core.bad["tls_error"] += 1
            self.core.ended(conn, now, error=True)
            self._close(conn)
            return
        except OSError:
            self.core.ended(conn, now, error=True)
            self._close(conn)
            return
        if data is None:
            self.core.ended(conn, now)
            self._close(conn)
        elif data:
            self.core.receive(conn, data, now)

    def _flush(self, conn: int, now: float) -> None:
        t = self.conns[conn]
        try:
            done = t.flush(now)
        except OSError:
            assert self.core is not None
            self.core.ended(conn, now, error=True)
            self._close(conn)
            return
        self._want(conn, out=not done)

    def _want(self, conn: int, out: bool | None = None, read: bool | None = None) -> None:
        """Set what the epoll watches a connection for: reading unless paused, writing while queued."""
        mask = self.masks[conn]
        if out is not None:
            mask = mask | select.EPOLLOUT if out else mask & ~select.EPOLLOUT
        if read is not None:
            mask = mask | select.EPOLLIN if read else mask & ~select.EPOLLIN
        if mask != self.masks[conn]:
            self.masks[conn] = mask
            self.epoll.modify(self.conns[conn].fileno(), mask)

    def _close(self, conn: int) -> None:
        t = self.conns.pop(conn, None)
        if t is None:
            return
        fd = t.fileno()
        self.fd_conn.pop(fd, None)
        self.masks.pop(conn, None)
        self.epoll.unregister(fd)
        t.close()

    def _stun(self) -> None:
        assert self.core is not None and self.stun is not None
        for _ in range(STUN_BUDGET):
            try:
                data, addr = self.stun.recvfrom(2048)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # an ICMP error queued for an earlier answer
                continue
            try:
                req = stun.parse_binding_request(data)
            except stun.StunError as err:
                self.core.bad[f"stun_{err.reason}"] += 1
                continue
            self.core.counters["stun_requests"] += 1
            try:
                self.stun.sendto(stun.response(req.txid, _endpoint(addr), req.fingerprint), addr)
            except OSError:
                self.core.dropped["stun_send"] += 1

    # --- the core's output ---------------------------------------------------------
    def _apply(self) -> None:
        assert self.core is not None
        out = self.core.take()
        now = time.monotonic()
        for conn, frames in out.send.items():
            t = self.conns.get(conn)
            if t is None:
                continue
            if dropped := t.queue(frames, now):
                self.core.dropped["queue_full"] += dropped
            if conn not in out.close:
                self._flush(conn, now)
        for conn in out.pause:
            if conn in self.conns:
                self._want(conn, read=False)
        for conn in out.resume:
            if conn in self.conns:
                self._want(conn, read=True)
        for conn in out.close:
            t = self.conns.get(conn)
            if t is not None:
                try:
                    t.flush(now)  # the refusal's last words, if the socket takes them now
                except OSError:
                    pass
                self._close(conn)
        for worker, batch in out.batches():
            self.core.counters["batches_to_workers"] += 1
            self.outbox.send(worker, batch)
        for event in out.events:
            self.publish(event)


def _tls_context(relay: RelayConf) -> ssl.SSLContext | None:
    if not relay.tls_cert:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(relay.tls_cert, relay.tls_key)
    return ctx

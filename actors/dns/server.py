"""The DNS controller's IO server: UDP and TCP listeners around the resolver.

Embeddable in any asyncio loop. Every listen address gets a UDP and a TCP
socket with SO_REUSEPORT, so N worker processes share the ports and the
kernel spreads queries across them; IP_FREEBIND lets a worker bind the
tunnel address before the router has put it on the link. TCP carries many
queries per connection (answers may come back out of order, RFC 7766) and
idle connections are closed. Every query is offered to the resolver's fast
path first (a question asked before, answered from bytes); a UDP query it
does not know, to the native forwarder next (forwarder.c: the plain UDP
forward, query to reply, in C; what it cannot finish it hands back), and
goes the resolver's full way only when neither takes it. Upstreams that are dead, or idle in a
min_latency group, are probed from here as choice.py says, on the same
transport as the forwards.

Only loopback, the mesh and the `allow` prefixes are answered (access.py):
a query from anyone else is dropped over UDP (an answer would reflect off a
spoofed source) and refused over TCP, where the client is real, before the
connection is closed; both are counted (refused_source). UDP replies to
clients other than loopback are rate limited per client prefix (RRL: some
dropped, some truncated so that real clients retry over TCP), and one
prefix may hold at most an eighth of the TCP connections.

Interception (``[dns] intercept``) brings queries sent to any address to the
interception sockets the server is handed (actors.dns.interception): they are
answered as any, from the address the client asked, and that address goes to
the rules (``dst:``).

    server = DnsServer(settings, on_learned=publish, intercept=sockets)
    await server.start()
    ...
    server.flush_cache()               # link changed
    server.set_learning(False)         # nobody listens for learned names now
    await server.reconfigure(new)      # listeners kept if addresses unchanged
    server.counters()                  # for status
    server.upstreams()                 # each upstream's state, latency, counts
    await server.close()

or, all in one: ``await serve(settings, ready=ready, stop=stop)``.
"""

from __future__ import annotations

import asyncio
import functools
import socket
import struct
import time
from collections import Counter
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import structlog

from meshsup.actors.dns import burst, scan
from meshsup.actors.dns.access import RateLimit, Sources, Verdict, share
from meshsup.actors.dns.choice import PROBE_QUERY
from meshsup.actors.dns.forwarder import Forwarder
from meshsup.actors.dns.interception import ANCILLARY_SIZE, original_destination, reply_from
from meshsup.actors.dns.message import refusal
from meshsup.actors.dns.resolver import Action, Drop, Forward, Learned, Log, Reply, Resolver
from meshsup.actors.dns.steering import steer
from meshsup.actors.dns.transport import Transport
from meshsup.actors.dns.wire import assemble, cut, parse_answer, truncated
from meshsup.actors.routing.prefixes import IPNetwork
from meshsup.actors.settings.dns import DnsSettings

log = structlog.get_logger("meshsup.dns")

Address = tuple[str, int]
OnLearned = Callable[[str, tuple[str, ...]], None]

STEER_INTERVAL = 2.0  # seconds between recounts of the workers sharing a UDP port
PROBE_TICK = 0.25  # seconds between looks at which upstreams are due a probe (choice.py paces them)
NATIVE_TICK = 0.1  # seconds between looks for the native forwarder's timeouts (and old sockets), while it is busy
BATCH = 64  # UDP datagrams read (and replies sent) per system call
MAX_QUERY = 4096  # bytes: a longer UDP query is dropped, counted (no DNS query is that long)
MAX_TCP_CLIENTS = 512
MAX_TCP_BACKLOG = 128
TCP_WRITE_BUFFER_LIMIT = 1 << 20  # a client that does not read its answers is cut off
# Linux values; the socket module does not export them.
IP_FREEBIND = 15
IPV6_FREEBIND = 78


def _bind(address: Address, kind: socket.SocketKind) -> socket.socket:
    host, port = address
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, kind)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.setsockopt(socket.IPPROTO_IPV6, IPV6_FREEBIND, 1)
        else:
            sock.setsockopt(socket.IPPROTO_IP, IP_FREEBIND, 1)
        sock.setblocking(False)
        sock.bind((host, port))
        if kind == socket.SOCK_STREAM:
            sock.listen(MAX_TCP_BACKLOG)
    except BaseException:
        sock.close()
        raise
    return sock


class _UdpListener:
    """Reads datagrams a batch at a time, each with its sender, and sends replies
    a batch at a time (burst.c: recvmmsg and sendmmsg, no Python call per
    datagram for either). Queries the fast path knows are answered right here,
    the hot loop, one clock reading per batch (the datagrams of a batch arrived
    together); their replies, and those of forwards, leave together at the end
    of the batch (or of the loop turn, for answers that come otherwise). A
    query the fast path does not know is offered to the native forwarder
    (forwarder.c), then to the resolver."""

    def __init__(self, sock: socket.socket, server: DnsServer) -> None:
        self.sock = sock
        self._server = server
        # Replies queued, and where each goes.
        self._replies: list[bytes] = []
        self._addresses: list[Any] = []
        self._reading = False  # a batch is being served: its replies leave when it is done
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(sock.fileno(), self._readable)

    def _readable(self) -> None:
        server = self._server
        try:
            datagrams = burst.receive_from(self.sock.fileno(), BATCH, MAX_QUERY)
        except OSError:
            server.stats["udp_receive_errors"] += 1
            return
        # The batch's forwards leave together once it is read, not in a loop turn of their own.
        transport = server._transport
        transport.hold()
        self._reading = True
        try:
            self._serve(datagrams)
        finally:
            transport.send_held()
            server._send_native()
            self._reading = False
            self._flush_outbox()

    def _serve(self, datagrams: list[tuple[bytes | None, Any]]) -> None:
        server = self._server
        fast, stats, sources, take = server.fast, server.stats, server.sources.client, server.native.take
        now = time.monotonic()
        for query, source in datagrams:
            if query is None:
                stats["udp_oversized_queries"] += 1
                continue
            client = sources(source[0])
            if not client.allowed:
                stats["refused_source"] += 1
                continue
            reply = fast(query, "udp", now)
            if reply is None:
                if not take(query, source, self, client.prefix, now):
                    server._handle(query, source, "udp", self, now)
                continue
            if client.prefix is not None:
                reply = server.limit(reply, client.prefix, now)
                if reply is None:
                    continue
            self._queue(reply, source)

    def send(self, wire: bytes, source: Any) -> None:
        """A reply made outside the receive batch (a forwarded answer), as the
        rate limit lets it go: queued, and sent with the others in one system call."""
        limited = self._server.limit_to(source[0], wire)
        if limited is not None:
            self._queue(limited, source)

    def reply(self, wire: bytes, source: Any, prefix: Hashable | None, now: float) -> None:
        """send(), for a client whose prefix is known (the native forwarder's replies)."""
        limited = wire if prefix is None else self._server.limit(wire, prefix, now)
        if limited is not None:
            self._queue(limited, source)

    def _queue(self, wire: bytes, source: Any) -> None:
        replies = self._replies
        if not replies and not self._reading:
            self._server._flush_later(self)
        replies.append(wire)
        self._addresses.append(source)

    def _flush_outbox(self) -> None:
        replies, addresses = self._replies, self._addresses
        if not replies:
            return
        self._replies, self._addresses = [], []
        fd = self.sock.fileno()
        if fd < 0:  # closed since (its number may be another socket's by now)
            return
        done = 0
        while done < len(replies):
            try:
                done += burst.send_to(fd, replies, addresses, done)
            except (OSError, ValueError):  # a full send buffer drops a reply, as a NIC would; the rest go on
                self._server.stats["udp_send_errors"] += 1
                done += 1

    def finished(self) -> None:
        """Nothing to keep track of per UDP query."""

    def close(self) -> None:
        self._flush_outbox()
        self._loop.remove_reader(self.sock.fileno())
        self.sock.close()


class _InterceptUdp:
    """The interception UDP socket (actors.dns.interception): a datagram at a
    time, as each carries its original destination, which the reply leaves from.
    Its source as the resolver sees it is the client's address with that
    destination last."""

    BATCH = 64  # datagrams read per wakeup, so that one busy socket does not starve the loop

    def __init__(self, sock: socket.socket, server: DnsServer) -> None:
        self.sock = sock
        self._server = server
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(sock.fileno(), self._readable)

    def _readable(self) -> None:
        server, stats = self._server, self._server.stats
        for _ in range(self.BATCH):
            try:
                query, ancillary, flags, client = self.sock.recvmsg(MAX_QUERY, ANCILLARY_SIZE)
            except BlockingIOError:
                return
            except OSError:
                stats["udp_receive_errors"] += 1
                return
            stats["intercepted_udp"] += 1
            if flags & socket.MSG_TRUNC:
                stats["udp_oversized_queries"] += 1
                continue
            destination = original_destination(ancillary)
            if destination is None:  # not delivered by interception: a client of 127.0.0.153 itself
                destination = str(self.sock.getsockname()[0])
            source = (*client, destination)
            if not server.sources(client[0]).allowed:
                stats["refused_source"] += 1
                continue
            server._answer(query, source, "udp", self, destination)

    def send(self, wire: bytes, source: Any) -> None:
        """A reply from the original destination (source's last item), as the rate limit lets it go."""
        limited = self._server.limit_to(source[0], wire)
        if limited is None:
            return
        try:
            self.sock.sendmsg([limited], [reply_from(source[-1])], 0, source[:-1])
        except OSError:
            self._server.stats["udp_send_errors"] += 1

    def finished(self) -> None:
        """Nothing to keep track of per UDP query."""

    def close(self) -> None:
        self._loop.remove_reader(self.sock.fileno())
        self.sock.close()


class _TcpConnection:
    """One client connection; counts the queries it still owes an answer."""

    def __init__(self, writer: asyncio.StreamWriter, server: DnsServer) -> None:
        self._writer = writer
        self._server = server
        self.pending = 0
        self.closed = False

    def send(self, wire: bytes, source: Any) -> None:
        self.finished()
        if self.closed:
            return
        self._writer.write(struct.pack("!H", len(wire)) + wire)
        if self._writer.transport.get_write_buffer_size() > TCP_WRITE_BUFFER_LIMIT:
            self._server.stats["tcp_slow_reader_closed"] += 1
            self.close()

    def finished(self) -> None:
        self.pending -= 1

    def close(self) -> None:
        self.closed = True
        self._writer.close()


class _Listeners:
    def __init__(self, udp: _UdpListener, tcp: asyncio.Server) -> None:
        self.udp = udp
        self.tcp = tcp

    def close(self) -> None:
        self.udp.close()
        self.tcp.close()


class DnsServer:
    def __init__(
        self,
        settings: DnsSettings,
        *,
        on_learned: OnLearned | None = None,
        intercept: Sequence[socket.socket] = (),
    ) -> None:
        """``intercept``: the interception sockets (actors.dns.interception), served
        from start() until close(), whatever the settings."""
        self.settings = settings
        self._intercept_socks = list(intercept)
        self._intercepting: list[_InterceptUdp | asyncio.Server] = []
        self._on_learned = on_learned
        self._resolver = Resolver(settings)
        self._resolver.learning = on_learned is not None
        self.fast = self._resolver.fast
        # The plain UDP forwards, in C; it hands the others (and its failures) to the resolver.
        self.native = Forwarder(scan.plain_query, parse_answer, assemble, cut)
        self._resolver.attach(self.native)
        self._native_timer: asyncio.TimerHandle | None = None
        self._transport = self._new_transport(settings)
        # While the transport hands out a batch of answers, the UDP replies they make
        # wait in their listeners' outboxes (these), to leave together when it is done.
        self._replies_held = False
        self._outboxes: list[_UdpListener] = []
        self._listeners: dict[Address, _Listeners] = {}
        self._connections: set[_TcpConnection] = set()
        self._tcp_prefixes: Counter[Hashable] = Counter()  # connections by client prefix
        self.sources = Sources(settings.sources)
        self._rate_limit = _rate_limit(settings)
        self._closing = False
        self._steer_timer: asyncio.TimerHandle | None = None
        self._probe_timer: asyncio.TimerHandle | None = None
        self.stats: Counter[str] = Counter()

    async def start(self) -> None:
        self._configure_native()
        asyncio.get_running_loop().add_reader(self.native.fileno(), self._native_readable)
        await self._listen(self.settings.listen)
        for sock in self._intercept_socks:
            if sock.type == socket.SOCK_DGRAM:
                self._intercepting.append(_InterceptUdp(sock, self))
            else:
                client = functools.partial(self._tcp_client, intercepted=True)
                self._intercepting.append(await asyncio.start_server(client, sock=sock, limit=65537))
        self._steer_timer = asyncio.get_running_loop().call_later(STEER_INTERVAL, self._steer_again)
        self._probe()

    def _probe(self) -> None:
        """Send the probes due now; look again in a moment."""
        for upstream in self._resolver.upstreams.probes(time.monotonic()):
            self._transport.start(upstream, PROBE_QUERY, self.settings.timeout, self._probed, upstream)
        self._configure_native()  # the policy's first choice may have changed
        self._probe_timer = asyncio.get_running_loop().call_later(PROBE_TICK, self._probe)

    def _probed(self, upstream: Any, wire: bytes | None, reason: str) -> None:
        if not self._closing:
            self._resolver.upstreams.probed(upstream, time.monotonic(), "" if wire is not None else reason)
            self._configure_native()  # an upstream back may be the first choice again

    def _steer(self, listeners: list[_Listeners]) -> None:
        """Spread UDP queries evenly over the workers sharing each port (steering.py)."""
        for each in listeners:
            if not steer(each.udp.sock):
                self.stats["udp_steering_errors"] += 1

    def _steer_again(self) -> None:
        """Every few seconds: workers come and go."""
        self._steer(list(self._listeners.values()))
        self._steer_timer = asyncio.get_running_loop().call_later(STEER_INTERVAL, self._steer_again)

    async def _listen(self, addresses: tuple[Address, ...]) -> None:
        """Open the listeners we do not have yet; all or none."""
        opened: dict[Address, _Listeners] = {}
        try:
            for address in addresses:
                if address in self._listeners:
                    continue
                udp = _bind(address, socket.SOCK_DGRAM)
                try:
                    tcp = await asyncio.start_server(
                        self._tcp_client, sock=_bind(address, socket.SOCK_STREAM), limit=65537
                    )
                except BaseException:
                    udp.close()
                    raise
                opened[address] = _Listeners(_UdpListener(udp, self), tcp)
        except BaseException:
            for listeners in opened.values():
                listeners.close()
            raise
        self._listeners.update(opened)
        self._steer(list(opened.values()))

    async def change_names(
        self, settings: DnsSettings, names: Mapping[str, Sequence[str]], ranges: tuple[list[IPNetwork], list[IPNetwork]]
    ) -> None:
        """New settings that differ in the mesh's names and ranges alone (peers changed): those names
        (Resolver.change_names) and who is answered (the ranges (gone, added)), the listeners and
        upstreams untouched."""
        self.sources.change(*ranges)
        self._resolver.change_names(settings, names)
        self.settings = settings
        self._configure_native()

    async def reconfigure(self, settings: DnsSettings) -> None:
        """New settings at runtime. New listeners open before old ones close; if
        one cannot be bound, the current settings stay and the error is raised."""
        await self._listen(settings.listen)
        for address in set(self._listeners) - set(settings.listen):
            self._listeners.pop(address).close()
        if _transport_shape(settings) != _transport_shape(self.settings):
            # Forwards under way on the old transport fail over to the new one.
            old = self._transport
            self._transport = self._new_transport(settings)
            old.close()
        if settings.sources != self.settings.sources:
            self.sources = Sources(settings.sources)
        if _rate_limit_shape(settings) != _rate_limit_shape(self.settings):
            self._rate_limit = _rate_limit(settings)
        self._resolver.reconfigure(settings)
        self.settings = settings
        self._configure_native()

    def _new_transport(self, settings: DnsSettings) -> Transport:
        transport = _transport(settings)
        transport.answer_hooks = (self._hold_replies, self._send_replies)
        return transport

    def _hold_replies(self) -> None:
        self._replies_held = True

    def _send_replies(self) -> None:
        self._replies_held = False
        outboxes, self._outboxes = self._outboxes, []
        for outbox in outboxes:
            outbox._flush_outbox()

    def _flush_later(self, listener: _UdpListener) -> None:
        """listener has replies queued: sent once the batch of answers being handed
        out is done, or at the end of this loop turn."""
        if self._replies_held:
            self._outboxes.append(listener)
        else:
            asyncio.get_running_loop().call_soon(listener._flush_outbox)

    def limit(self, wire: bytes, prefix: Hashable, now: float) -> bytes | None:
        """A UDP reply to a client of prefix as the rate limit lets it go:
        whole, truncated, or (None) not at all; counted."""
        if self._rate_limit is None:
            return wire
        verdict = self._rate_limit(prefix, now)
        if verdict is Verdict.SEND:
            return wire
        if verdict is Verdict.SLIP:
            self.stats["rrl_slipped"] += 1
            return truncated(wire)
        self.stats["rrl_dropped"] += 1
        return None

    def limit_to(self, host: str, wire: bytes) -> bytes | None:
        """A UDP reply to the client at host, made outside a receive batch, as limit() lets it go."""
        prefix = self.sources.client(host).prefix
        return wire if prefix is None else self.limit(wire, prefix, time.monotonic())

    def flush_cache(self) -> None:
        """Forget every cached answer, e.g. after a link change."""
        self._resolver.flush_cache()

    def set_learning(self, on: bool) -> None:
        """Whether on_learned hears of names (say, while anyone listens for them)."""
        self._resolver.learning = on and self._on_learned is not None
        self._configure_native()

    def upstreams(self) -> dict[str, dict[str, Any]]:
        """Each upstream's last outcome, state, latency and counts (actors.dns.choice.Upstreams)."""
        return self._resolver.upstreams.status()

    def counters(self) -> dict[str, int]:
        counters = Counter(self._resolver.stats())  # the native forwarder's counted in, under the same names
        counters.update(self._transport.counters)  # which it shares with the transport too: summed
        counters.update(self.stats)
        return {**counters, "tcp_clients": len(self._connections)}

    def upstream_latency(self) -> dict[str, Any]:
        """latency.LatencyBuckets' snapshot: forwards answered, by seconds waited."""
        return self._resolver.upstream_latency.snapshot()

    @property
    def addresses(self) -> list[Address]:
        return list(self._listeners)

    async def close(self) -> None:
        for timer in (self._steer_timer, self._probe_timer, self._native_timer):
            if timer is not None:
                timer.cancel()
        asyncio.get_running_loop().remove_reader(self.native.fileno())
        self.native.close()  # its forwards under way are dropped, as the transport's are
        for listeners in self._listeners.values():
            listeners.close()
        self._listeners.clear()
        for intercepting in self._intercepting:
            intercepting.close()
        self._intercepting.clear()
        for connection in list(self._connections):
            connection.close()
        self._closing = True
        self._transport.close()
        await self._transport.wait_closed()

    # -- the native forwarder ----------------------------------------------

    def _configure_native(self) -> None:
        """Tell the native forwarder what it may take now (Resolver.native_route)."""
        route = self._resolver.native_route()
        if route is None:
            self.native.configure(None)
        else:
            self.native.configure(**route)

    def _send_native(self) -> None:
        """Send what the native forwarder took in this batch; watch for its timeouts."""
        returned = self.native.send()
        if returned:
            self._resume(returned, time.monotonic())
        self._watch_native()

    def _watch_native(self) -> None:
        """Look for the native forwarder's timeouts (and a socket to retire once it has lived) while it is busy."""
        if self._native_timer is None and self.native.busy():
            self._native_timer = asyncio.get_running_loop().call_later(NATIVE_TICK, self._expire_native)

    def _native_readable(self) -> None:
        """Answers came to the native forwarder: its replies go out together, as a batch's do."""
        if self._closing:
            return
        now = time.monotonic()
        self._hold_replies()
        try:
            replies, answered, returned = self.native.readable(now)
            for ctx, reply, source, prefix in replies:
                ctx.reply(reply, source, prefix, now)
            if answered:
                self._run(self._resolver.native_answered(answered, now))
            if returned:
                self._resume(returned, now)
        finally:
            self._send_replies()

    def _expire_native(self) -> None:
        self._native_timer = None
        now = time.monotonic()
        returned = self.native.expire(now)
        if returned:
            self._resume(returned, now)
        self._watch_native()

    def _resume(self, returned: list[tuple[str, Any, float | None, list[Any]]], now: float) -> None:
        """Forwards the native forwarder handed back: the resolver goes on with them."""
        for reason, upstream, rtt, waiters in returned:
            self._run(self._resolver.resume(reason, upstream, rtt, waiters, now))
        self._configure_native()  # a failed upstream may no longer be the first choice

    # -- the loop around the resolver ------------------------------------

    def _answer(
        self, wire: bytes, source: Any, transport: str, ctx: _InterceptUdp | _TcpConnection, destination: str
    ) -> None:
        """A query read on its own (not in a UDP batch): the fast path's reply, else the resolver's."""
        now = time.monotonic()
        reply = self.fast(wire, transport, now)
        if reply is None:
            self._handle(wire, source, transport, ctx, now, destination)
        else:
            ctx.send(reply, source)

    def _handle(
        self,
        wire: bytes,
        source: Any,
        transport: str,
        ctx: _UdpListener | _InterceptUdp | _TcpConnection,
        now: float,
        destination: str = "",
    ) -> None:
        """``destination``: the address an intercepted query was sent to."""
        self._run(self._resolver.handle(wire, source, transport, now, ctx, destination))

    def _run(self, actions: list[Action]) -> None:
        for action in actions:
            kind = action.__class__  # by identity: a match statement's isinstance checks cost more per query
            if kind is Reply:
                action.ctx.send(action.wire, action.source)  # type: ignore[union-attr]
            elif kind is Forward:
                self._transport.start(action.upstream, action.query, action.timeout, self._answered, action)  # type: ignore[union-attr]
            elif kind is Drop:
                action.ctx.finished()  # type: ignore[union-attr]
            elif kind is Learned:
                self._learned(action)  # type: ignore[arg-type]
            elif kind is Log:
                log.warning(action.event, **action.fields)  # type: ignore[union-attr]

    def _answered(self, action: Forward, wire: bytes | None, reason: str) -> None:
        if self._closing:
            return
        now = time.monotonic()
        if wire is None:
            self._run(self._resolver.on_upstream_failure(action.key, action.upstream, reason, now))
        else:
            self._run(self._resolver.on_upstream_answer(action.key, action.upstream, wire, now))

    def _learned(self, learned: Learned) -> None:
        if self._on_learned is None:
            return
        try:
            self._on_learned(learned.name, learned.addresses)
        except Exception:
            self.stats["learned_callback_errors"] += 1
            log.exception("dns_learned_callback_failed", name=learned.name)

    async def _tcp_client(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, intercepted: bool = False
    ) -> None:
        source = writer.get_extra_info("peername")
        # An intercepted connection's local address is the one the client asked.
        destination = str(writer.get_extra_info("sockname")[0]) if intercepted else ""
        if intercepted:
            self.stats["intercepted_tcp"] += 1
        prefix = self.sources(source[0]).prefix
        if len(self._connections) >= MAX_TCP_CLIENTS:
            self.stats["tcp_clients_refused"] += 1
            writer.close()
            return
        if prefix is not None and self._tcp_prefixes[prefix] >= share(MAX_TCP_CLIENTS):
            self.stats["tcp_clients_refused_source"] += 1
            writer.close()
            return
        connection = _TcpConnection(writer, self)
        self._connections.add(connection)
        self._tcp_prefixes[prefix] += 1
        self.stats["tcp_connections"] += 1
        try:
            while not connection.closed:
                try:
                    async with asyncio.timeout(self.settings.tcp_idle_timeout):
                        (length,) = struct.unpack("!H", await reader.readexactly(2))
                except TimeoutError:
                    if connection.pending > 0:
                        continue  # the client waits for us, not the other way round
                    self.stats["tcp_idle_closed"] += 1
                    break
                # A message started must arrive in time; a timeout here closes.
                async with asyncio.timeout(self.settings.tcp_idle_timeout):
                    wire = await reader.readexactly(length)
                connection.pending += 1
                if not self.sources(source[0]).allowed:
                    # Not one of ours, but a real client (TCP is not spoofed): tell it, then hang up.
                    self.stats["refused_source"] += 1
                    refused = refusal(wire, "tcp")
                    if refused is not None:
                        connection.send(refused, source)
                    break
                self._answer(wire, source, "tcp", connection, destination)
        except (asyncio.IncompleteReadError, OSError, TimeoutError):
            pass  # the client went away or stalled mid-message
        finally:
            self._connections.discard(connection)
            self._tcp_prefixes[prefix] -= 1
            if not self._tcp_prefixes[prefix]:
                del self._tcp_prefixes[prefix]
            connection.close()


def _transport_shape(settings: DnsSettings) -> tuple[Any, ...]:
    return settings.ca_file, settings.tcp_idle_timeout, settings.bootstrap


def _transport(settings: DnsSettings) -> Transport:
    return Transport(ca_file=settings.ca_file, idle_timeout=settings.tcp_idle_timeout, bootstrap=settings.bootstrap)


def _rate_limit_shape(settings: DnsSettings) -> tuple[int, float, int]:
    return settings.rate_limit, settings.rate_limit_window, settings.rate_limit_slip


def _rate_limit(settings: DnsSettings) -> RateLimit | None:
    return RateLimit(*_rate_limit_shape(settings)) if settings.rate_limit else None


async def serve(
    settings: DnsSettings,
    *,
    on_learned: OnLearned | None = None,
    ready: asyncio.Event | None = None,
    stop: asyncio.Event,
    on_started: Callable[[DnsServer], None] | None = None,
) -> None:
    """Serve until stop is set. on_started hands out the server, for
    flush_cache(), reconfigure() and counters()."""
    server = DnsServer(settings, on_learned=on_learned)
    await server.start()
    try:
        if on_started is not None:
            on_started(server)
        if ready is not None:
            ready.set()
        await stop.wait()
    finally:
        await server.close()

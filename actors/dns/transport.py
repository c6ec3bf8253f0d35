"""The IO half of forwarding: asyncio clients for udp/tcp/tls/https upstreams.

- UDP: each burst of queries (those sent in one loop turn) gets a fresh
  connected socket, on a source port the kernel picks at random (RFC 5452),
  closed once its answers are in; answers matched by a random ID (and the
  resolver checks the question they echo). A burst's queries leave together
  at the end of the turn and its answers are read together, a system call
  each way (burst.c), not one per query. The burst sockets are watched in
  an epoll set of our own, one reader for the loop. A truncated answer is
  asked again over TCP.
- TCP and TLS: one connection per upstream carries many queries at once
  (RFC 7766 pipelining), answers matched by ID; a reused connection that
  the server closed meanwhile is retried once on a new one; closed when
  idle.
- HTTPS (RFC 8484): over HTTP/2 where the server speaks it (doh2.py);
  else HTTP/1.1 keep-alive POSTs of application/dns-message
  on a small pool of TLS connections (HTTP/1.1 has one request in flight
  per connection), ID 0 on the wire as the RFC asks. Every length the
  server writes is checked before anything is read by it (lines, headers,
  chunks, bodies): a server that breaks the bounds fails the exchange as
  http_bad_response, having made us hold no more than a message.
- DoQ (RFC 9250): doq.py. doq.py and doh2.py are imported when an upstream
  first needs them: a worker that has none carries neither aioquic nor h2.
- An upstream given by host name is first resolved through the bootstrap
  servers (bootstrap.py).

``Transport.start`` sends a query and calls back once, with the token it
was given, with the answer or with a short reason the resolver counts
(timeout, refused, closed, network, tls, http...). A UDP query costs a dict
entry, not a task or a closure.
"""

from __future__ import annotations

import asyncio
import os
import re
import select
import socket
import ssl
import struct
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Iterator, Sequence
from dataclasses import replace
from typing import Any

import structlog

from meshsup.actors.dns import burst
from meshsup.actors.dns.bootstrap import Bootstrap
from meshsup.actors.dns.exchange import (
    MAX_MESSAGE,
    QR_BYTE,
    ConnectionLost,
    UpstreamError,
    answer_for,
    exchange_once_more,
)
from meshsup.actors.settings.dnstypes import Upstream

log = structlog.get_logger("meshsup.dns")

DOH_POOL_SIZE = 4
UDP_BURST = 16  # queries one socket (one source port) carries at most (burst.c takes up to 64 a call)
UDP_ANSWER_SIZE = 4096  # we ask for at most OUR_PAYLOAD (1232): a larger answer is dropped, counted
POLL_EVENTS = 64  # burst sockets found ready per epoll_wait; the rest the next loop turn
MAX_HTTP_HEADERS = 64
MAX_HTTP_LINE = 8192  # a status, header or chunk-size line
CONTENT_LENGTH = re.compile(r"[0-9]{1,5}")
CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,8}")  # checked against what a message may still take before reading
_TC_BYTE = 0x02
_UDP_NONBLOCKING = socket.SOCK_DGRAM | socket.SOCK_NONBLOCK  # in socket(): no fcntl calls after it
_NEVER = float("inf")


def _tls_context(ca_file: str | None, alpn: tuple[str, ...]) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=ca_file)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(list(alpn))
    return context


def _random_ids() -> Iterator[int]:
    """Unpredictable 16-bit IDs (RFC 5452), from os.urandom a few thousand at a
    time rather than with a system call each; next() on them costs a third of
    what a method slicing them out does."""
    while True:
        yield from memoryview(os.urandom(8192)).cast("H")


_random_id = _random_ids().__next__


def _reason(exc: BaseException) -> str:
    """The short name a failed exchange is counted under."""
    if isinstance(exc, UpstreamError):
        return exc.reason
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, ssl.SSLError):
        return "tls"
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, (ConnectionError, asyncio.IncompleteReadError)):
        return "closed"
    if isinstance(exc, OSError):
        return "network"
    raise exc


# Called once per query with the token start() was given: the answer and "",
# or None and why not.
Done = Callable[[Any, bytes | None, str], None]
# Called instead for a UDP answer with TC set: upstream, query, deadline, done, token.
Truncated = Callable[[Upstream, bytes, float, Done, Any], None]


class _Bursts:
    """A transport's open burst sockets: their readiness in an epoll set of our
    own that the loop watches as one reader, their deadlines under one timer.
    A socket joins with one epoll_ctl and leaves by being closed (the kernel
    drops a closed socket from every epoll set), where the loop's add_reader
    and remove_reader would cost a system call each and a selector key and
    handle per burst; the loop makes one call a turn, however many are ready.
    The timer is armed for the earliest deadline and, when it fires, looks at
    every socket open (those waiting on answers: a few loop turns' worth), so
    a burst answered in time costs no timer of its own."""

    def __init__(self, hooks: Callable[[], tuple[Callable[[], None], Callable[[], None]] | None]) -> None:
        """hooks: what to call before and after each batch of answers is handed out (Transport.answer_hooks)."""
        self._epoll = select.epoll()
        self._sockets: dict[int, _UdpSocket] = {}  # every one open, by file descriptor
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._epoll.fileno(), self._ready)
        self._timer: asyncio.TimerHandle | None = None
        self._armed = _NEVER  # the timer's deadline
        self._hooks = hooks
        # Clients with a burst taking queries: theirs leave at the end of the loop
        # turn, or (held) when the caller says, whichever it is.
        self._open: list[_UdpClient] = []
        self._ending = False  # the end of this turn's bursts is scheduled
        self.held = False

    def opened(self, client: _UdpClient) -> None:
        """client started a burst: it ends with this loop turn unless held."""
        self._open.append(client)
        if not self.held and not self._ending:
            self._ending = True
            self._loop.call_soon(self.end)

    def end(self) -> None:
        """Send every burst taking queries (and hold them no longer)."""
        self._ending = self.held = False
        clients, self._open = self._open, []
        for client in clients:
            client.end_burst()

    def add(self, sock: _UdpSocket, fd: int) -> None:
        self._epoll.register(fd, select.EPOLLIN)
        self._sockets[fd] = sock

    def discard(self, fd: int) -> None:
        """Before the socket is closed: its number may be another's next."""
        del self._sockets[fd]

    def deadline(self, when: float) -> None:
        """A query must be answered by when."""
        if when < self._armed:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = self._loop.call_at(when, self._expire)
            self._armed = when

    def _ready(self) -> None:
        sockets, hooks = self._sockets, self._hooks()
        if hooks is not None:
            hooks[0]()
        try:
            for fd, _ in self._epoll.poll(0, POLL_EVENTS):
                # None if closed since the poll; a socket opened since on the same
                # number reads its own answers, or nothing.
                sock = sockets.get(fd)
                if sock is not None:
                    sock.readable()
        finally:
            if hooks is not None:
                hooks[1]()

    def _expire(self) -> None:
        self._timer, self._armed = None, _NEVER
        now = self._loop.time()
        for sock in list(self._sockets.values()):
            if sock.earliest <= now:
                sock.expire(now)
        earliest = min((sock.earliest for sock in self._sockets.values()), default=_NEVER)
        if earliest < _NEVER:
            self.deadline(earliest)

    def close(self) -> None:
        """Close every burst socket (their queries end as "closed"), then the set."""
        if self._timer is not None:
            self._timer.cancel()
        for sock in list(self._sockets.values()):
            sock.close()
        self._loop.remove_reader(self._epoll.fileno())
        self._epoll.close()


class _UdpSocket:
    """One connected UDP socket for one burst of queries: on a source port the
    kernel picks at random when it connects (RFC 5452), taking queries until
    retired, closed once those it took are answered or timed out. The queries
    taken are sent together when it is retired, in one system call; an answer
    goes to the query waiting on its ID. No task and no timer per query (nor
    per socket: _Bursts keeps one); as a burst is at most UDP_BURST queries,
    its deadlines are looked at all together rather than kept in order."""

    __slots__ = ("_sock", "_fd", "_upstream", "_counters", "_truncated", "_bursts", "_loop", "_opened", "_pending")
    __slots__ += ("_ids", "_queries")  # taken, not sent yet
    __slots__ += ("earliest", "uses", "retired", "closed")

    def __init__(self, upstream: Upstream, counters: Counter[str], truncated: Truncated, bursts: _Bursts) -> None:
        family = socket.AF_INET6 if ":" in upstream.host else socket.AF_INET
        self._sock = socket.socket(family, _UDP_NONBLOCKING)
        try:
            # Connected: the kernel filters other sources and reports ICMP
            # port unreachable as ConnectionRefusedError at once.
            self._sock.connect((upstream.host, upstream.port))
            self._fd = self._sock.fileno()
            bursts.add(self, self._fd)
        except BaseException:
            self._sock.close()
            raise
        self._upstream = upstream
        self._counters = counters
        self._truncated = truncated
        self._bursts = bursts
        self._loop = asyncio.get_running_loop()
        self._opened = self._loop.time()
        # By ID: query, callback, its token, deadline.
        self._pending: dict[int, tuple[bytes, Done, Any, float]] = {}
        self._ids: list[int] = []
        self._queries: list[bytes] = []
        self.earliest = _NEVER  # no query waiting has a deadline before (answered ones may)
        self.uses = 0
        self.retired = False
        self.closed = False

    def send(self, query: bytes, timeout: float, done: Done, token: Any) -> None:
        """Take query, to be sent under a fresh random ID when the socket is retired."""
        pending = self._pending
        query_id = _random_id()
        while query_id in pending:
            query_id = _random_id()
        self.uses += 1
        self._ids.append(query_id)
        self._queries.append(query)
        # From when the socket opened: its queries are taken in one loop turn, and one clock reading serves them.
        deadline = self._opened + timeout
        pending[query_id] = (query, done, token, deadline)
        if deadline < self.earliest:
            self.earliest = deadline
            self._bursts.deadline(deadline)

    def retire(self) -> None:
        """No more queries: send those taken, close once they are done."""
        self.retired = True
        self._flush()
        self._close_if_done()

    def _flush(self) -> None:
        """Send the queries taken, as many at a time as the kernel takes. One
        that cannot be sent fails on its own, in a later callback (the caller
        may be in the midst of starting others), and the rest go on."""
        ids, queries = self._ids, self._queries
        self._ids, self._queries = [], []
        done = 0
        while done < len(queries):
            try:
                done += burst.send(self._fd, ids, queries, done)
            except OSError as exc:
                waiting = self._pending.pop(ids[done], None)  # None: timed out meanwhile
                if waiting is not None:
                    self._loop.call_soon(waiting[1], waiting[2], None, _reason(exc))
                done += 1

    def _close_if_done(self) -> None:
        if self.retired and not self._pending:
            self.close()

    def expire(self, now: float) -> None:
        """Time out the queries due by now."""
        for query_id in [i for i, waiting in self._pending.items() if waiting[3] <= now]:
            # Looked up again: a callback may have closed the socket, ending every query.
            waiting = self._pending.pop(query_id, None)
            if waiting is not None:
                waiting[1](waiting[2], None, "timeout")
        self.earliest = min((waiting[3] for waiting in self._pending.values()), default=_NEVER)
        self._close_if_done()

    def readable(self) -> None:
        """The answers waiting, in one system call; more reads than there are
        queries waiting would only find none."""
        pending, counters = self._pending, self._counters
        try:
            waiting = len(pending)  # (not min() and max(): a call each that parses keywords)
            answers = burst.receive(self._fd, 1 if waiting < 1 else waiting, UDP_ANSWER_SIZE)
        except OSError as exc:  # e.g. port unreachable: every query here went to that port
            self._fail_all(_reason(exc))
            answers = []
        for answer in answers:
            if answer is None:
                counters["upstream_udp_oversized"] += 1
                continue
            is_answer = len(answer) >= 12 and answer[2] & QR_BYTE
            waiting = pending.pop((answer[0] << 8) | answer[1], None) if is_answer else None
            if waiting is None:
                counters["upstream_udp_mismatched"] += 1  # late, stray or spoofed: keep waiting
            elif answer[2] & _TC_BYTE:
                self._truncated(self._upstream, waiting[0], waiting[3], waiting[1], waiting[2])
            else:
                waiting[1](waiting[2], answer, "")
        self._close_if_done()

    def _fail_all(self, reason: str) -> None:
        pending, self._pending = self._pending, {}
        self._ids, self._queries = [], []
        for _, done, token, _ in pending.values():
            done(token, None, reason)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._bursts.discard(self._fd)
        self._sock.close()
        self._fail_all("closed")


class _UdpClient:
    """Queries to one upstream, each burst of them on a fresh socket: those
    sent in one loop turn, at most UDP_BURST. A socket per query would cost
    five system calls more for each; a burst shares its port, but the port
    lives about as long as one query does, and a forged answer must still
    match the ID (and question) of one query, so a burst gives it no better odds."""

    def __init__(self, upstream: Upstream, counters: Counter[str], truncated: Truncated, bursts: _Bursts) -> None:
        self._upstream = upstream
        self._counters = counters
        self._truncated = truncated
        self._bursts = bursts
        self._current: _UdpSocket | None = None

    def send(self, query: bytes, timeout: float, done: Done, token: Any) -> None:
        """Take query for this loop turn's burst; OSError if no socket can be opened for it."""
        sock = self._current
        if sock is None or sock.uses >= UDP_BURST:
            full, sock = sock, _UdpSocket(self._upstream, self._counters, self._truncated, self._bursts)
            self._current = sock
            if full is not None:
                full.retire()
            else:
                self._bursts.opened(self)
            self._counters["upstream_sockets_udp"] += 1
        sock.send(query, timeout, done, token)

    def end_burst(self) -> None:
        current, self._current = self._current, None
        if current is not None:
            current.retire()


class _StreamConnection:
    """One TCP or TLS connection carrying many length-prefixed queries."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, idle_timeout: float) -> None:
        self._reader = reader
        self._writer = writer
        self._idle_timeout = idle_timeout
        self._pending: dict[int, asyncio.Future[bytes]] = {}
        self._idle_timer: asyncio.TimerHandle | None = None
        self.closed = False
        self._reader_task = asyncio.create_task(self._read_loop())

    async def exchange(self, query: bytes) -> bytes:
        if self.closed:
            raise ConnectionLost()
        query_id = _random_id()
        while query_id in self._pending:
            query_id = _random_id()
        wire_id = struct.pack("!H", query_id)
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._pending[query_id] = future
        self._cancel_idle_timer()
        try:
            self._writer.write(struct.pack("!H", len(query)) + wire_id + query[2:])
            await self._writer.drain()
            answer = await future
        finally:
            self._pending.pop(query_id, None)
            if not self._pending and not self.closed:
                self._idle_timer = asyncio.get_running_loop().call_later(self._idle_timeout, self.close)
        return answer_for(query, answer, wire_id)

    async def _read_loop(self) -> None:
        try:
            while True:
                (length,) = struct.unpack("!H", await self._reader.readexactly(2))
                answer = await self._reader.readexactly(length)
                if length < 12:
                    continue
                future = self._pending.get(struct.unpack_from("!H", answer)[0])
                if future is not None and not future.done():
                    future.set_result(answer)
        except (asyncio.IncompleteReadError, OSError):
            pass  # the server closed or reset: pending queries fail below
        finally:
            self._shut()

    def _cancel_idle_timer(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None

    def _shut(self) -> None:
        self.closed = True
        self._cancel_idle_timer()
        for future in self._pending.values():
            if not future.done():
                future.set_exception(ConnectionLost())
        self._writer.close()

    def close(self) -> None:
        self._reader_task.cancel()
        self._shut()


class _StreamClient:
    def __init__(
        self, upstream: Upstream, tls: ssl.SSLContext | None, idle_timeout: float, counters: Counter[str]
    ) -> None:
        self._upstream = upstream
        self._tls = tls
        self._idle_timeout = idle_timeout
        self._counters = counters
        self._connection: _StreamConnection | None = None
        self._lock = asyncio.Lock()

    async def exchange(self, query: bytes) -> bytes:
        return await exchange_once_more(self._connect, query)

    async def _connect(self) -> tuple[_StreamConnection, bool]:
        """The shared connection, and whether it was open before this call."""
        async with self._lock:
            if self._connection is not None and not self._connection.closed:
                return self._connection, True
            reader, writer = await asyncio.open_connection(
                self._upstream.host,
                self._upstream.port,
                ssl=self._tls,
                server_hostname=self._upstream.tls_name if self._tls else None,
                limit=MAX_MESSAGE + 2,
            )
            self._counters[f"upstream_connections_{self._upstream.scheme}"] += 1
            self._connection = _StreamConnection(reader, writer, self._idle_timeout)
            return self._connection, False

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()


class _HttpConnection:
    """One HTTP/1.1 keep-alive connection: one request at a time."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self.requests = 0
        self.keep_alive = True
        self.idle_since = time.monotonic()

    async def post(self, authority: str, path: str, body: bytes) -> bytes:
        self.requests += 1
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {authority}\r\n"
            "Content-Type: application/dns-message\r\nAccept: application/dns-message\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        self._writer.write(head.encode("ascii") + body)
        await self._writer.drain()
        status_line = await self._line()
        if not status_line:
            raise ConnectionLost()
        parts = status_line.decode("latin-1").split(None, 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
            raise UpstreamError("http_bad_response")
        headers = await self._headers()
        self.keep_alive = parts[0] == "HTTP/1.1" and "close" not in headers.get("connection", "").lower()
        payload = await self._body(headers)
        if parts[1] != "200":
            raise UpstreamError("http_status")
        if headers.get("content-type", "").split(";")[0].strip().lower() != "application/dns-message":
            raise UpstreamError("http_content_type")
        self.idle_since = time.monotonic()
        return payload

    async def _line(self) -> bytes:
        """One line, up to MAX_HTTP_LINE bytes (the reader's limit)."""
        try:
            return await self._reader.readline()
        except ValueError:  # no end of line within the limit: what was read is dropped
            raise UpstreamError("http_bad_response") from None

    async def _headers(self) -> dict[str, str]:
        headers: dict[str, str] = {}
        for _ in range(MAX_HTTP_HEADERS):
            line = (await self._line()).decode("latin-1")
            if line in ("\r\n", "\n"):
                return headers
            name, sep, value = line.partition(":")
            if not sep:
                raise UpstreamError("http_bad_response")
            headers[name.strip().lower()] = value.strip()
        raise UpstreamError("http_bad_response")

    async def _body(self, headers: dict[str, str]) -> bytes:
        if "chunked" in headers.get("transfer-encoding", "").lower():
            return await self._chunked()
        if "content-length" in headers:
            length = headers["content-length"]
            if not CONTENT_LENGTH.fullmatch(length) or int(length) > MAX_MESSAGE:
                raise UpstreamError("http_bad_response")
            return await self._reader.readexactly(int(length))
        self.keep_alive = False  # the body ends when the connection does
        body = b""
        while len(body) <= MAX_MESSAGE:
            more = await self._reader.read(MAX_MESSAGE + 1 - len(body))
            if not more:
                return body
            body += more
        raise UpstreamError("http_bad_response")

    async def _chunked(self) -> bytes:
        body = b""
        while True:
            size_line = (await self._line()).split(b";")[0].strip()
            if not CHUNK_SIZE.fullmatch(size_line):
                raise UpstreamError("http_bad_response")
            size = int(size_line, 16)
            if size == 0:
                await self._headers()  # trailers, then the blank line
                return body
            if len(body) + size > MAX_MESSAGE:
                raise UpstreamError("http_bad_response")
            body += await self._reader.readexactly(size)
            if await self._reader.readexactly(2) != b"\r\n":  # after each chunk
                raise UpstreamError("http_bad_response")

    def close(self) -> None:
        self._writer.close()


class _DohClient:
    def __init__(self, upstream: Upstream, tls: ssl.SSLContext, idle_timeout: float, counters: Counter[str]) -> None:
        self._upstream = upstream
        self._tls = tls
        self._idle_timeout = idle_timeout
        self._counters = counters
        self._idle: list[_HttpConnection] = []
        self._slots = asyncio.Semaphore(DOH_POOL_SIZE)
        host = f"[{upstream.host}]" if ":" in upstream.host else upstream.host
        name = upstream.server_name or host
        self.authority = name if upstream.port == 443 else f"{name}:{upstream.port}"

    async def exchange(self, query: bytes) -> bytes:
        body = b"\x00\x00" + query[2:]  # RFC 8484 section 4.1: ID 0, cache friendly
        async with self._slots:
            connection = self._take_idle()
            reused = connection is not None
            try:
                answer = await self._post(connection or await self._connect(), body)
            except ConnectionLost:
                if not reused:
                    raise
                answer = await self._post(await self._connect(), body)
        return answer_for(query, answer, b"\x00\x00")

    async def _post(self, connection: _HttpConnection, body: bytes) -> bytes:
        try:
            answer = await connection.post(self.authority, self._upstream.path, body)
        except BaseException:
            connection.close()
            raise
        if connection.keep_alive:
            self._idle.append(connection)
        else:
            connection.close()
        return answer

    def adopt(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """A connection made elsewhere (doh2's, that found only HTTP/1.1 offered), to use next."""
        self._idle.append(_HttpConnection(reader, writer))

    def _take_idle(self) -> _HttpConnection | None:
        while self._idle:
            connection = self._idle.pop()
            if time.monotonic() - connection.idle_since < self._idle_timeout:
                return connection
            connection.close()
        return None

    async def _connect(self) -> _HttpConnection:
        reader, writer = await asyncio.open_connection(
            self._upstream.host,
            self._upstream.port,
            ssl=self._tls,
            server_hostname=self._upstream.tls_name,
            limit=MAX_HTTP_LINE,
        )
        self._counters["upstream_connections_https"] += 1
        return _HttpConnection(reader, writer)

    def close(self) -> None:
        for connection in self._idle:
            connection.close()
        self._idle.clear()


class Transport:
    """Sends queries to upstreams, and hands back their answers (with the query's ID)."""

    def __init__(
        self, *, ca_file: str | None = None, idle_timeout: float = 10.0, bootstrap: Sequence[tuple[str, int]] = ()
    ) -> None:
        self._ca_file = ca_file
        self._idle_timeout = idle_timeout
        self._contexts: dict[tuple[str, ...], ssl.SSLContext] = {}
        self._streams: dict[Upstream, _StreamClient] = {}
        self._udp_clients: dict[Upstream, _UdpClient] = {}
        self._bursts: _Bursts | None = None
        self._doh: dict[Upstream, _DohClient] = {}
        self._others: dict[Upstream, Any] = {}  # DoQ and DoH/2 clients: doq.py, doh2.py
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        self.counters: Counter[str] = Counter()
        self._bootstrap = Bootstrap(bootstrap, self.counters)
        # Called before and after each batch of UDP answers is handed out: the caller's
        # replies to them may then leave together, in that loop turn.
        self.answer_hooks: tuple[Callable[[], None], Callable[[], None]] | None = None
        self._held = False

    def hold(self) -> None:
        """UDP queries started from now on wait for send_held() (not the end of the
        loop turn): a caller that starts many at once has them leave together now."""
        self._held = True
        if self._bursts is not None:
            self._bursts.held = True

    def send_held(self) -> None:
        """Send the UDP queries started since hold(); hold no longer."""
        self._held = False
        if self._bursts is not None:
            self._bursts.end()

    def _context(self, *alpn: str) -> ssl.SSLContext:
        if alpn not in self._contexts:
            self._contexts[alpn] = _tls_context(self._ca_file, alpn)
        return self._contexts[alpn]

    def start(self, upstream: Upstream, query: bytes, timeout: float, done: Done, token: Any) -> None:
        """Send query to upstream; done gets token and the answer and "" (the ID
        of a UDP answer is ours, not the query's), or None and the reason
        (timeout, refused, closed, network, tls, http...), once."""
        self.counters[upstream.counter] += 1
        if self._closed:
            asyncio.get_running_loop().call_soon(done, token, None, "closed")
            return
        if upstream.scheme != "udp":
            self._spawn(self._stream_or_doh(upstream, query), timeout, done, token)
            return
        try:
            (self._udp_clients.get(upstream) or self._udp(upstream)).send(query, timeout, done, token)
        except OSError as exc:
            asyncio.get_running_loop().call_soon(done, token, None, _reason(exc))

    def _retry_over_tcp(self, upstream: Upstream, query: bytes, deadline: float, done: Done, token: Any) -> None:
        """A truncated UDP answer: the same query over TCP, in the time left."""
        self.counters["upstream_truncated_retried_tcp"] += 1
        timeout = deadline - asyncio.get_running_loop().time()
        self._spawn(self._stream(replace(upstream, scheme="tcp")).exchange(query), timeout, done, token)

    def _spawn(self, exchange: Coroutine[Any, Any, bytes], timeout: float, done: Done, token: Any) -> None:
        async def run() -> None:
            try:
                async with asyncio.timeout(timeout):
                    answer = await exchange
            except asyncio.CancelledError:  # the transport closed under it
                done(token, None, "closed")
                raise
            except Exception as exc:  # every failure is a reason; a bug is one too ("internal")
                try:
                    reason = _reason(exc)
                except Exception:
                    log.exception("dns_upstream_exchange_failed")
                    reason = "internal"
                done(token, None, reason)
            else:
                done(token, answer, "")

        task = asyncio.get_running_loop().create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _stream_or_doh(self, upstream: Upstream, query: bytes) -> bytes:
        if upstream.named:
            resolved = await self._bootstrap.resolve(upstream)
            if resolved is None:
                raise UpstreamError("bootstrap")
            upstream = resolved
        if upstream.scheme in ("tcp", "tls"):
            return await self._stream(upstream).exchange(query)
        return await self._other(upstream).exchange(query)

    def _other(self, upstream: Upstream) -> Any:
        client = self._others.get(upstream)
        if client is not None:
            return client
        if upstream.scheme == "doq":
            from meshsup.actors.dns.doq import DoqClient

            client = DoqClient(upstream, self._ca_file, self._idle_timeout, self.counters)
        else:
            from meshsup.actors.dns.doh2 import Doh2Client

            tls = self._context("h2", "http/1.1")
            client = Doh2Client(upstream, tls, self._idle_timeout, self.counters, self._doh_client(upstream))
        self._others[upstream] = client
        return client

    def _udp(self, upstream: Upstream) -> _UdpClient:
        """A new client for upstream (start() looks for one it has first)."""
        if self._bursts is None:
            self._bursts = _Bursts(lambda: self.answer_hooks)
            self._bursts.held = self._held
        client = self._udp_clients[upstream] = _UdpClient(upstream, self.counters, self._retry_over_tcp, self._bursts)
        return client

    def _stream(self, upstream: Upstream) -> _StreamClient:
        if upstream not in self._streams:
            tls = self._context("dot") if upstream.scheme == "tls" else None
            self._streams[upstream] = _StreamClient(upstream, tls, self._idle_timeout, self.counters)
        return self._streams[upstream]

    def _doh_client(self, upstream: Upstream) -> _DohClient:
        if upstream not in self._doh:
            self._doh[upstream] = _DohClient(upstream, self._context("http/1.1"), self._idle_timeout, self.counters)
        return self._doh[upstream]

    def close(self) -> None:
        """Close every connection; exchanges under way end as "closed"."""
        self._closed = True
        for task in self._tasks:
            task.cancel()
        for client in [*self._streams.values(), *self._doh.values(), *self._others.values()]:
            client.close()
        self._bootstrap.close()
        if self._bursts is not None:  # every UDP client's sockets
            self._bursts.close()
        self._udp_clients.clear()
        self._streams.clear()
        self._doh.clear()
        self._others.clear()

    async def wait_closed(self) -> None:
        """Until the exchanges close() cancelled have ended."""
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._bootstrap.wait_closed()

"""The IO half of forwarding: asyncio clients for udp/tcp/tls/https upstreams.

- UDP: a fresh socket (so a fresh source port) and a random ID per query;
  a truncated answer is asked again over TCP.
- TCP and TLS: one connection per upstream carries many queries at once
  (RFC 7766 pipelining), answers matched by ID; a reused connection that
  the server closed meanwhile is retried once on a new one; closed when
  idle.
- HTTPS (RFC 8484): HTTP/1.1 keep-alive POSTs of application/dns-message
  on a small pool of TLS connections (HTTP/1.1 has one request in flight
  per connection), ID 0 on the wire as the RFC asks.

Every failure comes out as UpstreamError with a short reason the resolver
counts (timeout, refused, closed, network, tls, http...).
"""

from __future__ import annotations

import asyncio
import secrets
import socket
import ssl
import struct
import time
from collections import Counter
from dataclasses import replace

from actors.dns.upstream import Upstream

MAX_MESSAGE = 65535
DOH_POOL_SIZE = 4
MAX_HTTP_HEADERS = 64
_QR_BYTE = 0x80  # in the third octet of a message
_TC_BYTE = 0x02


class UpstreamError(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _ConnectionLost(ConnectionError):
    """The connection ended before our answer came."""


def _answer_for(query: bytes, answer: bytes, wire_id: bytes) -> bytes:
    """Check the answer belongs to the query on the wire; give it the query's own ID."""
    if len(answer) < 12 or answer[:2] != wire_id or not answer[2] & _QR_BYTE:
        raise UpstreamError("mismatched")
    return query[:2] + answer[2:]


def _tls_context(ca_file: str | None, alpn: str) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=ca_file)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols([alpn])
    return context


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
            raise _ConnectionLost()
        query_id = secrets.randbits(16)
        while query_id in self._pending:
            query_id = secrets.randbits(16)
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
        return _answer_for(query, answer, wire_id)

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
                future.set_exception(_ConnectionLost())
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
        connection, reused = await self._connect()
        try:
            return await connection.exchange(query)
        except _ConnectionLost:
            if not reused:
                raise
        # A server may close an idle connection at any time (RFC 7766 section
        # 6.2.3): one more try on a new connection.
        connection, _ = await self._connect()
        return await connection.exchange(query)

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
        status_line = await self._reader.readline()
        if not status_line:
            raise _ConnectionLost()
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

    async def _headers(self) -> dict[str, str]:
        headers: dict[str, str] = {}
        for _ in range(MAX_HTTP_HEADERS):
            line = (await self._reader.readline()).decode("latin-1")
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
            length = int(headers["content-length"]) if headers["content-length"].isdigit() else -1
            if not 0 <= length <= MAX_MESSAGE:
                raise UpstreamError("http_bad_response")
            return await self._reader.readexactly(length)
        self.keep_alive = False  # the body ends when the connection does
        return await self._reader.read(MAX_MESSAGE + 1)

    async def _chunked(self) -> bytes:
        body = b""
        while True:
            size_line = (await self._reader.readline()).split(b";")[0].strip()
            try:
                size = int(size_line, 16)
            except ValueError:
                raise UpstreamError("http_bad_response") from None
            if size == 0:
                await self._headers()  # trailers, then the blank line
                return body
            body += await self._reader.readexactly(size)
            if len(body) > MAX_MESSAGE:
                raise UpstreamError("http_bad_response")
            await self._reader.readexactly(2)  # CRLF after each chunk

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
        self._authority = name if upstream.port == 443 else f"{name}:{upstream.port}"

    async def exchange(self, query: bytes) -> bytes:
        body = b"\x00\x00" + query[2:]  # RFC 8484 section 4.1: ID 0, cache friendly
        async with self._slots:
            connection = self._take_idle()
            reused = connection is not None
            try:
                answer = await self._post(connection or await self._connect(), body)
            except _ConnectionLost:
                if not reused:
                    raise
                answer = await self._post(await self._connect(), body)
        return _answer_for(query, answer, b"\x00\x00")

    async def _post(self, connection: _HttpConnection, body: bytes) -> bytes:
        try:
            answer = await connection.post(self._authority, self._upstream.path, body)
        except BaseException:
            connection.close()
            raise
        if connection.keep_alive:
            self._idle.append(connection)
        else:
            connection.close()
        return answer

    def _take_idle(self) -> _HttpConnection | None:
        while self._idle:
            connection = self._idle.pop()
            if time.monotonic() - connection.idle_since < self._idle_timeout:
                return connection
            connection.close()
        return None

    async def _connect(self) -> _HttpConnection:
        reader, writer = await asyncio.open_connection(
            self._upstream.host, self._upstream.port, ssl=self._tls, server_hostname=self._upstream.tls_name
        )
        self._counters["upstream_connections_https"] += 1
        return _HttpConnection(reader, writer)

    def close(self) -> None:
        for connection in self._idle:
            connection.close()
        self._idle.clear()


class Transport:
    """Sends a query to one upstream and returns its answer (with the query's ID)."""

    def __init__(self, *, ca_file: str | None = None, idle_timeout: float = 10.0) -> None:
        self._ca_file = ca_file
        self._idle_timeout = idle_timeout
        self._contexts: dict[str, ssl.SSLContext] = {}
        self._streams: dict[Upstream, _StreamClient] = {}
        self._doh: dict[Upstream, _DohClient] = {}
        self.counters: Counter[str] = Counter()

    def _context(self, alpn: str) -> ssl.SSLContext:
        if alpn not in self._contexts:
            self._contexts[alpn] = _tls_context(self._ca_file, alpn)
        return self._contexts[alpn]

    async def exchange(self, upstream: Upstream, query: bytes, timeout: float) -> bytes:
        try:
            async with asyncio.timeout(timeout):
                return await self._exchange(upstream, query)
        except UpstreamError:
            raise
        except TimeoutError:
            raise UpstreamError("timeout") from None
        except ssl.SSLError:
            raise UpstreamError("tls") from None
        except ConnectionRefusedError:
            raise UpstreamError("refused") from None
        except (ConnectionError, asyncio.IncompleteReadError):
            raise UpstreamError("closed") from None
        except OSError:
            raise UpstreamError("network") from None

    async def _exchange(self, upstream: Upstream, query: bytes) -> bytes:
        self.counters[f"upstream_queries_{upstream.scheme}"] += 1
        if upstream.scheme == "udp":
            answer = await self._udp(upstream, query)
            if not answer[2] & _TC_BYTE:
                return answer
            self.counters["upstream_truncated_retried_tcp"] += 1
            upstream = replace(upstream, scheme="tcp")
        if upstream.scheme in ("tcp", "tls"):
            return await self._stream(upstream).exchange(query)
        return await self._doh_client(upstream).exchange(query)

    async def _udp(self, upstream: Upstream, query: bytes) -> bytes:
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in upstream.host else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.setblocking(False)
            # Connected: the kernel filters other sources and reports ICMP
            # port unreachable as ConnectionRefusedError at once.
            sock.connect((upstream.host, upstream.port))
            wire_id = struct.pack("!H", secrets.randbits(16))
            sock.send(wire_id + query[2:])
            while True:
                try:
                    return _answer_for(query, await loop.sock_recv(sock, MAX_MESSAGE), wire_id)
                except UpstreamError:
                    self.counters["upstream_udp_mismatched"] += 1  # a stray or spoofed datagram: keep waiting

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
        for client in [*self._streams.values(), *self._doh.values()]:
            client.close()
        self._streams.clear()
        self._doh.clear()

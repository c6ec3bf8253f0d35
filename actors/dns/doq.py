"""DNS over QUIC upstreams (RFC 9250), on aioquic's QUIC stack.

One QUIC connection per upstream (ALPN "doq") carries every query, each on a
client-initiated bidirectional stream of its own: ID 0, a 2-byte length
prefix, FIN after the query; the answer is whatever the server sends on that
stream up to its FIN, and must be one prefixed message of at most
MAX_MESSAGE bytes. Anything else the server sends (a message cut short or
padded, data on a stream it opened, an answer over the size) closes the
connection with DOQ_PROTOCOL_ERROR and fails its queries as
"doq_bad_response"; a failed handshake or certificate is "tls". The
connection closes by QUIC's idle timeout (the lesser of ours and the
server's, RFC 9000 section 10.1); a reused connection that was closed
meanwhile is tried once more on a new one.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import struct
from collections import Counter

from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.events import ConnectionTerminated, HandshakeCompleted, QuicEvent, StreamDataReceived, StreamReset
from aioquic.quic.packet import QuicErrorCode

from meshsup.actors.dns.exchange import MAX_MESSAGE, ConnectionLost, UpstreamError, answer_for, exchange_once_more
from meshsup.actors.settings.dnstypes import Upstream

ALPN = "doq"
DOQ_PROTOCOL_ERROR = 0x2  # RFC 9250 section 4.3
DOQ_REQUEST_CANCELLED = 0x3
_LENGTH = struct.Struct("!H")
_CRYPTO_ERRORS = range(QuicErrorCode.CRYPTO_ERROR, QuicErrorCode.CRYPTO_ERROR + 0x100)  # a TLS alert each


def _is_ours(stream_id: int) -> bool:
    """Client-initiated and bidirectional: the low two bits of the ID are 0 (RFC 9000 section 2.1)."""
    return stream_id & 0x3 == 0


class _DoqConnection(QuicConnectionProtocol):
    """One QUIC connection: the queries waiting, each by its stream."""

    def __init__(self, quic: QuicConnection) -> None:
        super().__init__(quic)
        self._answers: dict[int, tuple[asyncio.Future[bytes], bytearray]] = {}
        self._handshake: asyncio.Future[None] = self._loop.create_future()
        self.failure = ""  # why it closed, once it has
        self.closed = False

    async def ready(self) -> None:
        """Until the handshake is done (UpstreamError if it fails)."""
        await self._handshake  # one waiter (the connecting one): cancelled with it

    async def exchange(self, query: bytes) -> bytes:
        if self.closed:
            raise ConnectionLost()
        stream_id = self._quic.get_next_available_stream_id()
        future: asyncio.Future[bytes] = self._loop.create_future()
        self._answers[stream_id] = (future, bytearray())
        message = b"\x00\x00" + query[2:]  # RFC 9250 section 4.2.1: ID 0
        self._quic.send_stream_data(stream_id, _LENGTH.pack(len(message)) + message, end_stream=True)
        self.transmit()
        try:
            answer = await future
        finally:
            if self._answers.pop(stream_id, None) is not None and not self.closed:
                # Given up on (timed out): the server may stop; what it still sends is ignored.
                with contextlib.suppress(ValueError):  # a stream aioquic has already let go of
                    self._quic.stop_stream(stream_id, DOQ_REQUEST_CANCELLED)
                self.transmit()
        return answer_for(query, answer, b"\x00\x00")

    def quic_event_received(self, event: QuicEvent) -> None:
        if isinstance(event, StreamDataReceived):
            self._data(event)
        elif isinstance(event, StreamReset):
            self._settle(event.stream_id, UpstreamError("closed"))
        elif isinstance(event, HandshakeCompleted):
            if event.alpn_protocol != ALPN:
                self._abort()
            elif not self._handshake.done():
                self._handshake.set_result(None)
        elif isinstance(event, ConnectionTerminated):
            self._terminated(event.error_code)

    def error_received(self, exc: Exception) -> None:
        """An ICMP error on the connected socket: port unreachable, most likely."""
        if not self.closed:
            self.failure = "refused" if isinstance(exc, ConnectionRefusedError) else "network"
            self.end()

    def _data(self, event: StreamDataReceived) -> None:
        if not _is_ours(event.stream_id):
            self._abort()  # a server sends only answers, on the streams of the queries
            return
        waiting = self._answers.get(event.stream_id)
        if waiting is None:
            return  # a query given up on
        buffer = waiting[1]
        buffer += event.data
        if len(buffer) > _LENGTH.size + MAX_MESSAGE:
            self._abort()
        elif event.end_stream:
            if len(buffer) < _LENGTH.size or _LENGTH.unpack_from(buffer)[0] != len(buffer) - _LENGTH.size:
                self._abort()  # cut short, or more than the one message
            else:
                self._settle(event.stream_id, bytes(buffer[_LENGTH.size :]))

    def _settle(self, stream_id: int, outcome: bytes | Exception) -> None:
        waiting = self._answers.pop(stream_id, None)
        if waiting is not None and not waiting[0].done():
            if isinstance(outcome, Exception):
                waiting[0].set_exception(outcome)
            else:
                waiting[0].set_result(outcome)

    def _abort(self) -> None:
        """The server broke the protocol: close, failing every query on the connection."""
        self.failure = "doq_bad_response"
        self.end(DOQ_PROTOCOL_ERROR)

    def end(self, error_code: int = QuicErrorCode.NO_ERROR) -> None:
        """Close now, without waiting for the server to hear of it."""
        self.close(error_code)
        self._terminated(error_code)

    def _terminated(self, error_code: int) -> None:
        if self.closed:
            return
        self.closed = True
        if not self.failure:
            if error_code in _CRYPTO_ERRORS:
                self.failure = "tls"
            elif error_code == QuicErrorCode.NO_ERROR:
                self.failure = "closed"  # idle, or the server closed it
            else:
                self.failure = "doq_bad_response"  # a QUIC error, the server's or one aioquic found in what it sent
        lost: Exception = ConnectionLost() if self.failure == "closed" else UpstreamError(self.failure)
        for stream_id in list(self._answers):
            self._settle(stream_id, lost)
        if not self._handshake.done():
            self._handshake.set_exception(UpstreamError(self.failure))
        # After this turn: the datagram that says so goes first.
        self._loop.call_soon(self._transport.close)


class DoqClient:
    """The queries to one DoQ upstream, on one connection at a time."""

    def __init__(self, upstream: Upstream, ca_file: str | None, idle_timeout: float, counters: Counter[str]) -> None:
        self._upstream = upstream
        self._counters = counters
        self._configuration = QuicConfiguration(
            is_client=True,
            alpn_protocols=[ALPN],
            server_name=upstream.tls_name,
            idle_timeout=idle_timeout,
            # A stream's flow-control window fits one prefixed message: a server can make aioquic
            # hold little more for a stream (it widens the window only as data is read).
            max_stream_data=_LENGTH.size + MAX_MESSAGE,
        )
        # The system's CAs, as for tls:// and https:// (aioquic would take certifi's).
        system = ssl.get_default_verify_paths()
        if ca_file is not None:
            self._configuration.load_verify_locations(cafile=ca_file)
        else:
            self._configuration.load_verify_locations(cafile=system.cafile, capath=system.capath)
        self._connection: _DoqConnection | None = None
        self._lock = asyncio.Lock()

    async def exchange(self, query: bytes) -> bytes:
        return await exchange_once_more(self._connect, query)

    async def _connect(self) -> tuple[_DoqConnection, bool]:
        """The shared connection, and whether it was open before this call."""
        async with self._lock:
            if self._connection is not None and not self._connection.closed:
                return self._connection, True
            family = socket.AF_INET6 if ":" in self._upstream.host else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_DGRAM)
            try:
                sock.setblocking(False)
                sock.connect((self._upstream.host, self._upstream.port))  # answers from elsewhere never reach it
                peer = sock.getpeername()
                _, connection = await asyncio.get_running_loop().create_datagram_endpoint(
                    lambda: _DoqConnection(QuicConnection(configuration=self._configuration)), sock=sock
                )
            except BaseException:
                sock.close()
                raise
            self._counters["upstream_connections_doq"] += 1
            connection.connect(peer)
            try:
                await connection.ready()
            except BaseException:  # failed, or timed out: no handshake left behind
                connection.end()
                raise
            self._connection = connection
            return connection, False

    def close(self) -> None:
        if self._connection is not None:
            self._connection.end()

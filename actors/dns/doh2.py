"""DNS over HTTPS (RFC 8484) over HTTP/2, on the h2 library's framing.

The TLS handshake offers ALPN "h2" and "http/1.1". A server that picks h2
gets every query to it on one connection, a stream each (as many at once as
its SETTINGS_MAX_CONCURRENT_STREAMS allows); one that offers only HTTP/1.1
is handed to transport's HTTP/1.1 client, with the connection just made,
and is asked over HTTP/1.1 from then on.

What the server sends is bounded: each frame's length is checked from its
header as it comes (h2 would hold a whole frame, up to 16 MB, before it
checks), h2 checks the rest of the framing (header lists of at most
MAX_HEADER_LIST bytes, a header block in at most 64 frames, streams we never
opened, no server push), and an answer's body is at most MAX_MESSAGE bytes. A
connection the server breaks the protocol on fails its queries as
http_bad_response; a stream it answers with a status other than 200 as
http_status, with another content type as http_content_type, or resets as
http_reset. The connection closes when idle.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import Counter
from collections.abc import Iterable
from typing import Protocol

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings

from meshsup.actors.dns.exchange import MAX_MESSAGE, ConnectionLost, UpstreamError, answer_for
from meshsup.actors.dns.transport import MAX_HTTP_LINE
from meshsup.actors.settings.dnstypes import Upstream

MAX_HEADER_LIST = 16384  # what a DoH answer's headers may take, decoded
MAX_FRAME = 16384  # RFC 9113 section 4.2: the least SETTINGS_MAX_FRAME_SIZE, and its default
READ_SIZE = 65536
_CONTENT_TYPE = b"application/dns-message"


class Http1(Protocol):
    """What transport's HTTP/1.1 client gives this one."""

    authority: str

    async def exchange(self, query: bytes) -> bytes: ...

    def adopt(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None: ...


class FrameLengths:
    """Follows the frames in what the server sends, to refuse one longer than
    MAX_FRAME (the default SETTINGS_MAX_FRAME_SIZE, which we keep) by its header."""

    HEADER = 9

    def __init__(self) -> None:
        self._header = b""  # of the next frame, as much as has come
        self._left = 0  # of the current frame's payload

    def fit(self, data: bytes) -> bool:
        view, at = memoryview(data), 0
        while at < len(view):
            if self._left:
                step = min(self._left, len(view) - at)
                self._left -= step
                at += step
                continue
            more = bytes(view[at : at + self.HEADER - len(self._header)])
            self._header += more
            at += len(more)
            if len(self._header) == self.HEADER:
                self._left = int.from_bytes(self._header[:3], "big")
                self._header = b""
                if self._left > MAX_FRAME:
                    return False
        return True


class _Stream:
    """One query's answer, as it comes."""

    __slots__ = ("future", "status", "content_type", "body")

    def __init__(self, future: asyncio.Future[bytes]) -> None:
        self.future = future
        self.status = b""
        self.content_type = b""
        self.body = bytearray()


class _H2Connection:
    """One HTTP/2 connection: many queries at once, a stream each."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, upstream: Upstream, authority: str
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._request = [
            (b":method", b"POST"),
            (b":scheme", b"https"),
            (b":authority", authority.encode("ascii")),
            (b":path", upstream.path.encode("ascii")),
            (b"content-type", _CONTENT_TYPE),
            (b"accept", _CONTENT_TYPE),
        ]
        self._h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
        self._h2.local_settings = h2.settings.Settings(
            client=True,
            initial_values={
                h2.settings.SettingCodes.ENABLE_PUSH: 0,
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 0,  # the server opens none
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: MAX_HEADER_LIST,
            },
        )
        self._h2.decoder.max_header_list_size = MAX_HEADER_LIST  # h2 sets it only when a changed setting is acked
        self._h2.initiate_connection()
        self._streams: dict[int, _Stream] = {}
        self._changed = asyncio.Event()  # a stream ended or the server's window grew: room to send maybe
        self._settings = asyncio.Event()  # the server's first SETTINGS came (or the connection ended)
        self.failure = "closed"  # why it ended, once it has
        self._idle_timer: asyncio.TimerHandle | None = None
        self.closed = False
        self._flush()
        self._reader_task = asyncio.get_running_loop().create_task(self._read_loop())

    async def ready(self) -> None:
        """Until the server's SETTINGS (RFC 9113 section 3.4: its first frame) have come,
        so that the first queries keep to the streams it allows at once."""
        await self._settings.wait()
        if self.closed:
            raise UpstreamError(self.failure)

    async def exchange(self, query: bytes, idle_timeout: float) -> bytes:
        body = b"\x00\x00" + query[2:]  # RFC 8484 section 4.1: ID 0, cache friendly
        while not self.closed and self._h2.open_outbound_streams >= self._h2.remote_settings.max_concurrent_streams:
            self._changed.clear()
            await self._changed.wait()
        if self.closed:
            raise ConnectionLost()
        self._cancel_idle_timer()
        stream_id = self._h2.get_next_available_stream_id()
        stream = self._streams[stream_id] = _Stream(asyncio.get_running_loop().create_future())
        try:
            self._h2.send_headers(stream_id, [*self._request, (b"content-length", str(len(body)).encode())])
            while self._h2.local_flow_control_window(stream_id) < len(body):  # a query is far less than a window
                self._flush()
                self._changed.clear()
                await self._changed.wait()
                if self.closed:
                    raise ConnectionLost()
            self._h2.send_data(stream_id, body, end_stream=True)
            self._flush()
            answer = await stream.future
        finally:
            if self._streams.pop(stream_id, None) is not None and not self.closed:
                self._reset(stream_id)  # given up on (timed out)
            self._changed.set()
            if not self._streams and not self.closed:
                self._cancel_idle_timer()  # another query's, when both ended in one read
                self._idle_timer = asyncio.get_running_loop().call_later(idle_timeout, self.close)
        return answer_for(query, answer, b"\x00\x00")

    async def _read_loop(self) -> None:
        try:
            frames = FrameLengths()
            while data := await self._reader.read(READ_SIZE):
                if not frames.fit(data):
                    raise UpstreamError("http_bad_response")
                self._received(self._h2.receive_data(data))
                self._flush()
        except (UpstreamError, h2.exceptions.H2Error, ValueError):  # h2 wraps hpack and hyperframe errors
            self.failure = "http_bad_response"  # broken framing, or a stream never opened
            self._fail_all(UpstreamError(self.failure))
        except (OSError, ssl.SSLError):
            pass  # the server closed or reset: queries fail below
        finally:
            self._shut()

    def _received(self, events: Iterable[h2.events.Event]) -> None:
        for event in events:
            if isinstance(event, (h2.events.WindowUpdated, h2.events.RemoteSettingsChanged)):
                self._changed.set()
                self._settings.set()
                continue
            if isinstance(event, h2.events.ConnectionTerminated):
                self._goaway(event.last_stream_id or 0)
                continue
            stream = self._streams.get(getattr(event, "stream_id", -1))
            if isinstance(event, h2.events.DataReceived):
                # Given back at once, kept or not: the window bounds what is in flight, not what was had.
                self._h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                if stream is not None:
                    stream.body += event.data
                    if len(stream.body) > MAX_MESSAGE:
                        self._settle(event.stream_id, UpstreamError("http_bad_response"))
            elif stream is None:
                continue  # given up on, or nothing a query waits for (trailers, 1xx)
            elif isinstance(event, h2.events.ResponseReceived):
                headers = dict(event.headers)
                stream.status = headers.get(b":status", b"")
                stream.content_type = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
                if stream.status != b"200":
                    self._settle(event.stream_id, UpstreamError("http_status"))
                elif stream.content_type != _CONTENT_TYPE:
                    self._settle(event.stream_id, UpstreamError("http_content_type"))
            elif isinstance(event, h2.events.StreamEnded):
                ended = bytes(stream.body) if stream.status else UpstreamError("http_bad_response")
                self._settle(event.stream_id, ended)
            elif isinstance(event, h2.events.StreamReset):
                self._settle(event.stream_id, UpstreamError("http_reset"))

    def _settle(self, stream_id: int, outcome: bytes | Exception) -> None:
        stream = self._streams.pop(stream_id)
        if isinstance(outcome, Exception):
            self._reset(stream_id)  # no more of it wanted
            stream.future.set_exception(outcome)
        else:
            stream.future.set_result(outcome)

    def _reset(self, stream_id: int) -> None:
        try:
            self._h2.reset_stream(stream_id, h2.errors.ErrorCodes.CANCEL)
        except h2.exceptions.StreamClosedError:
            pass  # ended meanwhile
        self._flush()

    def _goaway(self, last_stream_id: int) -> None:
        """The server takes no more streams; those after last_stream_id it never saw (RFC 9113 section 6.8)."""
        self.closed = True
        self._changed.set()
        for stream_id in [s for s in self._streams if s > last_stream_id]:
            self._streams.pop(stream_id).future.set_exception(ConnectionLost())

    def _flush(self) -> None:
        data = self._h2.data_to_send()
        if data and not self._writer.is_closing():
            self._writer.write(data)

    def _fail_all(self, error: Exception) -> None:
        streams, self._streams = self._streams, {}
        for stream in streams.values():
            if not stream.future.done():
                stream.future.set_exception(error)

    def _cancel_idle_timer(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None

    def _shut(self) -> None:
        self.closed = True
        self._changed.set()
        self._settings.set()
        self._cancel_idle_timer()
        self._fail_all(ConnectionLost())
        self._writer.close()

    def close(self) -> None:
        if not self.closed:
            self._h2.close_connection()
            self._flush()
        self._reader_task.cancel()
        self._shut()


class Doh2Client:
    """The queries to one DoH upstream: over HTTP/2 when it speaks it, else HTTP/1.1."""

    def __init__(
        self, upstream: Upstream, tls: ssl.SSLContext, idle_timeout: float, counters: Counter[str], http1: Http1
    ) -> None:
        self._upstream = upstream
        self._tls = tls
        self._idle_timeout = idle_timeout
        self._counters = counters
        self._http1 = http1
        self._only_http1 = False  # it offered only HTTP/1.1
        self._connection: _H2Connection | None = None
        self._lock = asyncio.Lock()

    async def exchange(self, query: bytes) -> bytes:
        connection, reused = await self._connect()
        try:
            return await self._ask(connection, query)
        except ConnectionLost:
            if not reused:
                raise
        # The server closed it meanwhile (idle, or a GOAWAY before our stream): once more, anew.
        connection, _ = await self._connect()
        return await self._ask(connection, query)

    async def _ask(self, connection: _H2Connection | None, query: bytes) -> bytes:
        if connection is None:
            return await self._http1.exchange(query)
        return await connection.exchange(query, self._idle_timeout)

    async def _connect(self) -> tuple[_H2Connection | None, bool]:
        """The shared HTTP/2 connection, and whether it was open before this call;
        None if the server speaks only HTTP/1.1."""
        async with self._lock:
            if self._only_http1:
                return None, False
            if self._connection is not None and not self._connection.closed:
                return self._connection, True
            reader, writer = await asyncio.open_connection(
                self._upstream.host,
                self._upstream.port,
                ssl=self._tls,
                server_hostname=self._upstream.tls_name,
                limit=MAX_HTTP_LINE,  # as the HTTP/1.1 client reads lines, should it get the connection
            )
            self._counters["upstream_connections_https"] += 1
            if writer.get_extra_info("ssl_object").selected_alpn_protocol() != "h2":
                self._counters["upstream_https_http1"] += 1
                self._only_http1 = True
                self._http1.adopt(reader, writer)
                return None, False
            self._counters["upstream_https_h2"] += 1
            connection = _H2Connection(reader, writer, self._upstream, self._http1.authority)
            try:
                await connection.ready()
            except BaseException:
                connection.close()
                raise
            self._connection = connection
            return connection, False

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()

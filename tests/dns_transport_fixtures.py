"""Upstreams speaking the newer transports, for tests: DNS over QUIC and DoH over
HTTP/2 or HTTP/1.1, well behaved or breaking the protocol in one given way.

Debian has no DNS over QUIC server (dnsdist 1.7 and unbound 1.17 speak none),
so ``DoqServer`` is built here from aioquic, the library the client uses; DoH
over HTTP/2 has real servers (dnsdist, unbound: tests.dns_fixtures) and
``BadDoh2`` only breaks it. Each listens on a free port of the loopback address
its certificate names (a DoqServer inside a namespace, if given), answers A queries with ``address`` and counts
what it got; each is stopped by the test (the `later` fixture, or a lab).
"""

from __future__ import annotations

import asyncio
import os
import select
import socket
import ssl
import struct
import threading
from collections.abc import Coroutine
from typing import Any

import dns.message
import dns.rdatatype
import dns.rrset
import h2.config
import h2.connection
import h2.events
import h2.settings
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.asyncio.server import QuicServer
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import QuicEvent, StreamDataReceived

from tests.dns_fixtures import Certificate, free_port, make_socket
from tests.nodes import Netns


def answer_to(wire: bytes, address: str, ttl: int = 60, query_id: int | None = None) -> bytes:
    """The answer a stub gives: address for an A query, no records otherwise."""
    query = dns.message.from_wire(wire)
    reply = dns.message.make_response(query)
    if query.question[0].rdtype == dns.rdatatype.A:
        reply.answer.append(dns.rrset.from_text(query.question[0].name, ttl, "IN", "A", address))
    if query_id is not None:
        reply.id = query_id
    return reply.to_wire()


class _Loop:
    """An asyncio loop on a thread of its own, for a server's lifetime."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def call(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self.loop.close()


# What a DoQ server may do with a query, besides answering it.
DOQ_MODES = ("answer", "truncated", "padded", "server-stream", "garbage", "nonzero-id", "oversized")


class _DoqHandler(QuicConnectionProtocol):
    def __init__(self, *args: Any, server: DoqServer, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._server = server
        self._buffers: dict[int, bytes] = {}
        server.connections += 1

    def quic_event_received(self, event: QuicEvent) -> None:
        if not isinstance(event, StreamDataReceived):
            return
        data = self._buffers.pop(event.stream_id, b"") + event.data
        if not event.end_stream:
            self._buffers[event.stream_id] = data
            return
        (length,) = struct.unpack_from("!H", data)
        query = data[2 : 2 + length]
        server = self._server
        server.queries += 1
        server.ids.append(struct.unpack_from("!H", query)[0])
        mode = server.mode
        answer = answer_to(query, server.address, server.ttl, 0x4242 if mode == "nonzero-id" else None)
        framed = struct.pack("!H", len(answer)) + answer
        stream_id = event.stream_id
        if mode == "truncated":
            framed = framed[: len(framed) // 2]
        elif mode == "padded":
            framed += b"\x00" * 7
        elif mode == "garbage":
            framed = os.urandom(40)
        elif mode == "oversized":
            framed = b"\xff\xff" + b"x" * 70000  # past any message the prefix can give
        elif mode == "server-stream":
            stream_id = self._quic.get_next_available_stream_id()  # one the server opens
        self._quic.send_stream_data(stream_id, framed, end_stream=True)
        self.transmit()


class DoqServer:
    """A DNS over QUIC server (RFC 9250) built from aioquic, in one of DOQ_MODES."""

    def __init__(
        self,
        certificate: Certificate,
        host: str,
        mode: str = "answer",
        address: str = "203.0.113.60",
        ns: Netns | None = None,
    ) -> None:
        assert mode in DOQ_MODES
        self.mode, self.address, self.ttl = mode, address, 60
        self.host, self.port = host, free_port(host, ns)
        self.queries = self.connections = 0
        self.ids: list[int] = []
        configuration = QuicConfiguration(is_client=False, alpn_protocols=["doq"], idle_timeout=30.0)
        configuration.load_cert_chain(certificate.cert, certificate.key)
        sock = make_socket(socket.SOCK_DGRAM, ns)
        sock.bind((self.host, self.port))
        self._loop = _Loop()

        async def open_server() -> QuicServer:
            _, protocol = await asyncio.get_running_loop().create_datagram_endpoint(
                lambda: QuicServer(
                    configuration=configuration,
                    create_protocol=lambda *a, **k: _DoqHandler(*a, server=self, **k),
                ),
                sock=sock,
            )
            return protocol

        self._server = self._loop.call(open_server())

    def url(self, name: str = "") -> str:
        return f"doq://{self.host}:{self.port}" + (f"#{name}" if name else "")

    def stop(self) -> None:
        async def close() -> None:
            self._server.close()

        self._loop.call(close())
        self._loop.stop()


# What a DoH server over HTTP/2 may do with a query, besides answering it.
H2_MODES = ("answer", "status-500", "wrong-stream", "truncated-frame", "garbage", "oversized", "text-plain")


class BadDoh2:
    """A DoH server on loopback: HTTP/2 in one of H2_MODES (taking max_streams at
    once), or (http1=True) HTTP/1.1 only, answering well. One thread per
    connection; every request is counted."""

    def __init__(
        self,
        certificate: Certificate,
        host: str,
        mode: str = "answer",
        *,
        http1: bool = False,
        address: str = "203.0.113.61",
        max_streams: int = 100,
    ) -> None:
        assert mode in H2_MODES
        self.mode, self.http1, self.address, self.max_streams = mode, http1, address, max_streams
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(certificate.cert, certificate.key)
        self.context.set_alpn_protocols(["http/1.1"] if http1 else ["h2"])
        self.host, self.port = host, free_port(host)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind((self.host, self.port))
        self.sock.listen(16)
        self.requests = self.connections = 0
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def url(self) -> str:
        return f"https://{self.host}:{self.port}/dns-query"

    def _accept(self) -> None:
        while not self._stop.is_set():
            if select.select([self.sock], [], [], 0.05)[0]:
                connection, _ = self.sock.accept()
                self.connections += 1
                thread = threading.Thread(target=self._serve, args=(connection,), daemon=True)
                self._threads.append(thread)
                thread.start()

    def _serve(self, connection: socket.socket) -> None:
        connection.settimeout(0.2)
        try:
            with self.context.wrap_socket(connection, server_side=True) as tls:
                (self._serve_http1 if self.http1 else self._serve_h2)(tls)
        except (OSError, ssl.SSLError):
            pass  # the client hung up

    def _recv(self, tls: ssl.SSLSocket) -> bytes:
        """What the client sent next; b"" once it hung up or the server stops."""
        while not self._stop.is_set():
            try:
                return tls.recv(65536)
            except TimeoutError:
                continue
        return b""

    def _serve_http1(self, tls: ssl.SSLSocket) -> None:
        data = b""
        while chunk := self._recv(tls):
            data += chunk
            while b"\r\n\r\n" in data:
                head, _, rest = data.partition(b"\r\n\r\n")
                lines = head.lower().split(b"\r\n")
                length = int(next(line for line in lines if line.startswith(b"content-length:"))[15:])
                if len(rest) < length:
                    break
                self.requests += 1
                answer = answer_to(rest[:length], self.address)
                data = rest[length:]
                head = b"HTTP/1.1 200 OK\r\nContent-Type: application/dns-message\r\n"
                tls.sendall(head + f"Content-Length: {len(answer)}\r\n\r\n".encode() + answer)

    def _serve_h2(self, tls: ssl.SSLSocket) -> None:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding=None))
        conn.local_settings = h2.settings.Settings(
            client=False, initial_values={h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: self.max_streams}
        )
        conn.initiate_connection()
        tls.sendall(conn.data_to_send())
        bodies: dict[int, bytes] = {}
        endless: set[int] = set()  # streams answered with DATA for as long as the client takes it
        while data := self._recv(tls):
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.DataReceived):
                    bodies[event.stream_id] = bodies.get(event.stream_id, b"") + event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, h2.events.StreamEnded):
                    self.requests += 1
                    if self._respond(tls, conn, event.stream_id, bodies.pop(event.stream_id, b""), endless):
                        return
                elif isinstance(event, h2.events.StreamReset):
                    endless.discard(event.stream_id)
            for stream_id in endless:
                while window := min(conn.local_flow_control_window(stream_id), conn.max_outbound_frame_size):
                    conn.send_data(stream_id, b"x" * window)
            tls.sendall(conn.data_to_send())

    def _respond(
        self, tls: ssl.SSLSocket, conn: h2.connection.H2Connection, stream_id: int, body: bytes, endless: set[int]
    ) -> bool:
        """Answer one request as the mode says; True if the connection is to end."""
        answer = answer_to(body, self.address)
        mode = self.mode
        if mode == "garbage":  # HTTP/1.1 where HTTP/2 was agreed: "HTT" would be a 4 MB frame's length
            tls.sendall(conn.data_to_send() + b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
            return False
        if mode == "wrong-stream":
            # A HEADERS frame (:status 200, from HPACK's static table) on a stream the client
            # never opened, framed by hand: h2 would refuse to send it.
            frame = b"\x00\x00\x01\x01\x04" + struct.pack("!I", stream_id + 1000) + b"\x88"
            tls.sendall(conn.data_to_send() + frame)
            return False
        status = b"500" if mode == "status-500" else b"200"
        content_type = b"text/plain" if mode == "text-plain" else b"application/dns-message"
        conn.send_headers(stream_id, [(b":status", status), (b"content-type", content_type)])
        if mode == "oversized":
            endless.add(stream_id)
            return False
        conn.send_data(stream_id, answer, end_stream=True)
        out = conn.data_to_send()
        if mode == "truncated-frame":
            tls.sendall(out[:-5])  # the DATA frame cut short, and the connection closed
            return True
        tls.sendall(out)
        return False

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=5)
        self.sock.close()

"""The /metrics endpoint Prometheus scrapes: HTTP/1.1 on non-blocking sockets in the supervisor's poll loop.

In the loop rather than on a thread of its own: the series are rendered
from the tree's state, which only the loop may touch without locks, and a
scrape is one short read, one render and one write. Nothing here waits: a
connection is read and written as the poller says it can be. Bounded: at
most MAX_CONNECTIONS (a new one pushes out the oldest, so idle clients
cannot shut scrapes out) and MAX_REQUEST bytes of request head; one request
a connection, answered and closed. What is not a GET or HEAD of /metrics
gets 400, 404 or 405.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import dataclass
from itertools import islice

from meshsup.supervisor.exposition import CONTENT_TYPE
from meshsup.supervisor.polled import StreamServer, receive

MAX_CONNECTIONS = 16
MAX_REQUEST = 8192
PATH = "/metrics"

REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed"}


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"
    head_only: bool = False

    def wire(self) -> bytes:
        extra = "Allow: GET, HEAD\r\n" if self.status == 405 else ""
        head = (
            f"HTTP/1.1 {self.status} {REASONS[self.status]}\r\n"
            f"Content-Type: {self.content_type}\r\nContent-Length: {len(self.body)}\r\n"
            f"{extra}Connection: close\r\n\r\n"
        )
        return head.encode() + (b"" if self.head_only else self.body)


def answer(request: bytes, render: Callable[[], str]) -> Response | None:
    """The response to a request head (bytes read so far); None while the head is incomplete."""
    end = request.find(b"\r\n\r\n")
    if end < 0:
        return Response(400, b"request too large\n") if len(request) > MAX_REQUEST else None
    line, _, _ = request[:end].partition(b"\r\n")
    parts = line.split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1.") or not parts[1].startswith(b"/"):
        return Response(400, b"bad request\n")
    method, target = parts[0], parts[1].split(b"?", 1)[0]
    if target != PATH.encode():
        return Response(404, b"not found: try /metrics\n")
    if method not in (b"GET", b"HEAD"):
        return Response(405, b"method not allowed\n")
    return Response(200, render().encode(), CONTENT_TYPE, head_only=method == b"HEAD")


@dataclass
class _Conn:
    sock: socket.socket
    inbuf: bytes = b""
    outbuf: bytes = b""
    answered: bool = False


class ScrapeServer(StreamServer[_Conn]):
    def __init__(self, listen: tuple[str, int], render: Callable[[], str]) -> None:
        self.listen = listen
        self.render = render
        family = socket.AF_INET6 if ":" in listen[0] else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(listen)
            listener.listen(MAX_CONNECTIONS)
        except OSError:
            listener.close()
            raise
        super().__init__(listener)

    def _reading(self, c: _Conn) -> bool:
        return not c.answered

    def _on_conn(self, fd: int, c: _Conn) -> None:
        if c.answered:
            self._flush(fd, c)
        else:
            self._read(fd, c)

    def _accept(self) -> None:
        for sock in islice(self._accepted(), MAX_CONNECTIONS):
            if len(self.conns) >= MAX_CONNECTIONS:
                self._close(next(iter(self.conns)))  # the oldest
            self.conns[sock.fileno()] = _Conn(sock)

    def _read(self, fd: int, c: _Conn) -> None:
        data = receive(c.sock, MAX_REQUEST + 1 - len(c.inbuf))
        if data is None:
            return
        if not data:
            self._close(fd)
            return
        c.inbuf += data
        response = answer(c.inbuf, self.render)
        if response is not None:
            c.answered, c.inbuf, c.outbuf = True, b"", response.wire()
            self._flush(fd, c)

    def _flush(self, fd: int, c: _Conn) -> None:
        try:
            sent = c.sock.send(c.outbuf)
        except BlockingIOError:
            return
        except OSError:
            sent = len(c.outbuf)
        c.outbuf = c.outbuf[sent:]
        if not c.outbuf:
            self._close(fd)

    def _close(self, fd: int) -> None:
        c = self.conns.pop(fd)
        try:
            c.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        c.sock.close()

    def close(self) -> None:
        for fd in list(self.conns):
            self._close(fd)
        self.listener.close()

"""The unix socket `wg` talks to: /var/run/wireguard/IFACE.sock, non-blocking.

It lives in the supervisor's poll loop: the supervisor asks for ``fds()``
and ``want_write()``, and calls ``on_ready``. A request is handed to
``handle(request, respond)``; ``respond`` may be called later (a ``set``
answers once its reconfiguration steps are acknowledged). Requests on one
connection are answered in order, one at a time.
"""

from __future__ import annotations

import os
import socket
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from meshsup.supervisor.polled import StreamServer, receive
from meshsup.supervisor.uapi import GetRequest, SetRequest, UapiError, parse_request, serialize_errno, split_request

SOCKET_DIR = Path("/var/run/wireguard")
MAX_CONNECTIONS = 64

Handler = Callable[[GetRequest | SetRequest, Callable[[bytes], None]], None]


class InUse(Exception):
    """Another live process serves this interface's API socket."""


@dataclass
class _Conn:
    sock: socket.socket
    inbuf: bytes = b""
    outbuf: bytes = b""
    busy: bool = False  # a request is being answered
    closing: bool = False  # peer hung up or sent garbage: close once outbuf is sent
    queued: list[bytes] = field(default_factory=list)


def socket_path(interface: str, directory: Path = SOCKET_DIR) -> Path:
    return directory / f"{interface}.sock"


def remove_if_stale(path: Path) -> bool:
    """Remove an API socket nobody answers on (its owner died); False if one is live."""
    if not path.exists():
        return True
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        if probe.connect_ex(str(path)) == 0:
            return False
    path.unlink(missing_ok=True)
    return True


class UapiServer(StreamServer[_Conn]):
    def __init__(self, interface: str, handle: Handler, directory: Path = SOCKET_DIR) -> None:
        self.path = socket_path(interface, directory)
        self.handle = handle
        directory.mkdir(mode=0o755, parents=True, exist_ok=True)
        if not remove_if_stale(self.path):
            raise InUse(f"{self.path} is served by another process")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o077)  # root-only, as wireguard-go's: `get` returns the private key
        try:
            listener.bind(str(self.path))
        finally:
            os.umask(old)
        listener.listen(16)
        super().__init__(listener)
        self.inode = os.stat(self.path).st_ino

    def _reading(self, c: _Conn) -> bool:
        return not c.closing  # a closing connection only waits to be written

    def _on_conn(self, fd: int, c: _Conn) -> None:
        if c.outbuf:
            self._flush(fd, c)
        if fd in self.conns and not c.closing:
            self._read(fd, c)

    def _accept(self) -> None:
        for sock in self._accepted():
            if len(self.conns) >= MAX_CONNECTIONS:
                sock.close()
                continue
            self.conns[sock.fileno()] = _Conn(sock)

    def _read(self, fd: int, c: _Conn) -> None:
        data = receive(c.sock, 65536)
        if data is None:
            return
        if not data:
            c.closing = True
            self._maybe_close(fd, c)
            return
        c.inbuf += data
        while True:
            split = split_request(c.inbuf)
            if isinstance(split, UapiError):
                self._send(fd, c, serialize_errno(split))
                c.closing = True
                return
            request, c.inbuf = split
            if request is None:
                return
            c.queued.append(request)
            self._next(fd, c)

    def _next(self, fd: int, c: _Conn) -> None:
        if c.busy or not c.queued:
            return
        parsed = parse_request(c.queued.pop(0))
        if isinstance(parsed, UapiError):
            self._send(fd, c, serialize_errno(parsed))
            return self._next(fd, c)
        c.busy = True

        def respond(reply: bytes) -> None:
            if self.conns.get(fd) is not c:
                return  # the client left before its answer was ready
            c.busy = False
            self._send(fd, c, reply)
            if fd in self.conns:
                self._next(fd, c)

        self.handle(parsed, respond)

    def _send(self, fd: int, c: _Conn, reply: bytes) -> None:
        c.outbuf += reply
        self._flush(fd, c)

    def _flush(self, fd: int, c: _Conn) -> None:
        try:
            sent = c.sock.send(c.outbuf)
            c.outbuf = c.outbuf[sent:]
        except BlockingIOError:
            return
        except OSError:
            c.outbuf, c.closing = b"", True
        self._maybe_close(fd, c)

    def _maybe_close(self, fd: int, c: _Conn) -> None:
        if c.closing and not c.outbuf and not c.busy:
            del self.conns[fd]
            c.sock.close()

    def close(self) -> None:
        for c in self.conns.values():
            c.sock.close()
        self.conns.clear()
        self.listener.close()
        try:  # only our own socket: a successor may already have bound the path
            if os.stat(self.path).st_ino == self.inode and stat.S_ISSOCK(os.stat(self.path).st_mode):
                self.path.unlink()
        except FileNotFoundError:
            pass

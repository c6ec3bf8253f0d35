"""Stream servers in the supervisor's poll loop (`wg`'s socket, /metrics): the loop registers what
each asks to be read and written (``register``) and hands it the descriptors that are ready."""

from __future__ import annotations

import socket
from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import Generic, Protocol, TypeVar

import zmq


class _Buffered(Protocol):
    sock: socket.socket
    outbuf: bytes


Conn = TypeVar("Conn", bound=_Buffered)


class StreamServer(ABC, Generic[Conn]):
    """A listening socket and its non-blocking connections (by fd, in order of arrival); a subclass
    accepts (``_accepted``), reads and answers them (``_on_conn``) as its protocol says."""

    def __init__(self, listener: socket.socket) -> None:
        listener.setblocking(False)
        self.listener = listener
        self.conns: dict[int, Conn] = {}

    def fds(self) -> list[int]:
        """What to poll for reading: the listener, and the connections still read from."""
        return [self.listener.fileno(), *(fd for fd, c in self.conns.items() if self._reading(c))]

    def want_write(self) -> list[int]:
        return [fd for fd, c in self.conns.items() if c.outbuf]

    def on_ready(self, fd: int) -> None:
        if fd == self.listener.fileno():
            self._accept()
        elif (c := self.conns.get(fd)) is not None:
            self._on_conn(fd, c)

    def _accepted(self) -> Iterator[socket.socket]:
        """The connections waiting on the listener, made non-blocking."""
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:  # nothing more to accept (BlockingIOError), or it left already
                return
            sock.setblocking(False)
            yield sock

    @abstractmethod
    def _reading(self, c: Conn) -> bool: ...

    @abstractmethod
    def _accept(self) -> None: ...

    @abstractmethod
    def _on_conn(self, fd: int, c: Conn) -> None: ...


def receive(sock: socket.socket, limit: int) -> bytes | None:
    """Up to ``limit`` bytes from a non-blocking socket: None when none are there yet, b"" when the
    client left or the connection failed."""
    try:
        return sock.recv(limit)
    except BlockingIOError:
        return None
    except OSError:
        return b""


def register(poller: zmq.Poller, server: StreamServer | None) -> set[int]:
    """A server's descriptors into the loop's poller, for reading or writing as it asks; those fds."""
    if server is None:
        return set()
    readers, writers = set(server.fds()), set(server.want_write())
    for fd in readers | writers:
        poller.register(fd, (zmq.POLLIN if fd in readers else 0) | (zmq.POLLOUT if fd in writers else 0))
    return readers | writers

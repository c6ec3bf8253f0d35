"""The point-to-point data path between actors: unix SOCK_SEQPACKET sockets, one message per batch.

A ZeroMQ PUSH/PULL hop hands every message through two extra threads (each
side's I/O thread), which on the hot path cost more CPU than the batch's
packets and most of a hop's latency. A unix seqpacket socket costs one
syscall on each side, keeps message boundaries and is bounded the same way:
when the receiver falls behind, the sender's socket buffer fills, and the
batch is dropped and counted, as a NIC drops on a full ring.

Every actor listens on ``Runtime.inbox(name)`` in the node's runtime
directory, for root's processes only unless it `share`s its inbox with the
unprivileged actors (actors.bus.endpoints). A sender connects on first use,
and again after the receiver restarted (the old connection then fails, and
that batch counts as dropped).
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections import Counter
from collections.abc import Callable
from typing import Any

from meshsup.actors.bus.codec import Message, encode
from meshsup.actors.bus.endpoints import grant

# Largest message read; a longer one is cut short and counted. Batches stay
# far below it (actors.bus.batch.MAX_BYTES): the kernel copies a message of
# up to about 80 KB into single pages, a longer one needs a contiguous
# allocation that may fail (ENOBUFS: dropped and counted).
MAX_MESSAGE = 128 * 1024
# Bytes a sender may have queued towards one receiver before it drops.
SEND_BUFFER = 8 * 1024 * 1024
SO_SNDBUFFORCE = 32  # <asm-generic/socket.h>; not in Python 3.11's socket
# Plain ints: the socket module's flags are enum members, and & on one costs microseconds.
_MSG_TRUNC, _MSG_NOSIGNAL = int(socket.MSG_TRUNC), int(socket.MSG_NOSIGNAL)
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid (SO_PEERCRED)
_GONE = frozenset({errno.ECONNREFUSED, errno.ENOENT, errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN})


class Inbox:
    """The listening end: accepts every sender and reads whole messages.

    ``handle`` gets each message (a memoryview valid during the call);
    ``truncated`` is called for a message larger than MAX_MESSAGE.
    """

    def __init__(
        self,
        path: str,
        add_reader: Callable[[Any, Callable[[], None]], None],
        remove_reader: Callable[[Any], None],
        handle: Callable[[memoryview], None],
        truncated: Callable[[], None],
    ) -> None:
        self._add_reader, self._remove_reader = add_reader, remove_reader
        self._handle, self._truncated = handle, truncated
        self._buffer = bytearray(MAX_MESSAGE)
        self._view = memoryview(self._buffer)
        self._connections: dict[int, tuple[socket.socket, Callable[[memoryview], None]]] = {}
        self._path = path
        try:
            os.unlink(path)  # left by a previous run of this actor
        except FileNotFoundError:
            pass
        self._listener = socket.socket(
            socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC
        )
        self._listener.bind(path)
        grant(path, unprivileged=False)
        self._listener.listen(64)
        self._uid = os.geteuid()
        # (uid, its handler, the handler of the other unprivileged senders): see share
        self._shared: tuple[int, Callable[[memoryview], None], Callable[[memoryview], None]] | None = None
        add_reader(self._listener.fileno(), self._accept)

    def share(self, uid: int, handle: Callable[[memoryview], None], others: Callable[[memoryview], None]) -> None:
        """Let the unprivileged actors connect too: what a sender running as `uid` sends goes to
        `handle` (which should trust none of it), what any other unprivileged one sends to `others`
        (the socket's group lets every unprivileged kind in; by uid only one is heard)."""
        self._shared = uid, handle, others
        grant(self._path, unprivileged=True)

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # e.g. out of descriptors: the sender retries on its next batch
                return
            _, uid, _ = _UCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
            if uid in (0, self._uid):
                handle = self._handle
            elif self._shared is not None:
                handle = self._shared[1] if uid == self._shared[0] else self._shared[2]
            else:  # the socket's mode let them in: not meant to happen
                conn.close()
                continue
            conn.setblocking(False)
            self._connections[conn.fileno()] = conn, handle
            self._add_reader(conn.fileno(), lambda conn=conn, handle=handle: self._drain(conn, handle))

    def _drain(self, conn: socket.socket, handle: Callable[[memoryview], None], budget: int = 64) -> None:
        """Read what is ready (bounded, so other readers and control never starve)."""
        for _ in range(budget):
            try:
                n, _, flags, _ = conn.recvmsg_into([self._buffer])
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self._close(conn)
                return
            if not n and not flags & _MSG_TRUNC:  # the sender went away
                self._close(conn)
                return
            if flags & _MSG_TRUNC:
                self._truncated()
                continue
            handle(self._view[:n])

    def _close(self, conn: socket.socket) -> None:
        self._remove_reader(conn.fileno())
        self._connections.pop(conn.fileno(), None)
        conn.close()

    def drain(self) -> None:
        """Read everything senders have queued so far (at exit, nothing left behind)."""
        self._accept()
        for conn, handle in list(self._connections.values()):
            self._drain(conn, handle, budget=1 << 30)

    def close(self) -> None:
        for conn, _ in list(self._connections.values()):
            self._close(conn)
        self._remove_reader(self._listener.fileno())
        self._listener.close()
        try:
            os.unlink(self._path)
        except OSError:  # gone, or this actor gave up root: the next one to bind it unlinks it
            pass


class Outbox:
    """Connections to other actors' inboxes. Sends never block: a batch that
    finds the receiver gone or its queue full is dropped and counted."""

    def __init__(self, path_of: Callable[[str], str]) -> None:
        self._path_of = path_of
        self._sockets: dict[str, socket.socket] = {}
        self.dropped: Counter[str] = Counter()

    def connect(self, names: list[str]) -> None:
        """Connect ahead of the first batch, where the receivers already listen."""
        for name in names:
            self._socket(name)

    def _socket(self, to: str) -> socket.socket | None:
        sock = self._sockets.get(to)
        if sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
            try:
                sock.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, SEND_BUFFER)
            except OSError:  # without CAP_NET_ADMIN: what the system allows
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
            try:
                # A unix connect completes at once, or fails (not listening, backlog full).
                sock.connect(self._path_of(to))
            except OSError:
                sock.close()
                return None
            self._sockets[to] = sock
        return sock

    def send(self, to: str, msg: Message) -> bool:
        sock = self._socket(to)
        if sock is None:
            self.dropped[to] += 1
            return False
        try:
            sock.send(encode(msg), _MSG_NOSIGNAL)
            return True
        except BlockingIOError:
            pass
        except OSError as e:
            if e.errno in _GONE:  # the receiver restarted: reconnect next time
                del self._sockets[to]
                sock.close()
        self.dropped[to] += 1
        return False

    def close(self) -> None:
        for sock in self._sockets.values():
            sock.close()
        self._sockets.clear()

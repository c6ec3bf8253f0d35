"""A TCP connection driven by an actor's loop: non-blocking reads and writes, TLS
through memory BIOs, and a send queue with a bound. A relay worker holds one per
DERP client (the server side); magicsock one per relay (the client side, which
starts the TLS handshake once connected and verifies the relay's certificate).

A peer that stops reading fills its kernel socket buffer, then this queue;
past SEND_QUEUE_BYTES further frames are dropped and counted, as a NIC drops
on a full ring. While frames wait, the client must take all of them or
PROGRESS_BYTES (a largest frame) every WRITE_TIMEOUT, else the connection is
closed: Tailscale's server allows each frame's write 2 s, and a reader that
only trickles (the kernel reopening a zero window by a few bytes) makes no
progress that counts. Writes go out many frames to a syscall (sendmsg's iovecs).
"""

from __future__ import annotations

import socket
import ssl
from collections import deque
from itertools import islice

from meshsup.actors.kernel.types import Buffer

RECV_SIZE = 256 << 10
SEND_QUEUE_BYTES = 256 << 10
WRITE_TIMEOUT = 2.0
PROGRESS_BYTES = 64 << 10
_IOV_MAX = 512


class Transport:
    def __init__(
        self, sock: socket.socket, tls: ssl.SSLContext | None, now: float, server_hostname: str | None = None
    ) -> None:
        """The server side of `sock`, or with `server_hostname` (the name or IP its certificate must carry) the
        client side."""
        self.sock = sock
        self.raw: deque[bytes | memoryview] = deque()  # bytes for the socket, ciphertext under TLS
        self.queued = 0
        self.progress = now  # when the queue last filled from empty or moved enough
        self._moved = 0  # bytes written since then
        self._bio_in = self._bio_out = None
        self._tls: ssl.SSLObject | None = None
        if tls is not None:
            self._bio_in, self._bio_out = ssl.MemoryBIO(), ssl.MemoryBIO()
            self._tls = tls.wrap_bio(
                self._bio_in, self._bio_out, server_side=server_hostname is None, server_hostname=server_hostname
            )
        self.ready = tls is None  # frames may be queued: no TLS, or its handshake done

    def start(self) -> None:
        """The client's socket connected: a TLS client says hello (it goes out with flush)."""
        if self._tls is not None:
            self._handshake()

    def _handshake(self) -> bool:
        assert self._tls is not None
        try:
            self._tls.do_handshake()
        except ssl.SSLWantReadError:
            return False
        finally:
            self._take_tls_output()
        self.ready = True
        return True

    def fileno(self) -> int:
        return self.sock.fileno()

    def read(self) -> bytes | None:
        """What arrived (b"" if nothing yet), None at the end of the stream.
        OSError or ssl.SSLError when the connection failed or the TLS is garbage."""
        try:
            data = self.sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return b""
        if not data:
            return None
        if self._tls is None:
            return data
        assert self._bio_in is not None
        self._bio_in.write(data)
        if not self.ready and not self._handshake():
            return b""
        plain: list[bytes] = []
        try:
            while chunk := self._tls.read(RECV_SIZE):
                plain.append(chunk)
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLZeroReturnError:  # the peer's close_notify
            return None
        finally:
            self._take_tls_output()
        return b"".join(plain)

    def queue(self, frames: list[Buffer], now: float) -> int:
        """Queue what fits under the bound; the number of frames dropped."""
        room = SEND_QUEUE_BYTES - self.queued
        keep = []
        for f in frames:
            if len(f) > room:
                break
            keep.append(f)
            room -= len(f)
        if keep:
            if not self.queued:
                self.progress, self._moved = now, 0
            if self._tls is None:
                self.raw.extend(keep)
                self.queued += sum(map(len, keep))
            else:
                self._tls.write(b"".join(keep))
                self._take_tls_output()
        return len(frames) - len(keep)

    def _take_tls_output(self) -> None:
        assert self._bio_out is not None
        if self._bio_out.pending:
            data = self._bio_out.read()
            self.raw.append(data)
            self.queued += len(data)

    def flush(self, now: float) -> bool:
        """Write what the socket takes; True when nothing is left queued."""
        while self.raw:
            try:
                n = self.sock.sendmsg(list(islice(self.raw, _IOV_MAX)))
            except (BlockingIOError, InterruptedError):
                return False
            self.queued -= n
            self._moved += n
            if self._moved >= PROGRESS_BYTES or not self.queued:
                self.progress, self._moved = now, 0
            while n:
                head = self.raw[0]
                if len(head) <= n:
                    n -= len(head)
                    self.raw.popleft()
                else:
                    self.raw[0] = memoryview(head)[n:]
                    n = 0
        return True

    def stalled(self, now: float) -> bool:
        return bool(self.raw) and now - self.progress > WRITE_TIMEOUT

    def close(self) -> None:
        self.sock.close()

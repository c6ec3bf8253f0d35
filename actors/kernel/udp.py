"""The underlay UDP socket, moving datagrams in batches.

One AF_INET6 socket with IPV6_V6ONLY=0 serves both families; IPv4 peers
appear as plain dotted-quad strings, never as ``::ffff:`` mapped addresses.

Sockets made with ``reuse_port`` share the listen port (SO_REUSEPORT):
magicsock's unconnected socket and a crypto worker's socket per peer,
connected to that peer's endpoint. The kernel hands a datagram to a socket
connected to its source before any unconnected one.

Two kernel features cut syscalls when they are present (probed at start,
reported in ``gso`` / ``gro``, each can be refused by the caller):

- UDP GSO (``UDP_SEGMENT``): consecutive datagrams of a burst with one
  size (the last may be shorter) leave in a single ``sendmsg``; the kernel
  cuts them apart.
- UDP GRO (``UDP_GRO``): the kernel may hand back many datagrams from one
  sender glued into one buffer, with the segment size in a control message;
  ``recv_batch`` cuts them apart again.

Datagrams come and go in bursts (``Burst``: one endpoint, its datagrams in order).
"""

from __future__ import annotations

import errno
import functools
import socket
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import groupby
from typing import Final

from meshsup.actors.kernel.mark import set_mark
from meshsup.actors.kernel.types import Buffer, Burst, Endpoint

SOL_UDP: Final = 17
UDP_SEGMENT: Final = 103  # <linux/udp.h>
UDP_GRO: Final = 104
SO_SNDBUFFORCE: Final = 32  # <asm-generic/socket.h>; not in Python 3.11's socket
SO_RCVBUFFORCE: Final = 33
# A plain int: the socket module's flags are enum members, and & on one costs microseconds.
_MSG_TRUNC: Final = int(socket.MSG_TRUNC)
# Kernel limits on one GSO send: segments per call (UDP_MAX_SEGMENTS, 64 on
# older kernels) and bytes in one IP datagram's payload.
MAX_GSO_SEGMENTS: Final = 64
MAX_GSO_BYTES: Final = 65507
_RECV_BUFFER: Final = 65536  # a GRO super-buffer is at most one IP datagram
_GRO_CMSG: Final = struct.Struct("=i")  # the segment size arrives as an int
_GRO_CMSG_SPACE: Final = socket.CMSG_SPACE(_GRO_CMSG.size)
_SEGMENT_CMSG: Final = struct.Struct("=H")  # ...but is sent as a u16


@dataclass
class UdpStats:
    rx_datagrams: int = 0
    rx_calls: int = 0  # receive syscalls that returned data
    rx_coalesced: int = 0  # GRO super-buffers split
    rx_dropped: int = 0  # truncated or failed receives
    tx_datagrams: int = 0
    tx_gso_sends: int = 0  # sendmsg calls that carried more than one datagram
    tx_dropped: int = 0


def split_coalesced(buf: Buffer, segment_size: int) -> list[bytes]:
    """Cut a GRO buffer into datagrams of ``segment_size`` (last may be short)."""
    if segment_size <= 0:
        return [bytes(buf)]
    view = memoryview(buf)
    return [bytes(view[i : i + segment_size]) for i in range(0, len(view), segment_size)]


def gso_groups(datagrams: Sequence[bytes]) -> list[Sequence[bytes]]:
    """Group consecutive datagrams that one GSO send can carry: same size
    except a shorter last one, within kernel limits. Order is kept, so the
    order on the wire is the burst's.

    Runs of one size are found by ``groupby`` (C speed), so the Python work
    is per run, not per datagram."""
    groups: list[Sequence[bytes]] = []
    count = len(datagrams)
    i = end = 0
    for size, run in groupby(map(len, datagrams)):
        end += len(list(run))
        # The kernel caps the segments and the bytes of one send.
        per_send = min(MAX_GSO_SEGMENTS, MAX_GSO_BYTES // size) if size else 1
        while i < end:
            j = min(i + per_send, end)
            # A shorter datagram right after a run may close its last group.
            if (
                j == end < count
                and j - i < per_send
                and 0 < len(datagrams[j]) < size
                and (j - i) * size + len(datagrams[j]) <= MAX_GSO_BYTES
            ):
                j += 1
            groups.append(datagrams[i:j])
            i = j
    return groups


@functools.lru_cache(maxsize=4096)
def _sockaddr(host: str, port: int, family: socket.AddressFamily) -> tuple | None:
    """Kernel address for an endpoint, or None if it is not a numeric
    address (a name would mean a blocking DNS lookup on the hot path)."""
    if not isinstance(port, int) or not 0 < port < 65536:
        return None
    try:
        if ":" in host:
            socket.inet_pton(socket.AF_INET6, host.partition("%")[0])
            return (host, port, 0, 0) if family == socket.AF_INET6 else None
        socket.inet_pton(socket.AF_INET, host)
    except OSError:
        return None
    return ("::ffff:" + host, port, 0, 0) if family == socket.AF_INET6 else (host, port)


def _endpoint(addr: tuple) -> Endpoint:
    host: str = addr[0]
    if host.startswith("::ffff:") and "." in host:
        host = host[7:]
    return host, addr[1]


def _bind_address(host: str, family: socket.AddressFamily) -> str:
    if family == socket.AF_INET6 and host and ":" not in host:
        return "::ffff:" + host
    return host or ("::" if family == socket.AF_INET6 else "0.0.0.0")


class UdpSocket:
    """A bound, non-blocking UDP socket for the WireGuard underlay."""

    def __init__(
        self,
        port: int = 0,
        host: str = "",
        *,
        gso: bool = True,
        gro: bool = True,
        buffer_bytes: int = 4 << 20,
        reuse_port: bool = False,
        mark: int = 0,
    ) -> None:
        """Bind to ``port`` (0: any) on ``host`` ("" means every address of
        both families). ``gso``/``gro`` False turns the offload off even when
        the kernel has it; ``reuse_port`` lets sockets of the node share the
        port; ``mark`` (nonzero) is the firewall mark on what it sends (set_mark).
        Raises OSError if the port cannot be bound or marked."""
        try:
            sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        except OSError:  # IPv6 compiled out or disabled at boot
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock = sock
        self.family = socket.AddressFamily(sock.family)
        try:
            sock.setblocking(False)
            self._grow_buffers(buffer_bytes)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if mark:
                set_mark(sock, mark)
            sock.bind((_bind_address(host, self.family), port))
        except BaseException:
            sock.close()
            raise
        self.port: int = sock.getsockname()[1]
        self.gso = gso and self._probe(lambda: sock.getsockopt(SOL_UDP, UDP_SEGMENT))
        self.gro = gro and self._probe(lambda: sock.setsockopt(SOL_UDP, UDP_GRO, 1))
        self.stats = UdpStats()
        self._buf = bytearray(_RECV_BUFFER)
        self._view = memoryview(self._buf)
        self._connected: tuple | None = None  # kernel address of the endpoint we are connected to

    def _grow_buffers(self, size: int) -> None:
        # The *FORCE variants pass net.core.[rw]mem_max when we have
        # CAP_NET_ADMIN; otherwise take what the unprivileged limit allows.
        options = ((SO_RCVBUFFORCE, socket.SO_RCVBUF), (SO_SNDBUFFORCE, socket.SO_SNDBUF))
        for force, plain in options:
            try:
                self._sock.setsockopt(socket.SOL_SOCKET, force, size)
            except OSError:
                self._sock.setsockopt(socket.SOL_SOCKET, plain, size)

    @staticmethod
    def _probe(call: Callable[[], object]) -> bool:
        try:
            call()
        except OSError:
            return False
        return True

    def fileno(self) -> int:
        return self._sock.fileno()

    def set_mark(self, mark: int) -> None:
        """The firewall mark on what is sent from now on. Raises OSError."""
        set_mark(self._sock, mark)

    def connect(self, endpoint: Endpoint) -> None:
        """Receive only from ``endpoint`` (and be preferred for it over the
        port's unconnected sockets). Connecting again moves to a new endpoint.
        Raises OSError (or ValueError for an endpoint that is not numeric)."""
        addr = _sockaddr(endpoint[0], endpoint[1], self.family)
        if addr is None:
            raise ValueError(f"cannot connect to {endpoint!r}")
        self._sock.connect(addr)
        self._connected = addr

    def close(self) -> None:
        self._sock.close()

    def recv_batch(self, max_datagrams: int) -> list[Burst]:
        """Datagrams ready now, oldest first, in bursts of one sender, stopping
        at ``max_datagrams`` or when nothing is left. A GRO super-buffer is
        returned whole, so the count may exceed ``max_datagrams`` by one buffer."""
        out: list[Burst] = []
        stats = self.stats
        count = 0
        last_addr: tuple | None = None
        burst: list[bytes] = []
        while count < max_datagrams:
            try:
                if self.gro:
                    n, ancdata, flags, addr = self._sock.recvmsg_into((self._buf,), _GRO_CMSG_SPACE)
                else:
                    n, addr = self._sock.recvfrom_into(self._buf)
                    ancdata, flags = [], 0
            except BlockingIOError:
                break
            except InterruptedError:
                continue
            except OSError:  # e.g. a queued ICMP error: report, retry next batch
                stats.rx_dropped += 1
                break
            if flags & _MSG_TRUNC:
                stats.rx_dropped += 1
                continue
            stats.rx_calls += 1
            if addr != last_addr:  # a sender's datagrams tend to come in runs: one burst each
                last_addr = addr
                burst = []
                out.append(Burst(_endpoint(addr), burst))
            segment = 0
            for level, kind, data in ancdata:
                if level == SOL_UDP and kind == UDP_GRO and len(data) >= _GRO_CMSG.size:
                    (segment,) = _GRO_CMSG.unpack_from(data)
            if 0 < segment < n:
                stats.rx_coalesced += 1
                datagrams = split_coalesced(self._view[:n], segment)
                burst += datagrams
                count += len(datagrams)
            else:
                burst.append(bytes(self._view[:n]))
                count += 1
        stats.rx_datagrams += count
        return out

    def send_batch(self, burst: Burst) -> int:
        """Send a burst in order; returns how many datagrams were dropped (bad
        endpoint, full buffer, unreachable network)."""
        endpoint, datagrams = burst
        try:
            host, port = endpoint
            addr = _sockaddr(host, port, self.family)
        except (TypeError, ValueError):  # malformed or unhashable endpoint
            addr = None
        if addr is None:
            dropped = len(datagrams)
        else:
            dropped = sum(self._send_group(addr, segments) for segments in gso_groups(datagrams))
        self.stats.tx_datagrams += len(datagrams) - dropped
        self.stats.tx_dropped += dropped
        return dropped

    def _send_group(self, addr: tuple, segments: Sequence[bytes]) -> int:
        # To the connected endpoint without an address: the kernel then uses
        # the socket's cached route instead of looking one up per send.
        sock = self._sock
        connected = addr == self._connected
        if self.gso and len(segments) > 1:
            cmsg = [(SOL_UDP, UDP_SEGMENT, _SEGMENT_CMSG.pack(len(segments[0])))]
            try:
                if connected:
                    sock.sendmsg(segments, cmsg)
                else:
                    sock.sendmsg(segments, cmsg, 0, addr)
                self.stats.tx_gso_sends += 1
                return 0
            except OSError as e:
                if e.errno == errno.EIO:
                    # The route's device cannot checksum GSO packets; that
                    # will not change, so stop trying (as wireguard-go does).
                    self.gso = False
                elif e.errno != errno.EINVAL:
                    return len(segments)  # full or unreachable: drop like a NIC
                # EINVAL: segments larger than the path MTU; send singly.
        dropped = 0
        for data in segments:
            try:
                if connected:
                    sock.send(data)
                else:
                    sock.sendto(data, addr)
            except OSError:
                dropped += 1
        return dropped

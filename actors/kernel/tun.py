"""The TUN device: raw IP packets in and out of the kernel, in batches.

``Tun`` owns a non-blocking ``/dev/net/tun`` descriptor opened with
``IFF_TUN | IFF_NO_PI`` (bare IP packets, no 4-byte protocol prefix), plus,
where the kernel has them:

- ``IFF_VNET_HDR``: every packet is framed by a virtio-net header, which
  lets ``write_batch`` hand the kernel coalesced TCP super-packets (see
  ``vnet``). TUNSETOFFLOAD stays off, so reads are ordinary packets: the
  kernel segments and checksums them faster than Python could.
- ``IFF_MULTI_QUEUE``: more than one descriptor on one device. tun-io reads
  the one enabled queue (so the order of outgoing packets is the order the
  kernel queued them); each crypto worker attaches a queue and detaches it at
  once (``open_writer``): the kernel queues nothing on it, but the worker
  writes what it decrypts through it, with no hop through tun-io.

Reads drain until the kernel has nothing more ready, so batch size follows
load. ``FakeTun`` has the same interface over in-memory queues for unit tests.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import struct
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final, Protocol

from meshsup.actors.kernel import vnet
from meshsup.actors.kernel.types import Buffer

# From <linux/if_tun.h>.
TUNSETIFF: Final = 0x400454CA
TUNGETIFF: Final = 0x800454D2
TUNGETFEATURES: Final = 0x800454CF
TUNSETOFFLOAD: Final = 0x400454D0
TUNSETPERSIST: Final = 0x400454CB
TUNSETQUEUE: Final = 0x400454D9
IFF_TUN: Final = 0x0001
IFF_NO_PI: Final = 0x1000
IFF_MULTI_QUEUE: Final = 0x0100
IFF_DETACH_QUEUE: Final = 0x0400
IFF_VNET_HDR: Final = 0x4000

SIOCSIFTXQLEN: Final = 0x8943  # <linux/sockios.h>
# Packets the kernel queues for tun-io (its default is 500): room for tun-io
# to be off the CPU for tens of milliseconds at 200 Mbit/s without drops.
# TCP does not fill it: TCP Small Queues bound what one flow has queued.
TX_QUEUE_LEN: Final = 2000

IFNAMSIZ: Final = 16
_IFREQ: Final = struct.Struct("16sH22x")  # struct ifreq: name, then ifr_flags
# Largest IP packet; a read into anything smaller would truncate silently.
MAX_PACKET: Final = 65535
# Write errors that mean "this packet was refused", not "the device is gone".
_DROP_ERRNOS: Final = frozenset({errno.EAGAIN, errno.EINVAL, errno.EIO, errno.ENOBUFS, errno.ENOMEM, errno.EMSGSIZE})


@dataclass(frozen=True)
class TunCapabilities:
    """What this kernel's TUN driver offers; ``Tun.vnet_hdr`` and
    ``Tun.multi_queue`` say what the open device actually uses."""

    vnet_hdr: bool  # IFF_VNET_HDR: packets framed by a virtio-net header
    set_offload: bool  # TUNSETOFFLOAD: kernel may hand over/accept GSO packets
    multi_queue: bool  # IFF_MULTI_QUEUE: one fd per worker on one device


class TunDevice(Protocol):
    """The interface both Tun and FakeTun provide."""

    name: str

    def fileno(self) -> int: ...
    def read_batch(self, max_packets: int) -> list[bytes]: ...
    def write_batch(self, packets: Sequence[Buffer]) -> int: ...
    def close(self) -> None: ...


def _features(fd: int) -> int:
    return struct.unpack("I", fcntl.ioctl(fd, TUNGETFEATURES, b"\0" * 4))[0]


def _ifreq(name: str, flags: int = 0) -> bytes:
    raw = name.encode()
    # The kernel's dev_valid_name() rules.
    bad = not raw or raw in (b".", b"..") or len(raw) >= IFNAMSIZ
    if bad or any(c <= 32 or c in b"/:" for c in raw):
        raise ValueError(f"invalid interface name {name!r}")
    return _IFREQ.pack(raw, flags)


def _ioctl_ok(fd: int, request: int, arg: int) -> bool:
    try:
        fcntl.ioctl(fd, request, arg)
    except OSError:
        return False
    return True


@dataclass
class TunStats:
    rx_refused: int = 0  # reads with an offload the node did not ask for
    tx_writes: int = 0  # write syscalls
    tx_coalesced: int = 0  # of those, TCP super-packets


class Tun:
    """An open TUN device. Create with ``Tun.open``, ``Tun.open_writer`` or ``Tun.from_fd``."""

    def __init__(self, fd: int, name: str, capabilities: TunCapabilities, flags: int) -> None:
        self._fd = fd
        self.name = name
        self.capabilities = capabilities
        self.vnet_hdr = bool(flags & IFF_VNET_HDR)
        self.multi_queue = bool(flags & IFF_MULTI_QUEUE)
        self.stats = TunStats()

    @classmethod
    def open(cls, name: str) -> Tun:
        """Open (creating if needed) the TUN called ``name`` in the caller's
        network namespace, with a virtio-net header and multi-queue when the
        kernel has them (an existing single-queue device is attached as it is).
        Raises ValueError for a bad name, OSError if the kernel refuses (no
        permission, name taken by another kind of link)."""
        _ifreq(name)  # a bad name is refused before anything is opened
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            features = _features(fd)
            flags = IFF_TUN | IFF_NO_PI | (features & (IFF_VNET_HDR | IFF_MULTI_QUEUE))
            try:
                fcntl.ioctl(fd, TUNSETIFF, _ifreq(name, flags))
            except OSError as e:
                if e.errno != errno.EINVAL or not flags & IFF_MULTI_QUEUE:
                    raise
                fcntl.ioctl(fd, TUNSETIFF, _ifreq(name, flags & ~IFF_MULTI_QUEUE))
        except BaseException:
            os.close(fd)
            raise
        return cls._wrap(fd)

    @classmethod
    def open_writer(cls, name: str) -> Tun:
        """A write-only queue of the existing multi-queue TUN ``name``: attached,
        then detached, so the kernel queues no packet on it while writes still
        go in. Raises OSError (or ValueError) where that is not possible."""
        tun = cls.open(name)
        try:
            if not tun.multi_queue:
                raise OSError(errno.EINVAL, f"{name} is not a multi-queue TUN")
            fcntl.ioctl(tun.fileno(), TUNSETQUEUE, _IFREQ.pack(b"", IFF_DETACH_QUEUE))
        except BaseException:
            tun.close()
            raise
        return tun

    @classmethod
    def from_fd(cls, fd: int) -> Tun:
        """Adopt an already attached TUN descriptor, e.g. one opened by a
        privileged parent or in another namespace and passed over a unix
        socket. Takes ownership of ``fd``."""
        os.set_blocking(fd, False)
        return cls._wrap(fd)

    @classmethod
    def _wrap(cls, fd: int) -> Tun:
        try:
            features = _features(fd)
            name_raw, flags = _IFREQ.unpack(fcntl.ioctl(fd, TUNGETIFF, b"\0" * _IFREQ.size))
            if flags & (IFF_TUN | IFF_NO_PI) != IFF_TUN | IFF_NO_PI:
                raise ValueError("descriptor is not an IFF_TUN|IFF_NO_PI device")
        except BaseException:
            os.close(fd)
            raise
        # TUNSETOFFLOAD with no offload bits asks whether the ioctl exists and
        # makes sure the kernel hands over plain, fully checksummed packets.
        caps = TunCapabilities(
            vnet_hdr=bool(features & IFF_VNET_HDR),
            set_offload=_ioctl_ok(fd, TUNSETOFFLOAD, 0),
            multi_queue=bool(features & IFF_MULTI_QUEUE),
        )
        return cls(fd, name_raw.rstrip(b"\0").decode(), caps, flags)

    def fileno(self) -> int:
        return self._fd

    def read_batch(self, max_packets: int) -> list[bytes]:
        """Up to ``max_packets`` IP packets, stopping early when none is ready."""
        packets: list[bytes] = []
        skip = vnet.HEADER_LEN if self.vnet_hdr else 0
        while len(packets) < max_packets:
            try:
                data = os.read(self._fd, MAX_PACKET + skip)
            except BlockingIOError:
                break
            except InterruptedError:
                continue
            if skip:
                # A partial checksum or a super-packet would leave broken on
                # the wire; with offloads off the kernel sends neither.
                if data[0] & vnet.F_NEEDS_CSUM or data[1] != vnet.GSO_NONE:
                    self.stats.rx_refused += 1
                    continue
                data = data[skip:]
            packets.append(data)
        return packets

    def write_batch(self, packets: Sequence[Buffer]) -> int:
        """Hand packets to the kernel (TCP runs coalesced when the device has
        a virtio-net header); returns how many it refused."""
        if not self.vnet_hdr:
            return sum(self._write([p], 1) for p in packets)
        dropped = 0
        stats = self.stats
        for buffers in vnet.coalesce(packets):
            if buffers[0] is vnet.PLAIN:
                dropped += self._write(buffers, 1)
            else:
                stats.tx_coalesced += 1
                dropped += self._write(buffers, len(buffers) - 3)
        return dropped

    def _write(self, buffers: list[Buffer], packets: int) -> int:
        self.stats.tx_writes += 1
        try:
            os.writev(self._fd, buffers)
        except OSError as e:
            if e.errno not in _DROP_ERRNOS:
                raise
            return packets
        return 0

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class FakeTun:
    """In-memory TUN for unit tests.

    ``inject`` plays the OS sending a packet into the tunnel; ``written``
    collects what the node delivered to the OS. ``fileno`` is an eventfd that
    is readable exactly while injected packets wait, so poll loops work.
    ``capacity`` bounds ``written`` to exercise drop accounting.
    """

    def __init__(self, name: str = "faketun0", capacity: int | None = None) -> None:
        self.name = name
        self.capabilities = TunCapabilities(vnet_hdr=False, set_offload=False, multi_queue=False)
        self.capacity = capacity
        self.written: list[bytes] = []
        self._inbound: deque[bytes] = deque()
        self._event = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

    def inject(self, *packets: bytes) -> None:
        if packets:
            self._inbound.extend(packets)
            os.eventfd_write(self._event, 1)

    def fileno(self) -> int:
        return self._event

    def read_batch(self, max_packets: int) -> list[bytes]:
        n = min(max(max_packets, 0), len(self._inbound))
        batch = [self._inbound.popleft() for _ in range(n)]
        if not self._inbound:
            try:
                os.eventfd_read(self._event)
            except BlockingIOError:
                pass
        return batch

    def write_batch(self, packets: Iterable[bytes]) -> int:
        dropped = 0
        for pkt in packets:
            # An empty write, or one past capacity, is what the kernel refuses.
            if not pkt or (self.capacity is not None and len(self.written) >= self.capacity):
                dropped += 1
            else:
                self.written.append(bytes(pkt))
        return dropped

    def close(self) -> None:
        if self._event >= 0:
            os.close(self._event)
            self._event = -1


def make_persistent(name: str) -> None:
    """Create the TUN ``name`` (if missing) so that it outlives its file descriptors.

    The router creates it (multi-queue with a virtio-net header where the
    kernel has them: the device keeps the mode it was created in); tun-io and
    the crypto workers attach to it. A restart of either then finds the link
    with its addresses and routes intact, and traffic resumes.
    """
    tun = Tun.open(name)
    try:
        fcntl.ioctl(tun.fileno(), TUNSETPERSIST, 1)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            fcntl.ioctl(sock, SIOCSIFTXQLEN, struct.pack("16si12x", name.encode(), TX_QUEUE_LEN))
    finally:
        tun.close()

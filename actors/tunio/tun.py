"""The TUN device: raw IP packets in and out of the kernel, in batches.

``Tun`` owns a non-blocking ``/dev/net/tun`` descriptor opened with
``IFF_TUN | IFF_NO_PI`` (bare IP packets, no 4-byte protocol prefix). Reads
drain until the kernel has nothing more ready, so batch size follows load.
Offloads (``IFF_VNET_HDR`` / ``TUNSETOFFLOAD``) are probed and reported in
``capabilities`` but not switched on: with them every packet carries a
virtio-net header and may be a TCP super-packet, which the packet path does
not handle yet.

``FakeTun`` has the same interface over in-memory queues for unit tests.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final, Protocol

# From <linux/if_tun.h>.
TUNSETIFF: Final = 0x400454CA
TUNGETIFF: Final = 0x800454D2
TUNGETFEATURES: Final = 0x800454CF
TUNSETOFFLOAD: Final = 0x400454D0
TUNSETPERSIST: Final = 0x400454CB
IFF_TUN: Final = 0x0001
IFF_NO_PI: Final = 0x1000
IFF_MULTI_QUEUE: Final = 0x0100
IFF_VNET_HDR: Final = 0x4000

IFNAMSIZ: Final = 16
_IFREQ: Final = struct.Struct("16sH22x")  # struct ifreq: name, then ifr_flags
# Largest IP packet; a read into anything smaller would truncate silently.
MAX_PACKET: Final = 65535
# Write errors that mean "this packet was refused", not "the device is gone".
_DROP_ERRNOS: Final = frozenset(
    {errno.EAGAIN, errno.EINVAL, errno.EIO, errno.ENOBUFS, errno.ENOMEM, errno.EMSGSIZE}
)


@dataclass(frozen=True)
class TunCapabilities:
    """What this kernel's TUN driver offers (reported, not required)."""

    vnet_hdr: bool  # IFF_VNET_HDR: packets framed by a virtio-net header
    set_offload: bool  # TUNSETOFFLOAD: kernel may hand over/accept GSO packets
    multi_queue: bool  # IFF_MULTI_QUEUE: one fd per worker on one device


class TunDevice(Protocol):
    """The interface both Tun and FakeTun provide."""

    name: str

    def fileno(self) -> int: ...
    def read_batch(self, max_packets: int) -> list[bytes]: ...
    def write_batch(self, packets: Iterable[bytes]) -> int: ...
    def close(self) -> None: ...


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


class Tun:
    """An open TUN device. Create with ``Tun.open`` or ``Tun.from_fd``."""

    def __init__(self, fd: int, name: str, capabilities: TunCapabilities) -> None:
        self._fd = fd
        self.name = name
        self.capabilities = capabilities

    @classmethod
    def open(cls, name: str, *, multi_queue: bool = False) -> Tun:
        """Open (creating if needed) the TUN called ``name`` in the caller's
        network namespace. Raises ValueError for a bad name, OSError if the
        kernel refuses (no permission, name taken by another kind of link)."""
        ifreq = _ifreq(name, IFF_TUN | IFF_NO_PI | (IFF_MULTI_QUEUE if multi_queue else 0))
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            fcntl.ioctl(fd, TUNSETIFF, ifreq)
        except BaseException:
            os.close(fd)
            raise
        return cls._wrap(fd)

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
            features = struct.unpack("I", fcntl.ioctl(fd, TUNGETFEATURES, b"\0" * 4))[0]
            name_raw, flags = _IFREQ.unpack(fcntl.ioctl(fd, TUNGETIFF, b"\0" * _IFREQ.size))
            if flags & (IFF_TUN | IFF_NO_PI | IFF_VNET_HDR) != IFF_TUN | IFF_NO_PI:
                raise ValueError("descriptor is not an IFF_TUN|IFF_NO_PI device")
        except BaseException:
            os.close(fd)
            raise
        # TUNSETOFFLOAD with no offload bits is a harmless way to ask whether
        # the ioctl exists; it leaves the device exactly as it was.
        caps = TunCapabilities(
            vnet_hdr=bool(features & IFF_VNET_HDR),
            set_offload=_ioctl_ok(fd, TUNSETOFFLOAD, 0),
            multi_queue=bool(features & IFF_MULTI_QUEUE),
        )
        return cls(fd, name_raw.rstrip(b"\0").decode(), caps)

    def fileno(self) -> int:
        return self._fd

    def read_batch(self, max_packets: int) -> list[bytes]:
        """Up to ``max_packets`` IP packets, stopping early when none is ready."""
        packets: list[bytes] = []
        while len(packets) < max_packets:
            try:
                packets.append(os.read(self._fd, MAX_PACKET))
            except BlockingIOError:
                break
            except InterruptedError:
                continue
        return packets

    def write_batch(self, packets: Iterable[bytes]) -> int:
        """Hand packets to the kernel; returns how many it refused."""
        dropped = 0
        for pkt in packets:
            try:
                os.write(self._fd, pkt)
            except OSError as e:
                if e.errno not in _DROP_ERRNOS:
                    raise
                dropped += 1
        return dropped

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

    The router creates it; tun-io attaches to it. A tun-io restart then finds
    the link with its addresses and routes intact, and traffic resumes.
    """
    tun = Tun.open(name)
    try:
        fcntl.ioctl(tun.fileno(), TUNSETPERSIST, 1)
    finally:
        tun.close()

"""Spreading UDP queries evenly over the workers that share a port.

SO_REUSEPORT picks a socket by a hash of the client's address and port, so a
client that asks from a few ports (a load generator, a forwarding resolver
in front of us) lands on one worker however many there are. A classic BPF
program attached to the port's reuseport group picks a socket at random for
each datagram instead (DNS over UDP keeps no state between datagrams). It
has to know the group's size: each worker counts the sockets bound to the
address in /proc/net/udp when it binds, and again every few seconds, as
workers come and go. An index past the end (a worker just left) makes the kernel
fall back to the hash, so a stale count never loses a query.
"""

from __future__ import annotations

import ctypes
import socket
import struct
from pathlib import Path

# Linux values; the socket module does not export them.
SO_ATTACH_REUSEPORT_CBPF = 51
_SKF_AD_RANDOM = -0x1000 + 56  # SKF_AD_OFF + SKF_AD_RANDOM: a random 32-bit number
_LD_W_ABS, _ALU_MOD_K, _RET_A = 0x20, 0x94, 0x16
_SOCK_FILTER = struct.Struct("HBBI")  # code, jt, jf, k
_SOCK_FPROG = struct.Struct("HL")  # len, then (aligned) the pointer to the filter
_UDP_UNCONNECTED = "07"  # TCP_CLOSE, as /proc/net/udp shows a bound, unconnected socket


def _proc_address(sock: socket.socket) -> str:
    """The socket's local address as /proc/net/udp{,6} writes it: each 32-bit
    word of the address in host order, in hex, then the port."""
    host, port = sock.getsockname()[:2]
    raw = socket.inet_pton(sock.family, host)
    words = struct.unpack(f"={len(raw) // 4}I", raw)
    return "".join(f"{word:08X}" for word in words) + f":{port:04X}"


def group_size(sock: socket.socket) -> int:
    """How many unconnected UDP sockets of this network namespace are bound to
    sock's address and port: its reuseport group (itself included)."""
    table = Path("/proc/net/udp6" if sock.family == socket.AF_INET6 else "/proc/net/udp")
    local = _proc_address(sock)
    count = 0
    with table.open() as lines:
        next(lines)  # the header
        for line in lines:
            fields = line.split(None, 4)
            if fields[1] == local and fields[3] == _UDP_UNCONNECTED:
                count += 1
    return max(count, 1)


def spread(sock: socket.socket, members: int) -> None:
    """Attach the program that sends each datagram to one of members sockets at
    random; OSError if the kernel refuses it (the hash then goes on choosing)."""
    program = b"".join(
        _SOCK_FILTER.pack(code, 0, 0, k & 0xFFFFFFFF)
        for code, k in ((_LD_W_ABS, _SKF_AD_RANDOM), (_ALU_MOD_K, members), (_RET_A, 0))
    )
    buffer = ctypes.create_string_buffer(program)
    sock.setsockopt(
        socket.SOL_SOCKET,
        SO_ATTACH_REUSEPORT_CBPF,
        _SOCK_FPROG.pack(len(program) // _SOCK_FILTER.size, ctypes.addressof(buffer)),
    )


def steer(sock: socket.socket) -> bool:
    """Count sock's group and attach the program for that many; False if that
    failed. Attached again every time: the group has one program, and the
    last worker to attach one may have counted before another came or went."""
    try:
        spread(sock, group_size(sock))
    except OSError:
        return False
    return True

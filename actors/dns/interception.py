"""The controller's interception sockets: where the router's ingress program
(meshsup.bpf.intercept, ``[dns] intercept``) delivers DNS sent to any address.

They are transparent (IP_TRANSPARENT): a reply leaves from the address the
client asked, the one it will accept an answer from. Making a socket
transparent needs CAP_NET_ADMIN or CAP_NET_RAW, which a DNS worker does not
keep: it opens these while still root, before it drops privileges
(Actor.bind_runtime), so it holds the sockets but never the capability. They
are opened whether or not anything is intercepted (a few idle sockets), as
the setting may come with any reload.

A UDP query's original destination arrives with it (IP_ORIGDSTADDR, and
IPV6_ORIGDSTADDR); the reply names it as its source (IP_PKTINFO's spec_dst,
IPV6_PKTINFO), from the socket's port 53. A TCP connection's local address,
getsockname(), is the original destination already.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from typing import Final

from meshsup.actors.settings.dns import INTERCEPT_TCP_PORT, INTERCEPT_UDP_PORT, INTERCEPT_V4, INTERCEPT_V6

# Linux values; the socket module does not export them all.
IP_TRANSPARENT: Final = 19
IP_RECVORIGDSTADDR = IP_ORIGDSTADDR = 20
IP_PKTINFO: Final = 8
IPV6_TRANSPARENT: Final = 75
IPV6_RECVORIGDSTADDR = IPV6_ORIGDSTADDR = 74
IPV6_PKTINFO: Final = 50
ANCILLARY_SIZE: Final = socket.CMSG_SPACE(28)  # one sockaddr_in6, the larger of the two

_IN_PKTINFO: Final = struct.Struct("=i4s4s")  # ifindex, spec_dst, addr
_IN6_PKTINFO: Final = struct.Struct("=16sI")  # addr, ifindex


def _open(family: socket.AddressFamily, kind: socket.SocketKind, host: str, port: int) -> socket.socket:
    sock = socket.socket(family, kind)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)  # every worker opens its own
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
            if kind == socket.SOCK_DGRAM:
                sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVORIGDSTADDR, 1)
        else:
            sock.setsockopt(socket.IPPROTO_IP, IP_TRANSPARENT, 1)
            if kind == socket.SOCK_DGRAM:
                sock.setsockopt(socket.IPPROTO_IP, IP_RECVORIGDSTADDR, 1)
        sock.setblocking(False)
        sock.bind((host, port))
        if kind == socket.SOCK_STREAM:
            sock.listen(128)
    except BaseException:
        sock.close()
        raise
    return sock


def open_intercept_sockets() -> tuple[list[socket.socket], list[str]]:
    """The interception sockets this process can open (as root), and what failed
    (a host without IPv6, say): interception then works for what did open."""
    opened, problems = [], []
    for family, host in ((socket.AF_INET, INTERCEPT_V4), (socket.AF_INET6, INTERCEPT_V6)):
        for kind, port in ((socket.SOCK_DGRAM, INTERCEPT_UDP_PORT), (socket.SOCK_STREAM, INTERCEPT_TCP_PORT)):
            try:
                opened.append(_open(family, kind, host, port))
            except OSError as err:
                problems.append(f"{host}:{port}/{'udp' if kind == socket.SOCK_DGRAM else 'tcp'}: {err}")
    return opened, problems


def original_destination(ancillary: list[tuple[int, int, bytes]]) -> str | None:
    """The address a datagram was sent to, from its IP_ORIGDSTADDR / IPV6_ORIGDSTADDR."""
    for level, kind, data in ancillary:
        if level == socket.IPPROTO_IP and kind == IP_ORIGDSTADDR and len(data) >= 8:
            return str(ipaddress.IPv4Address(data[4:8]))
        if level == socket.IPPROTO_IPV6 and kind == IPV6_ORIGDSTADDR and len(data) >= 24:
            return str(ipaddress.IPv6Address(data[8:24]))
    return None


def reply_from(destination: str) -> tuple[int, int, bytes]:
    """The ancillary item that makes a reply leave from ``destination``."""
    address = ipaddress.ip_address(destination)
    if address.version == 6:
        return socket.IPPROTO_IPV6, IPV6_PKTINFO, _IN6_PKTINFO.pack(address.packed, 0)
    return socket.IPPROTO_IP, IP_PKTINFO, _IN_PKTINFO.pack(0, address.packed, b"\0" * 4)

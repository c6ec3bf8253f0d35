"""The router's side of DNS interception on a TUN, the tunnel's kind of link
(no link header): a DNS datagram written into the TUN, to an address nobody
has, reaches the interception socket with its original destination, and the
answer comes out of the TUN from that address. Then clear() leaves nothing,
and a new Interception clears what an earlier one left (a router crash)."""

from __future__ import annotations

import fcntl
import os
import secrets
import select
import socket
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from meshsup.actors.dns.interception import open_intercept_sockets, original_destination, reply_from
from meshsup.actors.router.intercept import Interception
from meshsup.actors.wire.pcap import udp_packet
from tests.dns_fixtures import in_netns
from tests.nodes import Netns

pytestmark = pytest.mark.netns

_TUNSETIFF, _IFF_TUN, _IFF_NO_PI = 0x400454CA, 0x0001, 0x1000
CLIENT = ("100.64.0.2", 40000)
ASKED = ("203.0.113.53", 53)


def _tun(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR)
    fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH", name.encode(), _IFF_TUN | _IFF_NO_PI))
    return fd


def _run(*argv: str) -> str:
    """A command in the calling thread's namespace (a child starts in its parent thread's)."""
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


def _read_udp(fd: int, timeout: float = 5.0) -> bytes | None:
    """The next UDP datagram the kernel sends into the TUN (skipping IPv6 chatter)."""
    while select.select([fd], [], [], timeout)[0]:
        packet = os.read(fd, 65535)
        if packet[0] >> 4 == 4 and packet[9] == socket.IPPROTO_UDP:
            return packet
    return None


def test_dns_written_into_a_tun_is_intercepted_and_answered_from_its_destination(
    netns: Callable[..., Netns], tmp_path: Path
) -> None:
    ns = netns("dit")
    name = f"dit{secrets.token_hex(3)}"

    def run() -> tuple[str | None, bytes | None, str, str]:
        fd = _tun(name)
        socks, _ = open_intercept_sockets()
        udp = next(s for s in socks if s.family == socket.AF_INET and s.type == socket.SOCK_DGRAM)
        interception = Interception(tmp_path)
        try:
            _run("ip", "addr", "add", "100.64.0.1/10", "dev", name)
            _run("ip", "link", "set", name, "up")
            interception.apply([name, "nosuchlink"])
            assert interception.missing == ["nosuchlink"]
            os.write(fd, udp_packet(CLIENT, ASKED, b"query"))
            udp.settimeout(5)
            data, ancillary, _, client = udp.recvmsg(512, 256)
            destination = original_destination(ancillary)
            udp.sendmsg([b"answer:" + data], [reply_from(destination)], 0, client)
            reply = _read_udp(fd)
            # A new one (a restarted router) first clears what the record says was left.
            again = Interception(tmp_path)
            again.apply([name])
            filters = _run("tc", "filter", "show", "dev", name, "ingress")
            again.clear()
            again.close()
            left = _run("tc", "qdisc", "show", "dev", name) + _run("ip", "rule") + _run("ip", "-6", "rule")
            return destination, reply, filters, left
        finally:
            interception.close()
            for sock in socks:
                sock.close()
            os.close(fd)

    destination, reply, filters, left = in_netns(ns, run)
    assert destination == ASKED[0]
    assert reply is not None and reply.endswith(b"answer:query")
    assert socket.inet_ntoa(reply[12:16]) == ASKED[0] and socket.inet_ntoa(reply[16:20]) == CLIENT[0]
    assert struct.unpack("!HH", reply[20:24]) == (ASKED[1], CLIENT[1])
    assert filters.count(" meshsup_dns direct-action") == 1
    assert "clsact" not in left and "0x4453" not in left
    assert not (tmp_path / "intercept.json").exists()

"""The TUN device (real, in a throwaway namespace), FakeTun, and packet helpers."""

from __future__ import annotations

import os
import select
import secrets
import shutil
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from actors.tunio import packet
from actors.tunio.tun import FakeTun, Tun

V4_A, V4_B = socket.inet_aton("100.64.0.1"), socket.inet_aton("100.64.0.2")
V6_A, V6_B = socket.inet_pton(socket.AF_INET6, "fd00::1"), socket.inet_pton(socket.AF_INET6, "fd00::2")


def _checksum(data: bytes) -> int:
    data += b"\0" * (len(data) % 2)
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ipv4(src: bytes, dst: bytes, proto: int, payload: bytes, frag: int = 0) -> bytes:
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 1, frag, 64, proto, 0, src, dst)
    return header[:10] + struct.pack("!H", _checksum(header)) + header[12:] + payload


def udp(sport: int, dport: int, body: bytes) -> bytes:
    return struct.pack("!HHHH", sport, dport, 8 + len(body), 0) + body  # checksum 0: none (IPv4)


def ipv6(src: bytes, dst: bytes, next_header: int, payload: bytes) -> bytes:
    return struct.pack("!IHBB16s16s", 6 << 28, len(payload), next_header, 64, src, dst) + payload


# --- packet helpers -------------------------------------------------------------


def test_ipv4_udp_fields() -> None:
    pkt = ipv4(V4_A, V4_B, packet.IPPROTO_UDP, udp(1234, 53, b"q"))
    assert packet.version(pkt) == 4
    assert packet.src_addr(pkt) == V4_A and packet.dst_addr(pkt) == V4_B
    assert packet.protocol(pkt) == packet.IPPROTO_UDP
    assert packet.ports(pkt) == (1234, 53)
    assert packet.total_length(pkt) == len(pkt) == 29
    assert packet.ports(memoryview(pkt)) == (1234, 53)


def test_ipv4_non_first_fragment_has_no_ports() -> None:
    pkt = ipv4(V4_A, V4_B, packet.IPPROTO_TCP, b"\0" * 20, frag=185)
    assert packet.protocol(pkt) == packet.IPPROTO_TCP
    assert packet.ports(pkt) is None


def test_ipv6_tcp_behind_extension_header() -> None:
    tcp = struct.pack("!HH", 443, 50000) + bytes(16)
    hop_by_hop = bytes([packet.IPPROTO_TCP, 0]) + bytes(6)
    pkt = ipv6(V6_A, V6_B, 0, hop_by_hop + tcp)
    assert packet.version(pkt) == 6
    assert packet.src_addr(pkt) == V6_A and packet.dst_addr(pkt) == V6_B
    assert packet.protocol(pkt) == packet.IPPROTO_TCP
    assert packet.ports(pkt) == (443, 50000)
    assert packet.total_length(pkt) == len(pkt)


def test_icmp_has_protocol_but_no_ports() -> None:
    pkt = ipv4(V4_A, V4_B, 1, bytes(8))
    assert packet.protocol(pkt) == 1 and packet.ports(pkt) is None


@pytest.mark.parametrize(
    "pkt",
    [
        b"",
        b"\x45",
        ipv4(V4_A, V4_B, packet.IPPROTO_UDP, udp(1, 2, b""))[:19],
        ipv4(V4_A, V4_B, packet.IPPROTO_UDP, udp(1, 2, b""))[:22],  # ports cut off
        b"\x4f" + bytes(30),  # header length claims 60 bytes
        b"\x44" + bytes(30),  # header length below 20
        ipv6(V6_A, V6_B, packet.IPPROTO_UDP, b"")[:39],
        ipv6(V6_A, V6_B, 0, b"\x11"),  # extension header cut off
        b"\x10" + bytes(40),  # version 1
    ],
)
def test_truncated_or_bogus_packets_answer_none(pkt: bytes) -> None:
    assert packet.ports(pkt) is None
    if len(pkt) < 20 or packet.version(pkt) is None:
        assert packet.src_addr(pkt) is None and packet.total_length(pkt) is None


# --- FakeTun ----------------------------------------------------------------------


def test_fake_tun_queues_and_readiness() -> None:
    tun = FakeTun(capacity=2)
    try:
        assert tun.read_batch(8) == []
        assert select.select([tun], [], [], 0)[0] == []
        tun.inject(b"p1", b"p2", b"p3")
        assert select.select([tun], [], [], 0)[0] == [tun]
        assert tun.read_batch(2) == [b"p1", b"p2"]
        assert select.select([tun], [], [], 0)[0] == [tun]  # one still waiting
        assert tun.read_batch(2) == [b"p3"]
        assert select.select([tun], [], [], 0)[0] == []
        assert tun.write_batch([b"a", b"", b"b", b"c"]) == 2  # empty, then over capacity
        assert tun.written == [b"a", b"b"]
    finally:
        tun.close()


@pytest.mark.parametrize("name", ["", "x" * 16, "a/b", "a b", "a:b", ".."])
def test_open_refuses_bad_names(name: str) -> None:
    with pytest.raises(ValueError):
        Tun.open(name)


# --- a real TUN in a namespace ------------------------------------------------------


def _run(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, timeout=10)


@pytest.fixture
def netns() -> Iterator[str]:
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces and TUN")
    if shutil.which("ip") is None or not os.path.exists("/dev/net/tun"):
        pytest.skip("needs iproute2 and /dev/net/tun")
    name = "mstun" + secrets.token_hex(3)
    _run("ip", "netns", "add", name)
    try:
        _run("ip", "-n", name, "link", "set", "lo", "up")
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10)


_OPEN_AND_PASS = """
import socket, sys
from actors.tunio.tun import Tun
tun = Tun.open(sys.argv[1])
socket.send_fds(socket.socket(fileno=int(sys.argv[2])), [b"tun"], [tun.fileno()])
"""


@pytest.fixture
def tun(netns: str) -> Iterator[Tun]:
    """A TUN created inside ``netns`` by a helper process and handed to us by
    descriptor, so this test process never enters the namespace. It vanishes
    with its last descriptor."""
    name = "mst" + secrets.token_hex(3)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with ours, theirs:
        cmd = ["ip", "netns", "exec", netns, sys.executable, "-c", _OPEN_AND_PASS, name, str(theirs.fileno())]
        subprocess.run(cmd, pass_fds=[theirs.fileno()], check=True, capture_output=True, timeout=30)
        _, fds, _, _ = socket.recv_fds(ours, 16, 1)
    device = Tun.from_fd(fds[0])
    try:
        _run("ip", "-n", netns, "addr", "add", "100.64.0.1/24", "dev", name)
        _run("ip", "-n", netns, "link", "set", name, "up")
        yield device
    finally:
        device.close()


def _read_until(tun: Tun, wanted: object, timeout: float = 5) -> bytes:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        select.select([tun], [], [], 0.2)
        for pkt in tun.read_batch(64):
            if wanted(pkt):  # type: ignore[operator]
                return pkt
    raise AssertionError("packet never came out of the TUN")


def test_ping_into_the_tun_is_read(netns: str, tun: Tun) -> None:
    assert tun.name.startswith("mst")
    assert isinstance(tun.capabilities.vnet_hdr, bool) and isinstance(tun.capabilities.set_offload, bool)
    ping = subprocess.Popen(
        ["ip", "netns", "exec", netns, "ping", "-c", "5", "-i", "0.2", "100.64.0.2"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        echo = _read_until(tun, lambda p: packet.version(p) == 4 and packet.protocol(p) == 1)
    finally:
        ping.kill()
        ping.wait(timeout=5)
    assert packet.src_addr(echo) == V4_A and packet.dst_addr(echo) == V4_B
    assert echo[20] == 8  # ICMP echo request
    assert packet.total_length(echo) == len(echo)


def test_written_packet_reaches_a_socket_in_the_namespace(netns: str, tun: Tun) -> None:
    from pyroute2.netns import create_socket

    with create_socket(netns, socket.AF_INET, socket.SOCK_DGRAM, flags=0) as receiver:
        receiver.bind(("100.64.0.1", 0))
        receiver.settimeout(5)
        port = receiver.getsockname()[1]
        crafted = ipv4(V4_B, V4_A, packet.IPPROTO_UDP, udp(40000, port, b"hello from the tunnel"))
        garbage = b"\x00" * 28  # not IPv4 or IPv6: the kernel refuses it
        assert tun.write_batch([garbage, crafted]) == 1
        data, source = receiver.recvfrom(2048)
    assert data == b"hello from the tunnel"
    assert source == ("100.64.0.2", 40000)


def test_read_batch_returns_at_once_when_idle(tun: Tun) -> None:
    assert not os.get_blocking(tun.fileno())
    tun.read_batch(1024)  # whatever the kernel sent on link-up
    started = time.monotonic()
    tun.read_batch(64)
    assert time.monotonic() - started < 0.5

"""The TUN device (real, in a throwaway namespace), FakeTun, and packet helpers."""

from __future__ import annotations

import fcntl
import functools
import os
import random
import secrets
import select
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest

from meshsup.actors.kernel import vnet
from meshsup.actors.kernel.tun import FakeTun, Tun
from meshsup.actors.wire import ip as packet

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
from meshsup.actors.kernel.tun import Tun
tun = (Tun.open_writer if sys.argv[3] == "writer" else Tun.open)(sys.argv[1])
socket.send_fds(socket.socket(fileno=int(sys.argv[2])), [b"tun"], [tun.fileno()])
"""


def open_in(netns: str, name: str, how: str = "open") -> Tun:
    """Open the TUN ``name`` in ``netns`` from a helper process and take its
    descriptor, so this test process never enters the namespace."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with ours, theirs:
        cmd = ["ip", "netns", "exec", netns, sys.executable, "-c", _OPEN_AND_PASS, name, str(theirs.fileno()), how]
        subprocess.run(cmd, pass_fds=[theirs.fileno()], check=True, capture_output=True, timeout=30)
        _, fds, _, _ = socket.recv_fds(ours, 16, 1)
    return Tun.from_fd(fds[0])


# What the kernel's TUN driver offers, asked apart from Tun's own probe: where the kernel
# has a feature, a Tun that did not take it fails the test instead of skipping it.
TUNGETFEATURES = 0x800454CF  # _IOR('T', 207, unsigned int), <linux/if_tun.h>
IFF_MULTI_QUEUE, IFF_VNET_HDR = 0x0100, 0x4000


@functools.cache
def kernel_tun_features() -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR)
    try:
        return struct.unpack("I", fcntl.ioctl(fd, TUNGETFEATURES, bytes(4)))[0]
    finally:
        os.close(fd)


def needs_kernel_tun(flag: int, what: str) -> None:
    if not kernel_tun_features() & flag:
        pytest.skip(f"the kernel's TUN driver lacks {what} (TUNGETFEATURES on /dev/net/tun)")


@pytest.fixture
def tun(netns: str) -> Iterator[Tun]:
    """A TUN created inside ``netns``; it vanishes with its last descriptor."""
    name = "mst" + secrets.token_hex(3)
    device = open_in(netns, name)
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


@pytest.mark.netns
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


@pytest.mark.netns
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


@pytest.mark.netns
def test_coalesced_segments_reach_a_tcp_socket_as_one_stream(netns: str, tun: Tun) -> None:
    from pyroute2.netns import create_socket

    needs_kernel_tun(IFF_VNET_HDR, "IFF_VNET_HDR")
    assert tun.vnet_hdr, "the kernel offers IFF_VNET_HDR, Tun did not take it"
    with create_socket(netns, socket.AF_INET, socket.SOCK_STREAM, flags=0) as listener:
        listener.bind(("100.64.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        seg = functools.partial(tcp_segment, ports=(40000, port), inbound=True)
        tun.read_batch(1024)  # whatever the kernel sent on link-up
        assert tun.write_batch([seg(999, b"", flags=0x02, ack=0)]) == 0  # SYN from 100.64.0.2
        syn_ack = _read_until(tun, lambda p: packet.protocol(p) == packet.IPPROTO_TCP)
        ack = functools.partial(seg, ack=struct.unpack("!I", syn_ack[24:28])[0] + 1)
        data = bytes(random.Random(2).randbytes(30 * 1380 + 7))
        segments = [ack(1000 + i, data[i : i + 1380]) for i in range(0, len(data), 1380)]
        assert tun.write_batch([ack(1000, b""), *segments]) == 0
        assert tun.stats.tx_coalesced == 1 and tun.stats.tx_writes == 3  # SYN, ACK, one super-packet
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(5)
            got = b""
            while len(got) < len(data):
                got += conn.recv(1 << 16)
    assert got == data


@pytest.mark.netns
def test_a_writer_queue_writes_but_is_never_read(netns: str, tun: Tun) -> None:
    from pyroute2.netns import create_socket

    needs_kernel_tun(IFF_MULTI_QUEUE, "IFF_MULTI_QUEUE")
    assert tun.multi_queue, "the kernel offers IFF_MULTI_QUEUE, Tun did not take it"
    writer = open_in(netns, tun.name, "writer")
    try:
        with create_socket(netns, socket.AF_INET, socket.SOCK_DGRAM, flags=0) as sock:
            sock.bind(("100.64.0.1", 0))
            sock.settimeout(5)
            port = sock.getsockname()[1]
            assert writer.write_batch([ipv4(V4_B, V4_A, packet.IPPROTO_UDP, udp(40000, port, b"in"))]) == 0
            assert sock.recvfrom(64) == (b"in", ("100.64.0.2", 40000))
            tun.read_batch(1024)
            sock.sendto(b"out", ("100.64.0.2", 40000))
            out = _read_until(tun, lambda p: packet.protocol(p) == packet.IPPROTO_UDP)
        assert out.endswith(b"out")
        assert writer.read_batch(64) == []
    finally:
        writer.close()


@pytest.mark.netns
def test_read_batch_returns_at_once_when_idle(tun: Tun) -> None:
    assert not os.get_blocking(tun.fileno())
    tun.read_batch(1024)  # whatever the kernel sent on link-up
    # A read that waited would wait for 64 packets that never come: the bound is only a deadline.
    reader = threading.Thread(target=tun.read_batch, args=(64,), daemon=True)
    reader.start()
    reader.join(timeout=10)
    assert not reader.is_alive(), "read_batch waited on an idle TUN"


# --- the virtio-net header: coalescing TCP segments for one write (sans-IO) -----------


def tcp_segment(
    seq: int,
    payload: bytes,
    *,
    v6: bool = False,
    flags: int = 0x10,
    ports: tuple[int, int] = (5201, 40000),
    options: bytes = b"",
    ident: int = 1,
    frag: int = 0x4000,
    ack: int = 777,
    inbound: bool = False,
) -> bytes:
    """A TCP segment from A to B (``inbound``: B to A) with valid IP and TCP checksums."""
    src, dst = (V6_A, V6_B) if v6 else (V4_A, V4_B)
    if inbound:
        src, dst = dst, src
    offset = (20 + len(options)) // 4
    tcp = struct.pack("!HHIIBBHHH", *ports, seq, ack, offset << 4, flags, 512, 0, 0) + options + payload
    pseudo = src + dst + (struct.pack("!I3xB", len(tcp), 6) if v6 else struct.pack("!xBH", 6, len(tcp)))
    tcp = tcp[:16] + struct.pack("!H", _checksum(pseudo + tcp)) + tcp[18:]
    if v6:
        return ipv6(src, dst, 6, tcp)
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), ident, frag, 64, 6, 0, src, dst)
    return header[:10] + struct.pack("!H", _checksum(header)) + header[12:] + tcp


def flow(count: int, mss: int = 1380, *, v6: bool = False, first_seq: int = 1000, **kw: object) -> list[bytes]:
    return [
        tcp_segment(first_seq + i * mss, bytes([i % 256]) * mss, v6=v6, ident=i + 1, **kw)  # type: ignore[arg-type]
        for i in range(count)
    ]


def segments_of(write: list) -> list[bytes]:
    """What the kernel makes of one write: the super-packet cut back into
    segments (as GSO does), or the plain packet."""
    header, rest = bytes(write[0]), b"".join(bytes(b) for b in write[1:])
    flags, gso_type, hdr_len, gso_size, csum_start, csum_offset = vnet.HEADER.unpack(header)
    if gso_type == vnet.GSO_NONE:
        assert header == vnet.PLAIN
        return [rest]
    v6 = gso_type == vnet.GSO_TCPV6
    assert flags == vnet.F_NEEDS_CSUM and csum_start == (40 if v6 else 20) and csum_offset == 16
    if not v6:
        assert _checksum(rest[:20]) == 0, "IPv4 header checksum"
        assert struct.unpack("!H", rest[2:4])[0] == len(rest)
    else:
        assert struct.unpack("!H", rest[4:6])[0] == len(rest) - 40
    src, dst = (rest[8:24], rest[24:40]) if v6 else (rest[12:16], rest[16:20])
    tcp_len = len(rest) - csum_start
    pseudo = src + dst + (struct.pack("!I3xB", tcp_len, 6) if v6 else struct.pack("!xBH", 6, tcp_len))
    assert struct.unpack("!H", rest[csum_start + 16 : csum_start + 18])[0] == vnet.ones_complement_sum(pseudo)
    headers, payload = rest[:hdr_len], rest[hdr_len:]
    t = csum_start
    seq = struct.unpack("!I", headers[t + 4 : t + 8])[0]
    return [
        headers[: t + 4] + struct.pack("!I", seq + i) + headers[t + 8 :] + payload[i : i + gso_size]
        for i in range(0, len(payload), gso_size)
    ]


def transport_view(pkt: bytes) -> object:
    """What coalescing must keep of a TCP segment: addresses, ports, sequence
    and ack numbers, options, payload. Anything else must come out as it went in."""
    ip_len = 40 if pkt[0] >> 4 == 6 else 20
    if len(pkt) < ip_len + 20 or (pkt[6] if ip_len == 40 else pkt[9]) != packet.IPPROTO_TCP:
        return pkt
    tcp_len = (pkt[ip_len + 12] >> 4) * 4
    return (
        pkt[8:40] if ip_len == 40 else pkt[12:20],
        pkt[ip_len : ip_len + 12],
        pkt[ip_len + 20 : ip_len + tcp_len],
        pkt[ip_len + tcp_len :],
    )


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_a_bulk_run_becomes_one_super_packet(v6: bool) -> None:
    packets = flow(40, v6=v6) + [tcp_segment(1000 + 40 * 1380, b"end", v6=v6, flags=0x18)]
    (write,) = vnet.coalesce(packets)
    _, gso_type, hdr_len, gso_size, _, _ = vnet.HEADER.unpack(write[0])
    assert gso_type == (vnet.GSO_TCPV6 if v6 else vnet.GSO_TCPV4)
    assert (hdr_len, gso_size) == ((60 if v6 else 40), 1380)
    assert [transport_view(p) for p in segments_of(write)] == [transport_view(p) for p in packets]
    assert bytes(write[2])[13] == 0x18, "PSH of the last segment is kept"


def test_writes_keep_the_order_and_break_where_segments_do_not_follow() -> None:
    a = flow(3)
    other_flow = tcp_segment(5000, b"x" * 1380, ports=(5202, 40000))
    gap = tcp_segment(1000 + 5 * 1380, b"y" * 1380)  # seq jumps
    syn, fin, rst = (tcp_segment(9, b"", flags=f) for f in (0x02, 0x11, 0x04))
    pure_ack = tcp_segment(1000 + 6 * 1380, b"")
    udp_packet = ipv4(V4_A, V4_B, packet.IPPROTO_UDP, udp(1, 2, b"u"))
    no_df = flow(2, frag=0, first_seq=77)
    stamped = flow(2, options=b"\x01\x01\x08\x0a" + bytes(8), first_seq=99) + flow(
        1, options=b"\x01\x01\x08\x0a" + bytes(7) + b"\x01", first_seq=99 + 2 * 1380
    )
    packets = [*a, other_flow, gap, syn, fin, rst, pure_ack, udp_packet, *no_df, *stamped]
    writes = vnet.coalesce(packets)
    assert [transport_view(s) for w in writes for s in segments_of(w)] == [transport_view(p) for p in packets]
    sizes = [len(segments_of(w)) for w in writes]
    # a's three, then alone: other flow, gap, SYN, FIN, RST, pure ACK, UDP, two without DF;
    # then two with equal timestamps, and one whose timestamp moved on.
    assert sizes == [3, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 1]


def test_a_shorter_segment_or_psh_closes_the_run() -> None:
    packets = flow(2) + [tcp_segment(1000 + 2 * 1380, b"s" * 100)] + [tcp_segment(1000 + 2 * 1380 + 100, b"t" * 1380)]
    assert [len(segments_of(w)) for w in vnet.coalesce(packets)] == [3, 1]
    pushed = flow(1) + [tcp_segment(1000 + 1380, b"p" * 1380, flags=0x18), tcp_segment(1000 + 2760, b"q" * 1380)]
    assert [len(segments_of(w)) for w in vnet.coalesce(pushed)] == [2, 1]
    bigger = flow(1, mss=500) + [tcp_segment(1500, b"b" * 1380)]
    assert [len(segments_of(w)) for w in vnet.coalesce(bigger)] == [1, 1]


def test_super_packets_stay_within_an_ip_packet() -> None:
    writes = vnet.coalesce(flow(100))
    assert sum(len(segments_of(w)) for w in writes) == 100
    assert all(sum(len(b) for b in w[1:]) <= 65535 for w in writes)
    assert len(writes) == 3  # 47 segments of 1380 bytes fit under 64 KiB


def test_ones_complement_sum_matches_rfc_1071() -> None:
    rng = random.Random(1)
    for n in (0, 1, 2, 3, 20, 1399, 1400):
        data = rng.randbytes(n)
        assert ~vnet.ones_complement_sum(data) & 0xFFFF == _checksum(data)
    header = tcp_segment(1, b"")[:20]
    assert vnet.ipv4_header_checksum(header[:10] + b"\0\0" + header[12:]) == struct.unpack("!H", header[10:12])[0]
    assert vnet.ones_complement_sum(bytes(40)) == 0 and vnet.ones_complement_sum(b"\xff\xff") == 0xFFFF

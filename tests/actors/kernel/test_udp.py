"""The underlay UDP socket (on loopback) and WireGuard datagram classification."""

from __future__ import annotations

import functools
import random
import select
import socket
import time
from collections.abc import Iterator, Sequence

import pytest

from meshsup.actors.kernel.types import Burst
from meshsup.actors.kernel.udp import (
    MAX_GSO_BYTES,
    MAX_GSO_SEGMENTS,
    SOL_UDP,
    UDP_GRO,
    UDP_SEGMENT,
    UdpSocket,
    gso_groups,
    split_coalesced,
)
from meshsup.actors.wire.wireguard import MessageType, classify, receiver_index

# --- grouping and splitting (no sockets) -------------------------------------


def _shape(groups: Sequence[Sequence[bytes]]) -> list[list[int]]:
    return [[len(d) for d in segs] for segs in groups]


def test_gso_groups_equal_size_last_shorter() -> None:
    batch = [b"x" * 100] * 3 + [b"x" * 40, b"x" * 100]
    assert _shape(gso_groups(batch)) == [[100, 100, 100, 40], [100]]


def test_gso_groups_break_on_growth_and_keep_order() -> None:
    batch = [b"1" * 50, b"2" * 50, b"3" * 50, b"4" * 60]
    groups = gso_groups(batch)
    assert _shape(groups) == [[50, 50, 50], [60]]
    assert [d for segs in groups for d in segs] == batch


def test_gso_groups_respect_kernel_limits() -> None:
    many = [b"x" * 10] * (MAX_GSO_SEGMENTS + 1)
    assert [len(s) for s in gso_groups(many)] == [MAX_GSO_SEGMENTS, 1]
    big = [b"x" * 1400] * 60
    assert all(sum(map(len, s)) <= MAX_GSO_BYTES for s in gso_groups(big))
    assert _shape(gso_groups([b"", b""])) == [[0], [0]]


def test_gso_groups_are_greedy_and_lawful_on_random_batches() -> None:
    rng = random.Random(5)
    for _ in range(300):
        batch = [b"x" * rng.choice([0, 40, 1200, 1200, 1200, 1436]) for _ in range(rng.randrange(0, 150))]
        groups = gso_groups(batch)
        assert [d for segs in groups for d in segs] == batch
        for segs in groups:
            size = len(segs[0])
            assert all(len(d) == size for d in segs[:-1]) and len(segs[-1]) <= size
            assert len(segs) <= MAX_GSO_SEGMENTS and sum(map(len, segs)) <= MAX_GSO_BYTES
            assert size > 0 or len(segs) == 1
        for g1, g2 in zip(groups, groups[1:]):
            size, nxt = len(g1[0]), len(g2[0])
            could_join = (
                size > 0
                and len(g1[-1]) == size
                and 0 < nxt <= size
                and len(g1) < MAX_GSO_SEGMENTS
                and sum(map(len, g1)) + nxt <= MAX_GSO_BYTES
            )
            assert not could_join, "a group was closed early"


def test_split_coalesced() -> None:
    assert split_coalesced(b"aabbc", 2) == [b"aa", b"bb", b"c"]
    assert split_coalesced(b"abc", 0) == [b"abc"]


# --- real sockets on loopback ------------------------------------------------


# What the kernel offers, asked with plain sockets apart from UdpSocket's own probes: where the
# kernel has a feature, a UdpSocket that did not take it fails the test instead of skipping it.


@functools.cache
def kernel_lacks(level: int, option: int, value: int, what: str) -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.setsockopt(level, option, value)
        except OSError as e:
            return f"the kernel lacks {what}: a plain socket's setsockopt says {e}"
    return None


@functools.cache
def no_ipv6_loopback() -> str | None:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
    except OSError as e:
        return f"no IPv6 on this host's loopback: a plain socket cannot bind ::1 ({e})"
    return None


def needs(reason: str | None) -> None:
    if reason:
        pytest.skip(reason)


@pytest.fixture
def sockets() -> Iterator[list[UdpSocket]]:
    made: list[UdpSocket] = []
    yield made
    for s in made:
        s.close()


def _pair(made: list[UdpSocket], host: str, *, gso: bool, gro: bool) -> tuple[UdpSocket, UdpSocket]:
    needs(no_ipv6_loopback())  # UdpSocket is an AF_INET6 socket for both families
    if gso:
        needs(kernel_lacks(SOL_UDP, UDP_SEGMENT, 1200, "UDP GSO (UDP_SEGMENT, Linux 4.18)"))
    if gro:
        needs(kernel_lacks(SOL_UDP, UDP_GRO, 1, "UDP GRO (Linux 5.0)"))
    tx, rx = UdpSocket(0, host, gso=gso), UdpSocket(0, host, gro=gro)
    made += [tx, rx]
    assert (tx.gso, rx.gro) == (gso, gro), "the kernel offers it, UdpSocket did not take it"
    return tx, rx


def _receive(rx: UdpSocket, count: int, max_batch: int = 1024) -> list[Burst]:
    got: list[Burst] = []
    deadline = time.monotonic() + 5
    while len(_data(got)) < count and time.monotonic() < deadline:
        select.select([rx], [], [], 0.2)
        got += rx.recv_batch(max_batch)
    return got


def _data(bursts: list[Burst]) -> list[bytes]:
    return [d for burst in bursts for d in burst.datagrams]


def _numbered(count: int, size: int) -> list[bytes]:
    return [i.to_bytes(2, "big") * (size // 2) for i in range(count)]


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
@pytest.mark.parametrize(("gso", "gro"), [(True, True), (True, False), (False, True), (False, False)])
def test_batch_of_64_arrives_whole_and_in_order(sockets: list[UdpSocket], host: str, gso: bool, gro: bool) -> None:
    tx, rx = _pair(sockets, host, gso=gso, gro=gro)
    payloads = _numbered(64, 1200)
    assert tx.send_batch(Burst((host, rx.port), payloads)) == 0
    got = _receive(rx, 64)
    assert _data(got) == payloads
    # IPv4 senders are reported plainly, not as ::ffff: mapped addresses.
    assert {ep for ep, _ in got} == {(host, tx.port)}
    assert (tx.stats.tx_gso_sends > 0) == gso
    # Loopback only coalesces what was sent as one GSO packet.
    assert (rx.stats.rx_coalesced > 0) == (gso and gro)


@pytest.mark.parametrize("gro", [True, False])
def test_short_last_datagram_survives_gso_and_gro(sockets: list[UdpSocket], gro: bool) -> None:
    tx, rx = _pair(sockets, "::1", gso=True, gro=gro)
    payloads = [b"a" * 1000] * 10 + [b"b" * 333]
    assert tx.send_batch(Burst(("::1", rx.port), payloads)) == 0
    assert tx.stats.tx_gso_sends == 1
    assert _data(_receive(rx, len(payloads))) == payloads


def test_bad_endpoints_are_counted_drops(sockets: list[UdpSocket]) -> None:
    tx, rx = _pair(sockets, "127.0.0.1", gso=False, gro=False)
    good = ("127.0.0.1", rx.port)
    bad = [
        Burst(("localhost", rx.port), [b"name, not an address"]),
        Burst(("127.0.0.1", 0), [b"port 0", b"twice"]),
        Burst(("127.0.0.1", "51820"), [b"port as text"]),  # type: ignore[arg-type]
        Burst((["127.0.0.1"], rx.port), [b"host not a string"]),  # type: ignore[arg-type]
        Burst(("127.0.0.1",), [b"no port"]),  # type: ignore[arg-type]
    ]
    assert [tx.send_batch(burst) for burst in bad] == [1, 2, 1, 1, 1]
    assert tx.send_batch(Burst(good, [b"delivered"])) == 0
    assert tx.stats.tx_dropped == 6 and tx.stats.tx_datagrams == 1
    assert _data(_receive(rx, 1)) == [b"delivered"]


def test_recv_batch_stops_at_max_and_when_empty(sockets: list[UdpSocket]) -> None:
    tx, rx = _pair(sockets, "127.0.0.1", gso=False, gro=False)
    assert rx.recv_batch(10) == []
    tx.send_batch(Burst(("127.0.0.1", rx.port), [bytes([i]) for i in range(5)]))
    select.select([rx], [], [], 2)
    time.sleep(0.05)
    # One sender's datagrams come as one burst.
    assert rx.recv_batch(3) == [Burst(("127.0.0.1", tx.port), [b"\0", b"\1", b"\2"])]
    assert _data(rx.recv_batch(3)) == [b"\3", b"\4"]


def test_one_socket_talks_to_both_families(sockets: list[UdpSocket]) -> None:
    needs(no_ipv6_loopback())
    dual = UdpSocket(0)  # bound to every address, so reachable on ::1 and 127.0.0.1
    v4, v6 = UdpSocket(0, "127.0.0.1"), UdpSocket(0, "::1")
    sockets += [dual, v4, v6]
    assert v4.send_batch(Burst(("127.0.0.1", dual.port), [b"four"])) == 0
    assert v6.send_batch(Burst(("::1", dual.port), [b"six"])) == 0
    got = sorted(_receive(dual, 2))
    assert got == [Burst(("127.0.0.1", v4.port), [b"four"]), Burst(("::1", v6.port), [b"six"])]
    assert dual.send_batch(Burst(("127.0.0.1", v4.port), [b"r4"])) == 0
    assert dual.send_batch(Burst(("::1", v6.port), [b"r6"])) == 0
    assert _receive(v4, 1) == [Burst(("127.0.0.1", dual.port), [b"r4"])]
    assert _receive(v6, 1) == [Burst(("::1", dual.port), [b"r6"])]


# --- classification ------------------------------------------------------------


def _msg(kind: int, size: int, index: int = 0x01020304) -> bytes:
    # A response starts with its sender's own index; the receiver's comes after it.
    sender = (0x0A0B0C0D).to_bytes(4, "little") if kind == 2 else b""
    body = sender + index.to_bytes(4, "little")
    return bytes([kind, 0, 0, 0]) + body + bytes(size - 4 - len(body))


@pytest.mark.parametrize(
    ("datagram", "expected", "index"),
    [
        (_msg(1, 148), MessageType.INITIATION, None),
        (_msg(2, 92), MessageType.RESPONSE, 0x01020304),
        (_msg(3, 64), MessageType.COOKIE_REPLY, 0x01020304),
        (_msg(4, 32), MessageType.TRANSPORT, 0x01020304),  # keepalive: header + tag only
        (_msg(4, 1500, 7), MessageType.TRANSPORT, 7),
        (_msg(1, 149), None, None),
        (_msg(2, 91), None, None),
        (_msg(3, 65), None, None),
        (_msg(4, 31), None, None),
        (_msg(5, 148), None, None),
        (_msg(0, 64), None, None),
        (b"\x04\x00\x01\x00" + bytes(60), None, None),  # reserved bytes must be zero
        (b"\x01", None, None),
        (b"", None, None),
    ],
)
def test_classify(datagram: bytes, expected: MessageType | None, index: int | None) -> None:
    assert classify(datagram) == expected
    assert classify(memoryview(datagram)) == expected
    assert receiver_index(datagram) == index


def test_a_socket_connected_on_a_shared_port_takes_its_peers_datagrams(sockets: list[UdpSocket]) -> None:
    """magicsock's unconnected socket and a crypto worker's socket connected to
    one peer share the listen port: the peer's datagrams go to the connected
    one, everyone else's to the unconnected one, and replies leave from the port."""
    needs(no_ipv6_loopback())
    needs(kernel_lacks(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1, "SO_REUSEPORT (Linux 3.9)"))
    shared = UdpSocket(0, "127.0.0.1", reuse_port=True)
    peer, stranger = UdpSocket(0, "127.0.0.1"), UdpSocket(0, "127.0.0.1")
    sockets += [shared, peer, stranger]
    direct = UdpSocket(shared.port, "127.0.0.1", reuse_port=True)
    sockets.append(direct)
    direct.connect(("127.0.0.1", peer.port))
    with pytest.raises(OSError):
        UdpSocket(shared.port, "127.0.0.1")  # a socket without SO_REUSEPORT is still refused
    port = ("127.0.0.1", shared.port)
    for i in range(20):
        peer.send_batch(Burst(port, [b"peer%d" % i]))
        stranger.send_batch(Burst(port, [b"stranger%d" % i]))
    assert _data(_receive(direct, 20)) == [b"peer%d" % i for i in range(20)]
    assert _data(_receive(shared, 20)) == [b"stranger%d" % i for i in range(20)]
    assert direct.recv_batch(10) == [] and shared.recv_batch(10) == []
    assert direct.send_batch(Burst(("127.0.0.1", peer.port), [b"reply"])) == 0
    assert _receive(peer, 1) == [Burst(port, [b"reply"])]
    burst = [b"%04d" % i + bytes(96) for i in range(8)]  # one GSO send, to the connected endpoint
    assert direct.send_batch(Burst(("127.0.0.1", peer.port), burst)) == 0
    got = _receive(peer, 8)
    assert _data(got) == burst and {ep for ep, _ in got} == {port}
    direct.close()
    peer.send_batch(Burst(port, [b"after"]))
    assert _data(_receive(shared, 1)) == [b"after"], "without the worker, magicsock gets it"


def test_a_socket_carries_the_firewall_mark_it_is_given() -> None:
    sock = UdpSocket(mark=0x4D53)
    try:
        assert sock._sock.getsockopt(socket.SOL_SOCKET, socket.SO_MARK) == 0x4D53
        sock.set_mark(0)
        assert sock._sock.getsockopt(socket.SOL_SOCKET, socket.SO_MARK) == 0
    finally:
        sock.close()

"""The TUN queue-steering program and its LPM maps: as assembled, as the
kernel's verifier accepts it, as the kernel runs it (BPF_PROG_TEST_RUN), and
steering real traffic across the queues of a multi-queue TUN in a throwaway
namespace."""

from __future__ import annotations

import errno
import ipaddress
import os
import random
import secrets
import select
import socket
import struct
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack

import pytest

from meshsup.actors.kernel import vnet
from meshsup.actors.wire import ip as packet
from meshsup.bpf.asm import INSN, PSEUDO_MAP_FD
from meshsup.bpf.steering import KEY_SIZE, VALUE_SIZE, Network, key, program, value
from meshsup.bpf.syscall import (
    attach_steering,
    create_lpm_trie,
    detach_steering,
    load_socket_filter,
    map_delete,
    map_lookup,
    map_update,
    run_on_packet,
)
from tests.nodes import REPO, Netns


def needs_root(test: Callable[..., None]) -> Callable[..., None]:
    """bpf() and TUN need root; marked netns so that `-m "not netns"` leaves the test out."""
    return pytest.mark.netns(pytest.mark.skipif(os.geteuid() != 0, reason="needs root for bpf() and TUN")(test))


N = ipaddress.ip_network
Route = tuple[Network, int]
LD_IMM64 = 0x18


# --- the program and the keys, as bytes --------------------------------------------


def test_the_program_is_fixed_and_names_both_maps() -> None:
    prog = program(11, 12, 1)
    insns = [INSN.unpack_from(prog, at) for at in range(0, len(prog), INSN.size)]
    assert prog[:2] == bytes([0xBF, 0x16])  # r6 = r1: the context, kept across calls
    assert insns[-1][0] == 0x95  # exit
    map_loads = [(regs >> 4, imm) for code, regs, _, imm in insns if code == LD_IMM64]
    assert sorted(map_loads) == [(PSEUDO_MAP_FD, 11), (PSEUDO_MAP_FD, 12)]
    assert len(prog) < 50 * INSN.size  # a few dozen instructions, whatever the routes


def test_keys_hold_the_prefix_length_then_the_address() -> None:
    assert key(N("10.1.0.0/16")) == struct.pack("=I", 16) + bytes([10, 1, 0, 0])
    assert key(N("fd00::/8")) == struct.pack("=I", 8) + b"\xfd" + bytes(15)
    assert len(key(N("0.0.0.0/0"))) == KEY_SIZE[4] and len(key(N("::/0"))) == KEY_SIZE[6]
    assert value(255) == struct.pack("=I", 255)


@pytest.mark.parametrize("worker", [-1, 256])
def test_a_worker_that_is_no_queue_is_refused(worker: int) -> None:
    with pytest.raises(ValueError, match="queue index"):
        value(worker)
    with pytest.raises(ValueError, match="queue index"):
        program(3, 4, worker)


# --- the kernel: maps, verifier and test runs ------------------------------------


class Steered:
    """The two LPM maps and the program reading them, as tun-io has them."""

    def __init__(self, default: int) -> None:
        self.maps = {v: create_lpm_trie(KEY_SIZE[v], VALUE_SIZE, 1 << 20, f"test_dst{v}") for v in (4, 6)}
        self.prog = load_socket_filter(program(self.maps[4], self.maps[6], default), "steer_test")

    def route(self, routes: Iterable[Route]) -> None:
        for network, worker in routes:
            map_update(self.maps[network.version], key(network), value(worker))

    def unroute(self, network: Network) -> None:
        map_delete(self.maps[network.version], key(network))

    def run(self, dst: str) -> int:
        return run_on_packet(self.prog, ipv4_udp(dst) if ":" not in dst else ipv6_udp(dst))

    def close(self) -> None:
        for fd in [*self.maps.values(), self.prog]:
            os.close(fd)


@pytest.fixture
def steered() -> Iterator[Callable[..., Steered]]:
    """Steered(default, routes), closed at teardown."""
    with ExitStack() as made:

        def make(default: int, routes: Iterable[Route] = ()) -> Steered:
            s = Steered(default)
            made.callback(s.close)
            s.route(routes)
            return s

        yield make


@needs_root
def test_a_refusal_carries_the_verifier_log() -> None:
    r0_from_r2 = INSN.pack(0xBF, 0x20, 0, 0)  # r2 was never set
    with pytest.raises(OSError, match="R2 !read_ok"):
        load_socket_filter(r0_from_r2 + INSN.pack(0x95, 0, 0, 0), "unset")
    with pytest.raises(ValueError):
        load_socket_filter(b"\0" * 7, "short")
    with pytest.raises(ValueError):
        load_socket_filter(INSN.pack(0x95, 0, 0, 0), "bad name")


@needs_root
def test_map_refusals_say_which_call_and_why() -> None:
    with pytest.raises(OSError, match=r"BPF_MAP_CREATE 'odd'.*Invalid argument"):
        create_lpm_trie(3, VALUE_SIZE, 16, "odd")  # a key shorter than its prefix length
    fd = create_lpm_trie(KEY_SIZE[4], VALUE_SIZE, 1, "full")
    try:
        map_update(fd, key(N("10.0.0.0/8")), value(1))
        with pytest.raises(OSError, match="BPF_MAP_UPDATE_ELEM") as full:
            map_update(fd, key(N("11.0.0.0/8")), value(1))  # max_entries 1
        assert full.value.errno == errno.ENOSPC
        with pytest.raises(OSError, match="BPF_MAP_DELETE_ELEM") as absent:
            map_delete(fd, key(N("11.0.0.0/8")))
        assert absent.value.errno == errno.ENOENT
        map_update(fd, key(N("10.0.0.0/8")), value(2))  # replaced in place: no room needed
        assert map_lookup(fd, key(N("10.1.2.3/32")), VALUE_SIZE) == value(2)
        assert map_lookup(fd, key(N("11.1.2.3/32")), VALUE_SIZE) is None
    finally:
        os.close(fd)


def ipv4_udp(dst: str) -> bytes:
    return struct.pack("!BBHHHBBH4s4s", 0x45, 0, 28, 0, 0, 64, 17, 0, bytes(4), socket.inet_aton(dst)) + bytes(8)


def ipv6_udp(dst: str) -> bytes:
    return struct.pack("!IHBB16s16s", 6 << 28, 8, 17, 64, bytes(16), socket.inet_pton(socket.AF_INET6, dst)) + bytes(8)


def longest_match(routes: dict[Network, int], default: int, dst: ipaddress.IPv4Address | ipaddress.IPv6Address) -> int:
    held = [(network.prefixlen, worker) for network, worker in routes.items() if dst in network]
    return max(held)[1] if held else default


def random_table(rng: random.Random, count: int) -> list[Route]:
    """Nested prefixes of every length under 10.0.0.0/8 and fd00::/16 (so
    that many overlap), some of them listed twice (the second write wins)."""
    routes: list[Route] = []
    for _ in range(count):
        if rng.random() < 0.5:
            base, top, bits = int(ipaddress.IPv4Address("10.0.0.0")), 8, 32
        else:
            base, top, bits = int(ipaddress.IPv6Address("fd00::")), 16, 128
        length = rng.randint(top, bits)
        address = base | rng.getrandbits(bits - top) & ((1 << (bits - top)) - 1) & ~((1 << (bits - length)) - 1)
        routes.append((ipaddress.ip_network((address, length)), rng.randrange(8)))
    return routes + [(network, rng.randrange(8)) for network, _ in rng.sample(routes, count // 10)]


@needs_root
def test_the_kernel_runs_longest_prefix_match(steered: Callable[..., Steered]) -> None:
    rng = random.Random(7)
    routes = random_table(rng, 300)
    s = steered(9, routes)
    table = dict(routes)
    for network, _ in rng.sample(routes, 150) + [(N("10.0.0.0/8"), 0), (N("fd00::/16"), 0)] * 50:
        dst = network[rng.randrange(network.num_addresses)]
        assert s.run(str(dst)) == longest_match(table, 9, dst), dst


MIXED: list[Route] = [
    (N("10.99.0.0/16"), 1),
    (N("fd99::/64"), 2),
    (N("fd99::/56"), 3),
    (N("10.99.1.1/32"), 0),
    (N("fd99::1/128"), 0),
]


@needs_root
def test_a_default_route_catches_what_nothing_longer_holds(steered: Callable[..., Steered]) -> None:
    s = steered(7, MIXED)
    assert [s.run(d) for d in ("10.98.0.1", "8.8.8.8", "fe80::1", "fd99:0:0:ff::1")] == [7, 7, 7, 3]
    s.route([(N("0.0.0.0/0"), 4), (N("::/0"), 5)])
    assert [s.run(d) for d in ("10.98.0.1", "8.8.8.8", "fe80::1", "fd99:0:0:ff::1")] == [4, 4, 5, 3]
    assert [s.run(d) for d in ("10.99.1.1", "10.99.1.2", "fd99::1", "fd99::2")] == [0, 1, 0, 2]


@needs_root
def test_updates_and_deletes_steer_at_once_with_the_same_program(steered: Callable[..., Steered]) -> None:
    s = steered(7, MIXED)
    assert [s.run(d) for d in ("10.99.1.1", "10.99.2.2", "fd99::1", "fd99::2")] == [0, 1, 0, 2]
    s.route([(N("10.99.0.0/16"), 6), (N("fd99::1/128"), 5)])  # moved to other workers
    assert [s.run(d) for d in ("10.99.1.1", "10.99.2.2", "fd99::1", "fd99::2")] == [0, 6, 5, 2]
    s.unroute(N("10.99.1.1/32"))
    s.unroute(N("fd99::/64"))
    assert [s.run(d) for d in ("10.99.1.1", "10.99.2.2", "fd99::1", "fd99::2")] == [6, 6, 5, 3]
    s.unroute(N("10.99.0.0/16"))
    assert s.run("10.99.1.1") == 7


@needs_root
def test_ten_thousand_dual_stack_peers_steer(steered: Callable[..., Steered]) -> None:
    """Each peer's mesh addresses, a /32 and a /128 (20,000 prefixes), among 8 workers:
    the program compared route by route stopped fitting at 4,000 such peers."""
    peers = 10_000
    v4 = [N(f"100.{64 + i // 65536}.{i // 256 % 256}.{i % 256}/32") for i in range(peers)]
    v6 = [N(f"fd7a:115c:a1e0::{i:x}/128") for i in range(peers)]
    rng = random.Random(3)
    workers = [rng.randrange(8) for _ in range(peers)]
    s = steered(9, [*zip(v4, workers), *zip(v6, workers)])
    assert [s.run(str(n.network_address)) for n in v4] == workers
    assert [s.run(str(n.network_address)) for n in v6] == workers
    assert s.run("100.64.255.255") == 9 and s.run("fd7a:115c:a1e0::ffff") == 9  # just past the last peer


GARBAGE = [
    b"",
    b"\x45",
    b"\x45" * 19,
    b"\x60" * 39,
    b"\xff" * 64,
    b"\x00" * 40,
    b"\x50" * 20,
    ipv4_udp("10.99.1.1")[:19],
    ipv6_udp("fd99::1")[:39],
]


@needs_root
def test_short_or_non_ip_packets_go_to_the_default(steered: Callable[..., Steered]) -> None:
    # A BPF_ABS load past the end would return 0 (queue 0), not the default;
    # a catch-all route must not catch them either.
    s = steered(5, [*MIXED, (N("0.0.0.0/0"), 3), (N("::/0"), 3)])
    for pkt in GARBAGE:
        assert run_on_packet(s.prog, pkt) == 5, pkt
    assert run_on_packet(s.prog, ipv4_udp("10.99.1.1")) == 0
    assert run_on_packet(s.prog, ipv4_udp("10.99.1.1")[:20]) == 0  # a bare header is enough
    assert run_on_packet(s.prog, ipv6_udp("fd99::1")[:40]) == 0


# --- a real multi-queue TUN ------------------------------------------------------------


_OPEN_QUEUES = """
import fcntl, os, socket, struct, sys
from meshsup.actors.kernel.tun import IFF_MULTI_QUEUE, IFF_NO_PI, IFF_TUN, IFF_VNET_HDR, TUNSETIFF
name, count, vnet_hdr, to = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1", int(sys.argv[4])
flags = IFF_TUN | IFF_NO_PI | IFF_MULTI_QUEUE | (IFF_VNET_HDR if vnet_hdr else 0)
queues = []
for _ in range(count):  # in order: queue k gets index k
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(), flags))
    queues.append(fd)
socket.send_fds(socket.socket(fileno=to), [b"q"], queues)
"""


class Queues:
    """The queues of a multi-queue TUN made inside a namespace (by a helper
    process, so this one never enters it), with 10.99.0.1/16 and fd99::1/64."""

    def __init__(self, ns: Netns, count: int, vnet_hdr: bool) -> None:
        self.ns, self.vnet_hdr = ns, vnet_hdr
        self.steered: list[Steered] = []
        self.name = "mss" + secrets.token_hex(4)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        with ours, theirs:
            ns.run(
                sys.executable,
                "-c",
                _OPEN_QUEUES,
                self.name,
                str(count),
                "1" if vnet_hdr else "0",
                str(theirs.fileno()),
                pass_fds=[theirs.fileno()],
                cwd=REPO,
                timeout=30,
            )
            _, self.fds, _, _ = socket.recv_fds(ours, 16, count)
        assert len(self.fds) == count
        ns.run("ip", "addr", "add", "10.99.0.1/16", "dev", self.name)
        ns.run("ip", "addr", "add", "fd99::1/64", "dev", self.name, "nodad")
        ns.run("ip", "link", "set", self.name, "up")

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        for s in self.steered:
            s.close()
        self.fds, self.steered = [], []

    def steer(self, routes: Sequence[Route], default: int) -> Steered:
        """Attach through queue 0; the maps stay open to be changed (closed with the queues)."""
        s = Steered(default)
        self.steered.append(s)
        s.route(routes)
        attach_steering(self.fds[0], s.prog)
        return s

    def drain(self, wanted: Callable[[bytes], bool], count: int, timeout: float = 5) -> dict[bytes, list[int]]:
        """Read every queue until ``count`` wanted packets came; each wanted
        packet with the indices of the queues it came out of."""
        skip = vnet.HEADER_LEN if self.vnet_hdr else 0
        seen: dict[bytes, list[int]] = {}
        deadline = time.monotonic() + timeout
        while sum(map(len, seen.values())) < count and time.monotonic() < deadline:
            select.select(self.fds, [], [], 0.1)
            for index, fd in enumerate(self.fds):
                while True:
                    try:
                        data = os.read(fd, 65535 + skip)[skip:]
                    except BlockingIOError:
                        break
                    if wanted(data):
                        seen.setdefault(data, []).append(index)
        return seen


@pytest.fixture
def tun_queues(netns: Callable[..., Netns]) -> Iterator[Callable[[int, bool], Queues]]:
    made: list[Queues] = []

    def make(count: int, vnet_hdr: bool) -> Queues:
        made.append(Queues(netns("mss"), count, vnet_hdr))
        return made[-1]

    yield make
    for q in made:
        q.close()


def send_udp(ns: Netns, port: int, destinations: Sequence[str]) -> None:
    from pyroute2.netns import create_socket

    for dst in destinations:
        family = socket.AF_INET6 if ":" in dst else socket.AF_INET
        with create_socket(ns.name, family, socket.SOCK_DGRAM, flags=0) as sock:
            sock.sendto(dst.encode(), (dst, port))


def to_port(port: int) -> Callable[[bytes], bool]:
    def wanted(pkt: bytes) -> bool:
        return packet.protocol(pkt) == packet.IPPROTO_UDP and (packet.ports(pkt) or (0, 0))[1] == port

    return wanted


def arrivals(queues: Queues, destinations: Sequence[str]) -> dict[str, list[int]]:
    """Each destination with the queues its datagram came out of."""
    port = random.randrange(20000, 60000)
    send_udp(queues.ns, port, destinations)
    seen = queues.drain(to_port(port), len(destinations))
    landed: dict[str, list[int]] = {dst: [] for dst in destinations}
    for pkt, indices in seen.items():
        landed[str(ipaddress.ip_address(packet.dst_addr(pkt) or b""))] += indices
    return landed


STEERING: list[Route] = [
    (N("10.99.1.0/24"), 0),
    (N("10.99.2.0/24"), 1),
    (N("10.99.2.128/25"), 2),
    (N("fd99::1:0/112"), 2),
]
EXPECTED = {
    "10.99.1.7": [0],
    "10.99.2.7": [1],
    "10.99.2.200": [2],
    "10.99.3.7": [1],
    "fd99::1:7": [2],
    "fd99::2:7": [1],
}  # written as ip_address() prints them


@needs_root
@pytest.mark.parametrize("vnet_hdr", [False, True], ids=["plain", "vnet_hdr"])
def test_each_packet_comes_out_of_its_workers_queue(tun_queues: Callable[[int, bool], Queues], vnet_hdr: bool) -> None:
    queues = tun_queues(3, vnet_hdr)
    queues.steer(STEERING, 1)
    assert arrivals(queues, list(EXPECTED) * 3) == {d: q * 3 for d, q in EXPECTED.items()}


@needs_root
def test_a_map_change_moves_traffic_with_no_new_program(tun_queues: Callable[[int, bool], Queues]) -> None:
    queues = tun_queues(3, False)
    s = queues.steer(STEERING, 1)
    s.route([(N("10.99.1.0/24"), 2), (N("fd99::2:0/112"), 0)])
    s.unroute(N("10.99.2.128/25"))
    moved = {"10.99.1.7": [2], "10.99.2.200": [1], "fd99::2:7": [0], "fd99::1:7": [2]}
    assert arrivals(queues, list(moved) * 2) == {d: q * 2 for d, q in moved.items()}


@needs_root
def test_garbage_goes_to_the_default_queue_and_steering_goes_on(tun_queues: Callable[[int, bool], Queues]) -> None:
    from pyroute2.netns import create_socket

    queues = tun_queues(3, False)
    queues.steer(STEERING, 2)
    marked = [g + secrets.token_bytes(2) if len(g) > 20 else g for g in GARBAGE if g]
    eth_p_all = socket.htons(0x0003)
    with create_socket(queues.ns.name, socket.AF_PACKET, socket.SOCK_RAW, eth_p_all, flags=0) as raw:
        for g in marked:
            raw.sendto(g, (queues.name, 0x0800))
    seen = queues.drain(lambda p: p in marked, len(marked))
    assert seen == {g: [2] for g in marked}
    assert arrivals(queues, ["10.99.1.7", "10.99.2.200"]) == {"10.99.1.7": [0], "10.99.2.200": [2]}


@needs_root
def test_detaching_gives_the_choice_back_to_the_kernel(tun_queues: Callable[[int, bool], Queues]) -> None:
    queues = tun_queues(3, False)
    queues.steer([], 2)
    assert set(map(tuple, arrivals(queues, list(EXPECTED)).values())) == {(2,)}
    detach_steering(queues.fds[0])
    destinations = [f"10.99.{i}.{j}" for i in range(1, 4) for j in range(1, 9)]
    landed = arrivals(queues, destinations)
    assert all(len(q) == 1 for q in landed.values()), landed
    assert {q[0] for q in landed.values()} != {2}  # the flow hash spreads them


@needs_root
def test_closing_a_queue_moves_the_last_one_into_its_index(tun_queues: Callable[[int, bool], Queues]) -> None:
    # The kernel keeps attached queues packed: numqueues counts attached
    # queues, and the last one takes over a closed queue's index.
    queues = tun_queues(3, False)
    queues.steer(STEERING, 1)
    os.close(queues.fds.pop(0))
    landed = arrivals(queues, ["10.99.1.7", "10.99.2.7", "10.99.2.200"])
    # Worker 0 now lands on what was queue 2 (at list position 1 here);
    # worker 2 wraps to 2 % 2 == 0, the same queue.
    assert landed == {"10.99.1.7": [1], "10.99.2.7": [0], "10.99.2.200": [1]}

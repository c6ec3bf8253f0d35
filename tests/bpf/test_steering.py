"""The TUN queue-steering program: as assembled, as the kernel's verifier
accepts it, as the kernel runs it (BPF_PROG_TEST_RUN), and steering real
traffic across the queues of a multi-queue TUN in a throwaway namespace."""

from __future__ import annotations

import ipaddress
import os
import random
import secrets
import select
import socket
import struct
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import pytest

from meshsup.actors.kernel import vnet
from meshsup.actors.wire import ip as packet
from meshsup.bpf.asm import INSN
from meshsup.bpf.steering import Route, program
from meshsup.bpf.syscall import attach_steering, detach_steering, load_socket_filter, run_on_packet
from tests.nodes import REPO, Netns


def needs_root(test: Callable[..., None]) -> Callable[..., None]:
    """bpf() and TUN need root; marked netns so that `-m "not netns"` leaves the test out."""
    return pytest.mark.netns(pytest.mark.skipif(os.geteuid() != 0, reason="needs root for bpf() and TUN")(test))


N = ipaddress.ip_network
MOV_R0_IMM = 0xB7


def v4_routes(count: int) -> list[Route]:
    return [(N(f"10.{i // 256}.{i % 256}.0/24"), i % 4) for i in range(count)]


def v6_routes(count: int) -> list[Route]:
    return [(N(f"fd00:{i:x}::/64"), i % 4) for i in range(count)]


def returned_workers(prog: bytes) -> list[int]:
    """The values the program may return, in program order."""
    insns = [INSN.unpack_from(prog, at) for at in range(0, len(prog), INSN.size)]
    return [imm for code, regs, _, imm in insns if code == MOV_R0_IMM and regs & 0xF == 0]


# --- the assembler ------------------------------------------------------------------


def test_program_keeps_the_context_in_r6_then_ends_in_exit() -> None:
    prog = program(v4_routes(3), 1)
    assert prog[:2] == bytes([0xBF, 0x16])  # r6 = r1
    assert prog[-8] == 0x95  # exit
    assert len(prog) % INSN.size == 0


def test_instruction_count_grows_by_a_few_per_route() -> None:
    counts = {n: len(program(v4_routes(n), 0)) // INSN.size for n in (0, 1, 100, 1000)}
    assert counts[0] == 12
    assert counts[1] == 19  # loading the destination (2), the route (5)
    assert counts[1000] - counts[100] == 900 * 5  # load, mask, compare, return
    # A /64 compares two words, a /56 one word and one masked word.
    assert len(program(v6_routes(2), 0)) - len(program(v6_routes(1), 0)) == 6 * INSN.size
    assert len(program([(N("fd00::/56"), 1)], 0)) - len(program([(N("fd00::/64"), 1)], 0)) == INSN.size


def test_routes_are_tried_longest_prefix_first_ties_in_order() -> None:
    routes: list[Route] = [
        (N("10.0.0.0/8"), 1),
        (N("10.1.0.0/16"), 2),
        (N("10.1.1.0/24"), 3),
        (N("10.2.0.0/16"), 4),
        (N("fd00::/16"), 5),
        (N("fd00::/64"), 6),
    ]
    # IPv6 section, default, IPv4 section, default.
    assert returned_workers(program(routes, 0)) == [6, 5, 0, 3, 2, 4, 1, 0]


def test_a_catch_all_route_ends_its_family() -> None:
    # Anything after 0.0.0.0/0 is unreachable, which the verifier refuses.
    routes: list[Route] = [(N("0.0.0.0/0"), 3), (N("10.0.0.0/8"), 1)]
    assert returned_workers(program(routes, 0)) == [0, 1, 3]


@pytest.mark.parametrize("routes, default", [([], -1), ([], 256), ([(N("10.0.0.0/8"), 256)], 0)])
def test_a_worker_that_is_no_queue_is_refused(routes: list[Route], default: int) -> None:
    with pytest.raises(ValueError, match="queue index"):
        program(routes, default)


def test_a_table_beyond_the_jump_range_is_refused() -> None:
    with pytest.raises(ValueError, match="too large"):
        program([(N(f"fd00::{i:x}/128"), 0) for i in range(4000)], 0)


# --- the kernel: verifier and test runs ------------------------------------------


@contextmanager
def loaded(routes: Sequence[Route], default: int) -> Iterator[int]:
    fd = load_socket_filter(program(routes, default), "steer_test")
    try:
        yield fd
    finally:
        os.close(fd)


TABLES: dict[str, list[Route]] = {
    "none": [],
    "one": [(N("10.99.1.0/24"), 2)],
    "mixed": [
        (N("10.99.0.0/16"), 1),
        (N("fd99::/64"), 2),
        (N("fd99::/56"), 3),
        (N("10.99.1.1/32"), 0),
        (N("fd99::1/128"), 0),
        (N("::/0"), 3),
        (N("0.0.0.0/0"), 2),
    ],
    "1000_v4": v4_routes(1000),
    "1000_v6": v6_routes(1000),
}


@needs_root
@pytest.mark.parametrize("table", TABLES)
def test_the_verifier_accepts(table: str) -> None:
    with loaded(TABLES[table], 1) as fd:
        assert fd >= 0


@needs_root
def test_a_refusal_carries_the_verifier_log() -> None:
    r0_from_r2 = INSN.pack(0xBF, 0x20, 0, 0)  # r2 was never set
    with pytest.raises(OSError, match="R2 !read_ok"):
        load_socket_filter(r0_from_r2 + INSN.pack(0x95, 0, 0, 0), "unset")
    with pytest.raises(ValueError):
        load_socket_filter(b"\0" * 7, "short")
    with pytest.raises(ValueError):
        load_socket_filter(INSN.pack(0x95, 0, 0, 0), "bad name")


def ipv4_udp(dst: str) -> bytes:
    return struct.pack("!BBHHHBBH4s4s", 0x45, 0, 28, 0, 0, 64, 17, 0, bytes(4), socket.inet_aton(dst)) + bytes(8)


def ipv6_udp(dst: str) -> bytes:
    return struct.pack("!IHBB16s16s", 6 << 28, 8, 17, 64, bytes(16), socket.inet_pton(socket.AF_INET6, dst)) + bytes(8)


def longest_match(routes: Sequence[Route], default: int, dst: ipaddress.IPv4Address | ipaddress.IPv6Address) -> int:
    best: tuple[int, int] | None = None
    for network, worker in routes:
        if dst in network and (best is None or network.prefixlen > best[0]):
            best = (network.prefixlen, worker)
    return default if best is None else best[1]


def random_table(rng: random.Random, count: int) -> list[Route]:
    """Nested prefixes of every length under 10.0.0.0/8 and fd00::/16 (so
    that many overlap), some of them listed twice."""
    routes: list[Route] = []
    for _ in range(count):
        if rng.random() < 0.5:
            base, top, bits = int(ipaddress.IPv4Address("10.0.0.0")), 8, 32
        else:
            base, top, bits = int(ipaddress.IPv6Address("fd00::")), 16, 128
        length = rng.randint(top, bits)
        address = base | rng.getrandbits(bits - top) & ((1 << (bits - top)) - 1) & ~((1 << (bits - length)) - 1)
        routes.append((ipaddress.ip_network((address, length)), rng.randrange(8)))
    return routes + rng.sample(routes, count // 10)


@needs_root
def test_the_kernel_runs_longest_prefix_match() -> None:
    rng = random.Random(7)
    routes = random_table(rng, 300)
    with loaded(routes, 9) as fd:
        for network, _ in rng.sample(routes, 150) + [(N("10.0.0.0/8"), 0), (N("fd00::/16"), 0)] * 50:
            dst = network[rng.randrange(network.num_addresses)]
            pkt = ipv4_udp(str(dst)) if dst.version == 4 else ipv6_udp(str(dst))
            assert run_on_packet(fd, pkt) == longest_match(routes, 9, dst), dst


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
def test_short_or_non_ip_packets_go_to_the_default() -> None:
    # A BPF_ABS load past the end would return 0 (queue 0), not the default.
    with loaded(TABLES["mixed"], 5) as fd:
        for pkt in GARBAGE:
            assert run_on_packet(fd, pkt) == 5, pkt
        assert run_on_packet(fd, ipv4_udp("10.99.1.1")) == 0


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
        self.fds = []

    def steer(self, routes: Sequence[Route], default: int) -> None:
        """Attach through queue 0, closing the program's fd at once: the TUN
        keeps its own reference."""
        with loaded(routes, default) as prog:
            attach_steering(self.fds[0], prog)

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

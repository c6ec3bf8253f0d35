"""TUN queue steering: which crypto worker's queue an outgoing packet joins.

Each crypto worker reads its own queue of the multi-queue TUN. The kernel runs
a steering program (attached with TUNSETSTEERINGEBPF, see ``bpf.syscall``) on
every packet the stack sends into the TUN and queues the packet on
``(u16)return_value % numqueues`` (drivers/net/tun.c, tun_ebpf_select_queue).
``program`` builds that program from the route table: the longest prefix
holding the packet's destination names the worker that owns the peer.

The packet is bare L3 (IFF_TUN): byte 0 holds the IP version; the IPv4
destination is at offset 16, the IPv6 destination at offset 24 (actors.wire.ip). Socket filters
may not read packet memory directly, so the program uses the legacy
BPF_LD|BPF_ABS loads, which read through the context in r6 and return words in
host byte order: an address word compares as the plain integer.

Sans-IO: bytes out, nothing loaded here (the assembler is ``bpf.asm``).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator, Sequence
from typing import Final

from meshsup.actors.wire.ip import IPV4_DST, IPV4_HEADER_MIN, IPV6_DST, IPV6_HEADER
from meshsup.bpf.asm import (
    ABS,
    ALU,
    AND,
    JEQ,
    JLT,
    JNE,
    LD,
    LDX,
    MEM,
    R0,
    R1,
    R6,
    R7,
    R10,
    RSH,
    STX,
    Assembler,
    B,
    K,
    W,
    s32,
)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Route = tuple[Network, int]

# A TUN has at most this many queues (MAX_TAP_QUEUES); the kernel also cuts
# the return value to 16 bits, so a larger worker index would wrap silently.
MAX_QUEUES: Final = 256

# Registers: r6 holds the context for BPF_ABS loads, r7 the packet length
# (r6-r9 survive the BPF_ABS loads, which clobber r1-r5).
SKB_LEN: Final = 0  # offsetof(struct __sk_buff, len)
# The destination's 32-bit words live on the stack at r10-16 .. r10-4.
_DST_SLOT: Final = -16

_FULL_WORD: Final = 0xFFFFFFFF


def _prefix_words(network: Network) -> Iterator[tuple[int, int]]:
    """(value, mask) of each 32-bit word the prefix covers, most significant first."""
    address, bits = int(network.network_address), network.max_prefixlen
    for start in range(0, network.prefixlen, 32):
        covered = min(32, network.prefixlen - start)
        mask = (_FULL_WORD << (32 - covered)) & _FULL_WORD
        yield (address >> (bits - start - 32)) & mask, mask


def _longest_first(routes: Sequence[Route], version: int) -> list[Route]:
    # sorted() is stable: among equal prefixes the first route listed wins.
    family = [r for r in routes if r[0].version == version]
    return sorted(family, key=lambda r: -r[0].prefixlen)


def _match_destination(asm: Assembler, routes: list[Route], dst: int, words: int) -> bool:
    """Copy the destination to the stack, then test each route in turn.
    Returns whether a packet can fall past the last route."""
    if not routes:
        return True
    for i in range(words):
        asm.emit(LD | ABS | W, imm=dst + 4 * i)
        asm.emit(STX | MEM | W, R10, R0, off=_DST_SLOT + 4 * i)
    tag = f"v{routes[0][0].version}."
    for n, (network, worker) in enumerate(routes):
        mismatch = f"{tag}{n}"
        for i, (value, mask) in enumerate(_prefix_words(network)):
            asm.emit(LDX | MEM | W, R1, R10, off=_DST_SLOT + 4 * i)
            if mask != _FULL_WORD:
                asm.emit(ALU | AND | K, R1, imm=s32(mask))
            asm.jump32(JNE, R1, value, mismatch)
        asm.ret(worker)
        if network.prefixlen == 0:
            # Matches everything: whatever followed would be unreachable,
            # and the verifier refuses unreachable instructions.
            return False
        asm.label(mismatch)
    return True


def _check_worker(worker: int) -> None:
    if not 0 <= worker < MAX_QUEUES:
        raise ValueError(f"worker {worker} is not a TUN queue index (0..{MAX_QUEUES - 1})")


def program(routes: Sequence[Route], default: int) -> bytes:
    """The steering program's instructions (``bpf.asm.INSN`` each, little-endian).

    A packet goes to the worker of the longest prefix in ``routes`` holding
    its destination (among equal prefixes, the first listed); a packet that
    matches none, is not IPv4/IPv6, or is too short for its IP header goes to
    ``default``. Raises ValueError for a worker outside 0..255 or a table so
    large that a jump no longer fits (thousands of routes).
    """
    _check_worker(default)
    for _, worker in routes:
        _check_worker(worker)
    asm = Assembler()
    asm.mov(R6, R1)  # BPF_ABS loads read the packet through r6
    # A BPF_ABS load past the end ends the program returning 0, i.e. queue 0:
    # check the length first so short packets go to ``default`` instead.
    asm.emit(LDX | MEM | W, R7, R6, off=SKB_LEN)
    asm.jump32(JLT, R7, IPV4_HEADER_MIN, "default")
    asm.emit(LD | ABS | B, imm=0)
    asm.emit(ALU | RSH | K, R0, imm=4)  # the version nibble
    asm.jump32(JEQ, R0, 4, "ipv4")
    asm.jump32(JNE, R0, 6, "default")
    asm.jump32(JLT, R7, IPV6_HEADER, "default")
    _match_destination(asm, _longest_first(routes, 6), IPV6_DST.start, 4)
    asm.label("default")  # unmatched IPv6 falls through to here
    asm.ret(default)
    asm.label("ipv4")
    if _match_destination(asm, _longest_first(routes, 4), IPV4_DST.start, 1):
        asm.ret(default)
    return asm.assemble()

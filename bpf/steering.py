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

Sans-IO: bytes out, nothing loaded here. The assembler is the few helpers the
program needs, with labels for forward jumps.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Final

from meshsup.actors.wire.ip import IPV4_DST, IPV4_HEADER_MIN, IPV6_DST, IPV6_HEADER

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Route = tuple[Network, int]

# A TUN has at most this many queues (MAX_TAP_QUEUES); the kernel also cuts
# the return value to 16 bits, so a larger worker index would wrap silently.
MAX_QUEUES: Final = 256

# struct bpf_insn: u8 code, u8 dst_reg:4 | src_reg:4, s16 off, s32 imm.
INSN: Final = struct.Struct("<BBhi")

# Instruction classes, sizes, modes and operations from <linux/bpf.h>.
_LD, _LDX, _STX, _ALU, _JMP, _JMP32, _ALU64 = 0x00, 0x01, 0x03, 0x04, 0x05, 0x06, 0x07
_W, _B = 0x00, 0x10
_ABS, _MEM = 0x20, 0x60
_K, _X = 0x00, 0x08
_AND, _RSH, _MOV = 0x50, 0x70, 0xB0
_JEQ, _JNE, _JLT, _EXIT = 0x10, 0x50, 0xA0, 0x90

# Registers: r0 result, r1 context on entry (and scratch after), r6 context
# for BPF_ABS loads, r7 packet length (r6-r9 survive the BPF_ABS loads, which
# clobber r1-r5), r10 frame pointer.
R0, R1, R6, R7, R10 = 0, 1, 6, 7, 10

SKB_LEN: Final = 0  # offsetof(struct __sk_buff, len)
# The destination's 32-bit words live on the stack at r10-16 .. r10-4.
_DST_SLOT: Final = -16

_FULL_WORD: Final = 0xFFFFFFFF


def _s32(value: int) -> int:
    """An unsigned 32-bit value as the signed imm field carries it."""
    return value - (1 << 32) if value & 0x80000000 else value


@dataclass
class _Insn:
    code: int
    dst: int = 0
    src: int = 0
    off: int = 0
    imm: int = 0
    target: str | None = None  # a jump's label, resolved into off


class _Assembler:
    def __init__(self) -> None:
        self._insns: list[_Insn] = []
        self._labels: dict[str, int] = {}

    def emit(self, code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> None:
        self._insns.append(_Insn(code, dst, src, off, imm))

    def jump32(self, op: int, reg: int, value: int, label: str) -> None:
        """``if (u32)reg <op> value goto label``: 32-bit, so no sign extension."""
        self._insns.append(_Insn(_JMP32 | op | _K, reg, imm=_s32(value), target=label))

    def label(self, name: str) -> None:
        self._labels[name] = len(self._insns)

    def ret(self, value: int) -> None:
        self.emit(_ALU64 | _MOV | _K, R0, imm=value)
        self.emit(_JMP | _EXIT)

    def assemble(self) -> bytes:
        out = bytearray()
        for index, insn in enumerate(self._insns):
            off = insn.off
            if insn.target is not None:
                off = self._labels[insn.target] - index - 1
                if not -0x8000 <= off < 0x8000:
                    raise ValueError("route table too large: a jump exceeds the 16-bit offset")
            out += INSN.pack(insn.code, insn.src << 4 | insn.dst, off, insn.imm)
        return bytes(out)


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


def _match_destination(asm: _Assembler, routes: list[Route], dst: int, words: int) -> bool:
    """Copy the destination to the stack, then test each route in turn.
    Returns whether a packet can fall past the last route."""
    if not routes:
        return True
    for i in range(words):
        asm.emit(_LD | _ABS | _W, imm=dst + 4 * i)
        asm.emit(_STX | _MEM | _W, R10, R0, off=_DST_SLOT + 4 * i)
    tag = f"v{routes[0][0].version}."
    for n, (network, worker) in enumerate(routes):
        mismatch = f"{tag}{n}"
        for i, (value, mask) in enumerate(_prefix_words(network)):
            asm.emit(_LDX | _MEM | _W, R1, R10, off=_DST_SLOT + 4 * i)
            if mask != _FULL_WORD:
                asm.emit(_ALU | _AND | _K, R1, imm=_s32(mask))
            asm.jump32(_JNE, R1, value, mismatch)
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
    """The steering program's instructions (``INSN`` each, little-endian).

    A packet goes to the worker of the longest prefix in ``routes`` holding
    its destination (among equal prefixes, the first listed); a packet that
    matches none, is not IPv4/IPv6, or is too short for its IP header goes to
    ``default``. Raises ValueError for a worker outside 0..255 or a table so
    large that a jump no longer fits (thousands of routes).
    """
    _check_worker(default)
    for _, worker in routes:
        _check_worker(worker)
    asm = _Assembler()
    asm.emit(_ALU64 | _MOV | _X, R6, R1)  # BPF_ABS loads read the packet through r6
    # A BPF_ABS load past the end ends the program returning 0, i.e. queue 0:
    # check the length first so short packets go to ``default`` instead.
    asm.emit(_LDX | _MEM | _W, R7, R6, off=SKB_LEN)
    asm.jump32(_JLT, R7, IPV4_HEADER_MIN, "default")
    asm.emit(_LD | _ABS | _B, imm=0)
    asm.emit(_ALU | _RSH | _K, R0, imm=4)  # the version nibble
    asm.jump32(_JEQ, R0, 4, "ipv4")
    asm.jump32(_JNE, R0, 6, "default")
    asm.jump32(_JLT, R7, IPV6_HEADER, "default")
    _match_destination(asm, _longest_first(routes, 6), IPV6_DST.start, 4)
    asm.label("default")  # unmatched IPv6 falls through to here
    asm.ret(default)
    asm.label("ipv4")
    if _match_destination(asm, _longest_first(routes, 4), IPV4_DST.start, 1):
        asm.ret(default)
    return asm.assemble()

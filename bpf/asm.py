"""A small eBPF assembler: the instructions our programs use, with labels for forward jumps.

Opcodes and registers are those of <linux/bpf.h> (Documentation/bpf/standardization/
instruction-set.rst). Each program module (``steering``, ``intercept``) writes its
program with these helpers; ``assemble`` packs it as raw ``struct bpf_insn``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

# struct bpf_insn: u8 code, u8 dst_reg:4 | src_reg:4, s16 off, s32 imm.
INSN: Final = struct.Struct("<BBhi")

# Instruction classes, sizes, modes and operations.
LD, LDX, ST, STX, ALU, JMP, JMP32, ALU64 = 0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07
W, H, B, DW = 0x00, 0x08, 0x10, 0x18
IMM, MEM = 0x00, 0x60
K, X = 0x00, 0x08
AND, RSH, MOV = 0x50, 0x70, 0xB0
JA, JEQ, JNE, CALL, EXIT = 0x00, 0x10, 0x50, 0x80, 0x90
# src_reg of a 64-bit immediate load that names a map by its fd (BPF_PSEUDO_MAP_FD):
# the kernel puts the map's address in its place when it loads the program.
PSEUDO_MAP_FD: Final = 1

# Registers: r0 result, r1-r5 arguments (clobbered by calls), r6-r9 kept
# across calls, r10 the read-only frame pointer.
R0, R1, R2, R3, R4, R5, R6, R7, R8, R9, R10 = range(11)

SIZES: Final = {1: B, 2: H, 4: W, 8: DW}

# Kernel helpers (enum bpf_func_id).
SKB_LOAD_BYTES: Final = 26
SKB_LOAD_BYTES_RELATIVE: Final = 68


def s32(value: int) -> int:
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


class Assembler:
    def __init__(self) -> None:
        self._insns: list[_Insn] = []
        self._labels: dict[str, int] = {}

    def emit(self, code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> None:
        self._insns.append(_Insn(code, dst, src, off, imm))

    def mov(self, dst: int, src: int) -> None:
        """``dst = src`` (registers, 64-bit)."""
        self.emit(ALU64 | MOV | X, dst, src)

    def mov_imm(self, dst: int, value: int) -> None:
        """``dst = value``, sign-extended from 32 bits."""
        self.emit(ALU64 | MOV | K, dst, imm=value)

    def add_imm(self, dst: int, value: int) -> None:
        self.emit(ALU64 | 0x00 | K, dst, imm=value)  # BPF_ADD is 0x00

    def rsh_imm(self, dst: int, bits: int) -> None:
        """``dst >>= bits`` (logical, 64-bit)."""
        self.emit(ALU64 | RSH | K, dst, imm=bits)

    def ld_map_fd(self, dst: int, map_fd: int) -> None:
        """``dst = the map map_fd refers to``: a 64-bit immediate load, which takes
        two instruction slots (the second holds the immediate's upper half, 0)."""
        self.emit(LD | IMM | DW, dst, PSEUDO_MAP_FD, imm=map_fd)
        self.emit(0)

    def load(self, size: int, dst: int, base: int, off: int) -> None:
        """``dst = *(u<size*8> *)(base + off)``, zero-extended."""
        self.emit(LDX | MEM | SIZES[size], dst, base, off)

    def store(self, size: int, base: int, off: int, src: int) -> None:
        """``*(u<size*8> *)(base + off) = src``."""
        self.emit(STX | MEM | SIZES[size], base, src, off)

    def store_imm(self, size: int, base: int, off: int, value: int) -> None:
        """``*(u<size*8> *)(base + off) = value``."""
        self.emit(ST | MEM | SIZES[size], base, off=off, imm=s32(value))

    def call(self, helper: int) -> None:
        """A kernel helper by its number (enum bpf_func_id): r1-r5 in, r0 out."""
        self.emit(JMP | CALL, imm=helper)

    def load_packet_bytes(self, off: int, size: int, slot: int, short: str, start: int | None = None) -> None:
        """Copy ``size`` packet bytes at ``off`` on to the stack at ``r10 + slot``, through
        bpf_skb_load_bytes, or bpf_skb_load_bytes_relative from header ``start`` when given;
        to ``short`` if the packet has fewer. The context must be in r6."""
        self.mov(R1, R6)
        self.mov_imm(R2, off)
        self.mov(R3, R10)
        self.add_imm(R3, slot)
        self.mov_imm(R4, size)
        if start is None:
            self.call(SKB_LOAD_BYTES)
        else:
            self.mov_imm(R5, start)
            self.call(SKB_LOAD_BYTES_RELATIVE)
        self.jump(JNE, R0, 0, short)

    def jump32(self, op: int, reg: int, value: int, label: str) -> None:
        """``if (u32)reg <op> value goto label``: 32-bit, so no sign extension."""
        self._insns.append(_Insn(JMP32 | op | K, reg, imm=s32(value), target=label))

    def jump(self, op: int, reg: int, value: int, label: str) -> None:
        """``if reg <op> value goto label``, 64-bit (a pointer against 0, say)."""
        self._insns.append(_Insn(JMP | op | K, reg, imm=value, target=label))

    def goto(self, label: str) -> None:
        self._insns.append(_Insn(JMP | JA, target=label))

    def label(self, name: str) -> None:
        self._labels[name] = len(self._insns)

    def exit(self) -> None:
        """Return r0."""
        self.emit(JMP | EXIT)

    def ret(self, value: int) -> None:
        self.mov_imm(R0, value)
        self.exit()

    def assemble(self) -> bytes:
        out = bytearray()
        for index, insn in enumerate(self._insns):
            off = insn.off
            if insn.target is not None:
                off = self._labels[insn.target] - index - 1
                if not -0x8000 <= off < 0x8000:
                    raise ValueError("program too large: a jump exceeds the 16-bit offset")
            out += INSN.pack(insn.code, insn.src << 4 | insn.dst, off, insn.imm)
        return bytes(out)

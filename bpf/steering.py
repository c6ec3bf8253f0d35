"""TUN queue steering: which crypto worker's queue an outgoing packet joins.

Each crypto worker reads its own queue of the multi-queue TUN. The kernel runs
a steering program (attached with TUNSETSTEERINGEBPF, see ``bpf.syscall``) on
every packet the stack sends into the TUN and queues the packet on
``(u16)return_value % numqueues`` (drivers/net/tun.c, tun_ebpf_select_queue).

The program is fixed, built once whatever the routes: it looks the packet's
destination up in one of two BPF LPM-trie maps, IPv4 and IPv6, each holding
prefix -> worker (``key``, ``value``), and returns the worker of the longest
prefix holding it; a packet whose destination matches none, that is not IPv4
or IPv6, or that is too short for its IP header goes to ``default``. The
routes live in the maps alone, so a change of routes is a change of map
entries (tun-io's), never a new program, and any number of routes fits.

The packet is bare L3 (IFF_TUN): byte 0 holds the IP version; the IPv4
destination is at offset 16, the IPv6 destination at offset 24
(actors.wire.ip). ``bpf_skb_load_bytes`` copies it to the stack in network
order, as an LPM key holds its address, and fails on a packet too short to
hold it (where a BPF_ABS load past the end would end the program returning 0:
queue 0, not ``default``).

Sans-IO: bytes out, nothing loaded here (the assembler is ``bpf.asm``).
"""

from __future__ import annotations

import ipaddress
import struct
from typing import Final

from meshsup.actors.wire.ip import IPV4_DST, IPV6_DST
from meshsup.bpf.asm import JEQ, JNE, R0, R1, R2, R6, R10, Assembler

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# A TUN has at most this many queues (MAX_TAP_QUEUES); the kernel also cuts
# the return value to 16 bits, so a larger worker index would wrap silently.
MAX_QUEUES: Final = 256

# enum bpf_func_id, from <linux/bpf.h>.
MAP_LOOKUP_ELEM: Final = 1

# struct bpf_lpm_trie_key: a u32 prefix length in host order, then the
# address in network order. The value: the worker, a u32.
_PREFIXLEN: Final = struct.Struct("=I")
KEY_SIZE: Final = {4: _PREFIXLEN.size + 4, 6: _PREFIXLEN.size + 16}
_VALUE: Final = struct.Struct("=I")
VALUE_SIZE: Final = _VALUE.size

# The stack: the lookup key (its address at _KEY + 4), and the version byte.
_KEY: Final = -24
_VERSION: Final = -32


def key(network: Network) -> bytes:
    """The LPM map key of ``network`` (its map is the one of its IP version)."""
    return _PREFIXLEN.pack(network.prefixlen) + network.network_address.packed


def value(worker: int) -> bytes:
    """The map value that steers to ``worker``; ValueError if no TUN queue has that index."""
    if not 0 <= worker < MAX_QUEUES:
        raise ValueError(f"worker {worker} is not a TUN queue index (0..{MAX_QUEUES - 1})")
    return _VALUE.pack(worker)


def _destination(asm: Assembler, dst: slice, map_fd: int) -> None:
    """The key of a full-length destination read from ``dst``; r1: its family's map."""
    size = dst.stop - dst.start
    asm.load_packet_bytes(dst.start, size, _KEY + _PREFIXLEN.size, "default")
    asm.store_imm(4, R10, _KEY, size * 8)
    asm.ld_map_fd(R1, map_fd)


def program(v4_map: int, v6_map: int, default: int) -> bytes:
    """The steering program's instructions (``bpf.asm.INSN`` each, little-endian),
    reading the LPM maps ``v4_map`` and ``v6_map`` (fds of maps of ``KEY_SIZE``
    keys and ``VALUE_SIZE`` values; the loaded program holds them). ValueError
    for a ``default`` that is no queue index."""
    value(default)
    asm = Assembler()
    asm.mov(R6, R1)  # the context, kept across helper calls
    asm.load_packet_bytes(0, 1, _VERSION, "default")
    asm.load(1, R1, R10, _VERSION)
    asm.rsh_imm(R1, 4)  # the version nibble
    asm.jump32(JEQ, R1, 4, "ipv4")
    asm.jump32(JNE, R1, 6, "default")
    _destination(asm, IPV6_DST, v6_map)
    asm.goto("lookup")
    asm.label("ipv4")
    _destination(asm, IPV4_DST, v4_map)
    asm.label("lookup")
    asm.mov(R2, R10)
    asm.add_imm(R2, _KEY)
    asm.call(MAP_LOOKUP_ELEM)
    asm.jump(JEQ, R0, 0, "default")
    asm.load(4, R0, R0, 0)  # the worker
    asm.exit()
    asm.label("default")
    asm.ret(default)
    return asm.assemble()

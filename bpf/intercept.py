"""DNS interception: a traffic-control ingress program that hands DNS to the controller.

Attached to an interface's clsact ingress hook (``bpf.tc``), it looks at each
packet that comes in: UDP or TCP to port 53, to any address, is given to the
controller's interception socket with ``bpf_sk_assign`` and marked, and every
other packet passes untouched. The socket is found by its address
(``Target``); the kernel then delivers the packet to it with its header as it
was, so the controller sees the address the client asked (IP_ORIGDSTADDR for
UDP, getsockname() of an accepted TCP connection) and answers from it on its
transparent socket: the client never learns it was intercepted.

The mark is needed because the stack routes the packet before it looks at
the assigned socket: a policy rule sends marked packets to a table whose
only route is ``local default``, else a router would forward them (and
ip_forward drops a packet that carries a socket).

TCP: a packet of a connection under way belongs to its own socket (or request
socket): ``bpf_skc_lookup_tcp`` on the packet's own addresses finds it, and only
a packet that has none (a SYN) goes to the listener, as the kernel's
test_sk_assign does. IPv4 with options and IPv6 with extension headers pass
untouched (a DNS client sends neither), as do fragments.

Sans-IO: bytes out, nothing loaded here.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from dataclasses import dataclass
from typing import Final

from meshsup.bpf.asm import ALU, AND, JEQ, JNE, R0, R1, R2, R3, R4, R5, R6, R7, R8, R10, Assembler, K

# enum bpf_func_id, from <linux/bpf.h>.
SK_LOOKUP_TCP: Final = 84
SK_LOOKUP_UDP: Final = 85
SK_RELEASE: Final = 86
SKC_LOOKUP_TCP: Final = 99
SK_ASSIGN: Final = 124

HDR_START_NET: Final = 1  # BPF_HDR_START_NET: offsets count from the IP header, with or without a link header
CURRENT_NETNS: Final = -1  # BPF_F_CURRENT_NETNS
TC_ACT_OK: Final = 0
TCP_LISTEN: Final = 10  # BPF_TCP_LISTEN
SKB_MARK: Final = 8  # offsetof(struct __sk_buff, mark)
SKB_PROTOCOL: Final = 16  # offsetof(struct __sk_buff, protocol): the ethertype, network order
SOCK_STATE: Final = 72  # offsetof(struct bpf_sock, state)
DNS_PORT: Final = 53

# The stack: the IP header, then the transport ports, then the lookup tuple
# (struct bpf_sock_tuple: source address, destination address, source port,
# destination port, all in network order).
_HEADER: Final = -64  # 40 bytes: an IPv6 header, or an IPv4 one without options
_PORTS: Final = -24
_TUPLE: Final = -104  # 36 bytes at most (IPv6)


@dataclass(frozen=True)
class Family:
    """Where an IP version keeps what the program reads."""

    ethertype: int
    header: int  # bytes read, the fixed header
    protocol: int  # offset of the protocol / next header byte
    source: int  # offset of the source address
    size: int  # address size


_V4: Final = Family(0x0800, 20, 9, 12, 4)
_V6: Final = Family(0x86DD, 40, 6, 8, 16)
_IPV4_PLAIN: Final = 0x45  # version 4, a 20-byte header: no options
_IPV4_FRAGMENT: Final = 0x3FFF  # MF and the fragment offset


@dataclass(frozen=True)
class Target:
    """The controller's interception sockets: one address, a UDP and a TCP port."""

    address: ipaddress.IPv4Address | ipaddress.IPv6Address
    udp_port: int
    tcp_port: int


def _ne16(value: int) -> int:
    """A 16-bit network-order value as a little-endian load reads it."""
    return int.from_bytes(struct.pack("!H", value), "little")


def _words(raw: bytes) -> list[int]:
    """Network-order bytes as the 32-bit values that store them on a little-endian stack."""
    return [int.from_bytes(raw[i : i + 4], "little") for i in range(0, len(raw), 4)]


def _family(asm: Assembler, family: Family, target: Target) -> None:
    """The program's part for one IP version: from its label on to ``assign``
    with the socket in r8, or to ``pass``."""
    tag = f"v{target.address.version}"
    tuple_size = 2 * family.size + 4
    asm.load_packet_bytes(0, family.header, _HEADER, "pass", HDR_START_NET)
    if family is _V4:
        asm.load(1, R1, R10, _HEADER)
        asm.jump32(JNE, R1, _IPV4_PLAIN, "pass")
        asm.load(2, R1, R10, _HEADER + 6)
        asm.emit(ALU | AND | K, R1, imm=_ne16(_IPV4_FRAGMENT))
        asm.jump32(JNE, R1, 0, "pass")
    asm.load(1, R7, R10, _HEADER + family.protocol)  # r7: the transport protocol, kept across calls
    asm.jump32(JEQ, R7, socket.IPPROTO_UDP, f"{tag}.ports")
    asm.jump32(JNE, R7, socket.IPPROTO_TCP, "pass")
    asm.label(f"{tag}.ports")
    asm.load_packet_bytes(family.header, 4, _PORTS, "pass", HDR_START_NET)
    asm.load(2, R1, R10, _PORTS + 2)
    asm.jump32(JNE, R1, _ne16(DNS_PORT), "pass")
    # The tuple: the packet's addresses and ports, as they are.
    for i in range(0, 2 * family.size, 4):
        asm.load(4, R1, R10, _HEADER + family.source + i)
        asm.store(4, R10, _TUPLE + i, R1)
    asm.load(4, R1, R10, _PORTS)
    asm.store(4, R10, _TUPLE + 2 * family.size, R1)
    # TCP: a connection under way keeps its own socket.
    asm.jump32(JEQ, R7, socket.IPPROTO_UDP, f"{tag}.listener")
    _lookup(asm, SKC_LOOKUP_TCP, tuple_size)
    asm.jump(JEQ, R0, 0, f"{tag}.listener")
    asm.mov(R8, R0)
    asm.load(4, R1, R8, SOCK_STATE)
    asm.jump32(JNE, R1, TCP_LISTEN, "assign")
    asm.mov(R1, R8)
    asm.call(SK_RELEASE)
    # Else the controller's socket: the destination becomes its address and port.
    asm.label(f"{tag}.listener")
    for i, word in enumerate(_words(target.address.packed)):
        asm.store_imm(4, R10, _TUPLE + family.size + 4 * i, word)
    port_slot = _TUPLE + 2 * family.size + 2
    asm.jump32(JEQ, R7, socket.IPPROTO_UDP, f"{tag}.udp")
    asm.store_imm(2, R10, port_slot, _ne16(target.tcp_port))
    _lookup(asm, SK_LOOKUP_TCP, tuple_size)
    asm.goto(f"{tag}.found")
    asm.label(f"{tag}.udp")
    asm.store_imm(2, R10, port_slot, _ne16(target.udp_port))
    _lookup(asm, SK_LOOKUP_UDP, tuple_size)
    asm.label(f"{tag}.found")
    asm.jump(JEQ, R0, 0, "pass")  # the controller is not listening: the packet goes its way
    asm.mov(R8, R0)
    asm.goto("assign")


def _lookup(asm: Assembler, helper: int, tuple_size: int) -> None:
    """r0 = helper(skb, &tuple, size, current netns, 0): a socket reference or NULL."""
    asm.mov(R1, R6)
    asm.mov(R2, R10)
    asm.add_imm(R2, _TUPLE)
    asm.mov_imm(R3, tuple_size)
    asm.mov_imm(R4, CURRENT_NETNS)
    asm.mov_imm(R5, 0)
    asm.call(helper)


def program(v4: Target | None, v6: Target | None, mark: int) -> bytes:
    """The ingress program's instructions. DNS to any destination goes to the
    sockets of ``v4`` (IPv4 packets) and ``v6`` (IPv6), marked with ``mark``;
    a version without a target, and everything else, passes untouched.
    Raises ValueError without any target (the program would do nothing)."""
    if v4 is None and v6 is None:
        raise ValueError("no target: the program would intercept nothing")
    asm = Assembler()
    asm.mov(R6, R1)  # the context, kept across helper calls
    asm.load(4, R1, R6, SKB_PROTOCOL)
    for target, family in ((v4, _V4), (v6, _V6)):
        if target is not None:
            asm.jump32(JEQ, R1, _ne16(family.ethertype), f"v{target.address.version}")
    asm.goto("pass")
    for target, family in ((v4, _V4), (v6, _V6)):
        if target is not None:
            asm.label(f"v{target.address.version}")
            _family(asm, family, target)
    # r8: the socket, a reference the program must release on every path.
    asm.label("assign")
    asm.mov(R1, R6)
    asm.mov(R2, R8)
    asm.mov_imm(R3, 0)
    asm.call(SK_ASSIGN)
    asm.mov(R7, R0)
    asm.mov(R1, R8)
    asm.call(SK_RELEASE)
    asm.jump(JNE, R7, 0, "pass")
    asm.mov_imm(R1, mark)
    asm.store(4, R6, SKB_MARK, R1)
    asm.label("pass")
    asm.ret(TC_ACT_OK)
    return asm.assemble()

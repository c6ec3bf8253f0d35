"""Which protocol an underlay datagram speaks (sans-IO): the node's one UDP port
carries WireGuard, disco and STUN, told apart by their first bytes.

WireGuard's messages start with a type 1-4 and three zero bytes; a STUN
Binding message has its method in byte 1 (never zero) and the magic cookie
at bytes 4-8; disco starts with its magic, whose first byte, 0x54, is neither.
WireGuard is asked first: it is nearly all the traffic, and a transport
message whose receiver index happens to equal STUN's cookie is still
WireGuard (its byte 1 is zero, which no Binding message's is).
"""

from __future__ import annotations

from enum import Enum

from meshsup.actors.kernel.types import Buffer
from meshsup.actors.wire import disco, stun, wireguard


class Protocol(Enum):
    WIREGUARD = "wireguard"
    DISCO = "disco"
    STUN = "stun"


def protocol(datagram: Buffer) -> Protocol | None:
    """The protocol `datagram` is for, or None for one that is none of them (to count and drop)."""
    if wireguard.classify(datagram) is not None:
        return Protocol.WIREGUARD
    if disco.looks_like_disco(datagram):
        return Protocol.DISCO
    if stun.is_stun(datagram):
        return Protocol.STUN
    return None

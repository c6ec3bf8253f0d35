"""The types every layer passes packets and addresses as."""

from __future__ import annotations

from typing import NamedTuple

Buffer = bytes | bytearray | memoryview  # a packet or datagram, sliced without copying
Endpoint = tuple[str, int]  # a UDP address: (literal IP, port)


class Burst(NamedTuple):
    """Datagrams from or to one endpoint, in order: what one GRO read, GSO send or
    bus DatagramBatch carries. A record per burst, not per datagram: building a
    NamedTuple costs a Python call (~0.2 µs), which per datagram the hot path would feel."""

    endpoint: Endpoint
    datagrams: list[bytes]


# A peer's datagrams that go through a DERP relay travel between crypto workers and magicsock as a Burst
# to (RELAYED + the peer's key in hex, 0): no IP address starts so, and which relay carries them is
# magicsock's choice. What a reader sees of a relay (status, flow records) is RELAY_HOST:its number.
RELAYED = "relay:"
RELAY_HOST = "127.3.3.40"  # Tailscale's magic DERP address


def relayed(key: bytes) -> Endpoint:
    return (RELAYED + key.hex(), 0)


def relayed_key(endpoint: Endpoint) -> bytes | None:
    """The peer key of a relayed endpoint; None for an address (or a relayed one that is not a key)."""
    host = endpoint[0]
    if not host.startswith(RELAYED):
        return None
    try:
        key = bytes.fromhex(host[len(RELAYED) :])
    except ValueError:
        return None
    return key if len(key) == 32 else None

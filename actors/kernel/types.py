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

"""The two types every layer passes packets and addresses as."""
from __future__ import annotations

Buffer = bytes | bytearray | memoryview  # a packet or datagram, sliced without copying
Endpoint = tuple[str, int]  # a UDP address: (literal IP, port)

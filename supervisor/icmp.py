"""ICMP and ICMPv6 echo, sans-IO: encode requests, parse replies, keep ping's tally.

Messages are ICMP messages without the IP header, as raw sockets send them.
Raw IPv4 sockets deliver the IP header on receive (`strip_ipv4_header`); raw
ICMPv6 sockets never do, and the kernel computes the ICMPv6 checksum
(RFC 3542 section 3.1), so IPv6 requests leave it zero.
"""

from __future__ import annotations

import ipaddress
import math
import struct
from dataclasses import dataclass, field

ECHO_REQUEST = {4: 8, 6: 128}
ECHO_REPLY = {4: 0, 6: 129}
_HEADER = struct.Struct("!BBHHH")  # type, code, checksum, identifier, sequence


def checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071)."""
    if len(data) % 2:
        data += b"\x00"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


@dataclass(frozen=True)
class Echo:
    type: int
    ident: int
    seq: int
    payload: bytes


def encode_echo(version: int, ident: int, seq: int, payload: bytes, reply: bool = False) -> bytes:
    kind = (ECHO_REPLY if reply else ECHO_REQUEST)[version]
    message = _HEADER.pack(kind, 0, 0, ident, seq & 0xFFFF) + payload
    if version == 6:
        return message
    return message[:2] + struct.pack("!H", checksum(message)) + message[4:]


def parse_echo(version: int, message: bytes) -> Echo | None:
    """An echo request or reply, or None for anything else or a broken IPv4 checksum."""
    if len(message) < _HEADER.size:
        return None
    kind, code, _, ident, seq = _HEADER.unpack_from(message)
    if code != 0 or kind not in (ECHO_REQUEST[version], ECHO_REPLY[version]):
        return None
    if version == 4 and checksum(message) != 0:
        return None
    return Echo(kind, ident, seq, message[_HEADER.size :])


def strip_ipv4_header(packet: bytes) -> bytes | None:
    """The ICMP message inside an IPv4 packet, or None if it is not one."""
    if len(packet) < 20 or packet[0] >> 4 != 4 or packet[9] != 1:
        return None
    ihl = (packet[0] & 0x0F) * 4
    return packet[ihl:] if 20 <= ihl <= len(packet) else None


@dataclass(frozen=True)
class Reply:
    seq: int
    size: int  # ICMP bytes, as ping counts them
    rtt: float  # seconds


@dataclass
class Summary:
    transmitted: int
    rtts: list[float] = field(default_factory=list)

    @property
    def received(self) -> int:
        return len(self.rtts)

    @property
    def loss(self) -> float:
        """Per cent of requests left unanswered."""
        return 100.0 * (self.transmitted - self.received) / self.transmitted if self.transmitted else 0.0

    def rtt_line(self) -> str | None:
        """ping's `min/avg/max/mdev` in milliseconds, or None with no replies."""
        if not self.rtts:
            return None
        ms = [r * 1000 for r in self.rtts]
        avg = sum(ms) / len(ms)
        mdev = math.sqrt(sum((m - avg) ** 2 for m in ms) / len(ms))
        return f"rtt min/avg/max/mdev = {min(ms):.3f}/{avg:.3f}/{max(ms):.3f}/{mdev:.3f} ms"


class EchoSession:
    """One ping run to one target: requests out, matching replies in, the tally kept.

    A reply counts only from the target, with our identifier, for a request
    still outstanding and with the payload we sent; anything else is ignored,
    as a raw socket sees every ICMP message of its namespace.
    """

    def __init__(self, target: str, ident: int, payload: bytes) -> None:
        self.target = ipaddress.ip_address(target)
        self.version = self.target.version
        self.ident = ident & 0xFFFF
        self.payload = payload
        self.sent: dict[int, float] = {}
        self.summary = Summary(0)

    def request(self, now: float) -> bytes:
        seq = self.summary.transmitted + 1
        self.summary.transmitted = seq
        self.sent[seq & 0xFFFF] = now
        return encode_echo(self.version, self.ident, seq, self.payload)

    def receive(self, source: str, packet: bytes, now: float) -> Reply | None:
        """The reply this packet (as the raw socket gave it) answers, if any."""
        try:
            if ipaddress.ip_address(source.split("%")[0]) != self.target:
                return None
        except ValueError:
            return None
        message = strip_ipv4_header(packet) if self.version == 4 else packet
        if message is None:
            return None
        echo = parse_echo(self.version, message)
        if (
            echo is None
            or echo.type != ECHO_REPLY[self.version]
            or echo.ident != self.ident
            or echo.payload != self.payload
            or echo.seq not in self.sent
        ):
            return None
        rtt = now - self.sent.pop(echo.seq)
        self.summary.rtts.append(rtt)
        return Reply(echo.seq, len(message), rtt)

    @property
    def outstanding(self) -> int:
        return len(self.sent)

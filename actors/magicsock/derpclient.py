"""A DERP client connection, sans-IO, in the shape of aioquic's: bytes from the relay
in (`receive_data`), bytes for it out (`data_to_send`), one timer (`get_timer`,
`handle_timer`), what happened in `packets` and `events`.

It speaks as Tailscale's derphttp client: `GET /derp` with `Upgrade: DERP`,
then on the server's key a ClientInfo sealed to it (proof that we hold our
key), and it is up once the ServerInfo sealed to us opens. Up, it sends a Ping
every ping_interval (the latency that elects the home relay, and the
keepalive: the connection never idles out of a NAT), answers the server's
Pings, and tells the relay whether it is our home (NotePreferred).

What the relay sends that breaks the protocol (a bad HTTP answer, a frame
longer or shorter than its type allows, a box that does not open) closes the
connection with that reason; a login that does not finish in login_timeout,
or a Ping not answered in ping_timeout (a relay that stalls), closes it too.
Frames a client has no use for are counted and skipped, as Tailscale's are.
"""

from __future__ import annotations

import os
import struct
from collections import Counter
from dataclasses import dataclass
from enum import Enum
from typing import Any

from meshsup.actors.kernel.types import Buffer
from meshsup.actors.wire import derp
from meshsup.actors.wire.derp import KEY_LEN, FrameError, FrameReader, FrameType

_SEND_HEADER = struct.Struct(">BI").pack  # derp.header, without a call per packet


@dataclass(frozen=True)
class Timing:
    login_timeout: float = 10.0  # Tailscale's server allows a login 10 s too
    ping_interval: float = 15.0
    ping_timeout: float = 5.0


class Phase(Enum):
    HTTP = "http"  # the upgrade request sent, its answer awaited
    LOGIN = "login"  # upgraded: the server's key, then its info, awaited
    UP = "up"
    CLOSED = "closed"


@dataclass(frozen=True)
class PeerGone:
    """The relay says `key` left it, or was never there (derp.PeerGoneReason)."""

    key: bytes
    reason: int


@dataclass(frozen=True)
class Restarting:
    """The relay is restarting: come back in `reconnect_in` seconds, and keep trying for `try_for`."""

    reconnect_in: float
    try_for: float


@dataclass(frozen=True)
class Health:
    problem: str  # "" when healthy again


Event = PeerGone | Restarting | Health


class DerpClient:
    def __init__(
        self,
        private: bytes,
        public: bytes,
        host: str,
        now: float,
        timing: Timing = Timing(),
        counters: Counter[str] | None = None,
    ) -> None:
        """`host` as the request's Host header has it (HOST:PORT); `counters` to count into (kept across
        connections by their owner)."""
        self.private, self.public, self.timing = private, public, timing
        self.phase = Phase.HTTP
        self.close_reason = ""  # why it closed: "" for a clean end, else a label to count
        self.server_key = b""
        self.server_info: dict[str, Any] = {}
        self.rtt: float | None = None  # seconds, the last Ping's round trip
        # RecvPacket payloads by source key, in order, until the owner takes them (one batch per source).
        self.packets: dict[bytes, list[Buffer]] = {}
        self.events: list[Event] = []
        self.counters: Counter[str] = Counter() if counters is None else counters
        self._out: list[bytes] = [derp.upgrade_request(host)]
        self._head = bytearray()
        self._reader = FrameReader()
        self._deadline = now + timing.login_timeout  # the login's, then the Ping's in flight
        self._next_ping = float("inf")
        self._ping: bytes | None = None  # the Ping in flight
        self._ping_sent = 0.0

    @property
    def up(self) -> bool:
        return self.phase is Phase.UP

    @property
    def closed(self) -> bool:
        return self.phase is Phase.CLOSED

    # --- bytes in -----------------------------------------------------------------
    def receive_data(self, data: Buffer, now: float) -> None:
        if self.closed:
            return
        try:
            if self.phase is Phase.HTTP:
                self._head += data
                split = derp.split_head(self._head)
                if split is None:
                    return
                head, size = split
                version, status, _ = head.first
                if not version.startswith("HTTP/") or status != "101":
                    raise FrameError(f"http_{status[:3] if status.isdigit() else 'bad'}", f"{status} from the relay")
                data, self._head = bytes(self._head[size:]), bytearray()
                self.phase = Phase.LOGIN
            self._reader.feed(data)
            while not self.closed and (frame := self._reader.next()) is not None:
                self._frame(frame[0], frame[1], now)
        except FrameError as err:
            self.close(err.reason)

    def _frame(self, ftype: int, payload: bytes, now: float) -> None:
        if ftype == FrameType.RECV_PACKET and self.phase is Phase.UP:
            view = memoryview(payload)
            src = payload[:KEY_LEN]
            packets = self.packets.get(src)
            if packets is None:
                packets = self.packets[src] = []
            packets.append(view[KEY_LEN:])
            self.counters["rx_packets"] += 1
            self.counters["rx_bytes"] += len(payload) - KEY_LEN
        elif self.phase is Phase.LOGIN:
            self._login(ftype, payload, now)
        elif ftype == FrameType.PING:
            self._out.append(derp.pong(payload[: derp.PING_LEN]))
        elif ftype == FrameType.PONG:
            if self._ping is not None and payload[: derp.PING_LEN] == self._ping:
                self.rtt = now - self._ping_sent
                self._ping, self._deadline = None, float("inf")
        elif ftype == FrameType.PEER_GONE:
            key, reason = derp.parse_peer_gone(payload)
            self.events.append(PeerGone(key, int(reason)))
        elif ftype == FrameType.HEALTH:
            self.events.append(Health(payload.decode(errors="replace")))
        elif ftype == FrameType.RESTARTING:
            reconnect_in, try_for = derp.parse_restarting(payload)
            self.events.append(Restarting(reconnect_in / 1000, try_for / 1000))
        elif ftype not in (FrameType.KEEP_ALIVE, FrameType.PEER_PRESENT):
            self.counters[f"unexpected_{derp.type_name(ftype)}"] += 1

    def _login(self, ftype: int, payload: bytes, now: float) -> None:
        if ftype == FrameType.SERVER_KEY and not self.server_key:
            self.server_key = derp.parse_server_key(payload)
            info = derp.client_info_json()
            self._out.append(derp.client_info(self.private, self.public, self.server_key, info))
        elif ftype == FrameType.SERVER_INFO and self.server_key:
            self.server_info = derp.open_server_info(self.private, self.server_key, payload)
            self.phase = Phase.UP
            self._deadline = float("inf")
            self._next_ping = now  # the first latency at once
        elif ftype != FrameType.KEEP_ALIVE:
            raise FrameError(f"login_{derp.type_name(ftype)}", "not part of a login")

    # --- bytes out ------------------------------------------------------------------
    def send_packets(self, dst: bytes, packets: list[bytes]) -> int:
        """Queue a SendPacket for each packet, as one run of frames (written whole or dropped whole);
        how many were refused: all when not up, else those over DERP's limit."""
        if not self.up:
            return len(packets)
        parts: list[Buffer] = []
        refused = 0
        for packet in packets:
            n = len(packet)
            if n > derp.MAX_PACKET_SIZE:
                refused += 1
                continue
            parts += (_SEND_HEADER(FrameType.SEND_PACKET, KEY_LEN + n), dst, packet)
        if parts:
            self._out.append(b"".join(parts))
        return refused

    def note_preferred(self, preferred: bool) -> None:
        if self.up:
            self._out.append(derp.note_preferred(preferred))

    def data_to_send(self) -> list[bytes]:
        """Whole frames (the upgrade request first), to write in order; each given once."""
        out, self._out = self._out, []
        return out

    def take_packets(self) -> dict[bytes, list[Buffer]]:
        packets, self.packets = self.packets, {}
        return packets

    def take_events(self) -> list[Event]:
        events, self.events = self.events, []
        return events

    # --- time -----------------------------------------------------------------------
    def get_timer(self) -> float | None:
        if self.closed:
            return None
        return min(self._deadline, self._next_ping)

    def handle_timer(self, now: float) -> None:
        if self.closed:
            return
        if now >= self._deadline:
            self.close("login_timeout" if not self.up else "ping_timeout")
        elif now >= self._next_ping:
            self._ping, self._ping_sent = os.urandom(derp.PING_LEN), now
            self._out.append(derp.ping(self._ping))
            self._deadline = now + self.timing.ping_timeout
            self._next_ping = now + self.timing.ping_interval

    def close(self, reason: str = "") -> None:
        if not self.closed:
            self.phase = Phase.CLOSED
            self.close_reason = reason
            self._out.clear()

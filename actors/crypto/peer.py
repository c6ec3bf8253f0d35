"""Per-peer state of the WireGuard device: configuration, handshake, keys, timers, queue."""

from __future__ import annotations

import base64
import ipaddress
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from meshsup.actors.kernel.types import Endpoint, relayed

from .cookie import CookieGenerator
from .discopath import DiscoPath
from .handshake import Handshake, HandshakeState
from .keypair import Keypair, Keypairs
from .noise import StaticKey
from .timers import PeerTimers, Timing

# wireguard-go stages at most this many packets per peer while it has no session.
STAGED_PACKETS_LIMIT = 1024
DIRECT, RELAY = "direct", "relay"

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class PeerConfig:
    public_key: bytes
    preshared_key: bytes | None = None
    allowed_ips: Sequence[Network] = ()
    endpoint: Endpoint | None = None
    persistent_keepalive: int | None = None


class Peer:
    __slots__ = (
        "public_key",
        "handshake",
        "keypairs",
        "cookies",
        "timers",
        "staged",
        "endpoint",
        "rx_bytes",
        "tx_bytes",
        "last_handshake",
        "relay_endpoint",
        "direct_seen",
        "next_probe",
        "path",
        "disco",
    )

    def __init__(self, config: PeerConfig, local: StaticKey, timing: Timing, jitter: Callable[[], float]) -> None:
        self.public_key = config.public_key
        self.handshake = Handshake(local, config.public_key, config.preshared_key)
        self.keypairs = Keypairs()
        self.cookies = CookieGenerator(config.public_key, timing.cookie_refresh_time)
        self.timers = PeerTimers(timing, jitter)
        self.staged: deque[bytes] = deque()
        self.endpoint: Endpoint | None = config.endpoint
        self.rx_bytes = 0
        self.tx_bytes = 0
        self.last_handshake = 0.0  # wall-clock time of the last completed handshake, for status; 0 = never
        self.relay_endpoint = relayed(config.public_key)  # where datagrams go to be relayed
        self.direct_seen = float("-inf")  # when an authenticated datagram last came from the endpoint
        self.next_probe = float("-inf")  # when a relayed peer's endpoint may be tried again
        self.path: str | None = None  # how the last datagram went: DIRECT or RELAY; None before any
        # Set by magicsock's first PathSet: from then on only PathSet moves the endpoint (no roaming).
        self.disco: DiscoPath | None = None

    def sendable_keypair(self, now: float) -> Keypair | None:
        """The current keypair if it may still seal packets."""
        kp = self.keypairs.current
        timing = self.timers.timing
        if (
            kp is None
            or kp.send_counter >= timing.reject_after_messages
            or now - kp.created >= timing.reject_after_time
        ):
            return None
        return kp

    def stage(self, packet: bytes) -> bool:
        """Queue a packet until a session exists; False when the oldest had to be dropped."""
        full = len(self.staged) >= STAGED_PACKETS_LIMIT
        if full:
            self.staged.popleft()
        self.staged.append(packet)
        return not full

    def idle(self) -> bool:
        """Nothing to do and nothing held: no keys, no handshake, no packets waiting, no timer,
        no keepalive and no disco path (magicsock's)."""
        kps, timers = self.keypairs, self.timers
        return (
            kps.current is None
            and kps.previous is None
            and kps.next is None
            and self.handshake.state == HandshakeState.ZEROED
            and not self.staged
            and self.disco is None
            and timers.persistent_keepalive_interval == 0
            and all(d is None for d in timers.deadlines.values())
        )

    def status(self, now: float, relaying: bool) -> dict[str, object]:
        endpoint, disco = self.endpoint, self.disco
        if disco is not None and relaying and not disco.usable(endpoint, now):
            endpoint = None  # no direct path in use: the relay carries it
        return {
            "public_key": base64.b64encode(self.public_key).decode(),
            "endpoint": None if endpoint is None else _format_endpoint(endpoint),
            "rx_bytes": self.rx_bytes,
            "tx_bytes": self.tx_bytes,
            "last_handshake": int(self.last_handshake),
            "persistent_keepalive": self.timers.persistent_keepalive_interval,
            "path": self.path,
            "staged": len(self.staged),  # packets waiting for a session (the node's health watches them)
            "demoted": None if disco is None else disco.demotion(now),
        }


def _format_endpoint(endpoint: Endpoint) -> str:
    host, port = endpoint[0], endpoint[1]
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


@dataclass(frozen=True, slots=True)
class Trimmed:
    """What stays of an idle peer's state (Device._trim_idle): its figures for status, the endpoint
    it roamed to, and the newest initiation timestamp taken from it, so that an initiation
    replayed from before is still refused when its state is made again."""

    rx_bytes: int
    tx_bytes: int
    last_handshake: float
    endpoint: Endpoint | None
    last_timestamp: bytes
    last_initiation_consumption: float

    @classmethod
    def of(cls, peer: Peer) -> Trimmed:
        hs = peer.handshake
        return cls(
            peer.rx_bytes,
            peer.tx_bytes,
            peer.last_handshake,
            peer.endpoint,
            hs.last_timestamp,
            hs.last_initiation_consumption,
        )

    def restore(self, peer: Peer) -> None:
        peer.rx_bytes, peer.tx_bytes, peer.last_handshake = self.rx_bytes, self.tx_bytes, self.last_handshake
        peer.endpoint = self.endpoint if self.endpoint is not None else peer.endpoint
        peer.handshake.last_timestamp = self.last_timestamp
        peer.handshake.last_initiation_consumption = self.last_initiation_consumption

    def status(self, public_key: bytes) -> dict[str, object]:
        """As Peer.status says of a peer with nothing under way."""
        return {
            "public_key": base64.b64encode(public_key).decode(),
            "endpoint": None if self.endpoint is None else _format_endpoint(self.endpoint),
            "rx_bytes": self.rx_bytes,
            "tx_bytes": self.tx_bytes,
            "last_handshake": int(self.last_handshake),
            "persistent_keepalive": 0,
            "path": None,
            "staged": 0,
            "demoted": None,
        }

"""Disco, Tailscale's path discovery messages, on the wire (sans-IO).

Byte-compatible with Tailscale's `disco` package: the layouts below are its
facts; the code is ours. A disco packet is

    magic "TS💬" (6 bytes) | sender's disco public key (32) | nonce (24) | NaCl box

and the box, sealed from the sender's disco key to the receiver's, holds
a type byte, a version byte (0) and the message:

    Ping         TxID (12) | sender's WireGuard public key (32, absent from old senders) | zero padding
    Pong         TxID (12) | the source address the ping came from: IP (16, IPv4-mapped for v4) | port (2)
    CallMeMaybe  the sender's endpoints, 18 bytes each as in Pong (sent through a relay only)

Receivers ignore bytes beyond what they know, so later versions can add
fields. What cannot be used is refused with DiscoError, whose `reason` is a
short label to count it by: nothing here raises anything else on input from
the network.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Final

from nacl.exceptions import CryptoError
from nacl.public import Box, PrivateKey, PublicKey

from meshsup.actors.kernel.types import Buffer, Endpoint
from meshsup.actors.wire.errors import WireError
from meshsup.actors.wire.ip import packed16, unpacked16

MAGIC: Final = "TS💬".encode()  # 54 53 f0 9f 92 ac
KEY_LEN: Final = 32
NONCE_LEN: Final = 24
BOX_OVERHEAD: Final = 16  # Poly1305 tag
HEADER_LEN: Final = len(MAGIC) + KEY_LEN  # enough to tell whose it claims to be
MIN_LEN: Final = HEADER_LEN + NONCE_LEN + BOX_OVERHEAD  # an empty box
TXID_LEN: Final = 12
ENDPOINT_LEN: Final = 18
PONG_LEN: Final = TXID_LEN + ENDPOINT_LEN
VERSION: Final = 0


class MessageType(IntEnum):
    PING = 0x01
    PONG = 0x02
    CALL_ME_MAYBE = 0x03
    # Tailscale's 0x04-0x09 (its UDP relay servers' handshake) are not spoken here.


class DiscoError(WireError):
    """A datagram or payload that is not a usable disco message."""


@dataclass(frozen=True)
class Ping:
    txid: bytes
    node_key: bytes | None = None  # the sender's WireGuard key, as it claims: trust it only with other evidence
    padding: int = 0  # zero bytes at the end, to probe the path MTU


@dataclass(frozen=True)
class Pong:
    txid: bytes
    source: Endpoint  # where the ping came from, as the ponging node saw it


@dataclass(frozen=True)
class CallMeMaybe:
    endpoints: tuple[Endpoint, ...] = ()


Message = Ping | Pong | CallMeMaybe


# --- the message inside the box ------------------------------------------------


def _endpoint(host: str, port: int) -> bytes:
    return packed16(host) + port.to_bytes(2, "big")


def _parse_endpoint(raw: Buffer) -> Endpoint:
    return unpacked16(raw), int.from_bytes(raw[16:18], "big")


def marshal(message: Message) -> bytes:
    """The payload to seal: type, version and the message, as Tailscale's AppendMarshal writes it."""
    if isinstance(message, Ping):
        body = message.txid + (message.node_key or b"") + bytes(message.padding)
        return bytes([MessageType.PING, VERSION]) + body
    if isinstance(message, Pong):
        return bytes([MessageType.PONG, VERSION]) + message.txid + _endpoint(*message.source)
    return bytes([MessageType.CALL_ME_MAYBE, VERSION]) + b"".join(_endpoint(*e) for e in message.endpoints)


def parse(payload: Buffer) -> Message:
    """The message in an opened box. DiscoError "truncated" for a body too short for
    its type, "unknown_type" for a type not spoken here."""
    if len(payload) < 2:
        raise DiscoError("truncated", f"{len(payload)} bytes, not even a type and version")
    mtype, version, body = payload[0], payload[1], payload[2:]
    if mtype == MessageType.PING:
        if len(body) < TXID_LEN:
            raise DiscoError("truncated", f"a ping of {len(body)} bytes")
        # As Tailscale's parsePing: 32 bytes after the TxID are the node key,
        # all-zero meaning none; whatever follows is padding.
        rest = body[TXID_LEN:]
        key = bytes(rest[:KEY_LEN]) if len(rest) >= KEY_LEN else None
        padding = len(rest) - (KEY_LEN if key is not None else 0)
        return Ping(bytes(body[:TXID_LEN]), key if key and any(key) else None, padding)
    if mtype == MessageType.PONG:
        if len(body) < PONG_LEN:
            raise DiscoError("truncated", f"a pong of {len(body)} bytes")
        return Pong(bytes(body[:TXID_LEN]), _parse_endpoint(body[TXID_LEN:PONG_LEN]))
    if mtype == MessageType.CALL_ME_MAYBE:
        # As Tailscale's parseCallMeMaybe: a layout it does not know (another
        # version, or a length that is not whole endpoints) names no endpoints.
        if version != VERSION or len(body) % ENDPOINT_LEN:
            return CallMeMaybe()
        starts = range(0, len(body), ENDPOINT_LEN)
        return CallMeMaybe(tuple(_parse_endpoint(body[i : i + ENDPOINT_LEN]) for i in starts))
    raise DiscoError("unknown_type", f"type {mtype:#04x}")


# --- the packet around it --------------------------------------------------------


def looks_like_disco(datagram: Buffer) -> bool:
    """The datagram starts with the disco magic. WireGuard's messages start with
    a type 1-4 and STUN's with a byte below 0x40; the magic's first byte is 0x54,
    so any datagram that starts with it is disco's to count, even one too short."""
    return bytes(datagram[: len(MAGIC)]) == MAGIC


def sender(datagram: Buffer) -> bytes:
    """The disco key the datagram claims to come from, to look up the peer (and its
    SharedKey) by; DiscoError "short" or "bad_magic" if it is no disco packet."""
    if len(datagram) < MIN_LEN:
        raise DiscoError("short", f"{len(datagram)} bytes, a sealed disco message has at least {MIN_LEN}")
    if not looks_like_disco(datagram):
        raise DiscoError("bad_magic")
    return bytes(datagram[len(MAGIC) : HEADER_LEN])


class SharedKey:
    """Our disco private key with one peer's disco public key: seals messages to
    the peer and opens the peer's. Built once per peer key (the Curve25519 step
    is done here, not per message), as Tailscale keeps its discoInfo.sharedKey."""

    def __init__(self, private: bytes, peer: bytes) -> None:
        """DiscoError "bad_key" if `peer` is no usable Curve25519 key (wrong length, or a
        low-order point that would make every box open to anyone)."""
        if len(peer) != KEY_LEN:
            raise DiscoError("bad_key", f"a disco key of {len(peer)} bytes")
        ours = PrivateKey(private)
        try:
            self._box = Box(ours, PublicKey(peer))
        except CryptoError:
            raise DiscoError("bad_key", "no shared key with it") from None
        self.public = ours.public_key.encode()
        self.peer = peer

    def seal(self, message: Message) -> bytes:
        """A whole disco packet carrying `message`, under a fresh random nonce."""
        return MAGIC + self.public + bytes(self._box.encrypt(marshal(message)))

    def open(self, datagram: Buffer) -> Message:
        """The message in a packet from the peer. DiscoError "short", "bad_magic",
        "wrong_sender" (it names another key), "bad_box" (not sealed by the peer to
        us, or altered), "unknown_type" or "truncated"."""
        if sender(datagram) != self.peer:
            raise DiscoError("wrong_sender", "the packet names another disco key")
        try:
            payload = self._box.decrypt(bytes(datagram[HEADER_LEN:]))
        except CryptoError:
            raise DiscoError("bad_box", "the box does not open with the sender's key") from None
        return parse(payload)

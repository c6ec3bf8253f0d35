"""Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s as WireGuard uses it (paper section 5.4).

Mirrors wireguard-go's noise-protocol.go step for step: the initiator sends a
type-1 message (ephemeral, encrypted static key, encrypted TAI64N), the
responder answers with a type-2 message (ephemeral, encrypted empty payload
mixed with the preshared key), and both derive the transport keys from the
final chaining key. Index allocation and MACs are the device's business.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from enum import IntEnum
from typing import NamedTuple

from . import messages
from .noise import KEY_SIZE, StaticKey, aead_decrypt, aead_encrypt, hash_, kdf1, kdf2, kdf3
from .tai64n import TAI64N_SIZE, is_after

CONSTRUCTION = b"Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s"
IDENTIFIER = b"WireGuard v1 zx2c4 Jason@zx2c4.com"
INITIAL_CHAIN_KEY = hash_(CONSTRUCTION)
INITIAL_HASH = hash_(INITIAL_CHAIN_KEY, IDENTIFIER)
NO_PRESHARED_KEY = bytes(KEY_SIZE)  # "no PSK" is an all-zero PSK in Noise_IKpsk2


class HandshakeState(IntEnum):
    ZEROED = 0
    INITIATION_CREATED = 1
    INITIATION_CONSUMED = 2
    RESPONSE_CREATED = 3
    RESPONSE_CONSUMED = 4


class Handshake:
    """One peer's handshake state; timestamps survive ``clear`` to keep replay protection."""

    __slots__ = (
        "remote_static",
        "preshared_key",
        "precomputed_static_static",
        "state",
        "hash",
        "chain_key",
        "local_ephemeral",
        "remote_ephemeral",
        "local_index",
        "remote_index",
        "last_timestamp",
        "last_initiation_consumption",
        "last_sent_handshake",
    )

    def __init__(self, local: StaticKey, remote_static: bytes, preshared_key: bytes | None) -> None:
        self.remote_static = remote_static
        self.preshared_key = preshared_key or NO_PRESHARED_KEY
        # None when the peer's key is a low-order point: no handshake is possible.
        self.precomputed_static_static = local.dh(remote_static)
        self.last_timestamp = bytes(TAI64N_SIZE)
        self.last_initiation_consumption = -math.inf
        self.last_sent_handshake = -math.inf
        self.clear()

    def clear(self) -> None:
        """Back to ZEROED (wireguard-go's name): the secrets are dropped, not overwritten (see keypair)."""
        self.state = HandshakeState.ZEROED
        self.hash = b""
        self.chain_key = b""
        self.local_ephemeral: StaticKey | None = None
        self.remote_ephemeral = b""
        self.local_index: int | None = None
        self.remote_index = 0


class OpenedInitiation(NamedTuple):
    """An initiation whose mac1 and encrypted static key checked out; not yet its timestamp."""

    initiator_static: bytes
    hash: bytes
    chain_key: bytes
    message: messages.Initiation


def _initiation_keys(responder_static: bytes, ephemeral: bytes, es: bytes) -> tuple[bytes, bytes, bytes]:
    """Hash, chaining key and the key sealing the initiator's static key, from the initiator's
    ephemeral and its DH with the responder's static (``es``): what both ends derive alike."""
    h = hash_(hash_(INITIAL_HASH, responder_static), ephemeral)
    chain_key, key = kdf2(kdf1(INITIAL_CHAIN_KEY, ephemeral), es)
    return h, chain_key, key


def _response_keys(hs: Handshake, ephemeral: bytes, ee: bytes, se: bytes) -> tuple[bytes, bytes, bytes]:
    """Hash, chaining key and the key sealing the empty payload, from the responder's ephemeral, the
    ephemeral DH (``ee``), the responder's ephemeral with the initiator's static (``se``) and the
    preshared key, on top of the initiation's hash and chaining key: what both ends derive alike."""
    chain_key = kdf1(kdf1(kdf1(hs.chain_key, ephemeral), ee), se)
    chain_key, tau, key = kdf3(chain_key, hs.preshared_key)
    return hash_(hash_(hs.hash, ephemeral), tau), chain_key, key


def create_initiation(
    local: StaticKey, hs: Handshake, sender_index: int, timestamp: bytes, rng: Callable[[int], bytes]
) -> bytes | None:
    """Type-1 message with zero MACs carrying ``timestamp`` (TAI64N), or None if the peer's key is unusable."""
    if hs.precomputed_static_static is None:
        return None
    ephemeral = StaticKey.generate(rng)
    es = ephemeral.dh(hs.remote_static)
    if es is None:
        return None
    h, chain_key, key = _initiation_keys(hs.remote_static, ephemeral.public, es)
    static = aead_encrypt(key, 0, local.public, h)
    h = hash_(h, static)
    chain_key, key = kdf2(chain_key, hs.precomputed_static_static)
    sealed_timestamp = aead_encrypt(key, 0, timestamp, h)
    h = hash_(h, sealed_timestamp)

    hs.state = HandshakeState.INITIATION_CREATED
    hs.hash, hs.chain_key, hs.local_ephemeral, hs.local_index = h, chain_key, ephemeral, sender_index
    return messages.pack_initiation(sender_index, ephemeral.public, static, sealed_timestamp)


def open_initiation(local: StaticKey, data: bytes) -> OpenedInitiation | None:
    """Decrypt the initiator's static key (one DH); does not touch any state."""
    msg = messages.parse_initiation(data)
    if msg is None:
        return None
    es = local.dh(msg.ephemeral)
    if es is None:
        return None
    h, chain_key, key = _initiation_keys(local.public, msg.ephemeral, es)
    initiator_static = aead_decrypt(key, 0, msg.static, h)
    if initiator_static is None:
        return None
    return OpenedInitiation(initiator_static, hash_(h, msg.static), chain_key, msg)


def consume_initiation(opened: OpenedInitiation, hs: Handshake, now: float, min_interval: float) -> str | None:
    """Authenticate the timestamp and take the initiation into ``hs``; an error reason or None.
    ``now`` is monotonic: a wall clock stepped back would refuse every initiation as too soon."""
    if hs.precomputed_static_static is None:
        return "bad_initiation"
    msg = opened.message
    chain_key, key = kdf2(opened.chain_key, hs.precomputed_static_static)
    timestamp = aead_decrypt(key, 0, msg.timestamp, opened.hash)
    if timestamp is None:
        return "bad_initiation"
    # Replay: an initiation is accepted once, and only if newer than every one before.
    if not is_after(timestamp, hs.last_timestamp):
        return "handshake_replay"
    if now - hs.last_initiation_consumption <= min_interval:
        return "rate_limited"
    hs.state = HandshakeState.INITIATION_CONSUMED
    hs.hash = hash_(opened.hash, msg.timestamp)
    hs.chain_key = chain_key
    hs.remote_index = msg.sender
    hs.remote_ephemeral = msg.ephemeral
    hs.last_timestamp = timestamp
    hs.last_initiation_consumption = max(hs.last_initiation_consumption, now)
    return None


def create_response(hs: Handshake, sender_index: int, rng: Callable[[int], bytes]) -> bytes | None:
    """Type-2 message with zero MACs answering the consumed initiation."""
    if hs.state != HandshakeState.INITIATION_CONSUMED:
        return None
    ephemeral = StaticKey.generate(rng)
    ee = ephemeral.dh(hs.remote_ephemeral)
    se = ephemeral.dh(hs.remote_static)
    if ee is None or se is None:
        return None
    h, chain_key, key = _response_keys(hs, ephemeral.public, ee, se)
    empty = aead_encrypt(key, 0, b"", h)
    h = hash_(h, empty)

    hs.state = HandshakeState.RESPONSE_CREATED
    hs.hash, hs.chain_key, hs.local_ephemeral, hs.local_index = h, chain_key, ephemeral, sender_index
    return messages.pack_response(sender_index, hs.remote_index, ephemeral.public, empty)


def consume_response(local: StaticKey, hs: Handshake, msg: messages.Response) -> bool:
    """Complete our initiation with the peer's response; False (state untouched) if it fails."""
    if hs.state != HandshakeState.INITIATION_CREATED or hs.local_ephemeral is None:
        return False
    ee = hs.local_ephemeral.dh(msg.ephemeral)
    se = local.dh(msg.ephemeral)
    if ee is None or se is None:
        return False
    h, chain_key, key = _response_keys(hs, msg.ephemeral, ee, se)
    if aead_decrypt(key, 0, msg.empty, h) is None:
        return False
    hs.state = HandshakeState.RESPONSE_CONSUMED
    hs.hash = hash_(h, msg.empty)
    hs.chain_key = chain_key
    hs.remote_index = msg.sender
    hs.remote_ephemeral = msg.ephemeral
    return True


class SessionKeys(NamedTuple):
    send: bytes
    receive: bytes
    is_initiator: bool
    local_index: int
    remote_index: int


def derive_session(hs: Handshake) -> SessionKeys | None:
    """Transport keys from a finished handshake, which then drops its ephemeral secrets and chaining key
    (forward secrecy as far as Python allows: references dropped, memory not overwritten)."""
    if hs.state == HandshakeState.RESPONSE_CONSUMED:
        send, receive = kdf2(hs.chain_key, b"")
        is_initiator = True
    elif hs.state == HandshakeState.RESPONSE_CREATED:
        receive, send = kdf2(hs.chain_key, b"")
        is_initiator = False
    else:
        return None
    assert hs.local_index is not None
    keys = SessionKeys(send, receive, is_initiator, hs.local_index, hs.remote_index)
    hs.clear()
    return keys

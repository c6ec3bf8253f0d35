"""Cryptographic primitives of WireGuard's Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s.

Names follow the WireGuard paper (section 5.4): HASH, MAC, HMAC, KDF_n, AEAD,
XAEAD, DH. Every function is pure; failures are reported as ``None``.
"""

from __future__ import annotations

import hashlib
import hmac
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

KEY_SIZE = 32


def hash_(*parts: bytes) -> bytes:
    """HASH: BLAKE2s-256 over the concatenation of ``parts``."""
    h = hashlib.blake2s()
    for part in parts:
        h.update(part)
    return h.digest()


def mac(key: bytes, data: bytes) -> bytes:
    """MAC: keyed BLAKE2s with a 128-bit output (used for mac1, mac2 and cookies)."""
    return hashlib.blake2s(data, key=key, digest_size=16).digest()


def hmac_(key: bytes, data: bytes) -> bytes:
    """HMAC-BLAKE2s-256 (RFC 2104 over BLAKE2s, block size 64)."""
    return hmac.new(key, data, hashlib.blake2s).digest()


def kdf1(key: bytes, data: bytes) -> bytes:
    return hmac_(hmac_(key, data), b"\x01")


def kdf2(key: bytes, data: bytes) -> tuple[bytes, bytes]:
    prk = hmac_(key, data)
    t1 = hmac_(prk, b"\x01")
    return t1, hmac_(prk, t1 + b"\x02")


def kdf3(key: bytes, data: bytes) -> tuple[bytes, bytes, bytes]:
    prk = hmac_(key, data)
    t1 = hmac_(prk, b"\x01")
    t2 = hmac_(prk, t1 + b"\x02")
    return t1, t2, hmac_(prk, t2 + b"\x03")


def counter_nonce(counter: int) -> bytes:
    """The 96-bit AEAD nonce of WireGuard: 32 zero bits then the 64-bit little-endian counter."""
    return _NONCE.pack(counter)


_NONCE = struct.Struct("<4xQ")


def aead_encrypt(key: bytes, counter: int, plaintext: bytes, aad: bytes) -> bytes:
    return ChaCha20Poly1305(key).encrypt(counter_nonce(counter), plaintext, aad)


def aead_decrypt(key: bytes, counter: int, ciphertext: bytes, aad: bytes) -> bytes | None:
    try:
        return ChaCha20Poly1305(key).decrypt(counter_nonce(counter), ciphertext, aad)
    except InvalidTag:
        return None


# --- XChaCha20-Poly1305 (draft-irtf-cfrg-xchacha), used only for cookie replies.

_SIGMA = struct.unpack("<4I", b"expand 32-byte k")
_M32 = 0xFFFFFFFF
_ZERO_BLOCK = bytes(64)
_WORDS = struct.Struct("<16I")


def hchacha20(key: bytes, nonce16: bytes) -> bytes:
    """HChaCha20: 20 ChaCha rounds without the final addition; rows 0 and 3 are the subkey.

    One ChaCha20 block with ``nonce16`` as its counter and nonce is exactly those
    rounds plus the input state, so subtracting the known input words (the
    constants and the nonce) leaves HChaCha20 at C speed.
    """
    block = Cipher(algorithms.ChaCha20(key, nonce16), mode=None).encryptor().update(_ZERO_BLOCK)
    words = _WORDS.unpack(block)
    inputs = (*_SIGMA, *struct.unpack("<4I", nonce16))
    rows = (*words[0:4], *words[12:16])
    return struct.pack("<8I", *((w - i) & _M32 for w, i in zip(rows, inputs)))


def _xchacha_split(key: bytes, nonce24: bytes) -> tuple[ChaCha20Poly1305, bytes]:
    return ChaCha20Poly1305(hchacha20(key, nonce24[:16])), bytes(4) + nonce24[16:24]


def xaead_encrypt(key: bytes, nonce24: bytes, plaintext: bytes, aad: bytes) -> bytes:
    cipher, nonce = _xchacha_split(key, nonce24)
    return cipher.encrypt(nonce, plaintext, aad)


def xaead_decrypt(key: bytes, nonce24: bytes, ciphertext: bytes, aad: bytes) -> bytes | None:
    cipher, nonce = _xchacha_split(key, nonce24)
    try:
        return cipher.decrypt(nonce, ciphertext, aad)
    except InvalidTag:
        return None


# --- X25519


class StaticKey:
    """A Curve25519 key pair (the device's static identity or an ephemeral)."""

    __slots__ = ("private", "public", "_key")

    def __init__(self, private: bytes) -> None:
        self._key = X25519PrivateKey.from_private_bytes(private)
        self.private = private
        self.public = self._key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    @classmethod
    def generate(cls, rng) -> StaticKey:
        return cls(rng(32))

    def dh(self, public: bytes) -> bytes | None:
        """X25519; None for a low-order point (all-zero shared secret), as wireguard-go refuses it."""
        try:
            return self._key.exchange(X25519PublicKey.from_public_bytes(public))
        except ValueError:
            return None


def public_key(private: bytes) -> bytes:
    return StaticKey(private).public

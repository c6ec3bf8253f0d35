"""WireGuard key material: parsing, generation, and addresses derived from a key."""
from __future__ import annotations

import base64
import binascii
import hashlib
import ipaddress
import os
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

KEY_LEN = 32
MESH_V4 = ipaddress.ip_network("100.64.0.0/10")
MESH_V6 = ipaddress.ip_network("fd7a:115c:a1e0::/48")


def parse_key(text: str) -> bytes:
    """A base64 WireGuard key, or ValueError saying why not."""
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("not valid base64") from None
    if len(raw) != KEY_LEN:
        raise ValueError(f"decodes to {len(raw)} bytes, a key has {KEY_LEN}")
    return raw


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def generate_private() -> bytes:
    raw = bytearray(os.urandom(KEY_LEN))
    # Clamp as `wg genkey` does, so the stored key is canonical.
    raw[0] &= 248
    raw[31] = (raw[31] & 127) | 64
    return bytes(raw)


def public_of(private: bytes) -> bytes:
    return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes(
        Encoding.Raw, PublicFormat.Raw)


def load_or_create(path: Path) -> bytes:
    """The node's key file under the state dir, created 0600 on first start."""
    if path.exists():
        return parse_key(path.read_text())
    path.parent.mkdir(parents=True, exist_ok=True)
    key = generate_private()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(b64(key) + "\n")
    return key


def derived_addresses(public: bytes) -> list[str]:
    """Stable mesh addresses from the public key, as Tailscale's CGNAT/ULA ranges."""
    digest = hashlib.blake2s(public, digest_size=16).digest()
    host4 = int.from_bytes(digest[:4], "big") % (MESH_V4.num_addresses - 2) + 1
    host6 = int.from_bytes(digest[4:14], "big") or 1
    return [f"{MESH_V4.network_address + host4}/32", f"{MESH_V6.network_address + host6}/128"]

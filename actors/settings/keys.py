"""Key material: WireGuard keys (parsing, generation, addresses derived from one) and
the node's disco key."""

from __future__ import annotations

import base64
import binascii
import hashlib
import ipaddress
import os
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from meshsup.actors.kernel.files import GROUP_OTHER_ANY, read_owned, write_atomic

KEY_LEN = 32
DISCO_KEY_FILE = "disco.key"
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
    return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def load_or_create(path: Path, what: str = "private key file") -> bytes:
    """A key file of the node's under the state dir (`what` names it), created 0600 on first start.
    UnsafePath if the one found is not ours alone (as `wg` warns of a key
    others can read): a key others could read or write is not private."""
    try:
        return parse_key(read_owned(path, what, GROUP_OTHER_ANY).decode(errors="replace"))
    except FileNotFoundError:
        pass
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = generate_private()
    write_atomic(path, (b64(key) + "\n").encode(), 0o600)
    return key


def load_or_create_disco(state_dir: Path) -> bytes:
    """The node's disco private key: a Curve25519 key as its WireGuard key, but apart from
    it (as Tailscale keeps them), so no key serves two protocols: this one seals disco's
    NaCl boxes, the WireGuard key only Noise handshakes."""
    return load_or_create(state_dir / DISCO_KEY_FILE, "disco key file")


def derived_addresses(public: bytes) -> list[str]:
    """Stable mesh addresses from the public key, as Tailscale's CGNAT/ULA ranges."""
    digest = hashlib.blake2s(public, digest_size=16).digest()
    host4 = int.from_bytes(digest[:4], "big") % (MESH_V4.num_addresses - 2) + 1
    host6 = int.from_bytes(digest[4:14], "big") or 1
    return [f"{MESH_V4.network_address + host4}/32", f"{MESH_V6.network_address + host6}/128"]

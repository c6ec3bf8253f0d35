"""The crypto actor: WireGuard handshakes and transport encryption."""
from __future__ import annotations

from actors.base import Actor


class CryptoActor(Actor):
    kind = "crypto"

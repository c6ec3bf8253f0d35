"""Transport session keys and the current/previous/next rotation of wireguard-go.

The initiator may use a new keypair at once (the response proved the peer has
it). The responder parks its new keypair in ``next`` until the first
transport message sealed with it arrives: that is key confirmation.

Keys are dropped, not wiped. Where wireguard-go zeroes key memory, this
code only lets go of its references: the keys are immutable ``bytes``
(from hashlib and hmac, with copies in their intermediates) and live again
inside the AEAD objects, none of which Python can overwrite. The memory is
freed when the last reference goes and holds the key until it is reused:
nothing here promises that key material leaves memory before the process.
"""

from __future__ import annotations

from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from .handshake import SessionKeys
from .replay import ReplayFilter


class Keypair:
    __slots__ = ("send", "receive", "send_counter", "local_index", "remote_index", "created", "is_initiator", "replay")

    def __init__(self, keys: SessionKeys, created: float) -> None:
        # One AEAD object per direction, reused for every packet of the session.
        self.send = ChaCha20Poly1305(keys.send)
        self.receive = ChaCha20Poly1305(keys.receive)
        self.send_counter = 0
        self.local_index = keys.local_index
        self.remote_index = keys.remote_index
        self.created = created  # monotonic: Reject-After-Time counts from here
        self.is_initiator = keys.is_initiator
        self.replay = ReplayFilter()


class Keypairs:
    """A peer's three keypair slots. Mutators return the keypairs they dropped (to free indices)."""

    __slots__ = ("current", "previous", "next")

    def __init__(self) -> None:
        self.current: Keypair | None = None
        self.previous: Keypair | None = None
        self.next: Keypair | None = None

    def install(self, keypair: Keypair) -> list[Keypair]:
        dropped = [self.previous]
        if keypair.is_initiator:
            if self.next is not None:
                # An unconfirmed responder keypair still decrypts in-flight packets as `previous`.
                dropped.append(self.current)
                self.previous, self.next = self.next, None
            else:
                self.previous = self.current
            self.current = keypair
        else:
            dropped.append(self.next)
            self.next, self.previous = keypair, None
        return [kp for kp in dropped if kp is not None]

    def confirm(self, keypair: Keypair) -> list[Keypair] | None:
        """Promote ``next`` after it authenticated a packet; None if ``keypair`` is not ``next``."""
        if keypair is not self.next:
            return None
        dropped = [self.previous] if self.previous is not None else []
        self.previous, self.current, self.next = self.current, keypair, None
        return dropped

    def clear(self) -> list[Keypair]:
        dropped = [kp for kp in (self.previous, self.current, self.next) if kp is not None]
        self.previous = self.current = self.next = None
        return dropped

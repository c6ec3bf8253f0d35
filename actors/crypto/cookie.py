"""WireGuard's cookie mechanism (paper section 5.4.7, wireguard-go cookie.go).

Every handshake message carries mac1 = MAC(HASH("mac1----" || receiver's
static public key), message up to mac1), which proves the sender knows whom
it talks to. Under load the responder also demands mac2 = MAC(cookie, message
up to mac2), where the cookie is a MAC of the sender's address under a secret
that rotates every two minutes; a sender without one gets an encrypted cookie
reply instead of a handshake.
"""

from __future__ import annotations

import hmac
import ipaddress
import math
from collections.abc import Callable

from meshsup.actors.kernel.types import Endpoint

from .messages import MAC_SIZE, CookieReply, pack_cookie_reply
from .noise import hash_, mac, xaead_decrypt, xaead_encrypt

LABEL_MAC1 = b"mac1----"
LABEL_COOKIE = b"cookie--"
COOKIE_REFRESH_TIME = 120.0
COOKIE_NONCE_SIZE = 24


def endpoint_bytes(endpoint: Endpoint) -> bytes:
    """The source address a cookie is bound to: IP bytes then the port (big-endian)."""
    host, port = endpoint[0], endpoint[1]
    try:
        packed = ipaddress.ip_address(host).packed
    except ValueError:
        packed = str(host).encode()
    return packed + (port & 0xFFFF).to_bytes(2, "big")


def _macs_region(message: bytes) -> tuple[bytes, bytes, bytes]:
    """(bytes covered by mac1, mac1, mac2) of an initiation or response."""
    return message[: -2 * MAC_SIZE], message[-2 * MAC_SIZE : -MAC_SIZE], message[-MAC_SIZE:]


class CookieChecker:
    """Responder side: verifies mac1/mac2 of messages sent to us and issues cookie replies."""

    def __init__(
        self,
        local_public: bytes,
        rng: Callable[[int], bytes],
        refresh_time: float = COOKIE_REFRESH_TIME,
        seed: bytes | None = None,
    ) -> None:
        self._mac1_key = hash_(LABEL_MAC1, local_public)
        self._encryption_key = hash_(LABEL_COOKIE, local_public)
        self._rng = rng
        self._refresh_time = refresh_time
        # The secret of each refresh period derives from the seed, so checkers sharing a seed
        # (the crypto workers of one node) accept each other's cookies.
        self._seed = rng(32) if seed is None else seed
        self._period: int | None = None
        self._secret = b""

    def _secret_at(self, now: float) -> bytes:
        period = math.floor(now / self._refresh_time)
        if period != self._period:
            self._period, self._secret = period, hash_(self._seed, period.to_bytes(8, "little", signed=True))
        return self._secret

    def check_mac1(self, message: bytes) -> bool:
        body, mac1, _ = _macs_region(message)
        return hmac.compare_digest(mac(self._mac1_key, body), mac1)

    def check_mac2(self, message: bytes, source: bytes, now: float) -> bool:
        # A new refresh period means a new secret: no cookie handed out before is valid.
        cookie = mac(self._secret_at(now), source)
        return hmac.compare_digest(mac(cookie, message[:-MAC_SIZE]), message[-MAC_SIZE:])

    def create_reply(self, message: bytes, receiver_index: int, source: bytes, now: float) -> bytes:
        """A cookie reply (type 3) to ``message``, whose mac1 authenticates the reply."""
        cookie = mac(self._secret_at(now), source)
        nonce = self._rng(COOKIE_NONCE_SIZE)
        _, mac1, _ = _macs_region(message)
        return pack_cookie_reply(receiver_index, nonce, xaead_encrypt(self._encryption_key, nonce, cookie, mac1))


class CookieGenerator:
    """Initiator side, one per peer: adds mac1/mac2 to what we send and keeps the peer's cookie."""

    def __init__(self, remote_public: bytes, refresh_time: float = COOKIE_REFRESH_TIME) -> None:
        self._mac1_key = hash_(LABEL_MAC1, remote_public)
        self._encryption_key = hash_(LABEL_COOKIE, remote_public)
        self._refresh_time = refresh_time
        self._cookie = b""
        self._cookie_set = -math.inf
        self._last_mac1: bytes | None = None

    def add_macs(self, message: bytes, now: float) -> bytes:
        body = message[: -2 * MAC_SIZE]
        mac1 = mac(self._mac1_key, body)
        self._last_mac1 = mac1
        if now - self._cookie_set > self._refresh_time:
            return body + mac1 + bytes(MAC_SIZE)
        return body + mac1 + mac(self._cookie, body + mac1)

    def consume_reply(self, reply: CookieReply, now: float) -> bool:
        """Decrypt a cookie reply to the last message we sent; False if it does not authenticate."""
        if self._last_mac1 is None:
            return False
        cookie = xaead_decrypt(self._encryption_key, reply.nonce, reply.cookie, self._last_mac1)
        if cookie is None:
            return False
        self._cookie = cookie
        self._cookie_set = now
        self._last_mac1 = None
        return True


class SourceRateLimiter:
    """Token bucket per source address for handshakes under load (wireguard-go ratelimiter.go).

    20 handshakes a second with a burst of 5 per IPv4 address or IPv6 /64.
    """

    PACKETS_PER_SECOND = 20
    BURST = 5
    IDLE_TIME = 1.0

    def __init__(self) -> None:
        self._cost = 1.0 / self.PACKETS_PER_SECOND
        self._max_tokens = self._cost * self.BURST
        self._buckets: dict[bytes, list[float]] = {}  # source -> [tokens, last seen]

    @staticmethod
    def _source(host: str) -> bytes:
        try:
            packed = ipaddress.ip_address(host).packed
        except ValueError:
            return str(host).encode()
        return packed if len(packed) == 4 else packed[:8]

    def allow(self, host: str, now: float) -> bool:
        key = self._source(host)
        bucket = self._buckets.get(key)
        if bucket is None:
            self._buckets[key] = [self._max_tokens - self._cost, now]
            return True
        tokens = min(self._max_tokens, bucket[0] + now - bucket[1])
        bucket[1] = now
        if tokens > self._cost:
            bucket[0] = tokens - self._cost
            return True
        bucket[0] = tokens
        return False

    def collect(self, now: float) -> None:
        """Forget sources idle for a second (they would have a full bucket anyway)."""
        idle = [key for key, (_, last) in self._buckets.items() if now - last > self.IDLE_TIME]
        for key in idle:
            del self._buckets[key]

"""WireGuard's per-peer timer state machine (wireguard-go timers.go), sans-IO.

Timers are deadlines (floats in the monotonic clock of the caller's ``now``,
or None when not pending). Protocol events call the hooks below; ``due(now)`` pops the timers
that have expired and the device runs their handlers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

RETRANSMIT_HANDSHAKE = "retransmit_handshake"
SEND_KEEPALIVE = "send_keepalive"
NEW_HANDSHAKE = "new_handshake"
ZERO_KEY_MATERIAL = "zero_key_material"
PERSISTENT_KEEPALIVE = "persistent_keepalive"
TIMERS = (RETRANSMIT_HANDSHAKE, SEND_KEEPALIVE, NEW_HANDSHAKE, ZERO_KEY_MATERIAL, PERSISTENT_KEEPALIVE)


@dataclass(frozen=True)
class Timing:
    """Protocol constants (WireGuard paper section 6.1); tests shorten them."""

    rekey_after_time: float = 120.0
    reject_after_time: float = 180.0
    rekey_after_messages: int = 2**60
    reject_after_messages: int = 2**64 - 2**13 - 1
    rekey_attempt_time: float = 90.0
    rekey_timeout: float = 5.0
    rekey_timeout_jitter: float = 0.333
    keepalive_timeout: float = 10.0
    cookie_refresh_time: float = 120.0
    handshake_initiation_rate: float = 0.020
    # With relays: how a peer's datagrams choose between its endpoint and the relay (Device._to_peer).
    trust_direct: float = 6.5  # Tailscale's trustUDPAddrDuration
    mirror_direct: float = 30.0  # a one-way flow's receiver answers with a keepalive every keepalive_timeout
    probe_direct: float = 1.0
    # A disco peer's direct path (actors.crypto.discopath): demoted when a peer we keep sending to
    # stays silent there this long (keepalive_timeout + rekey_timeout: a receiver of data answers
    # within keepalive_timeout), and kept off it this long unless magicsock names another.
    data_timeout: float = 15.0
    demoted_for: float = 60.0

    @property
    def zero_keys_after(self) -> float:
        return 3 * self.reject_after_time

    @property
    def max_timer_handshakes(self) -> int:
        return int(self.rekey_attempt_time / self.rekey_timeout)


class PeerTimers:
    __slots__ = (
        "timing",
        "_jitter",
        "deadlines",
        "handshake_attempts",
        "need_another_keepalive",
        "sent_last_minute_handshake",
        "persistent_keepalive_interval",
    )

    def __init__(self, timing: Timing, jitter: Callable[[], float]) -> None:
        self.timing = timing
        self._jitter = jitter
        self.deadlines: dict[str, float | None] = dict.fromkeys(TIMERS)
        self.handshake_attempts = 0
        self.need_another_keepalive = False
        self.sent_last_minute_handshake = False
        self.persistent_keepalive_interval = 0

    def due(self, now: float) -> list[str]:
        """Pop the expired timers, earliest first."""
        expired = sorted(
            (deadline, name) for name, deadline in self.deadlines.items() if deadline is not None and deadline <= now
        )
        for _, name in expired:
            self.deadlines[name] = None
        return [name for _, name in expired]

    def next_deadline(self) -> float | None:
        pending = [d for d in self.deadlines.values() if d is not None]
        return min(pending) if pending else None

    def stop(self) -> None:
        self.deadlines = dict.fromkeys(TIMERS)

    # --- hooks, named and placed as in wireguard-go

    def data_sent(self, now: float) -> None:
        # No reply within keepalive + rekey timeout: the session may be dead, rehandshake.
        if self.deadlines[NEW_HANDSHAKE] is None:
            t = self.timing
            self.deadlines[NEW_HANDSHAKE] = now + t.keepalive_timeout + t.rekey_timeout + self._jitter()

    def data_received(self, now: float) -> None:
        if self.deadlines[SEND_KEEPALIVE] is None:
            self.deadlines[SEND_KEEPALIVE] = now + self.timing.keepalive_timeout
        else:
            self.need_another_keepalive = True

    def any_authenticated_packet_sent(self) -> None:
        # Anything we send acknowledges the peer, so no separate keepalive is needed.
        self.deadlines[SEND_KEEPALIVE] = None

    def any_authenticated_packet_received(self) -> None:
        self.deadlines[NEW_HANDSHAKE] = None

    def handshake_initiated(self, now: float) -> None:
        self.deadlines[RETRANSMIT_HANDSHAKE] = now + self.timing.rekey_timeout + self._jitter()

    def handshake_complete(self) -> None:
        self.deadlines[RETRANSMIT_HANDSHAKE] = None
        self.handshake_attempts = 0
        self.sent_last_minute_handshake = False

    def session_derived(self, now: float) -> None:
        self.deadlines[ZERO_KEY_MATERIAL] = now + self.timing.zero_keys_after

    def any_authenticated_packet_traversal(self, now: float) -> None:
        if self.persistent_keepalive_interval > 0:
            self.deadlines[PERSISTENT_KEEPALIVE] = now + self.persistent_keepalive_interval

    def handshake_gave_up(self, now: float) -> None:
        """After too many retransmissions: stop keepalives, drop any key material later."""
        self.deadlines[SEND_KEEPALIVE] = None
        if self.deadlines[ZERO_KEY_MATERIAL] is None:
            self.deadlines[ZERO_KEY_MATERIAL] = now + self.timing.zero_keys_after

    def after_keepalive_sent(self, now: float) -> None:
        """Rearm the keepalive timer when data kept arriving while it was pending."""
        if self.need_another_keepalive:
            self.need_another_keepalive = False
            self.deadlines[SEND_KEEPALIVE] = now + self.timing.keepalive_timeout

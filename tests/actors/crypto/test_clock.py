"""Protocol timers run on the monotonic clock; the wall clock only stamps initiations (TAI64N) and the
last handshake that status shows. Two sans-IO devices with injected clocks, the wall clock stepped by an hour
either way: sessions still expire at Reject-After-Time, rekeying keeps its schedule, and initiations, a
restarted peer's or our own, are still sent and accepted."""

from __future__ import annotations

import pytest

from meshsup.actors.crypto import messages
from meshsup.actors.crypto.device import Device
from meshsup.actors.crypto.peer import PeerConfig
from meshsup.actors.crypto.tai64n import is_after, successor, tai64n
from meshsup.actors.crypto.timers import Timing
from meshsup.actors.kernel.types import Burst
from tests.actors.crypto.test_device import A_IP, B_IP, EA, EB, Link, net, ping, sent
from tests.wg_harness import parse_icmp

MONO0 = 5_000.0  # a monotonic clock counts from boot
WALL0 = 1_700_000_000.0
HOUR = 3600.0
TIMING = Timing()
steps = pytest.mark.parametrize("step", [-HOUR, HOUR], ids=["wall-back-an-hour", "wall-forward-an-hour"])


class Walls:
    """Each side's wall clock: runs with the link's monotonic ``now``, stepped by the side's offset."""

    def __init__(self) -> None:
        self.link: Link | None = None
        self.offsets = {EA: 0.0, EB: 0.0}

    def of(self, side: tuple) -> float:
        assert self.link is not None
        return WALL0 + self.link.now - MONO0 + self.offsets[side]


def clocked_link() -> tuple[Link, Walls]:
    walls = Walls()
    link = Link(wall_a=lambda: walls.of(EA), wall_b=lambda: walls.of(EB))
    walls.link = link
    link.handshake(MONO0)
    return link, walls


def seqs(link: Link, side: tuple) -> list[int]:
    return [parse_icmp(p)[4] for p in link.received[side]]


@steps
def test_a_session_expires_at_reject_after_time_of_monotonic_time(step: float) -> None:
    link, walls = clocked_link()
    early, late = sent(link.a.send([ping(A_IP, B_IP, 2), ping(A_IP, B_IP, 3)], MONO0 + 1))
    walls.offsets[EA] = walls.offsets[EB] = step
    assert len(link.b.receive([Burst(EA, [early])], MONO0 + TIMING.reject_after_time - 1).packets) == 1
    assert link.b.receive([Burst(EA, [late])], MONO0 + TIMING.reject_after_time + 0.5).packets == []
    assert link.b.counters["expired_session"] == 1
    out = link.a.send([ping(A_IP, B_IP, 4)], MONO0 + TIMING.reject_after_time + 0.5)
    assert [messages.message_type(d) for d in sent(out)] == [messages.MESSAGE_INITIATION], "no sealing either"


@steps
def test_a_restarted_peer_is_answered_after_our_wall_clock_stepped(step: float) -> None:
    link, walls = clocked_link()
    walls.offsets[EB] = step
    # A restarts: all state gone, its own wall clock unchanged.
    restarted = Device(link.a_private, wall=lambda: walls.of(EA))
    restarted.set_peer(PeerConfig(link.b.public_key, None, net(f"{B_IP}/32"), EB))
    link.a = link.devices[EA] = restarted
    link.send(EA, [ping(A_IP, B_IP, 7)], MONO0 + 30)
    assert seqs(link, EB) == [1, 7], "the new initiation was accepted"
    assert not +link.a.counters and not +link.b.counters


@steps
def test_rekey_on_schedule_and_our_initiations_accepted_after_the_wall_clock_stepped(step: float) -> None:
    link, walls = clocked_link()
    walls.offsets[EA] = walls.offsets[EB] = step
    peer_b = link.a.peers[link.b.public_key]
    first = peer_b.keypairs.current
    rekeyed_at = None
    for second in range(1, 200):  # traffic both ways every second, timers ticked
        now = MONO0 + second
        link.send(EA, [ping(A_IP, B_IP, second + 1)], now)
        link.send(EB, [ping(B_IP, A_IP, second)], now)
        link.tick(now)
        if rekeyed_at is None and peer_b.keypairs.current is not first:
            rekeyed_at = second
    # A initiates once its key is older than REKEY_AFTER_TIME; its TAI64N keeps growing (B accepts it)
    # although its wall clock may read an hour earlier than at the first handshake.
    assert rekeyed_at == TIMING.rekey_after_time + 1
    assert seqs(link, EB) == list(range(1, 201)) and seqs(link, EA) == list(range(1, 200))
    assert not +link.a.counters and not +link.b.counters
    (status,) = link.a.status(link.now)
    assert status["last_handshake"] >= int(WALL0 + rekeyed_at + step), "status shows wall-clock time"


def test_tai64n_successor_is_the_next_label() -> None:
    t = 1_700_000_000.5
    assert is_after(successor(tai64n(t)), tai64n(t))
    assert successor(tai64n(t)) == tai64n(t + 0.0168)
    assert successor(tai64n(t + 0.499)) == tai64n(t + 0.5), "carries into the next second"
    assert successor(tai64n(t + 0.499))[8:] == bytes(4)

"""Two sans-IO WireGuard Devices talking in memory: handshakes, data, timers, cookies, drops."""

from __future__ import annotations

import ipaddress
import os
import random
import struct
from collections.abc import Callable

import pytest

from meshsup.actors.crypto import handshake, messages
from meshsup.actors.crypto.cookie import CookieChecker, CookieGenerator
from meshsup.actors.crypto.device import ENDPOINT_CHANGED, HANDSHAKE_COMPLETED, Device, Event, Output
from meshsup.actors.crypto.peer import STAGED_PACKETS_LIMIT, PeerConfig
from meshsup.actors.crypto.timers import Timing
from meshsup.actors.filter.packetfilter import Filter
from meshsup.actors.kernel.types import Burst
from meshsup.actors.settings.filter import ACCEPT, DENY, REJECT, Destination, FilterRule, FilterSettings
from tests.wg_harness import icmp_packet, parse_icmp

EA, EB = ("198.51.100.1", 51820), ("198.51.100.2", 51820)
A_IP, B_IP = "100.64.0.1", "100.64.0.2"
A_IP6, B_IP6 = "fd00::1", "fd00::2"
T0 = 1_700_000_000.0


def initiator_of(device: Device, datagram: bytes) -> bytes | None:
    """Static key of the initiator of a valid type-1 message (mac1 checked), as a front end would learn it."""
    checker = CookieChecker(device.public_key, os.urandom)
    if len(datagram) != messages.INITIATION_SIZE or not checker.check_mac1(datagram):
        return None
    opened = handshake.open_initiation(device.static, datagram)
    return None if opened is None else opened.initiator_static


def sent(out: Output) -> list[bytes]:
    """Every datagram ``out`` sends, in order."""
    return [d for burst in out.datagrams for d in burst.datagrams]


def net(*cidrs: str) -> list:
    return [ipaddress.ip_network(c) for c in cidrs]


def udp_packet(src: str, dst: str, sport: int, dport: int) -> bytes:
    header = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 32, 0, 0, 64, 17, 0, *(ipaddress.ip_address(a).packed for a in (src, dst))
    )
    return header + struct.pack("!HHHH", sport, dport, 12, 0) + b"data"


def ping(src: str, dst: str, seq: int = 1, size: int = 84) -> bytes:
    overhead = 28 if ":" not in src else 48
    return icmp_packet(src, dst, 8 if overhead == 28 else 128, 7, seq, bytes(size - overhead))


class Link:
    """Two devices A (at EA) and B (at EB) and a wire between them that can drop or tap datagrams.
    Their wall clocks read the ``now`` of the link's last call unless given (tests/actors/crypto/test_clock.py)."""

    def __init__(
        self,
        psk: bytes | None = None,
        timing: Timing = Timing(),
        b_knows_a: bool = True,
        wall_a: Callable[[], float] | None = None,
        wall_b: Callable[[], float] | None = None,
        **b_kwargs,
    ) -> None:
        self.a_private = os.urandom(32)
        self.now = T0
        self.a = Device(self.a_private, timing=timing, wall=wall_a or (lambda: self.now))
        self.b = Device(os.urandom(32), timing=timing, wall=wall_b or (lambda: self.now), **b_kwargs)
        self.a.set_peer(PeerConfig(self.b.public_key, psk, net(f"{B_IP}/32", f"{B_IP6}/128"), EB))
        self.b.set_peer(
            PeerConfig(self.a.public_key, psk, net(f"{A_IP}/32", f"{A_IP6}/128"), EA if b_knows_a else None)
        )
        self.devices = {EA: self.a, EB: self.b}
        self.received: dict[tuple, list[bytes]] = {EA: [], EB: []}
        self.events: dict[tuple, list[Event]] = {EA: [], EB: []}
        self.tsmp: dict[tuple, list[bytes]] = {EA: [], EB: []}  # what each diverted to magicsock
        self.wire: list[tuple[tuple, tuple, bytes]] = []  # (from, to, datagram) of everything sent
        self.drop: Callable[[tuple, bytes], bool] = lambda to, datagram: False

    def deliver(self, sender: tuple, out: Output, now: float) -> None:
        """Deliver ``out`` of ``sender`` and everything it provokes, until the wire is quiet."""
        self.now = now
        pending = [(sender, out)]
        while pending:
            frm, output = pending.pop(0)
            self.received[frm].extend(output.packets)
            self.events[frm].extend(output.events)
            self.tsmp[frm].extend(p for packets in output.tsmp.values() for p in packets)
            for to, datagrams in output.datagrams:
                for datagram in datagrams:
                    self.wire.append((frm, to, datagram))
                    if to in self.devices and not self.drop(to, datagram):
                        pending.append((to, self.devices[to].receive([Burst(frm, [datagram])], now)))

    def send(self, side: tuple, packets: list[bytes], now: float) -> None:
        self.now = now
        self.deliver(side, self.devices[side].send(packets, now), now)

    def tick(self, now: float) -> None:
        self.now = now
        for side, device in self.devices.items():
            self.deliver(side, device.tick(now), now)

    def handshake(self, now: float = T0) -> None:
        self.send(EA, [ping(A_IP, B_IP)], now)
        assert self.received[EB], "handshake and first packet should have gone through"


def sent_types(link: Link, frm: tuple) -> list[int]:
    return [messages.message_type(d) for f, _, d in link.wire if f == frm]


ADDRESSES = {EA: (A_IP, A_IP6), EB: (B_IP, B_IP6)}


@pytest.mark.parametrize("psk", [None, os.urandom(32)], ids=["no-psk", "psk"])
@pytest.mark.parametrize("initiator", [EA, EB], ids=["A-initiates", "B-initiates"])
def test_handshake_and_data_both_ways(initiator: tuple, psk: bytes | None) -> None:
    link = Link(psk=psk)
    responder = EB if initiator == EA else EA
    (i4, i6), (r4, r6) = ADDRESSES[initiator], ADDRESSES[responder]
    link.send(initiator, [ping(i4, r4, 1), ping(i6, r6, 2)], T0)
    assert [parse_icmp(p)[4] for p in link.received[responder]] == [1, 2]
    assert sent_types(link, initiator)[0] == messages.MESSAGE_INITIATION
    assert sent_types(link, responder)[0] == messages.MESSAGE_RESPONSE
    link.send(responder, [ping(r4, i4, 3), ping(r6, i6, 4)], T0 + 1)
    assert [parse_icmp(p)[4] for p in link.received[initiator]] == [3, 4]
    for side, device in link.devices.items():
        other = link.b if side == EA else link.a
        assert Event(HANDSHAKE_COMPLETED, other.public_key) in link.events[side]
        (status,) = device.status(T0)
        assert status["last_handshake"] == int(T0) and status["rx_bytes"] > 0 and status["tx_bytes"] > 0
    assert not +link.a.counters and not +link.b.counters, "no drops on a clean link"


def test_simultaneous_initiations_converge() -> None:
    link = Link()
    out_a = link.a.send([ping(A_IP, B_IP, 1)], T0)
    out_b = link.b.send([ping(B_IP, A_IP, 2)], T0)
    link.deliver(EA, out_a, T0)
    link.deliver(EB, out_b, T0)
    now = T0
    while not (link.received[EA] and link.received[EB]) and now < T0 + 30:
        now = min(link.a.next_deadline(), link.b.next_deadline())
        link.tick(now)
    assert [parse_icmp(p)[4] for p in link.received[EB]] == [1]
    assert [parse_icmp(p)[4] for p in link.received[EA]] == [2]
    assert now < T0 + 6, "one retransmission sorts it out"


def test_mismatched_psk_fails() -> None:
    link = Link()
    link.b.set_peer(PeerConfig(link.a.public_key, os.urandom(32), net(f"{A_IP}/32"), EA))
    link.send(EA, [ping(A_IP, B_IP)], T0)
    assert link.received[EB] == [] and link.a.counters["bad_response"] == 1


def test_padding_to_16_and_trimmed_on_receive() -> None:
    link = Link()
    link.handshake()
    packet = ping(A_IP, B_IP, 9, size=37)
    out = link.a.send([packet], T0 + 1)
    (datagram,) = sent(out)
    assert len(datagram) == 16 + 48 + 16  # 37 padded to 48, plus header and tag
    assert link.b.receive([Burst(EA, [datagram])], T0 + 1).packets == [packet]
    full = ping(A_IP, B_IP, 10, size=1420)
    (datagram,) = sent(link.a.send([full], T0 + 1))
    assert len(datagram) == 16 + 1420 + 16, "padding never exceeds the MTU"


def test_key_confirmation_responder_waits_for_first_data() -> None:
    link = Link()
    link.drop = lambda to, d: to == EB and messages.message_type(d) == messages.MESSAGE_TRANSPORT
    link.send(EA, [], T0)
    link.tick(T0)  # no packets: nothing happens yet
    assert link.wire == []
    link.send(EA, [ping(A_IP, B_IP)], T0)
    peer_a = link.b.peers[link.a.public_key]
    assert peer_a.keypairs.current is None and peer_a.keypairs.next is not None
    # B has no confirmed session: its packet waits instead of using the unconfirmed key.
    out = link.b.send([ping(B_IP, A_IP, 5)], T0 + 0.1)
    assert out.datagrams == [] and len(peer_a.staged) == 1
    assert link.b.status(T0 + 0.1)[0]["staged"] == 1  # what the node's health sees waiting
    # A's data (sealed with the new key) confirms it; B flushes its staged packet at once.
    link.drop = lambda to, d: False
    transport = [d for f, _, d in link.wire if f == EA and messages.message_type(d) == messages.MESSAGE_TRANSPORT]
    out = link.b.receive([Burst(EA, [transport[-1]])], T0 + 0.2)
    assert peer_a.keypairs.current is not None and peer_a.keypairs.next is None
    assert Event(HANDSHAKE_COMPLETED, link.a.public_key) in out.events
    assert link.b.status(T0 + 0.2)[0]["staged"] == 0
    assert [messages.message_type(d) for d in sent(out)] == [messages.MESSAGE_TRANSPORT]
    link.deliver(EB, out, T0 + 0.2)
    assert [parse_icmp(p)[4] for p in link.received[EA]] == [5]


def test_keepalive_after_receiving_data_and_persistent_keepalive() -> None:
    link = Link()
    link.handshake()
    before = len(link.wire)
    link.tick(T0 + 9.9)
    assert len(link.wire) == before
    link.tick(T0 + 10.1)  # B received data and sent nothing back for KEEPALIVE_TIMEOUT
    keepalives = [(f, d) for f, _, d in link.wire[before:] if len(d) == messages.TRANSPORT_MIN_SIZE]
    assert [f for f, _ in keepalives] == [EB]
    assert link.received[EA] == [] and not +link.a.counters

    link.b.set_peer(PeerConfig(link.a.public_key, None, net(f"{A_IP}/32"), EA, persistent_keepalive=25))
    before = len(link.wire)
    link.tick(T0 + 11)  # switching persistent keepalive on sends one at once
    link.tick(T0 + 11 + 24)
    link.tick(T0 + 11 + 25.1)
    from_b = [d for f, _, d in link.wire[before:] if f == EB]
    assert [len(d) for d in from_b] == [messages.TRANSPORT_MIN_SIZE] * 2


def test_handshake_retransmits_then_gives_up() -> None:
    timing = Timing(rekey_timeout=1.0, rekey_attempt_time=5.0)
    link = Link(timing=timing)
    link.drop = lambda to, d: True  # black hole
    link.send(EA, [ping(A_IP, B_IP, i) for i in range(3)], T0)
    now = T0
    while (deadline := link.a.next_deadline()) is not None and deadline < T0 + 30:
        now = deadline
        link.tick(now)
    initiations = [d for f, _, d in link.wire if f == EA]
    assert len(initiations) == 1 + timing.max_timer_handshakes + 1
    assert all(messages.message_type(d) == messages.MESSAGE_INITIATION for d in initiations)
    assert link.a.counters["handshake_timeout"] == 3
    assert not link.a.peers[link.b.public_key].staged


def test_rekey_after_time_without_packet_loss() -> None:
    timing = Timing(rekey_after_time=20.0, reject_after_time=40.0)
    link = Link(timing=timing)
    sent = 0
    first_keypair = None
    for step in range(200):  # 100 s of traffic both ways, every half second
        now = T0 + step * 0.5
        link.send(EA, [ping(A_IP, B_IP, step)], now)
        link.send(EB, [ping(B_IP, A_IP, step)], now)
        link.tick(now)
        sent += 1
        if step == 1:
            first_keypair = link.a.peers[link.b.public_key].keypairs.current
    assert [parse_icmp(p)[4] for p in link.received[EB]] == list(range(sent))
    assert [parse_icmp(p)[4] for p in link.received[EA]] == list(range(sent))
    initiations = [d for _, _, d in link.wire if messages.message_type(d) == messages.MESSAGE_INITIATION]
    assert len(initiations) >= 4, "rekeyed every REKEY_AFTER_TIME"
    assert link.a.peers[link.b.public_key].keypairs.current is not first_keypair
    assert not +link.a.counters and not +link.b.counters


def test_rekey_and_reject_after_messages() -> None:
    link = Link(timing=Timing(rekey_after_messages=10, reject_after_messages=20))
    link.handshake()
    first = link.a.peers[link.b.public_key].keypairs.current
    link.send(EA, [ping(A_IP, B_IP, i) for i in range(2, 27)], T0 + 6)  # past REKEY_TIMEOUT
    assert first.send_counter == 20, "no nonce at or beyond REJECT_AFTER_MESSAGES"
    assert link.a.peers[link.b.public_key].keypairs.current is not first
    assert [parse_icmp(p)[4] for p in link.received[EB]] == list(range(1, 27))
    assert not +link.a.counters and not +link.b.counters


def test_reject_after_time() -> None:
    timing = Timing(rekey_after_time=20.0, reject_after_time=40.0)
    link = Link(timing=timing)
    link.handshake()
    (stale,) = sent(link.a.send([ping(A_IP, B_IP, 2)], T0 + 1))
    # After REJECT_AFTER_TIME the keypair neither seals nor opens.
    assert link.b.receive([Burst(EA, [stale])], T0 + 40.5).packets == []
    assert link.b.counters["expired_session"] == 1
    out = link.a.send([ping(A_IP, B_IP, 3)], T0 + 40.5)
    assert [messages.message_type(d) for d in sent(out)] == [messages.MESSAGE_INITIATION]
    link.deliver(EA, out, T0 + 40.5)
    assert parse_icmp(link.received[EB][-1])[4] == 3, "staged packet went out after the new handshake"


def test_keys_zeroed_after_three_reject_after_times() -> None:
    link = Link()
    link.handshake()
    for second in range(1, 540):  # an idle but healthy session, ticked every second
        link.tick(T0 + second)
    assert link.a.peers[link.b.public_key].keypairs.current is not None
    link.tick(T0 + 541)
    for device, other in ((link.a, link.b), (link.b, link.a)):
        # No keys left, and nothing else: the peer's state goes, back to its record.
        assert other.public_key not in device.peers and other.public_key in device.trimmed


def flood_initiation(target: Device) -> bytes:
    """Garbage initiation with a valid mac1: what an attacker who knows our public key can send."""
    msg = messages.pack_initiation(
        int.from_bytes(os.urandom(4), "little"), os.urandom(32), os.urandom(48), os.urandom(28)
    )
    return CookieGenerator(target.public_key).add_macs(msg, 0.0)


def test_cookie_flow_under_load() -> None:
    link = Link(b_knows_a=False, under_load_threshold=8)
    attacker = ("203.0.113.66", 4444)
    out = link.b.receive([Burst(attacker, [flood_initiation(link.b) for _ in range(12)])], T0)
    assert link.b.counters["bad_initiation"] == 8
    assert link.b.counters["cookie_sent"] == 4
    assert [ep for ep, _ in out.datagrams] == [attacker] * 4
    assert all(messages.message_type(d) == messages.MESSAGE_COOKIE_REPLY for d in sent(out))

    link.send(EA, [ping(A_IP, B_IP)], T0 + 0.1)  # under load: A gets a cookie, not a response
    assert link.b.counters["cookie_sent"] == 5 and link.a.counters["cookie_received"] == 1
    assert link.received[EB] == []

    retry_at = link.a.next_deadline()
    assert retry_at is not None and T0 + 5 < retry_at < T0 + 5.5
    link.b.receive([Burst(attacker, [flood_initiation(link.b) for _ in range(12)])], retry_at - 0.1)
    assert link.b.counters["cookie_sent"] == 5 + 4
    link.tick(retry_at)  # A retries with mac2 and gets through while B is still under load
    assert link.received[EB], "handshake completed with MAC2"
    assert link.b.counters["cookie_sent"] == 5 + 4
    out = link.b.receive([Burst(attacker, [flood_initiation(link.b)])], retry_at)
    assert messages.message_type(sent(out)[0]) == messages.MESSAGE_COOKIE_REPLY, "still under load"


def test_replayed_and_tampered_data_dropped() -> None:
    link = Link()
    link.handshake()
    (datagram,) = sent(link.a.send([ping(A_IP, B_IP, 2)], T0 + 1))
    assert len(link.b.receive([Burst(EA, [datagram])], T0 + 1).packets) == 1
    assert link.b.receive([Burst(EA, [datagram])], T0 + 1).packets == []
    assert link.b.counters["replay"] == 1
    tampered = datagram[:-1] + bytes([datagram[-1] ^ 1])
    assert link.b.receive([Burst(EA, [tampered])], T0 + 1).packets == []
    assert link.b.counters["decrypt_failed"] == 1


def test_replayed_initiation_and_initiation_flood_rejected() -> None:
    link = Link()
    link.handshake()
    initiation = next(d for f, _, d in link.wire if f == EA)
    assert link.b.receive([Burst(EA, [initiation])], T0 + 1).datagrams == []
    assert link.b.counters["handshake_replay"] == 1

    def fresh_initiation(at: float) -> bytes:  # a clone of A, so initiations need not wait REKEY_TIMEOUT
        clone = Device(link.a_private, wall=lambda: at)
        clone.set_peer(PeerConfig(link.b.public_key, None, net(f"{B_IP}/32"), EB))
        (datagram,) = sent(clone.send([ping(A_IP, B_IP)], at))
        return datagram

    first, second, third = (fresh_initiation(T0 + 10 + dt) for dt in (0.0, 0.05, 0.1))
    assert len(link.b.receive([Burst(EA, [first])], T0 + 10).datagrams) == 1
    assert link.b.receive([Burst(EA, [second])], T0 + 10.01).datagrams == []
    assert link.b.counters["rate_limited"] == 1, "at most one initiation per peer every 20 ms"
    assert len(link.b.receive([Burst(EA, [third])], T0 + 10.05).datagrams) == 1


def test_wrong_mac1_dropped() -> None:
    link = Link()
    out = link.a.send([ping(A_IP, B_IP)], T0)
    (initiation,) = sent(out)
    bad = initiation[:-32] + bytes(16) + initiation[-16:]
    assert link.b.receive([Burst(EA, [bad])], T0).datagrams == []
    assert link.b.counters["bad_mac1"] == 1
    assert initiator_of(link.b, bad) is None
    assert initiator_of(link.b, initiation) == link.a.public_key


def test_garbage_of_every_type_is_counted() -> None:
    link = Link()
    link.handshake()
    b = link.b
    before = sum(b.counters.values())
    garbage = [
        b"",
        b"\x01",
        b"\x04\x00\x00",  # too short
        os.urandom(148),
        os.urandom(1500),  # random
        b"\x01\x00\x00\x00" + os.urandom(144),
        b"\x01\x00\x00\x00" + os.urandom(10),
        b"\x02\x00\x00\x00" + os.urandom(88),
        b"\x02\x00\x00\x00" + os.urandom(100),
        b"\x03\x00\x00\x00" + os.urandom(60),
        b"\x03\x00\x00\x00" + os.urandom(3),
        b"\x04\x00\x00\x00" + os.urandom(12),
        b"\x04\x00\x00\x00" + os.urandom(100),
        b"\x05\x00\x00\x00" + os.urandom(60),
        b"\x01\x01\x00\x00" + os.urandom(144),
    ]
    out = b.receive([Burst(EA, garbage)], T0 + 1)
    assert out.packets == [] and out.datagrams == []
    assert sum(b.counters.values()) - before == len(garbage)
    for reason in ("bad_length", "unknown_type", "bad_mac1", "no_session"):
        assert b.counters[reason] > 0, reason
    out = link.a.send([b"", b"\x45\x00", b"\x99" * 40, ping(A_IP, "100.64.0.99")], T0 + 1)
    assert out.datagrams == []
    assert link.a.counters["bad_packet"] == 3 and link.a.counters["no_route"] == 1


def test_inner_source_must_be_in_senders_allowed_ips() -> None:
    link = Link()
    link.handshake()
    spoofed = ping("100.64.0.77", B_IP, 3)
    link.a.allowed_ips.insert("100.64.0.0/24", link.a.peers[link.b.public_key])  # A routes anything to B
    (datagram,) = sent(link.a.send([spoofed], T0 + 1))
    assert link.b.receive([Burst(EA, [datagram])], T0 + 1).packets == []
    assert link.b.counters["allowed_ips"] == 1


def test_the_filter_judges_what_peers_send_and_rejects_go_back_through_the_tunnel() -> None:
    link = Link()
    link.handshake()
    rules = (FilterRule(ACCEPT, tuple(net(f"{A_IP}/32")), (Destination(net("0.0.0.0/0")[0], 7, 7),), 17),)
    link.b.filter = Filter(FilterSettings(True, REJECT, False, rules))
    link.a.filter = Filter(FilterSettings(True, DENY))
    allowed, refused = udp_packet(A_IP, B_IP, 5000, 7), udp_packet(A_IP, B_IP, 5000, 9)
    link.send(EA, [allowed, refused], T0 + 1)
    assert link.received[EB][-1:] == [allowed]  # the handshake's ping was before the filter
    (unreachable,) = link.received[EA]  # sealed back to A, and A's filter lets it in: it is about A's flow
    assert (unreachable[9], unreachable[20], unreachable[21], unreachable[28:]) == (1, 3, 13, refused)
    assert link.b.filter.drops == {"default_reject": 1} and link.b.filter.hits == [1]
    assert link.a.filter.drops == {}
    # A's default deny keeps B's ping out; B's own ping comes back through B's default reject.
    link.send(EB, [ping(B_IP, A_IP, 5)], T0 + 2)
    assert len(link.received[EA]) == 1 and link.a.filter.drops == {"default_deny": 1}
    link.send(EA, [icmp_packet(A_IP, B_IP, 0, 7, 5, bytes(56))], T0 + 3)
    assert parse_icmp(link.received[EB][-1])[4] == 5 and link.b.filter.drops == {"default_reject": 1}


def test_roaming_follows_last_authenticated_packet() -> None:
    link = Link()
    link.handshake()
    moved = ("203.0.113.5", 40000)
    (datagram,) = sent(link.a.send([ping(A_IP, B_IP, 2)], T0 + 1))
    forged = os.urandom(len(datagram))
    link.b.receive([Burst(moved, [b"\x04\x00\x00\x00" + datagram[4:16] + forged[16:]])], T0 + 1)
    assert link.b.peers[link.a.public_key].endpoint == EA, "unauthenticated packets do not move the peer"
    out = link.b.receive([Burst(moved, [datagram])], T0 + 1)
    assert Event(ENDPOINT_CHANGED, link.a.public_key, moved) in out.events
    ((endpoint, _),) = link.b.send([ping(B_IP, A_IP)], T0 + 1).datagrams
    assert endpoint == moved


def test_staged_queue_is_bounded_and_ordered() -> None:
    link = Link()
    link.drop = lambda to, d: True
    n = STAGED_PACKETS_LIMIT + 76
    link.send(EA, [ping(A_IP, B_IP, i) for i in range(n)], T0)
    assert link.a.counters["staged_overflow"] == 76
    link.drop = lambda to, d: False
    link.tick(T0 + 6)  # retransmission completes the handshake, staged packets follow in order
    assert [parse_icmp(p)[4] for p in link.received[EB]] == list(range(76, n))


def test_psk_change_flushes_session_and_remove_peer() -> None:
    link = Link()
    link.handshake()
    peer_b = link.a.peers[link.b.public_key]
    link.a.set_peer(PeerConfig(link.b.public_key, None, net(f"{B_IP}/32"), EB))
    assert peer_b.keypairs.current is not None, "an update without new key material keeps the session"
    link.a.set_peer(PeerConfig(link.b.public_key, os.urandom(32), net(f"{B_IP}/32"), EB))
    assert peer_b.keypairs.current is None
    link.b.remove_peer(link.a.public_key)
    out = link.b.receive([Burst(EA, [d for f, _, d in link.wire if f == EA])], T0 + 1)
    assert out.packets == [] and link.b.counters["no_session"] >= 1
    assert link.b.send([ping(B_IP, A_IP)], T0 + 1).datagrams == []
    assert link.b.counters["no_route"] == 1


def test_a_configured_peer_has_state_only_from_its_first_traffic() -> None:
    link = Link()
    assert link.a.peers == {} and link.b.peers == {}, "configured, no traffic: a record alone"
    assert link.a.status(T0) == [] and set(link.a.configs) == {link.b.public_key}
    link.handshake()  # A's packet gives A's peer state, B's peer gets it from the initiation
    assert set(link.a.peers) == {link.b.public_key} and set(link.b.peers) == {link.a.public_key}
    assert link.a.fresh == [link.b.public_key] and link.b.fresh == [link.a.public_key]
    (status,) = link.a.status(T0)
    assert status["allowed_ips"] == [f"{B_IP}/32", f"{B_IP6}/128"] and status["last_handshake"] == int(T0)


def test_a_lazy_peer_is_updated_removed_and_keeps_persistent_keepalive_at_once() -> None:
    link = Link()
    link.a.set_peer(PeerConfig(link.b.public_key, None, net(f"{B_IP}/32"), ("198.51.100.7", 1)))
    assert link.a.peers == {}, "a change of a peer without traffic stays a record"
    assert link.a.peer(link.b.public_key).endpoint == ("198.51.100.7", 1), "made from the latest record"
    other = Device(os.urandom(32))
    link.a.set_peer(PeerConfig(other.public_key, None, net("100.64.0.9/32"), ("198.51.100.9", 1), 25))
    assert other.public_key in link.a.peers, "persistent keepalive sends at once: state from the start"
    assert sent(link.a.tick(T0)), "its first keepalive starts a handshake"
    link.a.remove_peer(other.public_key)
    link.a.remove_peer(link.b.public_key)
    assert link.a.peers == {} and link.a.configs == {}
    assert link.a.send([ping(A_IP, B_IP)], T0).datagrams == [] and link.a.counters["no_route"] == 1
    assert link.a.peer(link.b.public_key) is None


def test_an_idle_peer_goes_back_to_a_record_keeping_its_figures_and_replay_protection() -> None:
    link = Link()
    link.handshake()
    initiation = next(d for f, _, d in link.wire if f == EA and messages.message_type(d) == messages.MESSAGE_INITIATION)
    for t in (20, 200, 600, 620):  # keepalive, then keys dropped 540 s after the session
        link.tick(T0 + t)
    assert link.b.peers == {} and set(link.b.trimmed) == {link.a.public_key}
    assert link.a.public_key in link.b.fresh, "the worker closes its socket"
    (status,) = link.b.status(T0 + 620)
    assert status["rx_bytes"] > 0 and status["last_handshake"] >= T0 and status["endpoint"] == "198.51.100.1:51820"
    assert link.b.receive([Burst(EA, [initiation])], T0 + 621).datagrams == []
    assert link.b.counters["handshake_replay"] == 1, "an initiation from before is still a replay"
    link.send(EB, [ping(B_IP, A_IP)], T0 + 622)
    assert link.received[EA] and link.a.public_key in link.b.peers and not link.b.trimmed


def test_unknown_initiator_is_dropped() -> None:
    link = Link()
    stranger = Device(os.urandom(32))
    stranger.set_peer(PeerConfig(link.b.public_key, None, net(f"{B_IP}/32"), EB))
    (initiation,) = sent(stranger.send([ping(A_IP, B_IP)], T0))
    assert link.b.receive([Burst(("198.51.100.9", 1), [initiation])], T0).datagrams == []
    assert link.b.counters["unknown_peer"] == 1
    assert initiator_of(link.b, initiation) == stranger.public_key


def test_worker_indices_route_sessions_to_their_owner() -> None:
    workers = 3
    key_b = os.urandom(32)
    shards = [Device(key_b, worker=w, workers=workers) for w in range(workers)]
    clients = [Device(os.urandom(32)) for _ in range(6)]
    for i, client in enumerate(clients):
        client.set_peer(PeerConfig(shards[0].public_key, None, net(f"{B_IP}/32"), EB))
        for shard in shards:
            shard.set_peer(PeerConfig(client.public_key, None, net(f"100.64.1.{i}/32"), None))

    def owner(public_key: bytes) -> int:  # what a front end would do to pick the worker owning a peer
        return public_key[0] % workers

    def front_end(datagram: bytes, now: float) -> tuple[int, Output]:
        mtype, receiver = messages.TRANSPORT_HEADER.unpack_from(datagram.ljust(16, b"\x00"))[:2]
        if mtype == messages.MESSAGE_INITIATION:
            w = owner(initiator_of(shards[0], datagram))
        else:
            w = receiver % workers
        return w, shards[w].receive([Burst((f"198.51.100.{w + 10}", 1), [datagram])], now)

    for i, client in enumerate(clients):
        (initiation,) = sent(client.send([ping(f"100.64.1.{i}", B_IP, 1)], T0))
        w, out = front_end(initiation, T0)
        assert w == owner(client.public_key)
        (response,) = sent(out)
        assert messages.parse_response(response).sender % workers == w
        packets: list[bytes] = []
        for datagram in sent(client.receive([Burst(EB, [response])], T0)):
            w2, out = front_end(datagram, T0)
            assert w2 == w
            packets += out.packets
        assert [parse_icmp(p)[4] for p in packets] == [1]
    for w, shard in enumerate(shards):
        assert all(index % workers == w for index in shard._indices)


def test_mutated_messages_never_raise_and_are_all_counted() -> None:
    rnd = random.Random(1)
    link = Link()
    link.handshake()
    captured = [d for _, _, d in link.wire] + sent(link.a.send([ping(A_IP, B_IP, 2)], T0 + 1))
    mutants = []
    for _ in range(3000):
        data = bytearray(rnd.choice(captured))
        for _ in range(rnd.randint(1, 3)):
            data[rnd.randrange(len(data))] ^= 1 << rnd.randrange(8)
        if rnd.random() < 0.2:
            data = data[: rnd.randrange(len(data))]
        mutants.append(bytes(data))
    before = sum(link.b.counters.values())
    out = link.b.receive([Burst(EA, mutants)], T0 + 1)
    assert out.packets == [] and out.events == []
    assert sum(link.b.counters.values()) - before == len(mutants), "every bad datagram is a counted drop"
    # A flip in mac2 or the timestamp still names the initiator; nothing else can.
    assert {initiator_of(link.b, m) for m in mutants} <= {None, link.a.public_key}

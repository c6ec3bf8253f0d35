"""The crypto workers' side of disco (sans-IO, in memory): magicsock's PathSet picks a disco peer's
direct path, which a path carrying no WireGuard loses; TSMP goes to magicsock and back; PathReport
tells magicsock what happened; disco and STUN read by a peer socket go to magicsock."""

from __future__ import annotations

import os

import pytest
from nacl.public import PrivateKey

from meshsup.actors.bus.messages import PathReport, PathSet
from meshsup.actors.crypto import messages
from meshsup.actors.crypto.actor import path_endpoint
from meshsup.actors.crypto.device import ENDPOINT_CHANGED, Event, Output
from meshsup.actors.crypto.direct import take_underlay
from meshsup.actors.crypto.peer import PeerConfig
from meshsup.actors.crypto.timers import Timing
from meshsup.actors.kernel.types import Burst, Endpoint, relayed_key
from meshsup.actors.wire import stun, tsmp
from meshsup.actors.wire.disco import Ping, SharedKey
from tests.actors.crypto.test_device import A_IP, A_IP6, B_IP, B_IP6, EA, EB, T0, Link, net, ping, sent
from tests.actors.crypto.test_paths import Mesh
from tests.wg_harness import parse_icmp

TRUST = 6.5  # a pong's worth
MOVED = ("203.0.113.5", 40000)


def reason(timing: Timing) -> str:
    return f"no WireGuard data from it for {timing.data_timeout:g} s while sending"


def destinations(out: Output) -> list[str | Endpoint]:
    """Where a device's Output sends: "relay" or the endpoint."""
    return ["relay" if relayed_key(b.endpoint) else b.endpoint for b in out.datagrams]


# --- roaming and trust


def test_a_disco_peer_does_not_roam_but_what_it_sends_from_elsewhere_is_accepted() -> None:
    link = Link()
    link.handshake()
    key_a = link.a.public_key
    assert link.b.set_path(key_a, EA, TRUST, T0).events == []  # where it already is: nothing moves
    (datagram,) = sent(link.a.send([ping(A_IP, B_IP, 2)], T0 + 1))
    out = link.b.receive([Burst(MOVED, [datagram])], T0 + 1)
    assert [parse_icmp(p)[4] for p in out.packets] == [2] and out.events == []
    assert destinations(link.b.send([ping(B_IP, A_IP)], T0 + 1)) == [EA]
    link.b.set_peer(PeerConfig(key_a, None, net(f"{A_IP}/32"), MOVED))  # nor does configuration move it
    assert destinations(link.b.send([ping(B_IP, A_IP)], T0 + 1)) == [EA]
    (status,) = link.b.status(T0 + 1)
    assert (status["endpoint"], status["path"], status["demoted"]) == (f"{EA[0]}:{EA[1]}", "direct", None)


def test_path_set_moves_a_disco_peer_and_says_so() -> None:
    link = Link()
    link.handshake()
    key_a = link.a.public_key
    out = link.b.set_path(key_a, MOVED, TRUST, T0 + 1)
    assert out.events == [Event(ENDPOINT_CHANGED, key_a, MOVED)]  # the worker's peer socket follows
    assert destinations(link.b.send([ping(B_IP, A_IP)], T0 + 1)) == [MOVED]
    assert link.b.set_path(b"\x01" * 32, MOVED, TRUST, T0 + 1).events == []
    assert link.b.counters["no_peer"] == 1


def test_trust_expires_to_the_relay_with_nothing_mirrored_and_a_path_set_brings_it_back() -> None:
    m = Mesh(endpoints=True)
    key_b = m.b.public_key
    m.a.set_path(key_b, EB, TRUST, T0)
    m.send(EA, 1, T0)  # the initiation and the data: direct only
    assert m.paths("A") == ["direct", "direct"] and len(m.received[EB]) == 1
    later = T0 + TRUST + 0.1
    assert destinations(m.a.send([ping(A_IP, B_IP)], later)) == ["relay"]
    (status,) = m.a.status(later)
    assert (status["path"], status["endpoint"], status["demoted"]) == ("relay", None, None)
    m.a.set_path(key_b, EB, TRUST, later)
    assert destinations(m.a.send([ping(A_IP, B_IP)], later)) == [EB]


def test_a_disco_peer_with_no_trusted_path_handshakes_through_the_relay() -> None:
    m = Mesh(endpoints=True)
    m.a.set_path(m.b.public_key, EB, TRUST, T0 - TRUST)  # trusted once, no longer
    m.send(EA, 3, T0)
    assert set(m.paths("A")) == {"relay"} and len(m.received[EB]) == 3
    m.a.set_path(m.b.public_key, None, 0.0, T0)  # no direct path at all
    assert m.a.peers[m.b.public_key].endpoint is None
    m.log.clear()
    m.send(EA, 2, T0 + 1)
    assert m.paths("A") == ["relay"] and len(m.received[EB]) == 5


def test_without_relays_an_untrusted_endpoint_is_still_the_way() -> None:
    m = Mesh(endpoints=True, relaying=False)
    m.a.set_path(m.b.public_key, EB, TRUST, T0 - TRUST)
    m.send(EA, 1, T0)
    assert set(m.paths("A")) == {"direct"} and len(m.received[EB]) == 1


# --- data liveness


def send_each_second(m: Mesh, seconds: range, endpoint: tuple = EB) -> list[PathReport]:
    """A sends a packet a second while magicsock keeps trusting `endpoint` (its pongs come back);
    both devices run their timers. The path reports A gives magicsock."""
    reports = []
    for s in seconds:
        now = T0 + s
        m.a.set_path(m.b.public_key, endpoint, TRUST, now)
        m.send(EA, 1, now)
        m.tick(now)
        report = m.a.path_report(now)
        if report is not None:
            reports.append(report)
    return reports


def demotions(reports: list[PathReport]) -> list[list]:
    return [d for r in reports for d in r.demoted]


@pytest.mark.parametrize("timing", [Timing(), Timing(data_timeout=4.0, demoted_for=20.0)], ids=["default", "shortened"])
def test_a_path_that_carries_no_data_is_demoted_reported_once_and_held(timing: Timing) -> None:
    m = Mesh(endpoints=True, timing=timing)
    key_b = m.b.public_key
    timeout, hold = int(timing.data_timeout), int(timing.demoted_for)
    send_each_second(m, range(0, 1))  # handshake and data, directly
    m.direct = False  # disco still answers there (magicsock trusts it); WireGuard does not get through
    m.log.clear()
    reports = send_each_second(m, range(1, timeout + 1))
    # The first unanswered send was at 0 (B answers data within keepalive_timeout, here via the relay)
    assert m.paths("A") == ["direct"] * (timeout - 1) + ["relay"]
    assert demotions(reports) == [[key_b, EB[0], EB[1], reason(timing)]]
    (status,) = m.a.status(T0 + timeout)
    assert (status["path"], status["endpoint"], status["demoted"]) == ("relay", None, reason(timing))
    m.log.clear()
    delivered = len(m.received[EB])
    reports = send_each_second(m, range(timeout + 1, timeout + hold))
    assert set(m.paths("A")) == {"relay"} and demotions(reports) == []  # held, though magicsock trusts it
    assert len(m.received[EB]) == delivered + hold - 1  # the relay carries the data
    m.log.clear()
    reports = send_each_second(m, range(timeout + hold, timeout + hold + timeout + 1))
    # Its time served, the path is tried again, and demoted again while it still carries nothing.
    assert m.paths("A")[0] == "direct" and m.paths("A")[-1] == "relay"
    assert len(demotions(reports)) == 1


def test_a_demotion_is_lifted_by_another_endpoint() -> None:
    m = Mesh(endpoints=True)
    timeout = int(m.a.timing.data_timeout)
    send_each_second(m, range(0, 1))
    m.direct = False
    send_each_second(m, range(1, timeout + 1))
    assert m.a.status(T0 + timeout)[0]["demoted"] is not None
    m.a.set_path(m.b.public_key, MOVED, TRUST, T0 + timeout + 1)
    assert destinations(m.a.send([ping(A_IP, B_IP)], T0 + timeout + 1)) == [MOVED]
    assert m.a.status(T0 + timeout + 1)[0]["demoted"] is None


def test_a_path_trusted_again_after_a_lapse_starts_its_clock_afresh() -> None:
    m = Mesh(endpoints=True)
    send_each_second(m, range(0, 1))  # data, owed an answer on the path
    m.direct = False
    for s in range(int(TRUST) + 1, 30):  # magicsock stopped trusting the path: the relay
        m.send(EA, 1, T0 + s)
        m.tick(T0 + s)
    m.direct = True
    m.log.clear()
    reports = send_each_second(m, range(30, 33))  # trusted again, long after the unanswered send
    assert "relay" not in m.paths("A") and demotions(reports) == []


def test_a_peer_answering_only_with_keepalives_keeps_its_direct_path() -> None:
    m = Mesh(endpoints=True)
    reports = send_each_second(m, range(0, 3 * int(m.a.timing.demoted_for)))  # one-way data, three minutes
    assert set(m.paths("A")) == {"direct"} and demotions(reports) == []
    assert m.paths("B").count("direct") >= 15  # B's keepalives and its rekeying answered, on the path


def test_plain_peers_are_never_demoted_and_still_roam() -> None:
    m = Mesh(endpoints=True)
    m.send(EA, 1, T0)
    m.direct = False
    reports = []
    for s in range(1, 40):
        m.send(EA, 1, T0 + s)
        m.tick(T0 + s)
        reports.append(m.a.path_report(T0 + s))
    assert demotions([r for r in reports if r is not None]) == [] and m.a.status(T0 + 40)[0]["demoted"] is None
    assert m.paths("A")[-2:] == ["direct", "relay"]  # the relay, and the endpoint probed, as before
    out = m.b.receive([Burst(MOVED, sent(m.a.send([ping(A_IP, B_IP)], T0 + 41)))], T0 + 41)
    assert Event(ENDPOINT_CHANGED, m.a.public_key, MOVED) in out.events


# --- reports


def test_the_path_report_names_active_peers_and_handshakes_at_once_then_once_a_second() -> None:
    link = Link()
    key_a, key_b = link.a.public_key, link.b.public_key
    assert link.a.path_report(T0) is None
    link.handshake(T0)
    assert link.a.path_report(T0) == PathReport(active=[key_b], handshakes=[key_b], demoted=[])
    assert link.b.path_report(T0) == PathReport(active=[key_a], handshakes=[key_a], demoted=[])  # the responder
    link.send(EA, [ping(A_IP, B_IP, i) for i in range(50)], T0 + 0.5)
    assert link.a.path_report(T0 + 0.5) is None and link.b.path_report(T0 + 0.5) is None  # within the second
    assert link.a.path_report(T0 + 1) == PathReport(active=[key_b], handshakes=[], demoted=[])
    assert link.b.path_report(T0 + 1) == PathReport(active=[key_a], handshakes=[], demoted=[])  # it received
    assert link.a.path_report(T0 + 2.5) is None  # nothing since
    from_b = len(link.wire)
    link.tick(T0 + 11)  # B answers the data with a keepalive, which is no data
    assert [messages.message_type(d) for f, _, d in link.wire[from_b:]] == [messages.MESSAGE_TRANSPORT]
    assert link.a.path_report(T0 + 11) is None and link.b.path_report(T0 + 11) is None
    # Data after a quiet second is news at once (disco starts hole punching on it), not a second later.
    link.send(EA, [ping(A_IP, B_IP, 99)], T0 + 12)
    assert link.a.path_report(T0 + 12) == PathReport(active=[key_b], handshakes=[], demoted=[])
    link.send(EA, [ping(A_IP, B_IP, 100)], T0 + 12.2)
    assert link.a.path_report(T0 + 12.2) is None  # still busy: kept active once a second


# --- TSMP


DISCO_KEY = os.urandom(32)


def test_tsmp_from_a_peer_goes_to_magicsock_not_the_tun() -> None:
    link = Link()
    link.handshake()
    adv4 = tsmp.disco_advertisement(A_IP, B_IP, DISCO_KEY)
    adv6 = tsmp.disco_advertisement(A_IP6, B_IP6, DISCO_KEY)
    link.send(EA, [adv4, ping(A_IP, B_IP, 5), adv6], T0 + 1)
    assert link.tsmp[EB] == [adv4, adv6]  # unpadded, whole
    assert tsmp.parse(link.tsmp[EB][0]) == tsmp.DiscoAdvertisement(A_IP, B_IP, DISCO_KEY)
    assert [parse_icmp(p)[4] for p in link.received[EB]] == [1, 5]
    assert link.b.counters["tsmp_received"] == 2


def test_tsmp_from_outside_the_peers_allowed_ips_is_dropped_like_any_packet() -> None:
    link = Link()
    link.handshake()
    link.a.allowed_ips.insert("100.64.0.0/24", link.a.peers[link.b.public_key])  # A routes anything to B
    link.send(EA, [tsmp.disco_advertisement("100.64.0.77", B_IP, DISCO_KEY)], T0 + 1)
    assert link.tsmp[EB] == [] and link.b.counters["allowed_ips"] == 1 and link.b.counters["tsmp_received"] == 0


def test_tsmp_from_magicsock_is_sealed_to_the_named_peer_handshaking_first() -> None:
    link = Link()
    pong = tsmp.pong(tsmp.Ping("100.64.9.9", B_IP, b"12345678"))  # from B to an address no route leads to
    link.deliver(EB, link.b.send_to(link.a.public_key, [pong], T0), T0)
    assert link.b.handshakes == 1 and link.tsmp[EA] == [pong] and link.received[EA] == []
    assert link.b.counters["tsmp_sent"] == 1 and link.b.counters["no_route"] == 0
    assert link.b.send_to(b"\x02" * 32, [pong], T0).datagrams == [] and link.b.counters["no_peer"] == 1


# --- the bus and the socket


def test_path_set_endpoints_are_written_as_the_kernel_writes_sources() -> None:
    def endpoint(host: str, port: int = 41641) -> tuple[str, int] | None:
        return path_endpoint(PathSet(peer=bytes(32), host=host, port=port, trusted_for=TRUST))

    assert endpoint("") is None
    assert endpoint("::ffff:198.51.100.7") == ("198.51.100.7", 41641)
    assert endpoint("2001:DB8::1") == ("2001:db8::1", 41641)
    for host, port in (("not-an-address", 1), ("198.51.100.7", 0), ("198.51.100.7", 70000)):
        with pytest.raises(ValueError):
            endpoint(host, port)


def test_disco_and_stun_read_by_a_peer_socket_are_taken_for_magicsock() -> None:
    link = Link()
    link.handshake()
    initiation, _, *transport = [d for _, _, d in link.wire]
    ours, theirs = PrivateKey.generate(), PrivateKey.generate()
    disco_ping = SharedKey(bytes(ours), bytes(theirs.public_key)).seal(Ping(os.urandom(12)))
    binding = stun.request(stun.new_txid())
    bursts = [
        Burst(EA, [initiation, disco_ping, *transport, b"", b"\x54garbage", binding]),
        Burst(MOVED, list(transport)),
    ]
    taken = take_underlay(bursts)
    assert taken == [Burst(EA, [disco_ping, binding])]
    assert bursts == [Burst(EA, [initiation, *transport, b"", b"\x54garbage"]), Burst(MOVED, transport)]
    assert take_underlay(bursts) == []

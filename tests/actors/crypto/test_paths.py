"""With relays, a device chooses per peer between its endpoint and the relay (sans-IO, in memory):
the endpoint alone while it is trusted (an authenticated datagram from it within 6.5 s), else the
relay, with the endpoint mirrored while it worked recently or probed once a second."""

from __future__ import annotations

import os

from meshsup.actors.crypto.device import ENDPOINT_CHANGED, Device, Output
from meshsup.actors.crypto.peer import PeerConfig
from meshsup.actors.crypto.timers import Timing
from meshsup.actors.kernel.types import Burst, Endpoint, relayed, relayed_key
from tests.actors.crypto.test_device import A_IP, B_IP, EA, EB, T0, net, ping

TIMING = Timing()


class Mesh:
    """Devices A (at EA) and B (at EB), a relay that carries what goes to a relayed endpoint, and a
    direct wire that carries the rest while `direct` is on."""

    def __init__(self, endpoints: bool, relaying: bool = True, timing: Timing = TIMING) -> None:
        self.a, self.b = Device(os.urandom(32), timing=timing), Device(os.urandom(32), timing=timing)
        self.a.relaying = self.b.relaying = relaying
        self.a.set_peer(PeerConfig(self.b.public_key, None, net(f"{B_IP}/32"), EB if endpoints else None))
        self.b.set_peer(PeerConfig(self.a.public_key, None, net(f"{A_IP}/32"), EA if endpoints else None))
        self.at = {EA: self.a, EB: self.b}
        self.key_at = {self.a.public_key: EA, self.b.public_key: EB}
        self.direct = True
        self.log: list[tuple[str, str, int]] = []  # (sender, "relay" or "direct", datagrams)
        self.received: dict[Endpoint, list[bytes]] = {EA: [], EB: []}
        self.events: list[tuple[Endpoint, str]] = []

    def deliver(self, frm: Endpoint, out: Output, now: float) -> None:
        pending = [(frm, out)]
        while pending:
            sender, output = pending.pop(0)
            self.received[sender].extend(output.packets)
            self.events += [(sender, e.kind) for e in output.events]
            for to, datagrams in output.datagrams:
                name = "A" if sender == EA else "B"
                key = relayed_key(to)
                if key is not None:  # the relay delivers it from the sender's key
                    self.log.append((name, "relay", len(datagrams)))
                    src, dst = relayed(self.at[sender].public_key), self.key_at[key]
                else:
                    self.log.append((name, "direct", len(datagrams)))
                    if not self.direct:
                        continue
                    src, dst = sender, to
                pending.append((dst, self.at[dst].receive([Burst(src, list(datagrams))], now)))

    def send(self, side: Endpoint, n: int, now: float) -> None:
        src, dst = (A_IP, B_IP) if side == EA else (B_IP, A_IP)
        self.deliver(side, self.at[side].send([ping(src, dst, i) for i in range(n)], now), now)

    def tick(self, now: float) -> None:
        for side, device in self.at.items():
            self.deliver(side, device.tick(now), now)

    def paths(self, sender: str) -> list[str]:
        return [path for who, path, _ in self.log if who == sender]

    def peer_of(self, device: Device) -> object:
        (peer,) = device.peers.values()
        return peer


def test_no_endpoints_everything_goes_through_the_relay() -> None:
    m = Mesh(endpoints=False)
    m.send(EA, 3, T0)
    assert len(m.received[EB]) == 3
    m.send(EB, 2, T0 + 0.1)
    assert len(m.received[EA]) == 2
    assert set(m.paths("A")) == set(m.paths("B")) == {"relay"}
    for device in (m.a, m.b):
        peer = m.peer_of(device)
        assert peer.endpoint is None and device.status(T0)[0]["path"] == "relay"  # type: ignore[attr-defined]
        assert device.counters["no_endpoint"] == 0
    assert not any(kind == ENDPOINT_CHANGED for _, kind in m.events)


def test_a_working_endpoint_is_trusted_then_mirrored_then_probed() -> None:
    m = Mesh(endpoints=True)
    m.send(EA, 1, T0)  # nothing trusted yet: the initiation goes both ways
    assert m.paths("A")[:2] == ["direct", "relay"] and len(m.received[EB]) == 1
    m.log.clear()
    m.send(EA, 5, T0 + 1)
    assert m.paths("A") == ["direct"] and m.a.status(T0)[0]["path"] == "direct"  # B answered directly
    m.log.clear()
    m.send(EA, 1, T0 + 1 + TIMING.trust_direct + 1)  # B silent past the trust window: the relay, and direct too
    assert sorted(m.paths("A")[:2]) == ["direct", "relay"] and m.a.status(T0)[0]["path"] == "relay"
    m.log.clear()
    quiet = T0 + 1 + TIMING.mirror_direct + 1  # the endpoint has not worked for long: probed once a second
    m.direct = False
    m.send(EA, 1, quiet)
    m.send(EA, 1, quiet + 0.5)
    m.send(EA, 1, quiet + TIMING.probe_direct + 0.6)
    assert m.paths("A") == ["direct", "relay", "relay", "direct", "relay"]


def test_a_dead_endpoint_leaves_the_peer_on_the_relay_and_never_moves_it() -> None:
    m = Mesh(endpoints=True)
    m.direct = False
    m.send(EA, 1, T0)
    m.send(EA, 10, T0 + 0.1)
    m.send(EB, 10, T0 + 0.2)
    assert len(m.received[EB]) == 11 and len(m.received[EA]) == 10
    assert m.paths("A").count("relay") == 3 and m.paths("A").count("direct") == 1  # initiation, then probe-paced
    assert m.a.status(T0)[0]["path"] == m.b.status(T0)[0]["path"] == "relay"
    assert m.peer_of(m.a).endpoint == EB and m.peer_of(m.b).endpoint == EA  # type: ignore[attr-defined]
    assert not any(kind == ENDPOINT_CHANGED for _, kind in m.events)  # nothing roamed to the relay


def test_without_relays_a_peer_with_no_endpoint_is_unreachable_as_before() -> None:
    m = Mesh(endpoints=False, relaying=False)
    m.send(EA, 2, T0)
    assert m.log == [] and m.a.counters["no_endpoint"] == 1 and m.a.status(T0)[0]["path"] is None

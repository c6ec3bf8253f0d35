"""The disco path engine: engines back to back through a small simulated network (UDP with per-address
delays, stateful firewalls and an endpoint-dependent NAT, and a relay that delivers by WireGuard key),
on a simulated clock; then every refusal against a lone engine, and betterAddr's rules."""

from __future__ import annotations

import hashlib
import heapq
import itertools
import random
from collections.abc import Callable, Iterable
from typing import NamedTuple

import pytest
from nacl.public import PrivateKey

from meshsup.actors.kernel.types import RELAY_HOST, Endpoint
from meshsup.actors.magicsock.paths import (
    IDLE,
    NO_CANDIDATES,
    NO_DISCO_KEY,
    Destination,
    Paths,
    PathUpdate,
    PingResult,
)
from meshsup.actors.magicsock.quality import better, bonus
from meshsup.actors.wire import disco
from meshsup.actors.wire.disco import CallMeMaybe, Message, Ping, Pong, SharedKey

UDP_DELAY = 0.005  # one way, unless the net says otherwise for an address
RELAY_DELAY = 0.03
A_ADDR: Endpoint = ("198.51.100.1", 41641)
B_ADDR: Endpoint = ("198.51.100.2", 41641)
B_ALT: Endpoint = ("203.0.113.2", 41641)
C_ADDR: Endpoint = ("198.51.100.3", 41641)


class Delivery(NamedTuple):
    time: float
    sender: str
    receiver: str
    source: Destination  # as the receiver sees it: an address (after NAT), or the sender's key (relay)
    dest: Destination
    message: Message


class Node:
    """A node's engine behind its middlebox: none, a stateful firewall (inbound only from addresses it
    sent to), or an endpoint-dependent NAT (a public port per destination, inbound only from it)."""

    def __init__(self, net: Net, name: str, addrs: Iterable[Endpoint], nat: str, public_ip: str) -> None:
        self.net, self.name, self.addrs, self.nat, self.public_ip = net, name, list(addrs), nat, public_ip
        self.wg = hashlib.sha256(name.encode()).digest()
        self.private = PrivateKey.generate()
        self.paths = Paths(bytes(self.private), node_key=self.wg)
        self.peers: dict[bytes, list[Endpoint]] = {}
        self.mappings: dict[Endpoint, Endpoint] = {}  # NAT: remote -> our public endpoint toward it
        self.sent_to: set[Endpoint] = set()  # firewall state
        self.reply_from: dict[Endpoint, Endpoint] = {}  # which of our addresses a remote reached last
        self.updates: list[tuple[float, PathUpdate]] = []
        self.results: list[tuple[float, PingResult]] = []

    def source_toward(self, remote: Endpoint) -> Endpoint:
        if self.nat == "edm":
            return self.mappings.setdefault(remote, (self.public_ip, 40000 + len(self.mappings)))
        self.sent_to.add(remote)
        return self.reply_from.get(remote, self.addrs[0])

    def holds(self, dest: Endpoint) -> bool:
        return dest in self.mappings.values() if self.nat == "edm" else dest in self.addrs

    def admits(self, remote: Endpoint, dest: Endpoint) -> bool:
        if self.nat == "edm":
            return self.mappings.get(remote) == dest
        return self.nat == "none" or remote in self.sent_to

    def deliver(self, datagram: bytes, source: Endpoint, dest: Endpoint) -> None:
        if not self.admits(source, dest):
            self.net.dropped.append((self.net.now, self.name, source))
            return
        self.reply_from[source] = dest
        self.paths.receive(datagram, source, self.net.now)

    def paths_to(self, peer: Node) -> list[Endpoint | None]:
        """The endpoints this node's PathUpdates gave for the peer, in order."""
        return [u.endpoint for _, u in self.updates if u.peer == peer.wg]


class Net:
    def __init__(self) -> None:
        self.now = 0.0
        self.nodes: list[Node] = []
        self.delay: dict[Endpoint, float] = {}  # one-way delay of datagrams to or from an address
        self.blocked: set[Endpoint] = set()  # datagrams to or from these addresses are lost
        self.relay_up = True
        self.delivered: list[Delivery] = []
        self.dropped: list[tuple[float, str, Endpoint]] = []
        self._events: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()

    def node(self, name: str, *addrs: Endpoint, nat: str = "none", public_ip: str = "") -> Node:
        node = Node(self, name, addrs, nat, public_ip)
        node.paths.set_local_endpoints(addrs, self.now)
        self.nodes.append(node)
        return node

    def connect(self, a: Node, b: Node, a_to_b: Iterable[Endpoint] = (), b_to_a: Iterable[Endpoint] = ()) -> None:
        """Each as the other's peer, with the endpoints its configuration names, and disco keys learnt."""
        a.peers[b.wg], b.peers[a.wg] = list(a_to_b), list(b_to_a)
        for x, y in ((a, b), (b, a)):
            x.paths.set_peers(x.peers, self.now)
            assert x.paths.set_disco_key(y.wg, y.paths.public_key, self.now)

    def at(self, when: float, action: Callable[[], None]) -> None:
        heapq.heappush(self._events, (when, next(self._seq), action))

    def keep_active(self, node: Node, peer: Node, start: float, stop: float) -> None:
        """Data moving between them, as the crypto worker reports it: once a second."""
        for t in range(int(start), int(stop)):
            self.at(float(t), lambda: node.paths.activity(peer.wg, self.now))

    def run(self, until: float) -> None:
        for _ in range(1_000_000):
            self._flush()
            due = [t for n in self.nodes if (t := n.paths.get_timer()) is not None]
            if self._events:
                due.append(self._events[0][0])
            if not due or min(due) > until:
                self.now = until
                return
            self.now = max(self.now, min(due))
            if self._events and self._events[0][0] <= self.now:
                heapq.heappop(self._events)[2]()
                continue
            for node in self.nodes:
                if (t := node.paths.get_timer()) is not None and t <= self.now:
                    node.paths.handle_timer(self.now)
        raise AssertionError("the engines keep asking for timers at the same time")

    def _flush(self) -> None:
        for node in self.nodes:
            for dest, datagram in node.paths.datagrams_to_send():
                self._send(node, dest, datagram)
            node.updates += [(self.now, u) for u in node.paths.path_updates()]
            node.results += [(self.now, r) for r in node.paths.ping_results()]

    def _send(self, node: Node, dest: Destination, datagram: bytes) -> None:
        if isinstance(dest, bytes):
            peer = next(n for n in self.nodes if n.wg == dest)
            if self.relay_up:
                self.at(self.now + RELAY_DELAY, lambda: self._arrive(node, peer, node.wg, dest, datagram))
            return
        source = node.source_toward(dest)
        target = next((n for n in self.nodes if n.holds(dest)), None)
        if target is None or {source, dest} & self.blocked:
            return
        delay = self.delay.get(dest, self.delay.get(source, UDP_DELAY))
        self.at(self.now + delay, lambda: self._arrive(node, target, source, dest, datagram))

    def _arrive(self, node: Node, target: Node, source: Destination, dest: Destination, datagram: bytes) -> None:
        message = SharedKey(bytes(target.private), node.paths.public_key).open(datagram)
        self.delivered.append(Delivery(self.now, node.name, target.name, source, dest, message))
        if isinstance(source, bytes):
            target.paths.receive(datagram, source, self.now)
        elif isinstance(dest, tuple):
            target.deliver(datagram, source, dest)

    def received(
        self, by: Node, kind: type, source: Destination | None = None, dest: Destination | None = None
    ) -> list[float]:
        """When `by` got messages of a kind (through its middlebox or not), from a source and to an
        address of its own if given."""
        return [
            d.time
            for d in self.delivered
            if d.receiver == by.name
            and isinstance(d.message, kind)
            and source in (None, d.source)
            and dest in (None, d.dest)
        ]


@pytest.fixture
def net() -> Net:
    return Net()


def _near(times: Iterable[float], expected: Iterable[float]) -> bool:
    return [round(t, 6) for t in times] == [round(t, 6) for t in expected]


# --- finding and keeping a path ---------------------------------------------------------------


def test_simultaneous_open_through_two_firewalls_gives_both_sides_a_trusted_path(net: Net) -> None:
    """Neither knows an endpoint of the other: each learns the other's from its call-me-maybe through the
    relay. The first pings die at the other's firewall, but open their own for the answer."""
    a = net.node("a", A_ADDR, nat="firewall")
    b = net.node("b", B_ADDR, nat="firewall")
    net.connect(a, b)
    net.keep_active(a, b, 0, 20)
    net.at(0.2, lambda: b.paths.activity(a.wg, net.now))
    net.keep_active(b, a, 1, 20)
    net.run(10)
    assert [name for _, name, _ in net.dropped][:1] == ["a"], "b's first ping met a's closed firewall"
    assert a.paths_to(b)[0] == B_ADDR and b.paths_to(a)[0] == A_ADDR
    # a at b's call-me-maybe; b at once too: a's ping came from where b's own ping had gone unanswered
    # (it died at a's firewall), so b pings it again out of turn instead of waiting 5 s for its next.
    assert a.updates[0][0] < 1 and b.updates[0][0] < 1.5, (a.updates[:1], b.updates[:1])
    pings_to_a = net.received(a, Ping, dest=A_ADDR)
    assert len([t for t in pings_to_a if t < 5]) <= 3, pings_to_a  # out of turn once, not in a loop
    assert a.paths.status(b.wg, net.now)["endpoint"] == "198.51.100.2:41641"
    assert b.paths.status(a.wg, net.now)["endpoint"] == "198.51.100.1:41641"
    assert all(u.trusted_for == 6.5 for _, u in a.updates + b.updates)
    assert net.received(b, CallMeMaybe, a.wg) and net.received(a, CallMeMaybe, b.wg)


def test_a_node_behind_endpoint_dependent_nat_reaches_a_public_one_by_the_ping_back(net: Net) -> None:
    """Nobody can predict the NAT's port toward b: b learns it from where a's ping came from, and pings
    it back, which the NAT lets in (a sent to b from it)."""
    a = net.node("a", ("10.0.0.1", 41641), nat="edm", public_ip="203.0.113.1")
    b = net.node("b", B_ADDR)
    net.connect(a, b, a_to_b=[B_ADDR])
    a.paths.activity(b.wg, net.now)
    net.run(1)
    mapped = a.mappings[B_ADDR]
    assert a.paths_to(b) == [B_ADDR]
    assert b.paths_to(a)[0] == mapped
    assert b.paths.status(a.wg, net.now)["endpoint"] == f"203.0.113.1:{mapped[1]}"


def test_heartbeats_every_3_s_keep_the_path_while_active_and_stop_45_s_after_activity(net: Net) -> None:
    a, b = net.node("a", A_ADDR), net.node("b", B_ADDR)
    net.connect(a, b, a_to_b=[B_ADDR], b_to_a=[A_ADDR])
    a.paths.activity(b.wg, 0.0)  # once, then nothing
    net.run(200)
    pings = net.received(b, Ping, A_ADDR)
    assert _near(pings, [t + UDP_DELAY for t in range(0, 46, 3)]), "a round at 0, then a heartbeat every 3 s to 45"
    ups = [(t, u.endpoint) for t, u in a.updates]
    assert all(endpoint == B_ADDR for _, endpoint in ups[:-1]) and len(ups) == len(pings) + 1
    last_pong = net.received(a, Pong)[-1]
    assert ups[-1][1] is None and ups[-1][0] == pytest.approx(last_pong + 6.5), "trust lapses 6.5 s after the pong"
    assert a.paths.status(b.wg, net.now)["why"] == IDLE
    assert a.paths.get_timer() is None and b.paths.get_timer() is None, "an idle peer costs no timer"


def test_trust_lapses_6_5_s_after_the_last_pong_when_the_path_dies_and_the_relay_takes_over(net: Net) -> None:
    a, b = net.node("a", A_ADDR), net.node("b", B_ADDR)
    net.connect(a, b, a_to_b=[B_ADDR], b_to_a=[A_ADDR])
    net.keep_active(a, b, 0, 60)
    net.at(10.5, lambda: net.blocked.add(B_ADDR))
    net.run(30)
    last_pong = max(net.received(a, Pong, B_ADDR))
    assert last_pong == pytest.approx(9 + 2 * UDP_DELAY)
    lapse = [t for t, u in a.updates if u.endpoint is None]
    assert lapse == [pytest.approx(last_pong + 6.5)]
    assert a.updates[-1][1] == PathUpdate(b.wg, None, 0.0)
    status = a.paths.status(b.wg, net.now)
    assert status["endpoint"] is None and status["why"] == "no pong from the one candidate"
    # The rounds go on while it is active: the path comes back once the address answers again.
    net.blocked.clear()
    net.run(40)
    assert a.updates[-1][1].endpoint == B_ADDR


def test_the_lower_latency_candidate_wins_and_a_1_percent_difference_does_not_move_the_path(net: Net) -> None:
    a, b = net.node("a", A_ADDR), net.node("b", B_ADDR, B_ALT)
    net.delay |= {B_ADDR: 0.010, B_ALT: 0.00995}  # 20 ms and 19.9 ms round trips
    net.blocked.add(B_ALT)
    net.connect(a, b, a_to_b=[B_ADDR, B_ALT])
    net.keep_active(a, b, 0, 200)
    net.at(10, lambda: net.blocked.clear())
    net.run(200)
    assert len(net.received(b, Ping, A_ADDR)) > 3 and len(net.received(a, Pong, B_ALT)) >= 3, "both answer"
    assert set(a.paths_to(b)) == {B_ADDR}, "19.9 ms is not enough better than 20 ms to move"
    status = a.paths.status(b.wg, net.now)
    assert status["latency_ms"] == pytest.approx(20.0)
    assert {c["endpoint"]: c["latency_ms"] for c in status["candidates"]} == pytest.approx(
        {"198.51.100.2:41641": 20.0, "203.0.113.2:41641": 19.9}
    )


def test_a_full_round_each_minute_finds_a_better_path_that_appeared_meanwhile(net: Net) -> None:
    a, b = net.node("a", A_ADDR), net.node("b", B_ADDR, B_ALT)
    net.delay |= {B_ADDR: 0.010, B_ALT: 0.005}
    net.blocked.add(B_ALT)
    net.connect(a, b, a_to_b=[B_ADDR, B_ALT])
    net.keep_active(a, b, 0, 200)
    net.at(10, lambda: net.blocked.clear())
    net.run(200)
    switches = [(t, u.endpoint) for t, u in a.updates if u.endpoint != B_ADDR]
    assert switches[0] == (pytest.approx(60 + 0.010), B_ALT), "found by the upgrade round at 60 s, not before"
    assert {u.endpoint for t, u in a.updates if t > 61} == {B_ALT}, "and stays"


def test_a_demoted_path_is_dropped_and_not_chosen_again_until_the_next_upgrade_round(net: Net) -> None:
    a, b = net.node("a", A_ADDR), net.node("b", B_ADDR, B_ALT)
    net.delay |= {B_ADDR: 0.005, B_ALT: 0.010}
    net.connect(a, b, a_to_b=[B_ADDR, B_ALT])
    net.keep_active(a, b, 0, 200)
    net.run(10)
    assert a.paths_to(b)[-1] == B_ADDR
    a.paths.demote(b.wg, B_ADDR, "no WireGuard data for 15 s", net.now)
    assert a.paths.path_updates() == [PathUpdate(b.wg, None, 0.0)]
    net.blocked.add(B_ALT)  # for a while the demoted path is the only one that answers
    net.at(20, lambda: net.blocked.clear())
    net.run(19.5)
    assert [t for t in net.received(a, Pong, B_ADDR) if t > 10] == pytest.approx([14.01, 19.01]), "it answers"
    assert [u.endpoint for t, u in a.updates if t > 10] == [], "but is not chosen"
    status = a.paths.status(b.wg, net.now)
    assert status["why"] == "direct path 198.51.100.2:41641 carried no data: no WireGuard data for 15 s"
    net.run(69)
    assert [(t, u.endpoint) for t, u in a.updates if t > 10][0] == (pytest.approx(21.02), B_ALT)
    assert {u.endpoint for t, u in a.updates if t > 10} == {B_ALT}
    net.run(90)
    back = [t for t, u in a.updates if u.endpoint == B_ADDR and t > 10]
    assert back[0] == pytest.approx(81.01), "at the first upgrade round after the demotion (70 s): 60 s after 21"
    assert a.updates[-1][1].endpoint == B_ADDR


# --- status -------------------------------------------------------------------------------------


def test_why_there_is_no_direct_path_in_plain_sentences(net: Net) -> None:
    a, b, c = net.node("a", A_ADDR), net.node("b", B_ADDR), net.node("c", C_ADDR)
    a.peers = {b.wg: [], c.wg: [("198.51.100.50", 1), ("198.51.100.51", 1), ("198.51.100.52", 1)]}
    a.paths.set_peers(a.peers, 0.0)
    assert a.paths.status(b"x" * 32, 0.0)["why"] == "not a configured peer"
    assert a.paths.status(b.wg, 0.0) == {"endpoint": None, "latency_ms": None, "candidates": [], "why": NO_DISCO_KEY}
    a.paths.set_disco_key(b.wg, b.paths.public_key, 0.0)
    a.paths.set_disco_key(c.wg, c.paths.public_key, 0.0)
    assert a.paths.status(b.wg, 0.0)["why"] == IDLE
    net.relay_up = False  # so no call-me-maybe names endpoints
    a.paths.activity(b.wg, 0.0)
    a.paths.activity(c.wg, 0.0)
    net.run(1)
    assert a.paths.status(b.wg, net.now)["why"] == NO_CANDIDATES
    assert a.paths.status(c.wg, net.now)["why"] == "no pong from any of 3 candidates"
    assert [x["latency_ms"] for x in a.paths.status(c.wg, net.now)["candidates"]] == [None, None, None]


def test_why_names_endpoint_dependent_nat_on_one_side_or_both(net: Net) -> None:
    a = net.node("a", ("10.0.0.1", 41641), nat="edm", public_ip="203.0.113.1")
    b = net.node("b", B_ADDR)
    c = net.node("c", ("10.0.1.1", 41641), nat="edm", public_ip="203.0.113.3")
    net.connect(a, b, a_to_b=[B_ADDR])
    net.connect(a, c, a_to_b=[("203.0.113.3", 41641)], b_to_a=[("203.0.113.1", 41641)])
    a.paths.set_nat(True)
    net.keep_active(a, b, 0, 30)
    net.keep_active(a, c, 0, 30)
    net.keep_active(c, a, 0, 30)
    net.at(10, lambda: net.blocked.add(B_ADDR))
    net.run(20)
    assert a.paths_to(b)[0] == B_ADDR and a.paths_to(b)[-1] is None and a.paths_to(c) == []
    assert (
        a.paths.status(b.wg, net.now)["why"]
        == "no pong from the one candidate; this node is behind endpoint-dependent NAT"
    )
    assert a.paths.status(c.wg, net.now)["why"] == (
        "no pong from any of 2 candidates; both sides behind endpoint-dependent NAT"
        " (no ping from the peer ever reached this node directly)"
    ), "the configured one and the one of c's call-me-maybe"
    a.paths.set_nat(False)
    assert a.paths.status(c.wg, net.now)["why"] == "no pong from any of 2 candidates"


def test_why_when_the_trusted_path_lapsed_while_another_candidate_still_answers() -> None:
    lone = Lone()
    lone.paths.receive(lone.from_b.seal(CallMeMaybe((B_ALT,))), lone.b, 0.01)
    pings = {dest: lone.from_b.open(d) for dest, d in lone.paths.datagrams_to_send()}
    lone.paths.receive(lone.pong, B_ADDR, 0.02)
    lone.paths.receive(lone.from_b.seal(Pong(pings[B_ALT].txid, A_ADDR)), B_ALT, 2.0)  # slower: not chosen
    while (due := lone.paths.get_timer()) is not None and due <= 6.6:
        lone.paths.handle_timer(due)  # heartbeats to B_ADDR at 3 and 6, unanswered
    assert lone.paths.path_updates() == [PathUpdate(lone.b, B_ADDR, 6.5), PathUpdate(lone.b, None, 0.0)]
    assert lone.paths.status(lone.b, 6.6)["why"] == "1 of 2 candidates answered; the next round picks one"


def test_status_of_a_trusted_path(net: Net) -> None:
    a, b = net.node("a", A_ADDR), net.node("b", B_ADDR)
    net.delay[B_ADDR] = 0.0125
    net.connect(a, b, a_to_b=[B_ADDR])
    a.paths.activity(b.wg, 0.0)
    net.run(1)
    assert a.paths.status(b.wg, net.now) == {
        "endpoint": "198.51.100.2:41641",
        "latency_ms": 25.0,
        "candidates": [{"endpoint": "198.51.100.2:41641", "latency_ms": 25.0}],
        "why": None,
    }


# --- the user's ping ----------------------------------------------------------------------------


def test_a_users_ping_takes_the_trusted_path_else_the_relay_and_times_out_at_5_s(net: Net) -> None:
    a, b, c = net.node("a", A_ADDR), net.node("b", B_ADDR), net.node("c", C_ADDR, nat="firewall")
    d = net.node("d", ("198.51.100.4", 41641), nat="firewall")
    net.connect(a, b, a_to_b=[B_ADDR])
    net.connect(a, c)
    net.connect(a, d)
    a.paths.activity(b.wg, 0.0)
    net.run(1)
    a.paths.ping(b.wg, 1, net.now)
    a.paths.ping(c.wg, 2, net.now)  # no candidate: through the relay
    net.run(2)
    assert [r for _, r in a.results] == [
        PingResult(1, b.wg, B_ADDR, pytest.approx(2 * UDP_DELAY)),
        PingResult(2, c.wg, None, pytest.approx(2 * RELAY_DELAY)),
    ]
    net.relay_up = False
    a.paths.ping(d.wg, 3, net.now)
    a.paths.ping(b"x" * 32, 4, net.now)  # not a peer: answered at once
    net.run(10)
    assert [(t, r) for t, r in a.results[2:]] == [
        (2.0, PingResult(4, b"x" * 32, None, None)),
        (7.0, PingResult(3, d.wg, None, None)),
    ]


# --- the node's own changes ---------------------------------------------------------------------


def test_new_local_endpoints_are_told_to_active_peers_at_most_once_per_5_s(net: Net) -> None:
    a, b, c = net.node("a", A_ADDR), net.node("b", B_ADDR), net.node("c", C_ADDR)
    net.connect(a, b, a_to_b=[B_ADDR])
    net.connect(a, c, a_to_b=[C_ADDR])
    a.paths.activity(b.wg, 0.0)
    net.run(1)
    a.paths.set_local_endpoints([A_ADDR, ("203.0.113.1", 3000)], net.now)
    a.paths.set_local_endpoints([A_ADDR, ("203.0.113.1", 3000)], net.now)  # no change: nothing owed
    net.run(10)
    told = [(d.time, d.message) for d in net.delivered if d.sender == "a" and isinstance(d.message, CallMeMaybe)]
    assert told == [
        (pytest.approx(RELAY_DELAY), CallMeMaybe((A_ADDR,))),
        (pytest.approx(5 + RELAY_DELAY), CallMeMaybe((A_ADDR, ("203.0.113.1", 3000)))),
    ], "c is idle: told nothing"


def test_a_new_disco_key_resets_the_peers_paths_and_a_bad_or_taken_one_is_refused(net: Net) -> None:
    a, b, c = net.node("a", A_ADDR), net.node("b", B_ADDR), net.node("c", C_ADDR)
    net.connect(a, b, a_to_b=[B_ADDR], b_to_a=[A_ADDR])
    net.connect(a, c)
    net.keep_active(a, b, 0, 30)
    net.run(1)
    assert a.paths_to(b) == [B_ADDR]
    assert not a.paths.set_disco_key(b.wg, b.paths.public_key, net.now), "the same key is no news"
    assert not a.paths.set_disco_key(b.wg, bytes(32), net.now)
    assert not a.paths.set_disco_key(b.wg, c.paths.public_key, net.now)
    assert not a.paths.set_disco_key(b"x" * 32, b.paths.public_key, net.now)
    refused = ("bad_key", "disco_key_in_use", "unknown_peer")
    assert [a.paths.counters[reason] for reason in refused] == [1, 1, 1]
    assert a.paths.disco_key(b.wg) == b.paths.public_key and a.paths.path_updates() == []
    # b restarts with a new disco key: what a knew of it is stale, a looks again at once.
    b.private = PrivateKey.generate()
    b.paths = Paths(bytes(b.private))
    b.paths.set_local_endpoints(b.addrs, net.now)
    b.paths.set_peers(b.peers, net.now)
    b.paths.set_disco_key(a.wg, a.paths.public_key, net.now)
    assert a.paths.set_disco_key(b.wg, b.paths.public_key, net.now)
    assert a.paths.path_updates() == [PathUpdate(b.wg, None, 0.0)]
    net.run(2)
    assert a.paths_to(b)[-1] == B_ADDR


def test_a_removed_peer_is_forgotten(net: Net) -> None:
    a, b = net.node("a", A_ADDR), net.node("b", B_ADDR)
    net.connect(a, b, a_to_b=[B_ADDR], b_to_a=[A_ADDR])
    a.paths.activity(b.wg, 0.0)
    net.keep_active(b, a, 0, 10)
    net.run(1)
    a.paths.set_peers({}, net.now)
    net.run(20)
    assert a.paths.disco_key(b.wg) is None and a.paths.get_timer() is None
    assert a.paths.counters["unknown_sender"] >= 1, "b's pings are a stranger's now"


def test_a_thousand_idle_peers_cost_no_timer() -> None:
    paths = Paths(bytes(PrivateKey.generate()))
    peers = {i.to_bytes(32, "big"): [("198.51.100.9", 1000 + i)] for i in range(1000)}
    paths.set_peers(peers, 0.0)
    for key in peers:
        assert paths.set_disco_key(key, PrivateKey.generate().public_key.encode(), 0.0)
    assert paths.get_timer() is None and paths.datagrams_to_send() == []
    paths.activity(next(iter(peers)), 0.0)
    assert paths.get_timer() == 3.0
    assert len(paths.datagrams_to_send()) == 1, "one ping; no call-me-maybe before a local endpoint is known"


# --- refusals: counted, and nothing moves -------------------------------------------------------


class Lone:
    """Engine `a` with peers b and c, having just pinged b at B_ADDR; the test plays b and c by hand."""

    def __init__(self) -> None:
        self.a_key, self.b_key, self.c_key = (PrivateKey.generate() for _ in range(3))
        self.b, self.c = b"b" * 32, b"c" * 32
        self.paths = Paths(bytes(self.a_key))
        self.paths.set_peers({self.b: [B_ADDR], self.c: [C_ADDR]}, 0.0)
        self.paths.set_local_endpoints([A_ADDR], 0.0)
        self.paths.set_disco_key(self.b, self.b_key.public_key.encode(), 0.0)
        self.paths.set_disco_key(self.c, self.c_key.public_key.encode(), 0.0)
        self.from_b = SharedKey(bytes(self.b_key), self.paths.public_key)
        self.from_c = SharedKey(bytes(self.c_key), self.paths.public_key)
        self.paths.activity(self.b, 0.0)
        sent = dict(self.paths.datagrams_to_send())
        ping = self.from_b.open(sent[B_ADDR])
        assert isinstance(ping, Ping) and isinstance(self.from_b.open(sent[self.b]), CallMeMaybe)
        self.txid = ping.txid
        self.pong = self.from_b.seal(Pong(self.txid, A_ADDR))

    def quiet(self) -> bool:
        return self.paths.path_updates() == [] and self.paths.datagrams_to_send() == []


def test_refused_datagrams_are_counted_by_reason_and_move_nothing() -> None:
    lone = Lone()
    tampered = bytearray(lone.pong)
    tampered[-1] ^= 1
    stranger = SharedKey(bytes(PrivateKey.generate()), lone.paths.public_key)
    cases: list[tuple[str, bytes, Destination]] = [
        ("unknown_txid", lone.from_b.seal(Pong(b"t" * 12, A_ADDR)), B_ADDR),
        ("pong_wrong_source", lone.pong, ("198.51.100.66", 41641)),
        ("pong_wrong_source", lone.from_b.seal(Pong(lone.txid, (RELAY_HOST, 0))), lone.b),
        ("pong_wrong_key", lone.from_c.seal(Pong(lone.txid, A_ADDR)), B_ADDR),
        ("bad_box", bytes(tampered), B_ADDR),
        ("unknown_sender", stranger.seal(Pong(lone.txid, A_ADDR)), B_ADDR),
        ("relay_key_mismatch", lone.from_b.seal(Pong(lone.txid, (RELAY_HOST, 0))), lone.c),
        ("call_me_maybe_not_via_relay", lone.from_b.seal(CallMeMaybe((("198.51.100.77", 1),))), B_ADDR),
        ("short", disco.MAGIC + b"x", B_ADDR),
        ("bad_magic", b"TS\xf0\x9f\x92\xad" + lone.pong[6:], B_ADDR),
    ]
    for reason, datagram, source in cases:
        before = lone.paths.counters[reason]
        lone.paths.receive(datagram, source, 0.02)
        assert lone.paths.counters[reason] == before + 1, reason
        assert lone.quiet(), reason
    assert [c["endpoint"] for c in lone.paths.status(lone.b, 0.02)["candidates"]] == ["198.51.100.2:41641"]
    # The pong itself is still welcome, once.
    lone.paths.receive(lone.pong, B_ADDR, 0.02)
    assert lone.paths.path_updates() == [PathUpdate(lone.b, B_ADDR, 6.5)]
    lone.paths.receive(lone.pong, B_ADDR, 0.03)
    assert lone.paths.counters["unknown_txid"] == 2 and lone.quiet(), "a replayed pong"


def test_a_pong_after_the_5_s_timeout_is_unknown() -> None:
    lone = Lone()
    lone.paths.receive(lone.pong, B_ADDR, 5.0)
    assert lone.paths.counters["unknown_txid"] == 1 and lone.quiet()


def test_a_replayed_ping_is_answered_once() -> None:
    lone = Lone()
    ping = lone.from_b.seal(Ping(b"p" * 12))
    lone.paths.receive(ping, ("198.51.100.70", 5), 0.1)
    answered = lone.paths.datagrams_to_send()
    assert [(dest, type(lone.from_b.open(d))) for dest, d in answered] == [
        (("198.51.100.70", 5), Pong),
        (("198.51.100.70", 5), Ping),
    ], "answered, and pinged back: a new candidate"
    lone.paths.receive(ping, ("198.51.100.71", 5), 0.2)
    assert lone.paths.counters["ping_replayed"] == 1 and lone.quiet()
    assert len(lone.paths.status(lone.b, 0.2)["candidates"]) == 2


def test_pings_from_many_sources_make_at_most_16_candidates() -> None:
    lone = Lone()
    for i in range(40):
        lone.paths.receive(lone.from_b.seal(Ping(bytes([i]) * 12)), ("198.51.100.70", 1000 + i), 0.1 + i / 100)
    candidates = [c["endpoint"] for c in lone.paths.status(lone.b, 1.0)["candidates"]]
    assert candidates == ["198.51.100.2:41641"] + [f"198.51.100.70:{1000 + i}" for i in range(24, 40)], "the latest"


def test_a_path_learnt_from_a_ping_stays_while_it_answers_though_the_peer_pings_no_more() -> None:
    """A peer that answers but does not ping (Tailscale pings back only in its own rounds): the source of
    its one ping stays the path through upgrade rounds, as long as its pongs come."""
    lone = Lone()
    mapped = ("203.0.113.9", 40000)  # its NAT's port toward us
    lone.paths.receive(lone.from_b.seal(Ping(b"q" * 12)), mapped, 0.1)
    now = 0.1
    while now < 130:
        for dest, datagram in lone.paths.datagrams_to_send():
            if dest == mapped and isinstance(ping := lone.from_b.open(datagram), Ping):
                lone.paths.receive(lone.from_b.seal(Pong(ping.txid, A_ADDR)), mapped, now + 0.01)
        lone.paths.activity(lone.b, now + 0.01)
        now = lone.paths.get_timer() or 130
        lone.paths.handle_timer(now)
    assert {u.endpoint for u in lone.paths.path_updates()} == {mapped}
    assert lone.paths.status(lone.b, now)["endpoint"] == "203.0.113.9:40000"


def test_a_relayed_ping_is_answered_through_the_relay() -> None:
    lone = Lone()
    lone.paths.receive(lone.from_b.seal(Ping(b"r" * 12)), lone.b, 0.1)
    [(dest, datagram)] = lone.paths.datagrams_to_send()
    assert dest == lone.b and lone.from_b.open(datagram) == Pong(b"r" * 12, (RELAY_HOST, 0))


def test_ten_thousand_random_magic_datagrams_are_counted_without_opening_a_box(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    lone = Lone()
    opened = []
    monkeypatch.setattr(SharedKey, "open", lambda self, d: opened.append(d))
    rng = random.Random(7)
    for _ in range(10_000):
        lone.paths.receive(disco.MAGIC + rng.randbytes(32) + rng.randbytes(rng.randrange(40, 120)), B_ADDR, 0.1)
    assert opened == [] and lone.paths.counters["unknown_sender"] == 10_000 and lone.quiet()


def test_a_call_me_maybe_flood_keeps_pings_in_flight_bounded_and_they_expire_at_5_s() -> None:
    lone = Lone()
    rng = random.Random(3)
    for i in range(20):
        endpoints = tuple(("198.51.100.200", rng.randrange(1, 65536)) for _ in range(40))
        lone.paths.receive(lone.from_b.seal(CallMeMaybe(endpoints)), lone.b, 0.1 + i / 100)
    pings = [d for dest, d in lone.paths.datagrams_to_send() if dest != lone.b]
    assert len(pings) == 64 - 1, "the first ping (to B_ADDR) is in flight too"
    assert lone.paths.counters["ping_in_flight_limit"] > 0
    assert len(lone.paths.status(lone.b, 1.0)["candidates"]) == 1 + 32, "B_ADDR and the last call's first 32"
    lone.paths.handle_timer(5.3)
    assert lone.paths.counters["ping_timeouts"] == 64
    again = [d for dest, d in lone.paths.datagrams_to_send() if dest != lone.b]
    assert len(again) == 33, "expired, they make room: the heartbeat's round pings every candidate again"


# --- betterAddr ---------------------------------------------------------------------------------


PUBLIC: Endpoint = ("198.51.100.2", 1)
OTHER: Endpoint = ("203.0.113.2", 1)


@pytest.mark.parametrize(
    ("a", "a_ms", "b", "b_ms", "want"),
    [
        (PUBLIC, 10, OTHER, 20, True),  # lower latency
        (PUBLIC, 20, OTHER, 10, False),
        (PUBLIC, 19.9, OTHER, 20, False),  # a 1% gain is no reason to move
        (PUBLIC, 19.7, OTHER, 20, True),  # 2% is
        (("10.1.2.3", 1), 20, PUBLIC, 20, True),  # private beats public at equal latency,
        (("10.1.2.3", 1), 20, PUBLIC, 14, False),  # not when 30% slower
        (("2001:db8::2", 1), 20, PUBLIC, 20, True),  # IPv6 +10
        (("fe80::2", 1), 20, ("10.1.2.3", 1), 20, True),  # link-local (30 + 10) over private (20)
        (("127.0.0.1", 1), 25, ("10.1.2.3", 1), 20, True),  # loopback: 50
        (PUBLIC, 10, PUBLIC, 20, False),  # the same endpoint never replaces itself
        (PUBLIC, 0, OTHER, 0, False),
    ],
)
def test_better_addr_as_tailscale_scores_it(a: Endpoint, a_ms: float, b: Endpoint, b_ms: float, want: bool) -> None:
    assert better(a, a_ms / 1000, b, b_ms / 1000) is want


def test_documentation_ranges_are_public_as_go_counts_them() -> None:
    """Python's is_private says True for 198.51.100.0/24; Go's IsPrivate (RFC 1918, RFC 4193) does not."""
    assert [
        bonus(h) for h in ("198.51.100.1", "203.0.113.1", "172.16.0.1", "192.168.1.1", "fd00::1", "169.254.1.1")
    ] == [
        0,
        0,
        20,
        20,
        30,
        30,
    ]


def test_a_call_me_maybe_that_beats_the_peers_key_through_the_relay_is_opened_once_the_key_comes() -> None:
    """The key comes inside the tunnel, the call-me-maybe through the relay: either may arrive first.
    One that comes first is held (through the relay only, a few, for 5 s) and acted on at the key."""
    ours, theirs = PrivateKey.generate(), PrivateKey.generate()
    peer = b"p" * 32
    paths = Paths(bytes(ours))
    paths.set_peers({peer: []}, 0.0)
    paths.set_local_endpoints([A_ADDR], 0.0)
    paths.activity(peer, 0.0)
    sealed = SharedKey(bytes(theirs), paths.public_key)
    paths.receive(sealed.seal(CallMeMaybe((B_ADDR,))), peer, 0.1)
    paths.receive(sealed.seal(CallMeMaybe((B_ALT,))), B_ADDR, 0.1)  # not through the relay: not held
    assert (paths.counters["held_until_key"], paths.counters["unknown_sender"]) == (1, 1)
    assert paths.datagrams_to_send() == []
    assert paths.set_disco_key(peer, theirs.public_key.encode(), 0.3)
    sent = paths.datagrams_to_send()
    assert B_ADDR in [dest for dest, _ in sent], sent  # its endpoint pinged at the key, not 5 s on
    assert paths.counters["call_me_maybe_received"] == 1
    # A held one older than 5 s is not acted on.
    late = Paths(bytes(ours))
    late.set_peers({peer: []}, 0.0)
    late.receive(SharedKey(bytes(theirs), late.public_key).seal(CallMeMaybe((B_ADDR,))), peer, 0.0)
    late.set_disco_key(peer, theirs.public_key.encode(), 6.0)
    assert late.counters["call_me_maybe_received"] == 0

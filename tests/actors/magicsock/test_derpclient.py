"""magicsock's DERP client, sans-IO: against the relay worker's own core (also sans-IO), and against
a relay that answers garbage, stalls or sends what a client has no use for."""

from __future__ import annotations

import pytest
from nacl.public import PrivateKey

from meshsup.actors.magicsock.derpclient import DerpClient, Health, PeerGone, Phase, Restarting, Timing
from meshsup.actors.relay.core import Core, Settings
from meshsup.actors.wire import derp
from meshsup.actors.wire.derp import FrameReader, FrameType, PeerGoneReason

T0 = 100.0


def keys() -> tuple[bytes, bytes]:
    k = PrivateKey.generate()
    return bytes(k), bytes(k.public_key)


SERVER = keys()


class Wire:
    """A client and the relay's core joined by nothing but byte strings: what one sends, the other receives."""

    def __init__(self) -> None:
        self.core = Core(Settings("relay-0", *SERVER), T0)
        self.clients: dict[int, DerpClient] = {}

    def connect(self, conn: int, now: float = T0) -> DerpClient:
        client = DerpClient(*keys(), "192.0.2.1:8080", now)
        self.core.accept(conn, ("198.51.100.7", 40000 + conn), now)
        self.clients[conn] = client
        self.pump(now)
        return client

    def pump(self, now: float) -> None:
        """Carry bytes both ways until neither side has more."""
        moved = True
        while moved:
            moved = False
            for conn, client in self.clients.items():
                out = client.data_to_send()
                if out:
                    self.core.receive(conn, b"".join(out), now)
                    moved = True
            taken = self.core.take()
            for conn, chunks in taken.send.items():
                if conn in self.clients and chunks:
                    self.clients[conn].receive_data(b"".join(bytes(c) for c in chunks), now)
                    moved = True
            for conn in taken.close:
                self.clients[conn].close()


def greeting() -> bytes:
    return derp.upgrade_response(SERVER[1]) + derp.server_key(SERVER[1])


def logged_in(now: float = T0, timing: Timing = Timing()) -> DerpClient:
    """A client logged in to a hand-driven relay (the test is the relay)."""
    client = DerpClient(*keys(), "192.0.2.1:8080", now, timing)
    client.receive_data(greeting(), now)
    client.receive_data(derp.server_info(SERVER[0], client.public), now)
    assert client.up
    client.data_to_send()
    return client


def sent_frames(client: DerpClient) -> list[tuple[int, bytes]]:
    reader = FrameReader()
    reader.feed(b"".join(client.data_to_send()))
    out = []
    while (f := reader.next()) is not None:
        out.append(f)
    return out


def test_login_packets_both_ways_and_latency() -> None:
    wire = Wire()
    a, b = wire.connect(1), wire.connect(2)
    assert a.up and b.up and a.server_key == SERVER[1] and a.server_info["version"] == 2
    assert a.send_packets(b.public, [b"packet %d" % i for i in range(3)]) == 0
    assert b.send_packets(a.public, [b"back"]) == 0
    wire.pump(T0 + 0.1)
    assert {k: [bytes(p) for p in ps] for k, ps in b.take_packets().items()} == {
        a.public: [b"packet 0", b"packet 1", b"packet 2"]
    }
    assert [bytes(p) for p in a.take_packets()[b.public]] == [b"back"]
    assert b.counters["rx_packets"] == 3 and b.counters["rx_bytes"] == 24
    # The first Ping goes at once; its Pong gives the round trip.
    assert a.get_timer() == T0
    a.handle_timer(T0 + 0.5)
    wire.pump(T0 + 0.52)
    assert a.rtt == pytest.approx(0.02)
    assert a.get_timer() == T0 + 0.5 + Timing().ping_interval
    a.note_preferred(True)
    wire.pump(T0 + 1)
    assert wire.core.status()["counters"]["home_clients"] == 1


def test_peer_gone_when_the_peer_leaves_and_not_here() -> None:
    wire = Wire()
    a, b = wire.connect(1), wire.connect(2)
    b.send_packets(a.public, [b"x"])
    stranger = keys()[1]
    a.send_packets(stranger, [b"y"])
    wire.pump(T0)
    assert a.take_events() == [PeerGone(stranger, PeerGoneReason.NOT_HERE)]
    wire.core.ended(2, T0 + 1)  # b's connection ends: a, who heard from it, is told
    del wire.clients[2]
    wire.pump(T0 + 1)
    assert a.take_events() == [PeerGone(b.public, PeerGoneReason.DISCONNECTED)]


def test_the_servers_pings_keepalives_health_and_restarting() -> None:
    c = logged_in()
    c.receive_data(derp.ping(b"12345678") + derp.keep_alive() + derp.health("overloaded"), T0)
    assert sent_frames(c) == [(FrameType.PONG, b"12345678")]
    c.receive_data(derp.restarting(1500, 20000), T0)
    assert c.take_events() == [Health("overloaded"), Restarting(1.5, 20.0)]
    c.receive_data(derp.frame(FrameType.SEND_PACKET, bytes(32), b"??") + derp.frame(0x42, b"later"), T0)
    assert c.up and c.counters["unexpected_send_packet"] == 1 and c.counters["unexpected_type_0x42"] == 1


def test_a_packet_over_derps_limit_is_refused_not_sent() -> None:
    c = logged_in()
    assert c.send_packets(bytes(32), [bytes(derp.MAX_PACKET_SIZE + 1), bytes(derp.MAX_PACKET_SIZE), b"x"]) == 1
    assert [len(payload) for _, payload in sent_frames(c)] == [32 + derp.MAX_PACKET_SIZE, 33]


def test_nothing_is_sent_before_login() -> None:
    c = DerpClient(*keys(), "192.0.2.1:8080", T0)
    assert c.send_packets(bytes(32), [b"x"]) == 1
    assert c.data_to_send() == [derp.upgrade_request("192.0.2.1:8080")]


@pytest.mark.parametrize(
    "answer, reason",
    [
        (b"HTTP/1.1 404 Not Found\r\n\r\n", "http_404"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", "http_200"),
        (b"SSH-2.0-OpenSSH\r\n\r\n", "bad_http"),
        (b"\xff" * 20 + b"\r\n\r\n", "bad_http"),
        (b"x" * (derp.MAX_HEAD + 10), "http_head_too_long"),
        (derp.upgrade_response(SERVER[1]) + derp.header(FrameType.SERVER_KEY, 1 << 20), "server_key_oversized"),
        (
            derp.upgrade_response(SERVER[1]) + derp.frame(FrameType.SERVER_KEY, b"NOTMAGIC" + bytes(32)),
            "server_key_magic",
        ),
        (derp.upgrade_response(SERVER[1]) + derp.recv_packet(bytes(32), b"early"), "login_recv_packet"),
        (greeting() + derp.frame(FrameType.SERVER_INFO, bytes(64)), "server_info_box"),
    ],
)
def test_a_relay_answering_garbage_is_closed_with_a_reason(answer: bytes, reason: str) -> None:
    c = DerpClient(*keys(), "192.0.2.1:8080", T0)
    for i in range(0, len(answer), 7):  # in pieces, as TCP may hand it over
        c.receive_data(answer[i : i + 7], T0)
    assert c.closed and c.close_reason == reason
    assert c.data_to_send() == [] and c.get_timer() is None


@pytest.mark.parametrize("ftype", [FrameType.RECV_PACKET, FrameType.PEER_GONE, FrameType.PING, FrameType.HEALTH])
def test_frames_too_long_or_short_for_their_type_close(ftype: FrameType) -> None:
    least, most = derp.LIMITS[ftype]
    for length, reason in ((most + 1, "oversized"), (least - 1, "truncated")):
        if length < 0:
            continue
        c = logged_in()
        c.receive_data(derp.header(ftype, length) + bytes(max(length, 0)), T0)
        assert c.closed and c.close_reason == f"{derp.type_name(ftype)}_{reason}"


def test_a_relay_that_stalls_at_login_or_after_times_out() -> None:
    timing = Timing(login_timeout=10.0, ping_interval=15.0, ping_timeout=5.0)
    c = DerpClient(*keys(), "192.0.2.1:8080", T0, timing)
    c.receive_data(greeting(), T0 + 1)  # ... and then nothing
    assert c.get_timer() == T0 + 10
    c.handle_timer(T0 + 9.9)
    assert c.phase is Phase.LOGIN
    c.handle_timer(T0 + 10)
    assert c.closed and c.close_reason == "login_timeout"

    c = logged_in(T0, timing)
    c.handle_timer(T0)  # the first Ping
    ping = sent_frames(c)
    assert [t for t, _ in ping] == [FrameType.PING]
    c.receive_data(derp.pong(b"wrong!!!"), T0 + 1)  # not ours: no latency from it
    assert c.rtt is None and c.get_timer() == T0 + 5
    c.handle_timer(T0 + 5)
    assert c.closed and c.close_reason == "ping_timeout"


def test_a_pong_keeps_it_up_and_the_next_ping_follows() -> None:
    c = logged_in()
    c.handle_timer(T0)
    ((_, data),) = sent_frames(c)
    c.receive_data(derp.pong(data), T0 + 0.03)
    assert c.rtt == pytest.approx(0.03) and c.get_timer() == T0 + Timing().ping_interval
    c.handle_timer(T0 + Timing().ping_interval)
    assert [t for t, _ in sent_frames(c)] == [FrameType.PING] and c.up

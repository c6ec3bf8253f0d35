"""magicsock's relay links on loopback, driven by a small select loop as the actor's would: against
`meshsup relay`, and against relays that answer garbage, stall or hang up; and the home and route
choices among several relays."""

from __future__ import annotations

import os
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from nacl.public import PrivateKey

from meshsup.actors.kernel.resolve import Resolver
from meshsup.actors.kernel.types import Buffer
from meshsup.actors.magicsock.derpclient import Timing
from meshsup.actors.magicsock.relays import Backoff, RelayLink, Relays
from meshsup.actors.settings.relay import RelayEntry
from meshsup.actors.wire import derp
from tests.actors.relay.test_node import Relay
from tests.netlog_fixtures import make_certificate


class Log:
    def __getattr__(self, name: str) -> Callable[..., None]:
        return lambda *args, **kw: None


class Loop:
    """The actor loop's part: watched descriptors and their handlers, then every link's tick and flush."""

    def __init__(self, resolver: Resolver | None = None) -> None:
        self.resolver = resolver or Resolver()
        self.fds: dict[int, tuple[Callable[[], None], bool, bool]] = {}
        self.got: dict[bytes, list[bytes]] = {}  # what the links delivered, by source key

    def watch(self, fd: int, handler: Callable[[], None], *, read: bool = False, write: bool = False) -> None:
        self.fds[fd] = (handler, read, write)

    def unwatch(self, fd: int) -> None:
        self.fds.pop(fd, None)

    def deliver(self, link: RelayLink, packets: dict[bytes, list[Buffer]]) -> None:
        for key, ps in packets.items():
            self.got.setdefault(key, []).extend(bytes(p) for p in ps)

    def link(
        self, index: int, port: int, timing: Timing = Timing(), ca_file: Path | None = None, host: str = "127.0.0.1"
    ) -> RelayLink:
        tls = ca_file is not None
        url = f"{'https' if tls else 'http'}://{host}:{port}/derp"
        settings = RelayEntry("edge", url, host, port, tls, (host, 3478), ca_file)
        key = PrivateKey.generate()
        keys = (bytes(key), bytes(key.public_key))
        return RelayLink(index, settings, keys, self.watch, self.unwatch, self.deliver, Log(), self.resolver, timing)

    def run(self, relays: Relays, until: Callable[[], bool], timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not until():
            assert time.monotonic() < deadline, "timed out"
            reads = [fd for fd, (_, r, _) in self.fds.items() if r]
            writes = [fd for fd, (_, _, w) in self.fds.items() if w]
            ready_r, ready_w, _ = select.select(reads, writes, [], 0.02)
            for fd in set(ready_r) | set(ready_w):
                if fd in self.fds:
                    self.fds[fd][0]()
            now = time.monotonic()
            relays.tick(now)
            relays.flush(now)


class Misbehaving:
    """A TCP server on loopback that treats every connection with `behave` (on its own thread)."""

    def __init__(self, behave: Callable[[socket.socket], None]) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.held: list[socket.socket] = []
        self.behave = behave
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.held.append(conn)
            conn.settimeout(5)
            try:
                self.behave(conn)
            except OSError:
                pass

    def close(self) -> None:
        self.listener.close()
        for conn in self.held:
            conn.close()


def request(conn: socket.socket) -> None:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(4096)
        if not chunk:
            return
        data += chunk


def answer(reply: bytes, hang_up: bool = True) -> Callable[[socket.socket], None]:
    def behave(conn: socket.socket) -> None:
        request(conn)
        conn.sendall(reply)
        if hang_up:
            conn.close()

    return behave


SERVER = PrivateKey.generate()
UPGRADED = derp.upgrade_response(bytes(SERVER.public_key)) + derp.server_key(bytes(SERVER.public_key))


def hang_up_after_login(conn: socket.socket) -> None:
    """The greeting, the client's proof read (so the close is a clean end, not a reset), then gone."""
    request(conn)
    conn.sendall(UPGRADED)
    conn.recv(4096)
    conn.close()


@pytest.mark.parametrize(
    "behave, reason",
    [
        (answer(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n"), "http_500"),
        (answer(os.urandom(64) + b"\r\n\r\n"), "bad_http"),
        (answer(UPGRADED + derp.header(derp.FrameType.RECV_PACKET, 1 << 30), hang_up=False), "recv_packet_oversized"),
        (answer(UPGRADED + derp.frame(derp.FrameType.SERVER_INFO, os.urandom(80)), hang_up=False), "server_info_box"),
        (hang_up_after_login, "closed_at_login"),
        (request, "login_timeout"),  # reads the request, then says nothing
    ],
    ids=["http-500", "garbage", "oversized-frame", "bad-box", "hangs-up", "stalls"],
)
def test_a_misbehaving_relay_is_counted_and_dialled_again(behave: Callable[[socket.socket], None], reason: str) -> None:
    server = Misbehaving(behave)
    loop = Loop()
    link = loop.link(1, server.port, Timing(login_timeout=0.3))
    relays = Relays([link])
    try:
        loop.run(relays, lambda: link.failures[reason] >= 2)
        assert link.counters["dials"] >= 2 and not link.up and relays.route(bytes(32)) is None
        assert set(link.failures) == {reason}, link.failures
    finally:
        relays.close()
        server.close()
    assert loop.fds == {}  # nothing left watched


def test_a_relay_that_refuses_connections_is_retried_with_backoff() -> None:
    with socket.create_server(("127.0.0.1", 0)) as s:
        port = s.getsockname()[1]  # closed again: nothing listens there
    loop = Loop()
    link = loop.link(1, port)
    relays = Relays([link])
    started = time.monotonic()
    loop.run(relays, lambda: link.failures["connect_econnrefused"] >= 4)
    # 0.1, 0.2 and 0.4 s at most (each drawn from the upper half of its step) between the four dials.
    assert 0.35 <= time.monotonic() - started < 2.0
    relays.close()


def test_backoff_doubles_to_its_cap_and_starts_again_after_a_login() -> None:
    b = Backoff(first=0.1, cap=5.0, rng=lambda: 1.0)
    assert [round(b.next(), 2) for _ in range(8)] == [0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0]
    b.reset()
    assert b.next() == 0.1
    assert Backoff(rng=lambda: 0.0).next() == 0.05


@pytest.fixture
def relay(tmp_path: Path) -> Iterator[Relay]:
    r = Relay(tmp_path, "--relay-workers", "1")
    try:
        r.wait_ready()
        yield r
    finally:
        r.close()


def test_two_links_exchange_packets_through_meshsup_relay(relay: Relay) -> None:
    loop = Loop()
    a, b = loop.link(1, relay.port), loop.link(1, relay.port)
    relays = Relays([a, b])
    loop.run(relays, lambda: a.rtt is not None and b.rtt is not None)
    key_a, key_b = a.keys[1], b.keys[1]
    now = time.monotonic()
    assert a.send(key_b, [b"one", b"two"], now) == 0 and b.send(key_a, [b"back"], now) == 0
    loop.run(relays, lambda: len(loop.got.get(key_a, [])) == 2 and len(loop.got.get(key_b, [])) == 1)
    assert loop.got == {key_a: [b"one", b"two"], key_b: [b"back"]}
    assert a.status(home=True)["latency_ms"] > 0 and a.status(home=True)["state"] == "up"
    stranger = bytes(32)
    a.send(stranger, [b"lost"], now)
    loop.run(relays, lambda: a.counters["not_here"] >= 1)
    relays.tick(time.monotonic())
    assert relays.not_at == {stranger: {1}}
    relays.close()


def test_https_with_the_relays_ca_and_refused_without_it(tmp_path: Path) -> None:
    cert, key = make_certificate(tmp_path)
    (tmp_path / "other").mkdir()
    other, _ = make_certificate(tmp_path / "other")  # a CA the relay's certificate is not from
    relay = Relay(tmp_path, "--tls-cert", str(cert), "--tls-key", str(key))
    try:
        relay.wait_ready()
        loop = Loop()
        good, bad = loop.link(1, relay.port, ca_file=cert), loop.link(2, relay.port, ca_file=other)
        relays = Relays([good, bad])
        loop.run(relays, lambda: good.rtt is not None and bad.failures["tls_certificate_verify_failed"] >= 1)
        assert good.state == "up" and not bad.up
        relays.close()
    finally:
        relay.close()


def loopback_as(name: str, asked: list[str]) -> Callable[..., list[tuple[Any, ...]]]:
    """A getaddrinfo that answers `name` with 127.0.0.1 and knows no other name."""

    def getaddrinfo(host: str, port: int, type: int = 0) -> list[tuple[Any, ...]]:
        asked.append(host)
        if host != name:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return socket.getaddrinfo("127.0.0.1", port, type=type)

    return getaddrinfo


def test_a_relay_named_by_host_name_is_reached_at_its_address_and_verified_by_that_name(tmp_path: Path) -> None:
    cert, key = make_certificate(tmp_path, "relay.test")
    relay = Relay(tmp_path, "--tls-cert", str(cert), "--tls-key", str(key))
    try:
        relay.wait_ready()
        asked: list[str] = []
        loop = Loop(Resolver(getaddrinfo=loopback_as("relay.test", asked)))
        named = loop.link(1, relay.port, ca_file=cert, host="relay.test")
        by_ip = loop.link(2, relay.port, ca_file=cert)  # the same relay, but the certificate does not name its IP
        relays = Relays([named, by_ip])
        loop.run(relays, lambda: named.rtt is not None and by_ip.failures["tls_certificate_verify_failed"] >= 1)
        assert named.state == "up" and not named.failures and not by_ip.up
        assert asked == ["relay.test"] and loop.resolver.lookups == 1  # a literal asks no resolver
        relays.close()
    finally:
        relay.close()


def test_a_relay_name_that_does_not_resolve_is_counted_and_retried_with_backoff() -> None:
    asked: list[str] = []
    loop = Loop(Resolver(getaddrinfo=loopback_as("relay.test", asked)))
    link = loop.link(1, 9, host="nowhere.test")
    relays = Relays([link])
    started = time.monotonic()
    loop.run(relays, lambda: link.failures["resolve_failed"] >= 3)
    # At least 0.05 and 0.1 s (the upper halves of the first two steps) between the three attempts.
    assert time.monotonic() - started >= 0.15 and link.backoff.failures == 3
    assert set(link.failures) == {"resolve_failed"} and link.counters["dials"] == 0 and link.state == "waiting"
    assert asked == ["nowhere.test"]  # the failure is cached: the retries start no lookup of their own
    assert loop.fds == {}
    relays.close()


class FakeLink:
    def __init__(self, index: int, rtt: float | None, up: bool = True) -> None:
        self.index, self.rtt, self.up = index, rtt, up
        self.relay = SimpleNamespace(name=f"r{index}")
        self.gone: list[bytes] = []
        self.told: list[bool] = []

    def note_preferred(self, preferred: bool) -> None:
        if self.up and (not self.told or self.told[-1] != preferred):
            self.told.append(preferred)

    def tick(self, now: float) -> None:
        pass


def relays_of(*links: Any) -> Relays:
    return Relays(list(links))


def test_home_is_the_fastest_and_changes_only_for_a_clearly_faster_one() -> None:
    x, y, z = FakeLink(1, 0.030), FakeLink(2, 0.020), FakeLink(3, None)
    relays = relays_of(x, y, z)
    relays.elect()
    assert relays.home is y and y.told == [True] and x.told == [False] and z.told == [False]
    y.rtt = 0.040  # x is faster now, but not by a third: y stays
    relays.elect()
    assert relays.home is y
    x.rtt = 0.025
    relays.elect()
    assert relays.home is x and y.told == [True, False] and x.told == [False, True]
    x.up, x.rtt = False, None  # the home fails: the best of the rest takes over
    relays.elect()
    assert relays.home is y
    y.up = z.up = False  # none up: the last home stays named (status shows it down)
    relays.elect()
    assert relays.home is y


def test_a_peer_is_reached_where_it_was_heard_else_home_else_where_it_was_not_refused() -> None:
    x, y = FakeLink(1, 0.010), FakeLink(2, 0.050)
    relays = relays_of(x, y)
    relays.elect()
    k = b"k" * 32
    assert relays.route(k) is x  # nothing known: the home
    relays.heard(k, y)  # its packets come through y
    assert relays.route(k) is y
    y.gone.append(k)  # y says it left
    relays.tick(0.0)
    assert relays.route(k) is x
    x.gone.append(k)  # and x says it is not there either
    relays.tick(0.0)
    assert relays.not_at[k] == {1, 2} and relays.route(k) is x  # nowhere: the home, should it come
    relays.heard(k, x)
    assert k not in relays.not_at and relays.route(k) is x
    x.up = y.up = False
    assert relays.route(k) is None


def test_a_peer_not_heard_from_is_tried_first_at_the_home_its_record_names() -> None:
    x, y, z = FakeLink(1, 0.010), FakeLink(2, 0.050), FakeLink(3, 0.060)
    relays = relays_of(x, y, z)
    relays.elect()
    k, other = b"k" * 32, b"o" * 32
    relays.hint({k: "r2", other: "elsewhere"})  # a relay of no such name is no hint
    assert relays.route(k) is y and relays.route(other) is x  # the hint, else our home
    relays.heard(k, z)  # heard through z: that wins over the hint
    assert relays.route(k) is z
    z.up = False
    assert relays.route(k) is y
    y.gone.append(k)  # y says it is not there: our home
    relays.tick(0.0)
    assert relays.route(k) is x
    relays.hint({})
    assert relays.hinted == {}


def test_a_relay_connection_carries_the_firewall_mark_and_takes_a_new_one() -> None:
    server = Misbehaving(lambda conn: None)  # accepts and holds
    loop = Loop()
    link = loop.link(1, server.port)
    link.set_mark(0x4D53)  # before the dial: the connection is routed by it from its first packet
    relays = Relays([link])
    try:
        loop.run(relays, lambda: link.transport is not None and link.counters["dials"] == 1)
        assert link.transport is not None
        assert link.transport.sock.getsockopt(socket.SOL_SOCKET, socket.SO_MARK) == 0x4D53
        link.set_mark(0)
        assert link.transport.sock.getsockopt(socket.SOL_SOCKET, socket.SO_MARK) == 0
    finally:
        relays.close()
        server.close()

"""The relay worker's core, sans-IO: bytes and time in, bytes, batches and events out."""

from __future__ import annotations

from nacl.public import PrivateKey

from meshsup.actors.bus.messages import RelayClientDown, RelayClientUp, RelayRoster, RelayWorkerUp
from meshsup.actors.relay.core import Core, Output, Settings
from meshsup.actors.wire import derp
from meshsup.actors.wire.derp import FrameReader, FrameType, PeerGoneReason


def keys() -> tuple[bytes, bytes]:
    k = PrivateKey.generate()
    return bytes(k), bytes(k.public_key)


SERVER = keys()


def core(worker: str = "relay-0", **kw: object) -> Core:
    return Core(Settings(worker, *SERVER, **kw), now=100.0)  # type: ignore[arg-type]


def frames(data: list[bytes]) -> list[tuple[int, bytes]]:
    r = FrameReader()
    for d in data:
        r.feed(d)
    out = []
    while (f := r.next()) is not None:
        out.append(f)
    return out


class Peer:
    """A client of the core: logs in on `conn` and reads what the core sends it."""

    def __init__(self, c: Core, conn: int, now: float = 100.0, mesh_key: str = "", fast: bool = True) -> None:
        self.c, self.conn = c, conn
        self.private, self.public = keys()
        c.accept(conn, ("198.51.100.7", 40000 + conn), now)
        hello = derp.upgrade_request("relay", fast_start=fast)
        c.receive(
            conn, hello + derp.client_info(self.private, self.public, SERVER[1], derp.client_info_json(mesh_key)), now
        )

    def got(self, out: Output) -> list[tuple[int, bytes]]:
        return frames(out.send.get(self.conn, []))


def test_login_forward_and_ping() -> None:
    c = core()
    a = Peer(c, 1, fast=False)
    out = c.take()
    sent = b"".join(out.send[1])
    assert sent.startswith(derp.upgrade_response(SERVER[1]))
    got = frames([sent[len(derp.upgrade_response(SERVER[1])) :]])
    assert [t for t, _ in got] == [FrameType.SERVER_KEY, FrameType.SERVER_INFO]
    assert isinstance(out.events[0], RelayWorkerUp) and out.events[1] == RelayClientUp(
        worker="relay-0", key=a.public, host="198.51.100.7", port=40001, flags=1, since=100.0
    )
    b = Peer(c, 2)
    c.take()
    c.receive(1, derp.send_packet(b.public, b"hi") + derp.ping(b"abcdefgh"), 101.0)
    out = c.take()
    assert b.got(out) == [(FrameType.RECV_PACKET, a.public + b"hi")]
    assert a.got(out) == [(FrameType.PONG, b"abcdefgh")]
    assert c.status()["counters"]["clients"] == 2


def test_replacement_peer_gone_and_not_here() -> None:
    c = core()
    a, b = Peer(c, 1), Peer(c, 2)
    c.receive(1, derp.send_packet(b.public, b"x"), 101.0)
    c.take()
    # a logs in again on conn 3: conn 1 is closed, no PeerGone to b.
    c.accept(3, ("198.51.100.7", 1), 102.0)
    c.receive(
        3, derp.upgrade_request("r", fast_start=True) + derp.client_info(a.private, a.public, SERVER[1], {}), 102.0
    )
    out = c.take()
    assert out.close == {1: ""} and b.got(out) == [] and c.counters["replaced"] == 1
    assert not any(isinstance(e, RelayClientDown) for e in out.events)
    c.ended(3, 103.0)  # now a leaves: b, who got a packet from it, is told
    out = c.take()
    assert b.got(out) == [(FrameType.PEER_GONE, a.public + bytes([PeerGoneReason.DISCONNECTED]))]
    assert out.events == [RelayClientDown(worker="relay-0", key=a.public, since=102.0)]
    nobody = bytes(32)
    for _ in range(5):
        c.receive(2, derp.send_packet(nobody, b"?"), 104.0)
    out = c.take()
    assert b.got(out) == [(FrameType.PEER_GONE, nobody + b"\x01")] * 3  # 3 a second, as Tailscale's
    assert c.dropped["unknown_dest"] == 5


def test_other_workers_batches_and_events() -> None:
    c = core("relay-0")
    a = Peer(c, 1)
    remote = bytes(range(32))
    c.on_event(RelayClientUp(worker="relay-1", key=remote, host="203.0.113.9", port=9, flags=1, since=50.0), 101.0)
    c.take()
    c.receive(1, derp.send_packet(remote, b"p1") + derp.send_packet(remote, b"p2"), 101.0)
    out = c.take()
    batches = out.batches()
    assert [w for w, _ in batches] == ["relay-1"]
    blob = batches[0][1].frames
    assert blob == b"".join(remote + derp.recv_packet(a.public, p) for p in (b"p1", b"p2"))
    # The other worker's side: a batch for a client here.
    c.on_frames(a.public + derp.recv_packet(remote, b"back") + bytes(32) + derp.recv_packet(remote, b"lost"))
    out = c.take()
    assert a.got(out) == [(FrameType.RECV_PACKET, remote + b"back")] and c.dropped["gone_disconnected"] == 1
    # It leaves there: a got from it, so a is told.
    c.on_event(RelayClientDown(worker="relay-1", key=remote, since=50.0), 102.0)
    assert a.got(c.take()) == [(FrameType.PEER_GONE, remote + b"\x00")]
    # A newer login of a's key elsewhere replaces it here.
    c.on_event(RelayClientUp(worker="relay-1", key=a.public, host="h", port=1, flags=1, since=103.0), 103.0)
    out = c.take()
    assert out.close == {1: ""} and c.table[a.public].worker == "relay-1"
    # A restarted worker: everything it had is gone, and it gets our roster.
    c.on_event(RelayWorkerUp(worker="relay-1", started=104.0), 104.0)
    out = c.take()
    assert a.public not in c.table and isinstance(out.events[-1], RelayRoster)
    c.on_event(RelayRoster(worker="relay-2", clients=[[remote, "h", 1, 1, 1.0]]), 105.0)
    assert c.table[remote].worker == "relay-2"
    c.keep_workers({"relay-0", "relay-1"})  # scaled down to two: relay-2's clients are gone
    assert remote not in c.table


def test_rate_limit_pauses_and_resumes() -> None:
    c = core(rate=100_000, burst=0)
    Peer(c, 1)
    b = Peer(c, 2)
    c.take()
    packet = bytes(60_000)
    c.receive(1, derp.send_packet(b.public, packet) * 3, 101.0)
    out = c.take()
    assert len(b.got(out)) == 2 and 1 in out.pause  # the bucket (65568) pays for one; the second is in debt
    c.tick(out.pause[1] - 0.01)
    assert not c.take().resume
    c.tick(out.pause[1])
    out = c.take()
    assert out.resume == {1} and len(b.got(out)) == 1


def test_keepalive_login_timeout_and_restarting() -> None:
    c = core()
    a = Peer(c, 1)
    c.accept(2, ("198.51.100.8", 1), 100.0)
    c.receive(2, b"GET /derp HTTP/1.1\r\n", 100.0)
    c.take()
    c.tick(111.0)
    out = c.take()
    assert out.close == {2: "login_timeout"} and a.got(out) == []
    c.tick(166.0)  # 60 s, and at most 5 of jitter
    assert a.got(c.take()) == [(FrameType.KEEP_ALIVE, b"")]
    c.restarting(0, 5000)
    assert a.got(c.take()) == [(FrameType.RESTARTING, bytes(4) + (5000).to_bytes(4, "big"))]


def test_watchers_need_the_mesh_key() -> None:
    c = core(mesh_key="ab" * 32)
    a = Peer(c, 1)
    w = Peer(c, 2, mesh_key="ab" * 32)
    c.take()
    c.receive(2, derp.watch_conns(), 101.0)
    present = [derp.parse_peer_present(p) for t, p in w.got(c.take()) if t == FrameType.PEER_PRESENT]
    assert {p.key for p in present} == {a.public, w.public}
    b = Peer(c, 3)
    assert [derp.parse_peer_present(p).key for _, p in w.got(c.take())] == [b.public]
    c.ended(3, 102.0)
    assert w.got(c.take()) == [(FrameType.PEER_GONE, b.public + b"\x00")]
    c.receive(1, derp.watch_conns(), 103.0)  # without the key: refused, that connection only
    out = c.take()
    assert out.close == {1: "watch_conns_denied"} and c.bad["watch_conns_denied"] == 1

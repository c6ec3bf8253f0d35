"""The supervisor's control sockets: an actor is heard and reached only by the identity its
launch was given, so another actor on the same socket cannot take over its connection."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
import zmq

from meshsup.actors.bus.codec import Message, decode, encode
from meshsup.actors.bus.endpoints import Runtime
from meshsup.actors.bus.messages import Heartbeat, LinkChanged, NameLearned, Stop
from meshsup.supervisor.hub import Hub


@pytest.fixture
def bus(tmp_path: Path) -> Iterator[tuple[zmq.Context, Runtime, Hub]]:
    runtime = Runtime(tmp_path)
    runtime.create()
    ctx = zmq.Context()
    hub = Hub(ctx, runtime, structlog.get_logger())
    yield ctx, runtime, hub
    ctx.destroy(linger=0)


def dealer(ctx: zmq.Context, runtime: Runtime, identity: bytes) -> zmq.Socket:
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.IDENTITY, identity)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(runtime.unprivileged_control)
    return s


ACTORS = {"netlog": "netlog", "dns-0": "dns-0"}  # what drain_control hands on: here, the name


def pump(hub: Hub, until: Any, what: str) -> list[tuple[str, Message]]:
    """Run the hub's side of the unprivileged control socket until `until(heard)`."""
    heard: list[tuple[str, Message]] = []
    deadline = time.monotonic() + 10
    while not until(heard):
        assert time.monotonic() < deadline, (what, heard, hub.bus_dropped)
        hub.unprivileged.poll(50)
        hub.drain_control(hub.unprivileged, ACTORS, lambda a, m: heard.append((a, m)))
    return heard


def received(sock: zmq.Socket, timeout_ms: int) -> list[Message]:
    out = []
    while sock.poll(timeout_ms):
        out.append(decode(sock.recv()))
        timeout_ms = 0
    return out


def beat(seq: int) -> bytes:
    return encode(Heartbeat(name="netlog", seq=seq, status={}))


def test_another_actor_cannot_speak_for_netlog_or_hear_what_it_is_sent(bus: tuple[zmq.Context, Runtime, Hub]) -> None:
    ctx, runtime, hub = bus
    netlog = dealer(ctx, runtime, hub.admit("netlog"))
    dns = dealer(ctx, runtime, hub.admit("dns-0"))
    # A compromised DNS worker connects by the names it knows.
    impostors = [dealer(ctx, runtime, name) for name in (b"netlog", b"dns-0", b"coord")]
    for s in impostors:
        s.send(beat(666))
    netlog.send(beat(1))
    dns.send(beat(2))
    heard = pump(hub, lambda h: len(h) == 2 and hub.bus_dropped.get("unknown_sender") == 3, "impostors dropped")
    assert sorted((a, m.seq) for a, m in heard) == [("dns-0", 2), ("netlog", 1)]
    assert hub.bus_dropped == {"unknown_sender": 3}
    hub.tell("netlog", Stop(req=1))
    hub.tell("dns-0", Stop(req=2))
    assert [m.req for m in received(netlog, 5000)] == [1]
    assert [m.req for m in received(dns, 5000)] == [2]
    for s in impostors:
        assert received(s, 200) == []


def test_a_live_identity_is_not_handed_over_and_a_dead_one_is_not_heard(bus: tuple[zmq.Context, Runtime, Hub]) -> None:
    ctx, runtime, hub = bus
    old = dealer(ctx, runtime, hub.admit("netlog"))
    identity = hub.admit("netlog")  # netlog restarted: its previous launch is no longer heard
    old.send(beat(1))
    pump(hub, lambda h: hub.bus_dropped.get("unknown_sender") == 1, "the previous launch dropped")
    netlog = dealer(ctx, runtime, identity)
    netlog.send(beat(2))
    assert [(a, m.seq) for a, m in pump(hub, lambda h: h, "netlog heard")] == [("netlog", 2)]
    copy = dealer(ctx, runtime, identity)  # had it leaked: a second connection takes nothing over
    copy.send(beat(3))
    hub.tell("netlog", Stop(req=1))
    assert [m.req for m in received(netlog, 5000)] == [1]
    assert received(copy, 200) == []
    netlog.send(beat(4))
    assert [(a, m.seq) for a, m in pump(hub, lambda h: h, "netlog heard again")] == [("netlog", 4)]


def test_an_unprivileged_publisher_may_announce_learned_names_and_nothing_else(
    bus: tuple[zmq.Context, Runtime, Hub],
) -> None:
    """A DNS worker taken over must not make the crypto workers and magicsock believe a link
    changed: only root reaches the root actors' event socket, and of what arrives on the
    unprivileged one only learned names pass."""
    ctx, runtime, hub = bus
    assert Path(runtime.events_in.removeprefix("ipc://")).stat().st_mode & 0o777 == 0o600
    assert Path(runtime.unprivileged_events_in.removeprefix("ipc://")).stat().st_mode & 0o777 == 0o660
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(runtime.events_out)
    root, dns = ctx.socket(zmq.PUB), ctx.socket(zmq.PUB)
    root.connect(runtime.events_in)
    dns.connect(runtime.unprivileged_events_in)
    forged, real = LinkChanged(interface="forged", change="link"), LinkChanged(interface="wg0", change="link")
    learned = NameLearned(name="host.example.", addresses=["203.0.113.9"])
    heard: list[Message] = []
    deadline = time.monotonic() + 10
    while not (real in heard and learned in heard and hub.bus_dropped.get("unprivileged_topic")):
        assert time.monotonic() < deadline, (heard, hub.bus_dropped)
        dns.send_multipart([LinkChanged.TAG.encode(), encode(forged)])
        dns.send_multipart([NameLearned.TAG.encode(), encode(learned)])
        root.send_multipart([LinkChanged.TAG.encode(), encode(real)])
        for s in hub.event_sockets:
            hub.pump(s)
        while sub.poll(20):
            heard.append(decode(sub.recv_multipart()[1]))
    assert forged not in heard

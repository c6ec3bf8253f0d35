"""Probes on a real server (loopback): a dead upstream is left alone by the queries and
hears only paced probes, however busy the server is, and comes back once it answers one."""

from __future__ import annotations

import time

import dns.message
import dns.rcode
import pytest

from meshsup.actors.dns import choice
from meshsup.actors.dns.choice import DEAD_AFTER
from meshsup.actors.settings.dns import DnsSettings
from tests.actors.dns.upstream_fakes import SilentUpstream
from tests.dns_fixtures import ServerThread, endpoint, start_stub, udp_exchange, wait_until

PROBE_MIN, PROBE_MAX, TIMEOUT = 0.2, 0.8, 0.3


@pytest.fixture
def fast_probes(monkeypatch: pytest.MonkeyPatch) -> None:
    """The schedule shrunk, so that a test sees several gaps in seconds."""
    monkeypatch.setattr(choice, "PROBE_MIN", PROBE_MIN)
    monkeypatch.setattr(choice, "PROBE_MAX", PROBE_MAX)


def ask(server: ServerThread, name: str) -> dns.message.Message:
    wire = udp_exchange(server.host, server.port, dns.message.make_query(name, "A").to_wire(), timeout=3)
    assert wire is not None, name
    return dns.message.from_wire(wire)


def test_a_recovering_dead_upstream_gets_paced_probes_only(later, fast_probes) -> None:
    dead = later(SilentUpstream())
    good = later(start_stub())
    host, port = endpoint()
    table = {"listen": [f"{host}:{port}"], "upstreams": [dead.url, f"udp://{good.host}:{good.port}"]}
    server = later(ServerThread(DnsSettings.from_config({**table, "timeout": TIMEOUT}, {})))

    # A busy server: queries one after the other, every one answered, until the dead
    # one has had four probes (the fourth after the longest pause).
    asked = []
    start = time.monotonic()
    while len(probes := [a.at for a in dead.arrivals if a.name == "."]) < 4 and time.monotonic() - start < 20:
        name = f"q{len(asked)}.example."
        assert ask(server, name).rcode() == dns.rcode.NOERROR
        asked.append(name)
    took = time.monotonic() - start
    queried = [a.name for a in dead.arrivals if a.name != "."]
    assert queried == asked[:DEAD_AFTER]  # then found dead: no query waited on it again
    assert server.counters()["upstream_timeout"] == DEAD_AFTER
    assert {a.rdtype for a in dead.arrivals if a.name == "."} == {"NS"}
    gaps = [b - a for a, b in zip(probes, probes[1:])]
    low = TIMEOUT + PROBE_MIN * (1 - choice.JITTER) - 0.05  # less a little for when the stub saw them
    assert len(gaps) == 3 and all(gap >= low for gap in gaps), gaps  # one at a time, and a pause after each
    assert gaps[2] >= TIMEOUT + PROBE_MAX * (1 - choice.JITTER) - 0.05, gaps  # the pause doubled up to PROBE_MAX
    assert len(asked) > 10 * len(probes) and took > 2.0  # a trickle, however busy the server
    status = server.call(lambda s: s.upstreams())
    assert status[dead.url]["state"] == "dead" and status[dead.url]["probes"] == len(probes)

    # It comes back: until a probe finds it, it hears probes and nothing else; then queries again.
    dead.answering.set()
    recovering = len(dead.arrivals)
    wait_until(lambda: server.call(lambda s: s.upstreams())[dead.url]["state"] == "alive", 5, "revived")
    assert [(a.name, a.rdtype) for a in dead.arrivals[recovering:]] == [(".", "NS")]
    assert ask(server, "back.example.").rcode() == dns.rcode.NOERROR
    assert dead.arrivals[-1].name == "back.example."  # first in the failover order again

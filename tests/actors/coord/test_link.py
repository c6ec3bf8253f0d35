"""The NATS link against servers that misbehave (loopback): a server that answers garbage, one
that stalls, and a real one that goes away and comes back, resumed after the last revision."""

from __future__ import annotations

import select
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from meshsup.actors.coord.link import Down, Entry, Event, Link, Problem, Up, Written
from meshsup.actors.settings.coordination import CoordinationSettings
from tests.netlog_fixtures import make_certificate

pytestmark = pytest.mark.skipif(shutil.which("nats-server") is None, reason="needs nats-server (deploy/setup.sh)")


def settings(port: int) -> CoordinationSettings:
    return CoordinationSettings(servers=(f"nats://127.0.0.1:{port}",), mesh="t", lifetime=6)


def collect(link: Link, until: Callable[[list[Event]], bool], timeout: float = 10.0) -> list[Event]:
    events: list[Event] = []
    deadline = time.monotonic() + timeout
    while not until(events) and time.monotonic() < deadline:
        select.select([link.wake], [], [], 0.2)
        events += link.take()
    assert until(events), events
    return events


@pytest.fixture
def fake_server() -> Iterator[Callable[[bytes | None], int]]:
    """A TCP server on loopback that sends `greeting` (None: nothing, it stalls) to each client."""
    socks: list[socket.socket] = []

    def start(greeting: bytes | None) -> int:
        srv = socket.socket()
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        socks.append(srv)

        def serve() -> None:
            while True:
                try:
                    conn, _ = srv.accept()
                except OSError:
                    return
                socks.append(conn)
                if greeting is not None:
                    conn.sendall(greeting)

        threading.Thread(target=serve, daemon=True).start()
        return srv.getsockname()[1]

    yield start
    for s in socks:
        s.close()


@pytest.mark.parametrize("greeting", [b"HELLO THERE\r\n\x00\xff garbage\r\n", None])
def test_a_server_that_answers_garbage_or_stalls_is_reported_and_tried_again(fake_server, greeting) -> None:  # type: ignore[no-untyped-def]
    link = Link(settings(fake_server(greeting)), "t")
    link.start()
    try:
        events = collect(link, lambda ev: sum(isinstance(e, (Down, Problem)) for e in ev) >= 2, 15)
        assert not any(isinstance(e, Up) for e in events)
        assert link.thread.is_alive()  # it keeps trying
    finally:
        link.close()
    assert not link.thread.is_alive()


def test_a_real_server_lost_and_back_resumes_after_the_last_revision(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = ["nats-server", "-js", "-a", "127.0.0.1", "-p", str(port), "-sd", str(tmp_path)]
    server = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    link = Link(settings(port), "t")
    try:
        link.start()
        collect(link, lambda ev: any(isinstance(e, Up) for e in ev))
        for i in range(3):
            link.put(f"node.n{i}", b"x")
        collect(link, lambda ev: sum(isinstance(e, Written) for e in ev) == 3)
        server.terminate()
        server.wait(10)
        collect(link, lambda ev: any(isinstance(e, Down) for e in ev))
        server = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        events = collect(link, lambda ev: any(isinstance(e, Up) for e in ev), 20)
        assert not any(isinstance(e, Entry) for e in events)  # nothing replayed
        link.put("node.n3", b"y")
        events = collect(link, lambda ev: any(isinstance(e, Entry) for e in ev))
        assert [(e.key, e.revision) for e in events if isinstance(e, Entry)] == [("node.n3", 4)]
    finally:
        link.close()
        server.terminate()
        server.wait(10)


def test_tls_with_the_operators_ca(tmp_path: Path) -> None:
    """A server with a certificate of the operator's CA: the link trusts `ca_file` and nothing else."""
    cert, key = make_certificate(tmp_path, "127.0.0.1")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    conf = tmp_path / "nats.conf"
    conf.write_text(
        f'listen: "127.0.0.1:{port}"\njetstream {{ store_dir: "{tmp_path / "js"}" }}\n'
        f'tls {{ cert_file: "{cert}", key_file: "{key}" }}\n'
    )
    server = subprocess.Popen(["nats-server", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    trusting = Link(replace(settings(port), servers=(f"tls://127.0.0.1:{port}",), ca_file=cert), "t")
    stranger = Link(replace(settings(port), servers=(f"tls://127.0.0.1:{port}",)), "t")  # the system's CAs
    try:
        trusting.start()
        stranger.start()
        collect(trusting, lambda ev: any(isinstance(e, Up) for e in ev))
        # Refused for the certificate (one refusal is enough: a second waits on the retry backoff).
        events = collect(stranger, lambda ev: any("CERTIFICATE_VERIFY_FAILED" in getattr(e, "reason", "") for e in ev))
        assert not any(isinstance(e, Up) for e in events)
    finally:
        trusting.close()
        stranger.close()
        server.terminate()
        server.wait(10)

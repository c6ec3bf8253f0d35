"""`meshsup relay` for real, on loopback: DERP clients built from actors/wire/derp.py log in,
exchange packets across workers, survive a worker's kill -9, are rate limited; every
kind of bad input is counted and costs at most its own connection; STUN answers
coturn's client, and our STUN client reads coturn's server."""

from __future__ import annotations

import base64
import os
import secrets
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from meshsup.actors.wire import derp, stun
from meshsup.actors.wire.derp import FrameType
from meshsup.supervisor.lab import have
from tests.derp_client import Closed, DerpClient
from tests.nodes import Node


def free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Relay(Node):
    def __init__(self, tmp: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.port, self.stun_port = free_port(socket.SOCK_STREAM), free_port(socket.SOCK_DGRAM)
        self.addr = ("127.0.0.1", self.port)
        super().__init__(
            tmp,
            "--listen",
            f"127.0.0.1:{self.port}",
            "--stun-listen",
            f"127.0.0.1:{self.stun_port}",
            *args,
            env=env,
            command="relay",
        )

    def wait_ready(self, timeout: float = 30.0) -> dict[str, Any]:
        return self.wait(lambda: (s := self.status())["relay"]["ready"] and s, timeout, "relay ready")

    def clients(self) -> dict[str, int]:
        return {a["name"]: a["counters"].get("clients", 0) for a in self.status()["actors"]}

    def wait_clients(self, n: int) -> dict[str, int]:
        return self.wait(lambda: sum((c := self.clients()).values()) == n and c, what=f"{n} clients")


@pytest.fixture
def relay_factory(tmp_path: Path) -> Iterator[Callable[..., Relay]]:
    made: list[Relay] = []

    def make(*args: str, env: dict[str, str] | None = None) -> Relay:
        r = Relay(tmp_path, *args, env=env)
        made.append(r)
        r.wait_ready()
        return r

    yield make
    for r in made:
        r.close()


def on_two_workers(relay: Relay) -> tuple[DerpClient, DerpClient, dict[str, str]]:
    """Two logged-in clients that the kernel gave to different workers; which worker has which."""
    a = DerpClient(relay.addr)
    a_worker = next(w for w, n in relay.wait_clients(1).items() if n)
    for _ in range(40):
        b = DerpClient(relay.addr)
        counts = relay.wait_clients(2)
        if counts[a_worker] == 1:
            return a, b, {"a": a_worker, "b": next(w for w, n in counts.items() if n and w != a_worker)}
        b.close()
        relay.wait_clients(1)
    raise AssertionError("SO_REUSEPORT never gave the second client to the other worker")


def test_stanza_status_probes_notify_and_stop(relay_factory: Callable[..., Relay], tmp_path: Path) -> None:
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify.sock"))
    notify.settimeout(30)
    relay = relay_factory(
        "--relay-workers", "2", "--name", "edge1", env={"NOTIFY_SOCKET": str(tmp_path / "notify.sock")}
    )
    assert "READY=1" in notify.recv(4096).decode().splitlines()  # as a node tells systemd
    notify.close()
    status = relay.status()
    r = status["relay"]
    assert (r["name"], r["workers"], r["url"]) == ("edge1", 2, f"http://127.0.0.1:{relay.port}/derp")
    assert [a["kind"] for a in status["actors"]] == ["relay", "relay"]
    out = relay.stdout()
    assert "[[relays]]" in out and 'name = "edge1"' in out and f'url = "{r["url"]}"' in out
    assert f'stun = "127.0.0.1:{relay.stun_port}"' in out and r["public_key"] in out
    assert (relay.state_dir / "relay.key").stat().st_mode & 0o077 == 0
    for method, path in (("GET", "/derp/probe"), ("HEAD", "/derp/latency-check")):
        with socket.create_connection(relay.addr, timeout=5) as s:
            s.sendall(f"{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            assert s.recv(4096).startswith(b"HTTP/1.1 200 OK\r\n")
    text = relay.cli("status").stdout
    assert "relay edge1" in text and "relay-1" in text
    a = DerpClient(relay.addr)
    relay.cli("stop")
    assert a.expect(FrameType.RESTARTING)[1] == bytes(4) + (5000).to_bytes(4, "big")  # come back within 5 s
    assert a.closed() and relay.proc.wait(15) == 0


def test_clients_on_two_workers_exchange_packets(relay_factory: Callable[..., Relay]) -> None:
    relay = relay_factory("--relay-workers", "2")
    a, b, where = on_two_workers(relay)
    assert a.server_info == {"version": 2} and a.server_key == b.server_key
    c = DerpClient(relay.addr, fast_start=True)  # no 101: frames right after the request
    a.send(b.public, b"from a")
    assert b.packet() == (a.public, b"from a")
    b.send(a.public, b"from b" * 1000)
    assert a.packet() == (b.public, b"from b" * 1000)
    big = secrets.token_bytes(derp.MAX_PACKET_SIZE)
    a.send(b.public, big)
    assert b.packet() == (a.public, big)
    assert c.nothing()  # a client never gets what is meant for another key
    a.sock.sendall(derp.ping(b"12345678"))
    assert a.expect(FrameType.PONG) == (FrameType.PONG, b"12345678")
    b.sock.sendall(derp.note_preferred(True))
    relay.wait(lambda: relay.status()["counters"].get("home_clients") == 1, what="a home client")
    relay.wait(
        lambda: (
            (c := relay.status()["counters"]).get("packets_to_workers", 0) >= 3
            and c.get("batches_from_workers", 0) >= 1
        ),
        what="the packets counted as crossing workers",
    )
    # A second connection with a's key replaces the first, whichever worker it lands on.
    a2 = DerpClient(relay.addr, a.private)
    assert a.closed()
    b.send(a.public, b"to the new one")
    assert a2.packet() == (b.public, b"to the new one")
    # b leaves: a2, who got packets from it, is told.
    b.close()
    assert a2.expect(FrameType.PEER_GONE)[1] == b.public + bytes([derp.PeerGoneReason.DISCONNECTED])
    for cl in (a2, c):
        cl.close()


def test_unknown_destination_is_told_not_here(relay_factory: Callable[..., Relay]) -> None:
    relay = relay_factory()
    a = DerpClient(relay.addr)
    nobody = secrets.token_bytes(32)
    a.send(nobody, b"hello?")
    assert a.expect(FrameType.PEER_GONE)[1] == nobody + bytes([derp.PeerGoneReason.NOT_HERE])
    relay.wait(lambda: relay.status()["dropped"].get("unknown_dest") == 1, what="the drop counted")
    a.sock.sendall(derp.ping(b"stillok!"))
    assert a.expect(FrameType.PONG)[1] == b"stillok!"


def test_kill_9_of_a_worker(relay_factory: Callable[..., Relay]) -> None:
    relay = relay_factory("--relay-workers", "2")
    a, b, where = on_two_workers(relay)
    victim = {x["name"]: x for x in relay.status()["actors"]}[where["b"]]
    os.kill(victim["pid"], signal.SIGKILL)
    assert b.closed()
    relay.wait(
        lambda: (
            (x := {y["name"]: y for y in relay.status()["actors"]}[where["b"]])["restarts"] == 1
            and x["state"] == "running"
            and x["pid"] != victim["pid"]
        ),
        what="the worker restarted",
    )
    b2 = DerpClient(relay.addr, b.private)  # the client reconnects, to whichever worker
    relay.wait_clients(2)
    a.send(b.public, b"after the restart")
    assert b2.packet() == (a.public, b"after the restart")
    b2.send(a.public, b"and back")
    assert a.packet() == (b.public, b"and back")
    assert relay.cli("scale", "relay", "3").returncode == 0
    relay.wait(lambda: [x["state"] for x in relay.status()["actors"]] == ["running"] * 3, what="3 workers")


def bad_connections(relay: Relay) -> dict[str, int]:
    """Send every kind of bad input, each on its own connection; the reasons the relay should count."""
    want: dict[str, int] = {}

    def expect(reason: str) -> None:
        want[reason] = want.get(reason, 0) + 1

    def raw(data: bytes) -> bytes:
        with socket.create_connection(relay.addr, timeout=5) as s:
            s.sendall(data)
            got = b""
            while chunk := s.recv(65536):
                got += chunk
            return got

    assert raw(b"\x16\x03\x01\x00\x05hello\r\n\r\n").startswith(b"HTTP/1.1 400 ")
    expect("bad_http")
    assert raw(b"GET /derp HTTP/1.1\r\nHost: x\r\n\r\n").startswith(b"HTTP/1.1 426 ")
    expect("not_upgrade")
    assert raw(b"GET /nothing HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 404 ")
    expect("not_found")
    assert raw(derp.upgrade_request("x") + b"hello, this is garbage, not frames").startswith(b"HTTP/1.1 101 ")
    expect("type_0x68_oversized")  # 'h', then "ello" read as a length
    c = DerpClient(relay.addr, login=False)
    other = DerpClient(relay.addr, login=False)
    with pytest.raises(Closed):  # sealed with another key than the one it names
        c.login(derp.client_info(other.private, c.public, relay_key(relay), {}))
    expect("client_info_box")
    for ftype, (least, most) in derp.LIMITS.items():
        name = derp.type_name(ftype)
        cases = [(derp.header(ftype, most + 1), f"{name}_oversized")]
        if least:
            cases.append((derp.header(ftype, least - 1) + bytes(least - 1), f"{name}_truncated"))
        for data, reason in cases:
            cl = DerpClient(relay.addr)
            cl.sock.sendall(data)
            assert cl.closed(), reason
            expect(reason)
    cl = DerpClient(relay.addr)  # a stream that ends inside a frame
    cl.sock.sendall(derp.send_packet(bytes(32), b"x" * 100)[:50])
    cl.sock.shutdown(socket.SHUT_WR)
    assert cl.closed()
    expect("send_packet_truncated")
    return want


def relay_key(relay: Relay) -> bytes:
    return base64.b64decode(relay.status()["relay"]["public_key"])


def test_bad_input_is_counted_and_costs_only_its_connection(relay_factory: Callable[..., Relay]) -> None:
    relay = relay_factory("--relay-workers", "2")
    a, b, _ = on_two_workers(relay)
    want = bad_connections(relay)
    relay.wait(
        lambda: all(relay.status()["bad_input"].get(k, 0) >= v for k, v in want.items()),
        what=f"every reason counted: {sorted(want)}",
    )
    # A client that stops reading: its queue is bounded, the excess dropped and counted, then it is closed.
    slow = DerpClient(relay.addr)
    slow.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    chunk = bytes(60000)
    deadline = time.monotonic() + 30  # keep it fed: what the kernel's buffers took is no longer the relay's
    while not (s := relay.status())["bad_input"].get("write_timeout") and time.monotonic() < deadline:
        for _ in range(20):
            a.send(slow.public, chunk)
    assert s["dropped"].get("queue_full", 0) > 0 and s["bad_input"].get("write_timeout") == 1
    relay.wait_clients(2)  # a and b: the slow reader's connection is gone
    slow.close()
    a.send(b.public, b"still fine")  # the others are untouched
    assert b.packet(timeout=15) == (a.public, b"still fine")
    assert all(x["restarts"] == 0 and x["state"] == "running" for x in relay.status()["actors"])


def test_rate_limit(relay_factory: Callable[..., Relay]) -> None:
    rate = 400_000
    relay = relay_factory("--rate-limit", str(rate))
    a, b = DerpClient(relay.addr), DerpClient(relay.addr)
    assert a.server_info == {
        "version": 2,
        "tokenbucketbytespersecond": rate,
        "tokenbucketbytesburst": derp.MAX_PACKET_SIZE + 32,
    }
    n, size = 20, 50_000
    start = time.monotonic()
    for i in range(n):
        a.send(b.public, bytes([i]) * size)
    for i in range(n):
        assert b.packet(timeout=15) == (a.public, bytes([i]) * size)
    elapsed = time.monotonic() - start
    least = (n * (size + 32) - (derp.MAX_PACKET_SIZE + 32)) / rate
    assert least * 0.95 <= elapsed < least * 3, elapsed
    relay.wait(lambda: relay.status()["counters"].get("rate_limited", 0) > 0, what="the waits counted")


def test_tls(relay_factory: Callable[..., Relay], tmp_path: Path) -> None:
    if why := have("openssl"):
        pytest.skip(why)
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "2",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )
    relay = relay_factory("--tls-cert", str(cert), "--tls-key", str(key))
    assert relay.status()["relay"]["url"].startswith("https://")
    ctx = ssl.create_default_context(cafile=str(cert))
    a, b = DerpClient(relay.addr, tls=ctx), DerpClient(relay.addr, tls=ctx)
    a.send(b.public, b"over TLS" * 500)
    assert b.packet() == (a.public, b"over TLS" * 500)
    with socket.create_connection(relay.addr, timeout=5) as s:  # plain HTTP on a TLS port
        s.sendall(b"GET /derp HTTP/1.1\r\n\r\n")
        assert s.recv(100) == b""
    relay.wait(lambda: relay.status()["bad_input"].get("tls_error") == 1, what="tls_error counted")


def test_stun_answers_coturns_client(relay_factory: Callable[..., Relay]) -> None:
    if why := have("turnutils_stunclient"):
        pytest.skip(why)
    relay = relay_factory()
    out = subprocess.run(
        ["turnutils_stunclient", "-p", str(relay.stun_port), "127.0.0.1"], capture_output=True, text=True, timeout=30
    ).stdout
    assert "UDP reflexive addr: 127.0.0.1:" in out, out
    relay.wait(lambda: relay.status()["counters"].get("stun_requests", 0) >= 1, what="the request counted")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:  # and ours, as Tailscale's netcheck asks
        s.bind(("127.0.0.1", 0))
        s.settimeout(5)
        s.sendto(b"\x00\x01 not stun at all, no cookie...", ("127.0.0.1", relay.stun_port))
        client = stun.BindingClient()
        s.sendto(client.packet, ("127.0.0.1", relay.stun_port))
        assert client.receive(s.recv(2048)) == s.getsockname()
    relay.wait(lambda: relay.status()["bad_input"].get("stun_not_stun") == 1, what="non-STUN counted")


def test_our_stun_client_against_coturns_server(tmp_path: Path) -> None:
    if why := have("turnserver"):
        pytest.skip(why)
    port = free_port(socket.SOCK_DGRAM)
    server = subprocess.Popen(
        [
            "turnserver",
            "-n",
            "--stun-only",
            "--no-tls",
            "--no-dtls",
            "--no-cli",
            "--listening-ip=127.0.0.1",
            f"--listening-port={port}",
            "--log-file=stdout",
            f"--pidfile={tmp_path / 'turnserver.pid'}",
            "--simple-log",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd=tmp_path,
    )
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind(("127.0.0.1", 0))
            client = stun.BindingClient(rto=0.1, tries=9)  # the server may take a moment to listen
            while client.result is None and not client.failed(time.monotonic()):
                if packet := client.due(time.monotonic()):
                    s.sendto(packet, ("127.0.0.1", port))
                s.settimeout(0.05)
                try:
                    client.receive(s.recv(2048))
                except TimeoutError:
                    pass
            assert client.result == s.getsockname()
    finally:
        server.terminate()
        server.wait(10)

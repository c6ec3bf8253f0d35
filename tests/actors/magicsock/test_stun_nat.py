"""magicsock's STUN prober against real servers from behind real NAT: coturn and `meshsup relay
--stun-listen` on the internet segment of a NatLab, a home behind each kind of NAT. Both servers see
the home's router address; a router that maps per destination (masquerade random) shows them two
ports, which the prober reports as a varying mapping; one that keeps the port (masquerade) shows
them one."""

from __future__ import annotations

import select
import socket
import subprocess
import time
from pathlib import Path

import pytest
from pyroute2.netns import create_socket

from meshsup.actors.kernel.types import Endpoint
from meshsup.actors.magicsock.stunclient import StunProber
from tests.nodes import is_root
from tests.topology import NatLab, Netns, Underlay, have, start_relay

TOOLS = ("nft", "turnserver", "ss")
pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(not is_root() or bool(have(*TOOLS)), reason=have(*TOOLS) or "needs root"),
]
STUN_PORT = 3478


class Coturn:
    """coturn's turnserver answering STUN only at addr:3478 in `ns`; ready when it listens, stopped by its PID."""

    def __init__(self, ns: Netns, addr: str, tmp: Path) -> None:
        self.ns, self.addr = ns, addr
        with open(tmp / f"turnserver-{ns.name}.log", "w") as log:
            self.proc = ns.popen(
                "turnserver",
                "-n",  # no configuration file: only these options
                "--stun-only",
                "--no-tls",
                "--no-dtls",
                "--no-cli",
                f"--listening-ip={addr}",
                f"--listening-port={STUN_PORT}",
                "--log-file=stdout",
                "--simple-log",
                f"--pidfile={tmp / f'turnserver-{ns.name}.pid'}",
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=tmp,
            )

    def listening(self) -> bool:
        assert self.proc.poll() is None, f"turnserver exited with {self.proc.returncode}"
        return bool(self.ns.run("ss", "-Huln", "src", f"{self.addr}:{STUN_PORT}").stdout.strip())

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def wait_until(check: object, timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def first_round(ns: Netns, servers: list[Endpoint], timeout: float = 10.0) -> StunProber:
    """A prober's first round from a UDP socket in `ns`, driven as magicsock's loop would drive it:
    done when every server has answered (which ends the round) or the round has given up on one."""
    prober = StunProber(servers)
    with create_socket(ns.name, socket.AF_INET, socket.SOCK_DGRAM, flags=0) as sock:
        sock.bind(("0.0.0.0", 0))
        sock.setblocking(False)
        deadline = time.monotonic() + timeout
        while prober.counters["answers"] < len(servers) and not prober.counters["timeouts"]:
            now = time.monotonic()
            assert now < deadline, f"no round ended: {prober.counters}"
            timer = prober.get_timer()
            if timer is not None and timer <= now:
                prober.handle_timer(now)
            for server, datagram in prober.datagrams_to_send():
                sock.sendto(datagram, server)
            timer = prober.get_timer()
            select.select([sock], [], [], max(0.0, min(deadline, timer or deadline) - now))
            while True:
                try:
                    data, source = sock.recvfrom(2048)
                except BlockingIOError:
                    break
                prober.receive(data, source, time.monotonic())
    return prober


def test_stun_from_behind_nat_finds_the_router_address_and_how_it_maps(underlay: Underlay, tmp_path: Path) -> None:
    lab = NatLab(underlay)
    turn_ns, turn_addr = lab.public()
    coturn = underlay.track(Coturn(turn_ns, turn_addr, tmp_path))
    relay_ns, relay_addr = lab.public()
    relay = start_relay(underlay, tmp_path, relay_ns, relay_addr, "--stun-listen", f"{relay_addr}:{STUN_PORT}")
    easy, _, easy_public = lab.home(nat="masquerade")
    hard, _, hard_public = lab.home(nat="random")
    wait_until(coturn.listening, what="turnserver listening")
    servers = [(turn_addr, STUN_PORT), (relay_addr, STUN_PORT)]

    for server in servers:  # each server alone answers with the router's address
        alone = first_round(easy, [server])
        assert [host for host, _ in alone.reflexive()] == [easy_public], alone.counters

    behind_masquerade = first_round(easy, servers)
    assert behind_masquerade.counters["answers"] == 2, behind_masquerade.counters
    (mapped,) = behind_masquerade.reflexive()  # one address: the same port to both servers
    assert mapped[0] == easy_public and behind_masquerade.mapping_varies() is False

    behind_random = first_round(hard, servers)
    assert behind_random.counters["answers"] == 2, behind_random.counters
    seen = behind_random.reflexive()
    assert {host for host, _ in seen} == {hard_public} and len(seen) == 2  # a port per server
    assert behind_random.mapping_varies() is True
    # The relay's counters reach its status with its workers' next heartbeat.
    relay.wait(lambda: relay.status()["counters"].get("stun_requests", 0) >= 3, what="the relay counted them")

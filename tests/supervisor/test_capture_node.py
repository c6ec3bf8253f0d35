"""`meshsup capture` on running nodes, read back with tshark: the inner packets of a ping, the
outer WireGuard datagrams decrypted with the key log, one peer's traffic, a count that stops it."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest

from meshsup.supervisor.lab import ROOT
from tests.nodes import MESHSUP, Node, is_root
from tests.topology import Identity, Underlay, have, pair, ping, start_meshsup

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(not is_root() or bool(have("tshark", "ping")), reason=have("tshark", "ping") or "needs root"),
]


class Capture:
    """A `meshsup capture` running in the background, started once the node says it captures."""

    def __init__(self, node: Node, tmp: Path, *args: str, stdout: Path | None = None) -> None:
        self.err = tmp / f"capture-{time.monotonic_ns()}.err"
        with open(self.err, "w") as err, open(stdout or os.devnull, "wb") as out:
            self.proc = subprocess.Popen(
                [*MESHSUP, "capture", "--state-dir", str(node.state_dir), *args],
                stdout=out,
                stderr=err,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
            )
        deadline = time.monotonic() + 20
        while "capturing" not in self.stderr():
            assert self.proc.poll() is None, self.stderr()
            assert time.monotonic() < deadline, "capture did not start"
            time.sleep(0.05)

    def stderr(self) -> str:
        return self.err.read_text()

    def wait(self, timeout: float = 20) -> str:
        assert self.proc.wait(timeout) == 0, self.stderr()
        return self.stderr()

    def interrupt(self) -> str:
        self.proc.send_signal(signal.SIGINT)
        return self.wait()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def tshark(pcap: Path, *args: str) -> list[list[str]]:
    """tshark's fields, a list per packet."""
    r = subprocess.run(["tshark", "-n", "-r", str(pcap), "-T", "fields", *args], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return [line.split("\t") for line in r.stdout.splitlines()]


ICMP = ("-Y", "icmp", "-e", "ip.src", "-e", "ip.dst", "-e", "icmp.type")


def test_inner_capture_shows_a_ping(underlay: Underlay, tmp_path: Path) -> None:
    (ns_a, a, alpha), (_, b, _) = pair(underlay, tmp_path, "meshsup")
    pcap = tmp_path / "inner.pcap"
    capture = Capture(alpha, tmp_path, "-w", str(pcap), "--count", "4")
    try:
        assert ping(ns_a, b.v4, count=2)
        assert "4 packets captured" in capture.wait()
    finally:
        capture.kill()
    # Inner packets are the IP packets themselves: no UDP, no WireGuard around them.
    assert tshark(pcap, *ICMP) == [[a.v4, b.v4, "8"], [b.v4, a.v4, "0"]] * 2
    assert tshark(pcap, "-Y", "udp or wg", "-e", "frame.number") == []

    # A worker that restarts during a capture joins it again at the next renewal (the file: stdout).
    again = tmp_path / "again.pcap"
    capture = Capture(alpha, tmp_path, "-w", "-", "--count", "2", stdout=again)
    try:
        alpha.cli("fault", "crypto-0", "crash", check=False)  # it dies before it can answer
        alpha.wait(lambda: (w := alpha.actors()["crypto-0"])["restarts"] == 1 and w["state"] == "running")
        deadline = time.monotonic() + 15
        while capture.proc.poll() is None:
            assert time.monotonic() < deadline, capture.stderr()
            ping(ns_a, b.v4, count=1)
        assert "2 packets captured" in capture.wait()
    finally:
        capture.kill()
    # The worker may rejoin between a request and its reply: two of the pings' packets, either kind.
    seen = tshark(again, *ICMP)
    assert len(seen) == 2 and all(p in ([a.v4, b.v4, "8"], [b.v4, a.v4, "0"]) for p in seen), seen


def test_outer_capture_decrypts_with_the_key_log(underlay: Underlay, tmp_path: Path) -> None:
    (ns_a, a, alpha), (ns_b, b, _) = pair(underlay, tmp_path, "meshsup")
    assert ping(ns_a, b.v4, count=1)  # a session before the capture: --keylog makes a new handshake
    pcap, keys = tmp_path / "outer.pcap", tmp_path / "keys"
    capture = Capture(alpha, tmp_path, "-w", str(pcap), "--outer", "--keylog", str(keys))
    try:
        assert ping(ns_a, b.v4, count=2)
        assert ping(ns_b, a.v4, count=1)
        capture.interrupt()
    finally:
        capture.kill()
    assert stat.S_IMODE(keys.stat().st_mode) == 0o600
    decode = ("-d", "udp.port==51820,wg")
    # Underlay addresses on the outside; a handshake (initiation, response) the key log covers.
    outer = tshark(pcap, *decode, "-e", "ip.src", "-e", "ip.dst", "-e", "udp.srcport", "-e", "wg.type")
    ends = {(row[0], row[1]) for row in outer}
    addr_a, addr_b = a.endpoint.split(":")[0], b.endpoint.split(":")[0]
    assert ends == {(addr_a, addr_b), (addr_b, addr_a)}
    assert {"1", "2", "4"} <= {row[3] for row in outer}
    # Without the keys the ICMP inside stays sealed; with them tshark shows it.
    assert tshark(pcap, *decode, *ICMP) == []
    inner = tshark(pcap, *decode, "-o", f"wg.keylog_file:{keys}", *ICMP)
    pings = [(row[0].split(",")[-1], row[1].split(",")[-1], row[2]) for row in inner]  # the inner IP header
    assert pings == [(a.v4, b.v4, "8"), (b.v4, a.v4, "0")] * 2 + [(b.v4, a.v4, "8"), (a.v4, b.v4, "0")]


def test_peer_filter_count_and_a_killed_capture(underlay: Underlay, tmp_path: Path) -> None:
    hosts = [underlay.host() for _ in range(3)]
    a, b, c = Identity("alpha", 1), Identity("bravo", 2), Identity("charlie", 3)
    for ident, (_, addr) in zip((a, b, c), hosts):
        ident.endpoint = f"{addr}:51820"
    alpha = start_meshsup(underlay, tmp_path, a, [b, c], ns=hosts[0][0])
    for ident, (ns, _) in ((b, hosts[1]), (c, hosts[2])):
        start_meshsup(underlay, tmp_path, ident, [a], ns=ns)
    ns_a = hosts[0][0]

    pcap = tmp_path / "bravo.pcap"
    capture = Capture(alpha, tmp_path, "-w", str(pcap), "--peer", "bravo", "--count", "3")
    try:
        assert ping(ns_a, c.v4, count=2)
        assert capture.proc.poll() is None  # charlie's packets are not counted: none was taken
        assert ping(ns_a, b.v4, count=3)
        assert "3 packets captured" in capture.wait()
    finally:
        capture.kill()
    assert tshark(pcap, *ICMP) == [[a.v4, b.v4, "8"], [b.v4, a.v4, "0"], [a.v4, b.v4, "8"]]

    # A capture killed outright holds the node only until its lease runs out.
    first = Capture(alpha, tmp_path, "-w", str(tmp_path / "first.pcap"))
    try:
        r = alpha.cli("capture", "-w", str(tmp_path / "second.pcap"), "--outer", "--count", "1", check=False)
        assert r.returncode == 1 and "another capture is running" in r.stderr
        first.kill()
        deadline = time.monotonic() + 10
        second = ("capture", "-w", str(tmp_path / "second.pcap"), "--seconds", "0.5")
        while (r := alpha.cli(*second, check=False)).returncode:
            assert time.monotonic() < deadline, r.stderr
            time.sleep(0.5)
    finally:
        first.kill()
    assert not list((alpha.state_dir / "run").glob("pc*.sock"))

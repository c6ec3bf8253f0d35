"""Interoperability of actors.crypto.Device with Debian's wireguard-go.

Two network namespaces joined by a veth (198.51.100.1 <-> 198.51.100.2).
wireguard-go runs in one with tunnel addresses 100.64.0.2/32 and fd00::2/128;
tests/wg_harness.py drives our Device over a UDP socket in the other, as
100.64.0.1 and fd00::1. Echo replies come from wireguard-go's kernel stack.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from meshsup.actors.crypto.noise import public_key
from tests.nodes import REPO

pytestmark = pytest.mark.netns

ROOT = REPO
HARNESS = REPO / "tests" / "wg_harness.py"
WG_PORT, OUR_PORT = 51820, 51821
OUR_UNDERLAY, WG_UNDERLAY = "198.51.100.1", "198.51.100.2"


def _missing_requirement() -> str | None:
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    for tool in ("wireguard-go", "wg", "ip", "ping"):
        if shutil.which(tool) is None:
            return f"needs the {tool} tool, which is not installed"
    if not os.path.exists("/dev/net/tun"):
        return "needs /dev/net/tun for wireguard-go"
    return None


def run(*cmd: str, input: str | None = None) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, input=input, timeout=20).stdout


@dataclass
class Topology:
    ns_ours: str
    ns_wg: str
    iface: str
    wg_private: str
    wg_public: str
    our_private: str
    our_public: str

    def in_wg(self, *cmd: str, input: str | None = None) -> str:
        return run("ip", "netns", "exec", self.ns_wg, *cmd, input=input)

    def configure_wg_peer(self, psk: str | None) -> None:
        """(Re)create our peer on wireguard-go, so every harness run starts without a session."""
        self.in_wg("wg", "set", self.iface, "peer", self.our_public, "remove")
        cmd = [
            "wg",
            "set",
            self.iface,
            "peer",
            self.our_public,
            "allowed-ips",
            "100.64.0.1/32,fd00::1/128",
            "endpoint",
            f"{OUR_UNDERLAY}:{OUR_PORT}",
        ]
        if psk is not None:
            cmd += ["preshared-key", "/dev/stdin"]
        self.in_wg(*cmd, input=psk)

    def harness(self, *extra: str, psk: str | None = None, endpoint: bool = True) -> subprocess.Popen:
        cmd = [
            "ip",
            "netns",
            "exec",
            self.ns_ours,
            sys.executable,
            str(HARNESS),
            "--private-key",
            self.our_private,
            "--peer",
            self.wg_public,
            "--listen",
            f"{OUR_UNDERLAY}:{OUR_PORT}",
            "--allowed",
            "100.64.0.2/32",
            "--allowed",
            "fd00::2/128",
            *extra,
        ]
        if endpoint:
            cmd += ["--endpoint", f"{WG_UNDERLAY}:{WG_PORT}"]
        if psk is not None:
            cmd += ["--psk", psk]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        assert proc.stdout is not None
        ready = proc.stdout.readline().strip()
        if ready != "READY":
            proc.kill()
            raise AssertionError(f"harness did not start: {ready} {proc.stderr.read() if proc.stderr else ''}")
        return proc

    @staticmethod
    def result(proc: subprocess.Popen) -> dict:
        # Not communicate(timeout=...): it reads the pipe's descriptor itself and misses what
        # readline() above already buffered, which a fast run's last line can be.
        try:
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.stdout is not None and proc.stderr is not None
        out, err = proc.stdout.read(), proc.stderr.read()
        assert proc.returncode == 0, err
        return json.loads(out.strip().splitlines()[-1])

    def latest_handshake(self) -> int:
        for line in self.in_wg("wg", "show", self.iface, "latest-handshakes").splitlines():
            key, stamp = line.split()
            if key == self.our_public:
                return int(stamp)
        return 0


@pytest.fixture(scope="module")
def topo() -> Iterator[Topology]:
    reason = _missing_requirement()
    if reason:
        pytest.skip(reason)
    suffix = secrets.token_hex(3)
    ns_ours, ns_wg = f"msw-a-{suffix}", f"msw-b-{suffix}"
    veth_ours, veth_wg = f"mwa{suffix}", f"mwb{suffix}"
    iface = f"wg{suffix}"
    wg_private = run("wg", "genkey").strip()
    our_private = base64.b64encode(os.urandom(32)).decode()
    topo = Topology(
        ns_ours,
        ns_wg,
        iface,
        wg_private,
        run("wg", "pubkey", input=wg_private).strip(),
        our_private,
        base64.b64encode(public_key(base64.b64decode(our_private))).decode(),
    )
    created: list[str] = []
    proc: subprocess.Popen | None = None
    try:
        for ns in (ns_ours, ns_wg):
            run("ip", "netns", "add", ns)
            created.append(ns)
            run("ip", "-n", ns, "link", "set", "lo", "up")
        run("ip", "link", "add", veth_ours, "netns", ns_ours, "type", "veth", "peer", "name", veth_wg, "netns", ns_wg)
        run("ip", "-n", ns_ours, "addr", "add", f"{OUR_UNDERLAY}/24", "dev", veth_ours)
        run("ip", "-n", ns_wg, "addr", "add", f"{WG_UNDERLAY}/24", "dev", veth_wg)
        run("ip", "-n", ns_ours, "link", "set", veth_ours, "up")
        run("ip", "-n", ns_wg, "link", "set", veth_wg, "up")

        proc = subprocess.Popen(
            ["ip", "netns", "exec", ns_wg, "wireguard-go", "-f", iface],
            env=dict(os.environ, WG_PROCESS_FOREGROUND="1"),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        sock = Path(f"/var/run/wireguard/{iface}.sock")
        deadline = time.monotonic() + 10
        while not sock.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("wireguard-go did not create its control socket")
            time.sleep(0.05)
        topo.in_wg("wg", "set", iface, "listen-port", str(WG_PORT), "private-key", "/dev/stdin", input=wg_private)
        topo.in_wg("ip", "addr", "add", "100.64.0.2/32", "dev", iface)
        topo.in_wg("ip", "-6", "addr", "add", "fd00::2/128", "dev", iface, "nodad")
        topo.in_wg("ip", "link", "set", iface, "up")
        topo.in_wg("ip", "route", "add", "100.64.0.1/32", "dev", iface)
        topo.in_wg("ip", "-6", "route", "add", "fd00::1/128", "dev", iface)
        yield topo
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for ns in created:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        Path(f"/var/run/wireguard/{iface}.sock").unlink(missing_ok=True)


def test_public_key_derivation_matches_wg_pubkey(topo: Topology) -> None:
    assert base64.b64encode(public_key(base64.b64decode(topo.wg_private))).decode() == topo.wg_public


def test_we_initiate_and_wireguard_go_answers_ipv4_and_ipv6(topo: Topology) -> None:
    topo.configure_wg_peer(psk=None)
    result = topo.result(topo.harness("--ping", "100.64.0.2", "--ping", "fd00::2", "--count", "3"))
    assert [seq for seq, _ in result["replies"]["100.64.0.2"]] == [1, 2, 3], result
    assert [seq for seq, _ in result["replies"]["fd00::2"]] == [1, 2, 3], result
    assert ["handshake_completed", topo.wg_public] in result["events"]
    latest = topo.latest_handshake()
    assert abs(latest - time.time()) < 60, "wg show reports no recent handshake"
    transfer = topo.in_wg("wg", "show", topo.iface, "transfer").split()
    assert int(transfer[1]) > 0 and int(transfer[2]) > 0


def test_wireguard_go_initiates_and_we_answer_its_ping(topo: Topology) -> None:
    topo.configure_wg_peer(psk=None)
    harness = topo.harness("--answer", "3", endpoint=False)
    try:
        topo.in_wg("ping", "-c", "3", "-i", "0.2", "-W", "3", "100.64.0.1")
    finally:
        result = topo.result(harness)
    assert result["answered"] == 3, result
    assert result["status"][0]["endpoint"] == f"{WG_UNDERLAY}:{WG_PORT}", "endpoint learned from the initiation"
    assert topo.latest_handshake() > 0


def test_preshared_key_on_both_sides(topo: Topology) -> None:
    psk = run("wg", "genpsk").strip()
    topo.configure_wg_peer(psk=psk)
    result = topo.result(topo.harness("--ping", "100.64.0.2", "--count", "2", psk=psk))
    assert len(result["replies"]["100.64.0.2"]) == 2, result


def test_mismatched_preshared_key_fails_the_handshake(topo: Topology) -> None:
    topo.configure_wg_peer(psk=run("wg", "genpsk").strip())
    result = topo.result(
        topo.harness("--ping", "100.64.0.2", "--count", "1", "--timeout", "2", psk=run("wg", "genpsk").strip())
    )
    assert result["replies"]["100.64.0.2"] == []
    assert result["counters"].get("bad_response", 0) >= 1, result


def test_full_mtu_packets_both_families(topo: Topology) -> None:
    topo.configure_wg_peer(psk=None)
    result = topo.result(topo.harness("--ping", "100.64.0.2", "--ping", "fd00::2", "--count", "2", "--size", "1420"))
    assert result["replies"]["100.64.0.2"] == [[1, 1420], [2, 1420]], result
    assert result["replies"]["fd00::2"] == [[1, 1420], [2, 1420]], result

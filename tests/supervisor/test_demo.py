"""`meshsup demo` end to end: it reports every pair and leaves nothing behind, also when interrupted."""

from __future__ import annotations

import itertools
import os
import re
import signal
import subprocess
import threading
from pathlib import Path

import pytest

from tests.nodes import MESHSUP, REPO, descendants_by_state_dir, is_root, pid_alive
from tests.topology import have

TOOLS = ("wireguard-go", "wg", "iperf3", "ping")
NAMES = ("alpha", "bravo", "charlie")
pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(not is_root() or bool(have(*TOOLS)), reason=have(*TOOLS) or "needs root"),
]


def demo(**kw: object) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*MESHSUP, "demo"],
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        **kw,
    )  # type: ignore[call-overload]


def assert_nothing_left(out: str) -> None:
    """Every namespace, link, WireGuard socket, process and file the demo said it made is gone."""
    namespaces = re.findall(r"namespace ((?:h|sw)[0-9a-f]{6})\b", out)
    tunnels = re.findall(r"tunnel ((?:ms|wg)[0-9a-f]{8})\b", out)
    veths = re.search(r"veth pairs (.+)", out).group(1).replace("-", " ").split()  # type: ignore[union-attr]
    pids = [int(p) for p in re.findall(r"pid (\d+)", out) + re.findall(r"^ +\S+ +(\d+) running", out, re.M)]
    state = Path(re.search(r"logs in (\S+)", out).group(1))  # type: ignore[union-attr]
    assert len(namespaces) == 4 and len(tunnels) == 3 and len(veths) == 6, out
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not [ns for ns in namespaces if ns in listed]
    for link in tunnels + veths:
        assert subprocess.run(["ip", "link", "show", "dev", link], capture_output=True).returncode != 0, link
    assert not [t for t in tunnels if Path(f"/var/run/wireguard/{t}.sock").exists()]
    assert not [p for p in pids if pid_alive(p)]
    assert not state.exists() and not descendants_by_state_dir(state)


def test_demo_shows_every_pair_and_cleans_up() -> None:
    proc = demo()
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert out.rstrip().splitlines()[-1].startswith("all good")
    for a, b in itertools.permutations(NAMES, 2):
        assert re.search(rf"{a} +-> {b} +IPv4 [\d.]+ ms +IPv6 [\d.]+ ms$", out, re.M), f"no ping {a} -> {b}"
    for a, b in itertools.combinations(NAMES, 2):
        m = re.search(rf"{a} +-> {b} +([\d.]+) Mbit/s$", out, re.M)
        assert m and float(m.group(1)) > 1, f"no iperf3 {a} -> {b}"
    assert out.count("meshsup status on") == 2 and out.count("crypto-0") == 2
    assert_nothing_left(out)


def test_ctrl_c_still_removes_everything() -> None:
    # Its own session, so the Ctrl-C reaches the demo and its children as a terminal's would.
    proc = demo(start_new_session=True)
    assert proc.stdout is not None
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("ping through the tunnel"):
            os.killpg(proc.pid, signal.SIGINT)
            break
    # The rest through the same reader, which holds what the loop read ahead (communicate()
    # would read the descriptor itself and lose that); killed if it has not ended in 60 s.
    watchdog = threading.Timer(60, proc.kill)
    watchdog.start()
    try:
        out = "".join(lines) + proc.stdout.read()
        proc.wait()
    finally:
        watchdog.cancel()
    assert proc.returncode == 1, out
    assert out.rstrip().splitlines()[-1] == "FAILED: interrupted"
    assert_nothing_left(out)

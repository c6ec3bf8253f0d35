"""`meshsup demo --mesh`: nodes that configure themselves through the nats-server it starts."""

from __future__ import annotations

import os
import re
import subprocess

import pytest

from tests.nodes import MESHSUP, REPO, is_root
from tests.topology import have

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(not is_root() or bool(have("nats-server", "ping")), reason=have("nats-server") or "root"),
]


def test_the_mesh_demo_configures_itself_and_leaves_nothing() -> None:
    r = subprocess.run(
        [*MESHSUP, "demo", "--mesh"],
        text=True,
        capture_output=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    out = r.stdout
    assert r.returncode == 0, out + r.stderr
    assert out.rstrip().endswith("every pair pinged both ways")
    for name in ("alpha", "bravo", "charlie"):
        assert re.search(rf"{name}\s+namespace h\w+\s+underlay \S+\s+tunnel \S+\s+took 100\.", out), name
    assert len(re.findall(r"IPv4 [\d.]+ ms\s+IPv6 [\d.]+ ms", out)) == 6
    assert "pinged from alpha, bravo, charlie" in out and "gone from alpha, bravo, charlie" in out
    assert "coordination up" in out
    namespaces = set(re.findall(r"namespace ((?:h|sw)[0-9a-f]{6})\b", out))
    left = subprocess.run(["ip", "netns", "list"], text=True, capture_output=True).stdout
    assert namespaces and not namespaces & {line.split()[0] for line in left.splitlines() if line}

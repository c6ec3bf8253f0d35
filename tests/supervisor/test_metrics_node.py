"""Metrics end to end: Debian's prometheus scrapes a node in a namespace every second, and its
HTTP API returns the node's series; /metrics answers curl with the exposition format's type,
and garbage with 400, the node unharmed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest

from meshsup.supervisor.exposition import CONTENT_TYPE
from tests.topology import Identity, Netns, Node, have, ping, start_meshsup, start_wg

pytestmark = pytest.mark.netns

METRICS = "127.0.0.1:9273"  # the namespace's own loopback: no other node's
PROMETHEUS = "127.0.0.1:9090"


def _prometheus(ns: Netns, tmp: Path) -> subprocess.Popen[str]:
    config = tmp / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
        f"scrape_configs:\n  - job_name: meshsup\n    static_configs:\n      - targets: ['{METRICS}']\n"
    )
    log = open(tmp / "prometheus.log", "w")
    return ns.popen(
        "prometheus",
        f"--config.file={config}",
        f"--storage.tsdb.path={tmp / 'tsdb'}",
        f"--web.listen-address={PROMETHEUS}",
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def _query(ns: Netns, promql: str) -> list[dict[str, Any]]:
    """The instant vector Prometheus answers `promql` with, asked from inside the namespace."""
    r = ns.run("curl", "-sfG", f"http://{PROMETHEUS}/api/v1/query", "--data-urlencode", f"query={promql}", check=False)
    if r.returncode != 0:
        return []
    answer = json.loads(r.stdout)
    assert answer["status"] == "success", answer
    return answer["data"]["result"]


def _http(ns: Netns, raw: bytes) -> bytes:
    """What the node's endpoint answers to `raw`, sent as it is."""
    code = (
        "import socket, sys; s = socket.create_connection(('127.0.0.1', 9273), timeout=5); "
        f"s.sendall({raw!r}); sys.stdout.write(s.recv(65536).decode('latin-1'))"
    )
    return ns.run("python3", "-c", code).stdout.encode("latin-1")


@pytest.mark.skipif(have("prometheus", "curl") is not None, reason=have("prometheus", "curl") or "")
def test_prometheus_scrapes_a_node(underlay, tmp_path) -> None:
    (ns_a, addr_a), (ns_b, addr_b) = underlay.host(), underlay.host()
    a, b = Identity("alpha", 1), Identity("bravo", 2)
    a.endpoint, b.endpoint = f"{addr_a}:51820", f"{addr_b}:51820"
    node: Node = start_meshsup(underlay, tmp_path, a, [b], ns=ns_a, extra=f'\n[metrics]\nlisten = "{METRICS}"\n')
    start_wg(underlay, tmp_path, ns_b, b, [a])
    assert ping(ns_a, b.v4, count=2)

    r = ns_a.run("curl", "-si", f"http://{METRICS}/metrics")
    head, _, body = r.stdout.partition("\n\n")  # text mode: each CRLF read as a newline
    assert head.startswith("HTTP/1.1 200") and f"Content-Type: {CONTENT_TYPE}" in head
    assert f'meshsup_peer_rx_bytes_total{{peer="bravo",public_key="{b.public}"}}' in body
    assert _http(ns_a, b"\x16\x03\x01\x00garbage\r\n\r\n").startswith(b"HTTP/1.1 400 ")
    assert _http(ns_a, b"DELETE /metrics HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 405 ")
    assert node.status()["node"]["ready"]

    prometheus = _prometheus(ns_a, tmp_path)
    try:
        netlog = node.actors()["netlog"]["pid"]
        os.kill(netlog, signal.SIGKILL)
        node.wait(lambda: (n := node.actors()["netlog"])["pid"] != netlog and n["state"] == "running", what="netlog")

        def scraped(promql: str) -> list[dict[str, Any]]:
            return node.wait(lambda: _query(ns_a, promql), timeout=60, what=f"prometheus to answer {promql}")

        assert scraped('up{job="meshsup"} == 1')
        rx = scraped('meshsup_peer_rx_bytes_total{peer="bravo"} > 0')
        assert rx[0]["metric"]["public_key"] == b.public
        assert scraped('meshsup_actor_restarts_total{actor="netlog"} == 1')
        assert scraped('meshsup_actor_up{actor="netlog"} == 1')
        assert scraped('meshsup_peer_path{peer="bravo",path="direct"} == 1')
        assert scraped("time() - meshsup_peer_last_handshake_timestamp_seconds < 120")
    finally:
        prometheus.terminate()
        try:
            prometheus.wait(10)
        except subprocess.TimeoutExpired:
            prometheus.kill()
            prometheus.wait(5)
    assert node.proc.poll() is None and node.status()["node"]["ready"]

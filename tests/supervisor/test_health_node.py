"""Health warnings of real nodes: each caused, seen in `status --json` and `status --check`, and cleared."""

from __future__ import annotations

import json
import secrets
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest

from meshsup.actors.kernel.udp import UdpSocket
from tests.dns_fixtures import dig, endpoint, in_netns, start_dnsmasq
from tests.netlog_fixtures import Rsyslog, free_port
from tests.nodes import Node
from tests.topology import Identity, Underlay, WgGo, have, start_meshsup

pytestmark = pytest.mark.netns


def write_config(tmp_path: Path, body: str) -> Path:
    path = tmp_path / f"node-{secrets.token_hex(3)}.toml"
    path.write_text(body)
    return path


def warning(node: Node, code: str) -> dict[str, Any] | None:
    return next((w for w in node.status()["health"] if w["code"] == code), None)


def check(node: Node) -> subprocess.CompletedProcess[str]:
    return node.cli("status", "--check", check=False)


def assert_standing(node: Node, code: str, timeout: float = 20.0) -> dict[str, Any]:
    """The warning is raised, `status --check` fails naming it, and it keeps its `since`."""
    raised = node.wait(lambda: warning(node, code), timeout, f"{code} raised")
    result = check(node)
    assert result.returncode == 1 and code in result.stdout, result.stdout
    again = warning(node, code)
    assert again is not None and again["since"] == raised["since"], (raised, again)
    assert f"{code}" in node.cli("status").stdout  # the text form lists it too
    return raised


def assert_cleared(node: Node, code: str, timeout: float = 20.0) -> None:
    node.wait(lambda: warning(node, code) is None, timeout, f"{code} cleared")


def test_an_actor_crashing_repeatedly(node_factory, tmp_path) -> None:
    node = node_factory("--config", str(write_config(tmp_path, "[supervisor]\nintensity = 20\nperiod = 8\n")))
    node.wait_ready()
    healthy = check(node)
    assert (healthy.returncode, healthy.stdout.strip()) == (0, "healthy")
    for restarts in (1, 2, 3):
        node.cli("fault", "dns-0", "crash", check=False)  # it dies before it could answer
        node.wait(lambda n=restarts: (a := node.actors()["dns-0"])["restarts"] == n and a["state"] == "running")
    raised = assert_standing(node, "actor-restarting")
    assert raised["subject"] == "dns-0" and "restarted 3 times" in raised["message"]
    assert "exited with status 70" in raised["message"]
    assert_cleared(node, "actor-restarting")  # the period passes without another
    healthy = check(node)
    assert (healthy.returncode, healthy.stdout.strip()) == (0, "healthy")


def test_every_dns_upstream_dead_then_back(node_factory, netns, tmp_path) -> None:
    ns = netns()
    upstream = endpoint(ns)  # nothing listens there yet
    config = f'[dns]\nlisten = ["127.0.0.1:53"]\nupstreams = ["udp://{upstream[0]}:{upstream[1]}"]\n'
    node = node_factory("--config", str(write_config(tmp_path, config)), ns=ns)
    node.wait_ready()
    assert dig("127.0.0.1", 53, "www.example.test", ns=ns).status == "SERVFAIL"
    raised = assert_standing(node, "dns-forward-failing")
    assert f"udp://{upstream[0]}:{upstream[1]}" in raised["message"]
    dnsmasq = start_dnsmasq(tmp_path, ["--address=/example.test/203.0.113.7"], ns=ns, at=upstream)
    try:
        assert dig("127.0.0.1", 53, "again.example.test", ns=ns).status == "NOERROR"
        assert_cleared(node, "dns-forward-failing")
    finally:
        dnsmasq.stop()


def test_a_log_collector_unreachable_then_started(node_factory, netns, tmp_path) -> None:
    ns = netns()
    port = free_port()  # the node's namespace is new: nothing listens on any port in it
    config = f'[[logging.collectors]]\nname = "central"\nkind = "syslog"\naddress = "tcp://127.0.0.1:{port}"\n'
    node = node_factory("--config", str(write_config(tmp_path, config)), ns=ns)
    node.wait_ready()
    raised = assert_standing(node, "collector-unreachable")
    assert raised["subject"] == "logs/central" and "tcp://127.0.0.1" in raised["message"]
    spooled = int(raised["message"].rsplit(" log lines spooled", 1)[0].rsplit(" ", 1)[1])
    assert spooled > 0  # the node's own log lines since it started wait for it
    rsyslog = Rsyslog(tmp_path / "rsyslog", port, ns)
    rsyslog.start()
    try:
        assert_cleared(node, "collector-unreachable", timeout=60)  # at its next retry
        assert rsyslog.messages()
    finally:
        rsyslog.stop()


def test_the_listen_port_taken_on_reload(node_factory, netns, tmp_path) -> None:
    ns = netns()
    first, second = 41641, 41642
    config = write_config(tmp_path, f"[node]\nlisten_port = {first}\n")
    node = node_factory("--config", str(config), ns=ns)
    node.wait_ready()
    blocker = in_netns(ns, lambda: UdpSocket(second, gso=False, gro=False))  # another program has it
    try:
        config.write_text(f"[node]\nlisten_port = {second}\n")
        refused = node.cli("reload", check=False)
        assert refused.returncode != 0 and "cannot listen on UDP port" in refused.stderr
        raised = assert_standing(node, "listen-port-lost")
        assert f"UDP port {second}" in raised["message"] and f"still on {first}" in raised["message"]
    finally:
        blocker.close()
    node.cli("fault", "magicsock", "crash", check=False)  # its restart binds the port, now free
    assert_cleared(node, "listen-port-lost")
    assert node.status()["node"]["listen_port"] == second


TOOLS = ("wireguard-go", "wg", "ping")


@pytest.mark.skipif(bool(have(*TOOLS)), reason=have(*TOOLS) or "")
def test_a_peer_that_does_not_answer_while_pings_wait(underlay: Underlay, tmp_path: Path) -> None:
    """The three minutes shortened with the crypto workers' test timing (reject_after_time)."""
    (ns_a, addr_a), (ns_b, addr_b) = underlay.host(), underlay.host()
    alpha, bravo = Identity("alpha", 1), Identity("bravo", 2)
    alpha.endpoint, bravo.endpoint = f"{addr_a}:51820", f"{addr_b}:51820"  # nothing on bravo's yet
    timing = {"MESHSUP_TEST_TIMING": "rekey_after_time=3,reject_after_time=6"}
    node = start_meshsup(underlay, tmp_path, alpha, [bravo], ns=ns_a, env=timing)
    pings = ns_a.popen("ping", "-i", "0.5", bravo.v4, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        raised = assert_standing(node, "peer-no-handshake")
        assert raised["subject"] == "bravo" and "last handshake never" in raised["message"]
        assert addr_b in raised["message"]
        wg = underlay.track(WgGo(ns_b, bravo, tmp_path))
        wg.add_peer(alpha)
        assert_cleared(node, "peer-no-handshake")
        assert json.loads(node.cli("status", "--json").stdout)["peers"][0]["last_handshake"] > 0
    finally:
        pings.send_signal(signal.SIGINT)
        pings.wait(5)

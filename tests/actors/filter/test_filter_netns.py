"""The filter through real namespaces: alpha filters, bravo (no filter) probes it, as a user would.

TCP connects, gets a RST or times out; UDP is answered, refused with an ICMP
unreachable or unanswered; ping is answered or not; alpha's own flows come
back under its default deny; a rule removed on reload cuts the flow it
allowed and leaves the others; random packets restart no actor.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.nodes import REPO, is_root
from tests.topology import (
    Identity,
    Netns,
    Node,
    Underlay,
    alpha_and_bravo,
    config_path,
    filter_stanza,
    have,
    ping,
    start_meshsup,
)

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(not is_root() or bool(have("ping")), reason=have("ping") or "needs root"),
]

RULES = filter_stanza(
    ("accept", ["bravo"], ["alpha:22", "alpha:2222"], "tcp"),
    ("reject", ["*"], ["*:23"], "tcp"),
    ("accept", ["bravo"], ["*:1053"], "udp"),
    ("reject", ["*"], ["*:1054"], "udp"),
    ("accept", ["bravo"], ["alpha:*"], "icmp"),
)
ALPHA_TCP, ALPHA_UDP = "22,23,24,2222", "1053,1054,1055"


@dataclass
class Lab:
    ns_a: Netns
    ns_b: Netns
    a: Identity
    b: Identity
    alpha: Node
    config: Path

    def probe(self, ns: Netns, *args: str) -> str:
        r = ns.run(sys.executable, "-m", "tests.actors.filter.probe", *args, cwd=REPO, timeout=60)
        return r.stdout.strip()

    def filter_status(self) -> dict:
        return self.alpha.status()["filter"]


def probe_cmd(ns: Netns, *args: str) -> list[str]:
    return ["ip", "netns", "exec", ns.name, sys.executable, "-m", "tests.actors.filter.probe", *args]


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    tmp = tmp_path_factory.mktemp("filter")
    u = Underlay()
    servers: list[subprocess.Popen[str]] = []
    try:
        (ns_a, a), (ns_b, b) = alpha_and_bravo(u)
        alpha = start_meshsup(u, tmp, a, [b], ns=ns_a, extra=RULES)
        start_meshsup(u, tmp, b, [a], ns=ns_b)
        for ns, tcp, udp in [(ns_a, ALPHA_TCP, ALPHA_UDP), (ns_b, "8000", "")]:
            server = subprocess.Popen(
                probe_cmd(ns, "serve", tcp, udp), cwd=REPO, text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE
            )
            servers.append(server)
            assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        lab = Lab(ns_a, ns_b, a, b, alpha, config_path(alpha))
        assert ping(ns_a, b.v4), "alpha's own ping opens the tunnel (and its flow)"
        yield lab
    finally:
        for server in servers:
            server.kill()
            server.wait()
        u.close()


@pytest.mark.parametrize(
    "kind, v6, port, seen",
    [
        ("tcp", False, 22, "open"),
        ("tcp", True, 22, "open"),
        ("tcp", False, 23, "reset"),
        ("tcp", True, 23, "reset"),
        ("tcp", False, 24, "timeout"),
        ("udp", False, 1053, "reply"),
        ("udp", False, 1054, "unreachable"),
        ("udp", True, 1054, "unreachable"),
        ("udp", False, 1055, "timeout"),
        ("udp", True, 1053, "reply"),
    ],
)
def test_filter(lab: Lab, kind: str, v6: bool, port: int, seen: str) -> None:
    assert lab.probe(lab.ns_b, kind, lab.a.v6 if v6 else lab.a.v4, str(port)) == seen


def test_ping_is_answered_where_a_rule_accepts_it_and_not_by_default(lab: Lab) -> None:
    assert ping(lab.ns_b, lab.a.v4)
    assert not ping(lab.ns_b, lab.a.v6, count=2, timeout=4)


def test_flows_alpha_opens_come_back_under_default_deny(lab: Lab) -> None:
    assert lab.probe(lab.ns_a, "tcp", lab.b.v4, "8000") == "open"
    assert lab.probe(lab.ns_a, "tcp", lab.b.v6, "8000") == "open"
    assert ping(lab.ns_a, lab.b.v6)


def test_status_counts_hits_per_rule_and_drops_per_reason(lab: Lab) -> None:
    before = lab.filter_status()
    assert lab.probe(lab.ns_b, "tcp", lab.a.v4, "23") == "reset"
    assert lab.probe(lab.ns_b, "tcp", lab.a.v4, "24") == "timeout"

    def counted() -> bool:
        now = lab.filter_status()
        return (
            now["rules"][1]["hits"] > before["rules"][1]["hits"]
            and now["drops"].get("reject", 0) > before["drops"].get("reject", 0)
            and now["drops"].get("default_deny", 0) > before["drops"].get("default_deny", 0)
        )

    assert lab.alpha.wait(counted, what="the filter's counters")
    status = lab.filter_status()
    assert [r["action"] for r in status["rules"]] == ["accept", "reject", "accept", "reject", "accept"]
    assert status["default"] == "deny" and status["flows"] > 0


def test_a_rule_removed_on_reload_cuts_its_flow_and_keeps_the_others(lab: Lab) -> None:
    holder = subprocess.Popen(
        probe_cmd(lab.ns_b, "hold", lab.a.v4, "22,2222"),
        cwd=REPO,
        text=True,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert holder.stdin is not None and holder.stdout is not None
    original = lab.config.read_text()
    try:
        assert holder.stdout.readline().split() == ["ok", "ok", "held"]
        lab.config.write_text(original.replace('dst = ["alpha:22", "alpha:2222"]', 'dst = ["alpha:22"]'))
        lab.alpha.cli("reload")
        lab.alpha.wait(lambda: lab.filter_status()["cut"] >= 1, what="the flow to 2222 cut")
        holder.stdin.write("again\n")
        holder.stdin.flush()
        assert holder.stdout.readline().split() == ["ok", "cut"]
        assert lab.probe(lab.ns_b, "tcp", lab.a.v4, "2222") == "timeout"  # new ones too
        assert lab.probe(lab.ns_b, "tcp", lab.a.v4, "22") == "open"
    finally:
        holder.kill()
        holder.wait()
        lab.config.write_text(original)
        lab.alpha.cli("reload")


def test_ten_thousand_random_packets_restart_no_actor(lab: Lab) -> None:
    before = {a["name"]: a["restarts"] for a in lab.alpha.status()["actors"]}
    assert lab.probe(lab.ns_b, "random", lab.b.v4, lab.a.v4, "10000", "15") == "sent"
    assert ping(lab.ns_b, lab.a.v4)  # still filtering, still answering
    after = lab.alpha.status()["actors"]
    assert {a["name"]: a["restarts"] for a in after} == before
    assert all(a["state"] == "running" for a in after)
    assert sum(lab.filter_status()["drops"].values()) > 0


def test_a_peer_sending_from_outside_its_allowed_ips_is_dropped_and_counted(lab: Lab) -> None:
    def dropped() -> int:
        return lab.alpha.counters()["crypto"].get("allowed_ips", 0)

    before = dropped()
    assert lab.probe(lab.ns_b, "random", "100.64.0.77", lab.a.v4, "50", "16") == "sent"
    assert lab.alpha.wait(lambda: dropped() >= before + 50, what="50 spoofed packets counted as allowed_ips")

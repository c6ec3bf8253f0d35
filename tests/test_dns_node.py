"""The DNS controller inside a running node: mesh names answered by the dns actor."""
from __future__ import annotations

import os
import signal

import pytest

from tests.topology import Identity, have, meshsup_config


@pytest.mark.skipif(bool(have("dig")), reason=have("dig") or "")
def test_node_answers_mesh_names_and_survives_a_dns_crash(node_factory, netns, tmp_path) -> None:
    alpha, bravo = Identity("alpha", 1), Identity("bravo", 2)
    ns = netns()
    node = node_factory("--config", str(meshsup_config(tmp_path, alpha, [bravo])), "--dns-workers", "2", ns=ns)
    node.wait_ready()

    def dig(name: str, qtype: str = "A") -> str:
        return ns.run("dig", "+short", "+time=2", "+tries=2", "-p", "53", "@127.0.0.1", name, qtype).stdout.strip()

    assert dig("bravo.mesh") == bravo.v4
    assert dig("alpha.mesh", "AAAA") == alpha.v6
    assert dig("2.0.64.100.in-addr.arpa", "PTR") == "bravo.mesh."
    assert "NXDOMAIN" in ns.run("dig", "-p", "53", "@127.0.0.1", "nobody.mesh").stdout
    old = node.actors()["dns-0"]["pid"]
    os.kill(old, signal.SIGKILL)
    node.wait(lambda: (a := node.actors()["dns-0"])["pid"] != old and a["state"] == "running",
              what="dns-0 replaced")
    assert dig("bravo.mesh") == bravo.v4

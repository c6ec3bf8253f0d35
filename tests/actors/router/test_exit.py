"""Using an exit node, through namespaces: client -> exit -> an "internet" namespace on 203.0.113.0/24.

The client has a default route by its underlay, so its own encrypted traffic following the tunnel's
default route into itself would show (no handshake, no transfer); without exit_node_allow_lan even the
underlay's LAN takes the tunnel, so only the socket mark keeps the client's UDP to the exit direct.
A kill -9 of either side's router actor: traffic resumes and the client's rules and routes are the same.
Changing exit_node on reload, and stopping, put `ip rule` and every routing table back as they were."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.nodes import is_root
from tests.topology import Identity, Netns, Node, Underlay, assert_carried, have, iperf3, meshsup_config, ping

INTERNET_EXIT, INTERNET_HOST = "203.0.113.1", "203.0.113.2"
MARK = "0x4d53"


def routing(ns: Netns) -> list[str]:
    return [
        ns.run(*cmd).stdout
        for cmd in (
            ("ip", "-4", "rule"),
            ("ip", "-6", "rule"),
            ("ip", "-4", "route", "show", "table", "all"),
            ("ip", "-6", "route", "show", "table", "all"),
        )
    ]


def link_local_settled(ns: Netns) -> None:
    """The underlay's IPv6 link-local address past DAD, so the routes to compare with are all there."""
    deadline = time.monotonic() + 10
    while "tentative" in (out := ns.run("ip", "-6", "addr", "show", "dev", "eth0").stdout) or "fe80" not in out:
        assert time.monotonic() < deadline, out
        time.sleep(0.1)


def route_dev(ns: Netns, addr: str, *extra: str) -> str:
    words = ns.run("ip", "route", "get", addr, *extra).stdout.split()
    return words[words.index("dev") + 1]


def with_node_keys(path: Path, keys: str) -> Path:
    path.write_text(path.read_text().replace("[supervisor]", f"{keys}\n[supervisor]", 1))
    return path


@pytest.mark.netns
@pytest.mark.skipif(not is_root() or bool(have("ping", "iperf3")), reason=have("ping", "iperf3") or "needs root")
def test_the_client_reaches_the_internet_through_the_exit_node_and_gets_its_routes_back(
    underlay: Underlay, tmp_path: Path
) -> None:
    u = underlay
    (ns_c, addr_c), (ns_e, addr_e) = u.host(), u.host()
    internet = Netns("inet")
    u.hosts.append(internet)
    subprocess.run(
        [
            "ip",
            "link",
            "add",
            "eth1",
            "netns",
            ns_e.name,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            internet.name,
        ],
        check=True,
    )
    ns_e.run("ip", "addr", "add", f"{INTERNET_EXIT}/24", "dev", "eth1")
    ns_e.run("ip", "link", "set", "eth1", "up")
    internet.run("ip", "addr", "add", f"{INTERNET_HOST}/24", "dev", "eth0")
    internet.run("ip", "link", "set", "eth0", "up")
    ns_c.run("ip", "route", "add", "default", "via", "198.51.100.254", "dev", "eth0")  # nobody: a dead end
    link_local_settled(ns_c)
    before = routing(ns_c)

    client, exit_ = Identity("client", 1), Identity("exit", 2)
    client.endpoint, exit_.endpoint = f"{addr_c}:51820", f"{addr_e}:51820"
    exit_node = u.track(
        Node(
            tmp_path,
            "--config",
            str(with_node_keys(meshsup_config(tmp_path, exit_, [client]), "advertise_exit_node = true")),
            netns=ns_e,
        )
    )
    exit_node.wait_ready()
    conf = meshsup_config(tmp_path, client, [exit_])
    seen = f'"{exit_.v6}/128"]'  # the exit may send from anywhere: 0.0.0.0/0 and ::/0 in its allowed IPs
    conf.write_text(conf.read_text().replace(seen, f'"{exit_.v6}/128", "0.0.0.0/0", "::/0"]'))
    plain = conf.read_text()
    with_node_keys(conf, 'exit_node = "exit"')
    node = u.track(Node(tmp_path, "--config", str(conf), netns=ns_c))
    node.wait_ready()

    assert route_dev(ns_c, INTERNET_HOST) == node.iface
    assert route_dev(ns_c, addr_e) == node.iface  # the LAN too, without exit_node_allow_lan ...
    assert route_dev(ns_c, addr_e, "mark", MARK) == "eth0"  # ... but the node's own marked UDP stays out
    assert ping(ns_c, INTERNET_HOST)
    assert_carried(iperf3(ns_c, internet, INTERNET_HOST, seconds=3))

    running = routing(ns_c)
    for crashed in (exit_node, node):  # each side's router killed: its successor takes over
        pid = crashed.actors()["router"]["pid"]
        os.kill(pid, signal.SIGKILL)
        crashed.wait(lambda c=crashed, p=pid: (a := c.actors()["router"])["pid"] != p and a["state"] == "running")
        assert ping(ns_c, INTERNET_HOST)
    assert routing(ns_c) == running  # the client's rules and routes as they were, none twice

    conf.write_text(plain)
    with_node_keys(conf, 'exit_node = "exit"\nexit_node_allow_lan = true')
    node.cli("reload")
    assert route_dev(ns_c, addr_e) == "eth0" and route_dev(ns_c, INTERNET_HOST) == node.iface
    assert ping(ns_c, INTERNET_HOST)

    conf.write_text(plain)  # no exit node: the rules go, the tunnel stays
    node.cli("reload")
    assert routing(ns_c)[:2] == before[:2]
    assert route_dev(ns_c, INTERNET_HOST) == "eth0"
    assert ping(ns_c, exit_.v4)

    with_node_keys(conf, 'exit_node = "exit"')
    node.cli("reload")
    assert ping(ns_c, INTERNET_HOST)
    node.close()
    assert routing(ns_c) == before

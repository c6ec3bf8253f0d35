"""Using an exit node, through namespaces: client -> exit -> an "internet" namespace on 203.0.113.0/24
(tests.topology.ExitLab).

The client has a default route by its underlay, so its own encrypted traffic following the tunnel's
default route into itself would show (no handshake, no transfer); without exit_node_allow_lan even the
underlay's LAN takes the tunnel, so only the socket mark keeps the client's UDP to the exit direct.
A kill -9 of either side's router actor: traffic resumes and the client's rules and routes are the same.
A kill -9 of the exit node's supervisor: its actors stop on their own and clean up; of every process of
the exit node at once: what it left is cleaned up by its next start; either way the client's routing
stays as it was and its traffic resumes when the exit returns. The client killed outright keeps its
rules until its next start takes them over. The internet's DNS server answers the
client through the exit, and the exit node logs what it carried as exit traffic, anonymised.
Changing exit_node on reload, and stopping, put `ip rule` and every routing table back as they were."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from meshsup.actors.router.forwarding import table_name
from tests.dns_fixtures import start_dnsmasq
from tests.netlog_fixtures import Rsyslog, free_port, wait_until
from tests.nodes import is_root, pid_alive
from tests.topology import ExitLab, Netns, Underlay, assert_carried, have, iperf3, ping, with_node_keys

INTERNET_HOST = ExitLab.INTERNET_HOST
MARK = "0x4d53"
SYSCTLS = ("net.ipv4.ip_forward", "net.ipv6.conf.all.forwarding")


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


def host_state(ns: Netns) -> list[str]:
    """What a node may change in its namespace: links, rules, routes, nftables, forwarding."""
    return [
        ns.run("ip", "-br", "link").stdout,
        *routing(ns),
        ns.run("nft", "list", "ruleset").stdout,
        *(ns.run("sysctl", "-n", s).stdout for s in SYSCTLS),
    ]


def link_local_settled(ns: Netns, *links: str) -> None:
    """The links' IPv6 link-local addresses past DAD, so the routes to compare with are all there."""
    for link in links:
        deadline = time.monotonic() + 10
        while "tentative" in (out := ns.run("ip", "-6", "addr", "show", "dev", link).stdout) or "fe80" not in out:
            assert time.monotonic() < deadline, out
            time.sleep(0.1)


def route_dev(ns: Netns, addr: str, *extra: str) -> str:
    words = ns.run("ip", "route", "get", addr, *extra).stdout.split()
    return words[words.index("dev") + 1]


def reaches_the_internet(ns: Netns, timeout: float = 60) -> bool:
    """An echo from the internet host answered within `timeout`: a client whose exit came back
    handshakes again once its old session goes unanswered (WireGuard's 15 s)."""
    return wait_until(lambda: ping(ns, INTERNET_HOST, count=1, timeout=2), timeout)


needs_tools = pytest.mark.skipif(
    not is_root() or bool(have("ping", "iperf3", "nft")), reason=have("ping", "iperf3", "nft") or "needs root"
)


@pytest.mark.netns
@needs_tools
def test_the_client_reaches_the_internet_through_the_exit_node_and_gets_its_routes_back(
    underlay: Underlay, tmp_path: Path
) -> None:
    lab = ExitLab(underlay, tmp_path)
    ns_c, addr_e = lab.client_ns, lab.exit.endpoint.split(":")[0]
    link_local_settled(ns_c, "eth0")
    before = routing(ns_c)
    exit_node = lab.start_exit()
    node = lab.start_client()

    assert route_dev(ns_c, INTERNET_HOST) == node.iface
    assert route_dev(ns_c, addr_e) == node.iface  # the LAN too, without exit_node_allow_lan ...
    assert route_dev(ns_c, addr_e, "mark", MARK) == "eth0"  # ... but the node's own marked UDP stays out
    assert ping(ns_c, INTERNET_HOST)
    assert_carried(iperf3(ns_c, lab.internet, INTERNET_HOST, seconds=3))

    running = routing(ns_c)
    for crashed in (exit_node, node):  # each side's router killed: its successor takes over
        pid = crashed.actors()["router"]["pid"]
        os.kill(pid, signal.SIGKILL)
        crashed.wait(lambda c=crashed, p=pid: (a := c.actors()["router"])["pid"] != p and a["state"] == "running")
        assert ping(ns_c, INTERNET_HOST)
    assert routing(ns_c) == running  # the client's rules and routes as they were, none twice

    lab.client_conf.write_text(lab.client_plain)
    with_node_keys(lab.client_conf, 'exit_node = "exit"\nexit_node_allow_lan = true')
    node.cli("reload")
    assert route_dev(ns_c, addr_e) == "eth0" and route_dev(ns_c, INTERNET_HOST) == node.iface
    assert ping(ns_c, INTERNET_HOST)

    lab.client_conf.write_text(lab.client_plain)  # no exit node: the rules go, the tunnel stays
    node.cli("reload")
    assert routing(ns_c)[:2] == before[:2]
    assert route_dev(ns_c, INTERNET_HOST) == "eth0"
    assert ping(ns_c, lab.exit.v4)

    with_node_keys(lab.client_conf, 'exit_node = "exit"')
    node.cli("reload")
    assert ping(ns_c, INTERNET_HOST)
    node.close()
    assert routing(ns_c) == before


@pytest.mark.netns
@needs_tools
def test_a_killed_node_leaves_nothing_behind_and_the_client_resumes_when_the_exit_returns(
    underlay: Underlay, tmp_path: Path
) -> None:
    lab = ExitLab(underlay, tmp_path)
    ns_c, ns_e = lab.client_ns, lab.exit_ns
    link_local_settled(ns_e, "eth0", "eth1")
    link_local_settled(ns_c, "eth0")
    before, client_before = host_state(ns_e), routing(ns_c)
    assert before[-2:] == ["0\n", "0\n"]  # else switching forwarding on would not show
    exit_node = lab.start_exit()
    client = lab.start_client()
    assert ping(ns_c, INTERNET_HOST)
    running = routing(ns_c)

    # kill -9 of the supervisor alone: its actors see it gone and stop as on `meshsup stop`.
    actors = [a["pid"] for a in exit_node.actors().values()]
    os.kill(exit_node.proc.pid, signal.SIGKILL)
    exit_node.proc.wait(10)  # reaped, as init would: its PID file no longer names a live process
    assert wait_until(lambda: not any(map(pid_alive, actors)), 30), [p for p in actors if pid_alive(p)]
    assert wait_until(lambda: not exit_node.processes(), 10), exit_node.processes()  # the fork server too
    assert host_state(ns_e) == before  # no table, no forwarding, no link left
    assert not ping(ns_c, INTERNET_HOST, count=1, timeout=2)
    assert routing(ns_c) == running  # the client keeps its way out, waiting for the exit

    exit_node = lab.start_exit(same_as=exit_node)
    assert reaches_the_internet(ns_c)

    # kill -9 of every process at once: nothing cleans up, so the next start must.
    exit_node.kill()
    tables = ns_e.run("nft", "list", "tables").stdout
    assert f"table inet {table_name(exit_node.iface)}" in tables  # really left behind
    assert routing(ns_c) == running
    exit_node = lab.start_exit(same_as=exit_node)
    assert reaches_the_internet(ns_c)
    assert ns_e.run("nft", "list", "tables").stdout == tables  # the stale table replaced, not doubled
    assert routing(ns_c) == running

    # The client killed outright keeps its rules (nothing leaks past the exit meanwhile); its next
    # start takes them over, none twice, and its traffic goes out through the exit again.
    client.kill()
    assert routing(ns_c)[:2] == running[:2]
    client = lab.start_client(same_as=client)
    assert reaches_the_internet(ns_c)
    assert routing(ns_c) == running

    client.close()
    assert routing(ns_c) == client_before
    exit_node.close()
    assert host_state(ns_e) == before


@pytest.mark.netns
@pytest.mark.skipif(
    not is_root() or bool(have("ping", "dig", "dnsmasq", "rsyslogd")),
    reason=have("ping", "dig", "dnsmasq", "rsyslogd") or "needs root",
)
def test_the_internet_answers_dns_through_the_exit_which_logs_it_as_anonymised_exit_traffic(
    underlay: Underlay, tmp_path: Path
) -> None:
    port = free_port()
    netlog = f'[netlog]\ninterval = 1\n[[netlog.collectors]]\nkind = "syslog"\naddress = "tcp://127.0.0.1:{port}"\n'
    lab = ExitLab(underlay, tmp_path, exit_extra=netlog)
    rsyslog = Rsyslog(tmp_path / "rsyslog", port, lab.exit_ns)
    rsyslog.start()
    dns = start_dnsmasq(tmp_path, ["--address=/www.example.test/203.0.113.80"], ns=lab.internet, at=(INTERNET_HOST, 53))
    try:
        lab.start_exit()
        lab.start_client()
        ns_c = lab.client_ns
        answer = ns_c.run("dig", f"@{INTERNET_HOST}", "www.example.test", "A", "+short", "+tries=3", "+time=2")
        assert answer.stdout.split() == ["203.0.113.80"]
        log = dns.log.read_text()
        assert f"query[A] www.example.test from {ExitLab.INTERNET_EXIT}" in log  # masqueraded by the exit
        assert ping(ns_c, INTERNET_HOST, count=5)

        def exit_traffic() -> dict[int, dict[str, int]]:
            records = [json.loads(m["msg"]) for m in rsyslog.messages() if m["msgid"] == "flowlog"]
            out: dict[int, dict[str, int]] = {}
            for e in (e for r in records for e in r.get("exitTraffic", [])):
                counts = out.setdefault(e["proto"], {"txPkts": 0, "rxPkts": 0})
                for k in counts:
                    counts[k] += e.get(k, 0)
            return out

        def counted() -> bool:  # the echoes and the DNS exchange, both ways
            got = exit_traffic()
            icmp, udp = got.get(1, {}), got.get(17, {})
            return min(icmp.values(), default=0) >= 5 and min(udp.values(), default=0) >= 1

        assert wait_until(counted, 20), exit_traffic()
        records = [json.loads(m["msg"]) for m in rsyslog.messages() if m["msgid"] == "flowlog"]
        exits = [e for r in records for e in r.get("exitTraffic", [])]
        assert all("src" not in e and "dst" not in e for e in exits), exits  # anonymised
        assert INTERNET_HOST not in json.dumps(records)  # the internet side's address is nowhere
        assert not any(lab.client.v4 in json.dumps(r.get("virtualTraffic", [])) for r in records)
    finally:
        dns.stop()
        rsyslog.stop()

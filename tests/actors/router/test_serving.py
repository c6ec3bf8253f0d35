"""A node serving as a subnet router (or exit node): the nft script, the sysctls kept and put back,
and through namespaces a host behind the router reached from a remote node, and not once the route
is withdrawn; after a kill -9 of the router actor and a stop, nftables and sysctls are as before."""

from __future__ import annotations

import ipaddress
import os
import signal
import subprocess
from pathlib import Path

import pytest

from meshsup.actors.router.forwarding import FORWARDING_SYSCTLS, Forwarding, Sysctls, ruleset
from tests.nodes import is_root
from tests.topology import Identity, Netns, Node, Underlay, have, meshsup_config, ping

LAN = "203.0.113.192/26"
LAN_ROUTER, LAN_HOST = "203.0.113.193", "203.0.113.194"
SYSCTLS = ("net.ipv4.ip_forward", "net.ipv6.conf.all.forwarding")


def test_the_table_masquerades_from_the_tunnel_toward_the_routes_or_everywhere() -> None:
    routes = [ipaddress.ip_network("10.20.0.0/16"), ipaddress.ip_network("fd00:20::/64")]
    text = ruleset("ms0", False, routes)
    assert text.startswith("table inet meshsup-ms0 {}\ndelete table inet meshsup-ms0\n")
    assert 'iifname "ms0" oifname != "ms0" ip daddr { 10.20.0.0/16 } masquerade' in text
    assert 'iifname "ms0" oifname != "ms0" ip6 daddr { fd00:20::/64 } masquerade' in text
    everywhere = ruleset("ms0", True, routes)
    assert everywhere.count("masquerade") == 1 and 'oifname != "ms0" masquerade' in everywhere
    assert ruleset("ms0", False, []) == "table inet meshsup-ms0 {}\ndelete table inet meshsup-ms0\n"


def test_sysctls_are_put_back_as_they_were_before_the_first_change(tmp_path: Path) -> None:
    root = tmp_path / "sys"
    (root / "net").mkdir(parents=True)
    (root / "net" / "f").write_text("0\n")
    saved = tmp_path / "saved.json"
    Sysctls(saved, root).set(["net/f"], "1")  # this router "dies" here
    again = Sysctls(saved, root)
    again.set(["net/f"], "1")
    assert (root / "net" / "f").read_text() == "1\n"
    again.restore()
    again.restore()  # a second is a no-op
    assert (root / "net" / "f").read_text() == "0\n" and not saved.exists()


def node_config(tmp: Path, ident: Identity, peers: list[Identity], node_keys: str) -> Path:
    path = meshsup_config(tmp, ident, peers)
    path.write_text(path.read_text().replace("[supervisor]", f"{node_keys}\n[supervisor]", 1))
    return path


def host_state(ns: Netns) -> tuple[str, list[str]]:
    return ns.run("nft", "list", "ruleset").stdout, [ns.run("sysctl", "-n", s).stdout.strip() for s in SYSCTLS]


@pytest.mark.netns
@pytest.mark.skipif(not is_root() or bool(have("ping", "nft")), reason=have("ping", "nft") or "needs root")
def test_a_host_behind_a_subnet_router_is_reached_until_the_route_is_withdrawn(
    underlay: Underlay, tmp_path: Path
) -> None:
    u = underlay
    (ns_c, addr_c), (ns_r, addr_r) = u.host(), u.host()
    lan = Netns("lan")
    u.hosts.append(lan)
    subprocess.run(
        ["ip", "link", "add", "lan0", "netns", ns_r.name, "type", "veth", "peer", "name", "eth0", "netns", lan.name],
        check=True,
    )
    ns_r.run("ip", "addr", "add", f"{LAN_ROUTER}/26", "dev", "lan0")
    ns_r.run("ip", "link", "set", "lan0", "up")
    lan.run("ip", "addr", "add", f"{LAN_HOST}/26", "dev", "eth0")
    lan.run("ip", "link", "set", "eth0", "up")
    before = host_state(ns_r)
    assert before[1] == ["0", "0"]  # else switching forwarding on would not show

    client, router = Identity("client", 1), Identity("router", 2)
    client.endpoint, router.endpoint = f"{addr_c}:51820", f"{addr_r}:51820"
    client_conf = meshsup_config(tmp_path, client, [router])
    seen = f'"{router.v6}/128"]'  # the client routes the LAN through the router: in its allowed IPs
    client_conf.write_text(client_conf.read_text().replace(seen, f'"{router.v6}/128", "{LAN}"]'))
    u.track(Node(tmp_path, "--config", str(client_conf), netns=ns_c)).wait_ready()
    conf = node_config(tmp_path, router, [client], f'advertise_routes = ["{LAN}"]')
    serving = u.track(Node(tmp_path, "--config", str(conf), netns=ns_r))
    serving.wait_ready()

    assert ping(ns_c, LAN_HOST)
    assert f"meshsup-{serving.iface}" in ns_r.run("nft", "list", "tables").stdout
    router_pid = serving.actors()["router"]["pid"]
    os.kill(router_pid, signal.SIGKILL)  # the table and sysctls outlive it; its successor takes them over
    serving.wait(lambda: (a := serving.actors()["router"])["pid"] != router_pid and a["state"] == "running")
    assert ping(ns_c, LAN_HOST)

    conf.write_text(meshsup_config(tmp_path, router, [client]).read_text())
    serving.cli("reload")
    assert not ping(ns_c, LAN_HOST, count=2, timeout=3)
    assert ping(ns_c, router.v4)  # the tunnel itself still works
    assert host_state(ns_r) == before

    conf.write_text(node_config(tmp_path, router, [client], f'advertise_routes = ["{LAN}"]').read_text())
    serving.cli("reload")
    assert ping(ns_c, LAN_HOST)
    serving.close()
    assert host_state(ns_r) == before


def test_a_node_that_does_not_serve_needs_no_nft(tmp_path: Path) -> None:
    root = tmp_path / "sys"
    for name in FORWARDING_SYSCTLS:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text("0\n")
    forwarding = Forwarding("ms0", tmp_path, nft=(str(tmp_path / "no-nft"),), sysctl_root=root)
    forwarding.apply(False, [])  # no table to clear: nothing is asked of nft
    with pytest.raises(OSError):
        forwarding.apply(True, [])
    forwarding.remove()
    assert [(root / name).read_text() for name in FORWARDING_SYSCTLS] == ["0\n", "0\n"]

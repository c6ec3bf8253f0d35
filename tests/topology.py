"""Test hosts in network namespaces on one underlay, with meshsup nodes and wireguard-go peers.

The lab itself lives in supervisor/lab.py (`meshsup demo` uses it too); this
module keeps the names the tests import, and the few set-ups many tests share.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from meshsup.supervisor.lab import Identity, Netns, Node, Underlay, WgGo, have, iperf3, meshsup_config, ping, ping_rtt

__all__ = [
    "ExitLab",
    "Home",
    "RELAY_PORT",
    "Identity",
    "NatLab",
    "Netns",
    "Node",
    "Underlay",
    "WgGo",
    "alpha_and_bravo",
    "assert_carried",
    "carried_through",
    "config_path",
    "filter_stanza",
    "have",
    "iperf3",
    "meshsup_config",
    "ping",
    "ping_rtt",
    "readdress",
    "received_from",
    "start_meshsup",
    "start_relay",
    "start_wg",
    "pair",
    "peer",
    "relay_up",
    "relays_stanza",
    "unanswered",
    "with_node_keys",
]

RELAY_PORT = 8080  # a test relay's DERP port; its STUN is on 3478 of the same address


def relays_stanza(addr: str, name: str = "edge") -> str:
    return f'\n[[relays]]\nname = "{name}"\nurl = "http://{addr}:{RELAY_PORT}/derp"\n'


def relay_up(node: Node) -> bool:
    """Every relay of the node connected, its latency measured."""
    return all(r["state"] == "up" and r["latency_ms"] is not None for r in node.status()["relays"])


def peer(node: Node, name: str) -> dict[str, Any]:
    """The node's status of one peer."""
    return next(p for p in node.status()["peers"] if p["name"] == name)


def readdress(underlay: Underlay, ns: Netns, old: str, ifname: str = "eth0") -> str:
    """Move a host to a new underlay address (roaming); returns the new address."""
    new = f"198.51.100.{underlay.next_host}"
    underlay.next_host += 1
    ns.run("ip", "addr", "del", f"{old}/24", "dev", ifname)
    ns.run("ip", "addr", "add", f"{new}/24", "dev", ifname)
    return new


def start_meshsup(
    u: Underlay,
    tmp: Path,
    ident: Identity,
    peers: list[Identity],
    *args: str,
    ns: Netns | None = None,
    env: dict[str, str] | None = None,
    extra: str = "",
) -> Node:
    """A meshsup node for `ident` with `peers`, in `ns`, ready."""
    node = u.track(Node(tmp, "--config", str(meshsup_config(tmp, ident, peers, extra=extra)), *args, netns=ns, env=env))
    node.wait_ready()
    return node


def config_path(node: Node) -> Path:
    """The config file a node was started with: a test rewrites it, then `meshsup reload`."""
    args = node.proc.args
    return Path(args[args.index("--config") + 1])


def filter_stanza(*rules: tuple[str, list[str], list[str], str], default: str = "deny") -> str:
    """A [filter] section: ``rules`` as (action, sources, destinations, protocol), in order."""
    return f'\n[filter]\ndefault = "{default}"\n' + "".join(
        f'[[filter.rules]]\naction = "{action}"\nsrc = {json.dumps(src)}\ndst = {json.dumps(dst)}\nproto = "{proto}"\n'
        for action, src, dst, proto in rules
    )


def start_relay(u: Underlay, tmp: Path, ns: Netns, addr: str, *args: str, name: str = "edge") -> Node:
    """`meshsup relay` at `addr` in `ns` (DERP on RELAY_PORT, STUN on 3478 unless `args` say), ready."""
    relay = u.track(Node(tmp, "--listen", f"{addr}:{RELAY_PORT}", "--name", name, *args, netns=ns, command="relay"))
    relay.wait(lambda: relay.status()["relay"]["ready"], what="relay ready")
    return relay


def start_wg(u: Underlay, tmp: Path, ns: Netns, ident: Identity, peers: list[Identity], keepalive: int = 0) -> WgGo:
    """wireguard-go for `ident` with `peers`, in `ns`."""
    wg = u.track(WgGo(ns, ident, tmp))
    for p in peers:
        wg.add_peer(p, keepalive)
    return wg


def alpha_and_bravo(u: Underlay) -> tuple[tuple[Netns, Identity], tuple[Netns, Identity]]:
    """Two hosts on the underlay and the identities of alpha and bravo, each with its host's endpoint."""
    (ns_a, addr_a), (ns_b, addr_b) = u.host(), u.host()
    a, b = Identity("alpha", 1), Identity("bravo", 2)
    a.endpoint, b.endpoint = f"{addr_a}:51820", f"{addr_b}:51820"
    return (ns_a, a), (ns_b, b)


def pair(
    u: Underlay, tmp: Path, second: str
) -> tuple[tuple[Netns, Identity, Node], tuple[Netns, Identity, Node | WgGo]]:
    """alpha is meshsup; bravo is wireguard-go or meshsup; each on its own host."""
    (ns_a, a), (ns_b, b) = alpha_and_bravo(u)
    node_a = start_meshsup(u, tmp, a, [b], ns=ns_a)
    peer_b = start_wg(u, tmp, ns_b, b, [a]) if second == "wireguard-go" else start_meshsup(u, tmp, b, [a], ns=ns_b)
    return (ns_a, a, node_a), (ns_b, b, peer_b)


@contextmanager
def carried_through(client: Netns, server: Netns, addr: str, seconds: int) -> Iterator[None]:
    """iperf3 TCP from ``client`` to ``addr`` (in ``server``) for ``seconds``, begun before the body: after
    it, the connection must have lived through whatever the body did (assert_carried)."""
    result: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: result.update(iperf3(client, server, addr, seconds=seconds)))
    thread.start()
    try:
        yield
    finally:
        thread.join(seconds + 60)
    assert_carried(result)


def received_from(wg: WgGo, sender: Identity) -> int:
    """Bytes wireguard-go says it received from ``sender`` (0 before any handshake)."""
    for line in wg.show().splitlines()[1:]:
        fields = line.split("\t")
        if fields[0] == sender.public:
            return int(fields[5])
    raise KeyError(sender.name)


def unanswered(ns: Netns, addr: str, received: Callable[[], int]) -> bool:
    """No echo request from ``ns`` to ``addr`` is answered and ``received``, a WireGuard rx counter
    that the exchange would move, stays put: a request that got through, or a reply that is merely
    late, fails this where a bare ping would pass."""
    before = received()
    return not ping(ns, addr, count=2, timeout=3) and received() == before


def assert_carried(result: dict[str, Any]) -> None:
    """An iperf3 transfer ended as iperf3 ends one, its figures sent over the tunnel, and the receiver
    got data: a connection that broke, or a run that never returned (no figures), fails. Stalls and
    speed are for the benchmarks."""
    assert "error" not in result, result.get("error")
    assert result.get("end", {}).get("sum_received", {}).get("bytes", 0) > 0, result


NatMode = Literal["masquerade", "random"]


@dataclass
class Home:
    """A home of a NatLab: its router and the one host on its LAN (a 198.51.100.0/26 from `base`)."""

    host: Netns
    router: Netns
    addr: str  # the host's LAN address
    public: str  # the router's address on the internet segment
    base: int  # the LAN's network number: its addresses are 198.51.100.(base+1 .. base+62)
    next_lan: int = 3  # the next free host number in the LAN (the router is 1, the first host 2)

    @property
    def gateway(self) -> str:
        return f"198.51.100.{self.base + 1}"


class NatLab:
    """An internet segment (203.0.113.0/24) and homes on it: each a router that masquerades its LAN
    (a 198.51.100.0/26 of its own) onto the segment with nftables, and one host on that LAN. Hosts
    in two homes cannot reach each other: each router takes only replies in (conntrack). A relay or
    a public peer sits on the segment itself. The faults NAT traversal must survive are made here:
    a NAT that maps per destination (`home(nat="random")`), a path that dies (`blackhole`), mappings
    that are forgotten (`flush_nat`), a host that changes address (`renumber`). Everything goes with
    `close` (the Underlay's): it all lives in the lab's namespaces."""

    def __init__(self, underlay: Underlay) -> None:
        self.net = underlay  # its bridge is the segment
        self.next_public = 1
        self.homes: list[Home] = []

    def public(self) -> tuple[Netns, str]:
        """A host on the internet segment, with its public address."""
        ns = Netns("pub")
        self.net.hosts.append(ns)
        addr = f"203.0.113.{self.next_public}"
        self.next_public += 1
        self.net.plug(ns, addr)
        return ns, addr

    def home(self, nat: NatMode = "masquerade") -> tuple[Netns, str, str]:
        """A new home: (its host, the host's LAN address, the router's public address). `nat` is how
        the router maps: "masquerade" keeps a LAN host's source port where it can, the same mapping
        for every destination; "random" (`masquerade random`) draws a port per destination, an
        endpoint-dependent NAT ("hard" in Tailscale's terms), where no STUN answer tells a peer
        the port to use."""
        if nat not in ("masquerade", "random"):
            raise ValueError(f"nat must be masquerade or random, not {nat!r}")
        router, public = self.public()
        host = Netns("lan")
        self.net.hosts.append(host)
        home = Home(host, router, "", public, base=64 * len(self.homes))
        home.addr = f"198.51.100.{home.base + 2}"
        self.homes.append(home)
        a, b = f"v{secrets.token_hex(4)}", f"v{secrets.token_hex(4)}"
        subprocess.run(
            ["ip", "link", "add", a, "netns", router.name, "type", "veth", "peer", "name", b, "netns", host.name],
            check=True,
        )
        router.run("ip", "link", "set", a, "name", "lan0")
        router.run("ip", "addr", "add", f"{home.gateway}/26", "dev", "lan0")
        router.run("ip", "link", "set", "lan0", "up")
        host.run("ip", "link", "set", b, "name", "eth0")
        host.run("ip", "addr", "add", f"{home.addr}/26", "dev", "eth0")
        host.run("ip", "link", "set", "eth0", "up")
        host.run("ip", "route", "add", "default", "via", home.gateway)
        router.run("sysctl", "-qw", "net.ipv4.ip_forward=1")
        # As a home router's firewall: the LAN goes out, only replies come in, and nothing from the
        # internet reaches the router itself. That last rule matters beyond realism: a datagram that
        # reaches the router unasked and is not dropped leaves a conntrack entry behind (30 s, renewed
        # by each one after it), and the mapping the LAN host makes next toward that sender clashes
        # with it and takes another port, which no hole punching can then find.
        rules = (
            "table ip nat { chain postrouting { type nat hook postrouting priority srcnat; "
            f'oifname "eth0" masquerade{" random" if nat == "random" else ""}; }}; }}\n'
            "table ip filter { chain forward { type filter hook forward priority filter; policy drop; "
            'iifname "lan0" accept; ct state established,related accept; }; '
            "chain input { type filter hook input priority filter; policy accept; "
            'iifname "eth0" ct state established,related accept; iifname "eth0" drop; }; }\n'
        )
        router.run("nft", "-f", "-", input=rules)
        return host, home.addr, public

    def home_of(self, ns: Netns) -> Home:
        """The home whose host or router `ns` is."""
        return next(h for h in self.homes if ns in (h.host, h.router))

    @staticmethod
    def _blackhole_table(other: str) -> str:
        return "blackhole_" + other.replace(".", "_")

    def blackhole(self, ns: Netns, other: str) -> None:
        """The router of `ns`'s home drops every UDP datagram between the home and the public address
        `other`, both ways, before conntrack sees it (so no mapping is refreshed by it either): the
        direct path between them dies while a relay, at another address, still carries."""
        table = self._blackhole_table(other)
        rules = (
            f"table ip {table} {{ chain prerouting {{ type filter hook prerouting priority raw; "
            f"ip daddr {other} meta l4proto udp counter drop; ip saddr {other} meta l4proto udp counter drop; }}; }}\n"
        )
        self.home_of(ns).router.run("nft", "-f", "-", input=rules)

    def unblackhole(self, ns: Netns, other: str) -> None:
        self.home_of(ns).router.run("nft", "delete", "table", "ip", self._blackhole_table(other))

    def blackholed(self, ns: Netns, other: str) -> tuple[int, int]:
        """Datagrams the blackhole between `ns`'s home and `other` dropped: (from the home, to it)."""
        out = self.home_of(ns).router.run("nft", "-j", "list", "table", "ip", self._blackhole_table(other)).stdout
        rules = [item["rule"] for item in json.loads(out)["nftables"] if "rule" in item]
        drops = {}
        for rule in rules:
            match = next(e["match"] for e in rule["expr"] if "match" in e)
            counter = next(e["counter"] for e in rule["expr"] if "counter" in e)
            drops[match["left"]["payload"]["field"]] = counter["packets"]
        return drops["daddr"], drops["saddr"]

    def flush_nat(self, ns: Netns) -> None:
        """The router of `ns`'s home forgets every mapping (conntrack -F), as a rebooted router would:
        a peer's datagrams to an old mapping are refused, and the next ones out get new ports."""
        self.home_of(ns).router.run("conntrack", "-F")

    def renumber(self, ns: Netns) -> str:
        """Move the host of `ns`'s home to another address in its LAN, as a DHCP renewal can: the new
        address is added, the default route switched to it, the old address removed. Returns the new."""
        home = self.home_of(ns)
        old, new = home.addr, f"198.51.100.{home.base + home.next_lan}"
        home.next_lan += 1
        host = home.host
        host.run("sysctl", "-qw", "net.ipv4.conf.eth0.promote_secondaries=1")  # else the new goes with the old
        host.run("ip", "addr", "add", f"{new}/26", "dev", "eth0")
        host.run("ip", "route", "replace", "default", "via", home.gateway, "src", new)
        host.run("ip", "addr", "del", f"{old}/26", "dev", "eth0")
        home.addr = new
        return new


def with_node_keys(path: Path, keys: str) -> Path:
    """The config at `path` with `keys` added to its [node] table."""
    path.write_text(path.read_text().replace("[supervisor]", f"{keys}\n[supervisor]", 1))
    return path


class ExitLab:
    """A client that uses an exit node, and the internet behind the exit: the client and the exit on
    the underlay, and an "internet" namespace on 203.0.113.0/24 linked to the exit alone (the exit at
    INTERNET_EXIT, a host at INTERNET_HOST). The client has a default route of its own by the
    underlay, to a gateway nobody answers for: only the tunnel reaches the internet, and the client's
    own encrypted traffic following the tunnel's default route into itself would show (no handshake).
    Nodes are started by `start_exit` (its config with `exit_extra` added) and `start_client`;
    `close` is the Underlay's."""

    INTERNET_EXIT, INTERNET_HOST = "203.0.113.1", "203.0.113.2"

    def __init__(self, underlay: Underlay, tmp: Path, exit_extra: str = "") -> None:
        self.u, self.tmp = underlay, tmp
        (self.client_ns, client_addr), (self.exit_ns, exit_addr) = underlay.host(), underlay.host()
        self.internet = Netns("inet")
        underlay.hosts.append(self.internet)
        subprocess.run(
            ["ip", "link", "add", "eth1", "netns", self.exit_ns.name, "type", "veth"]
            + ["peer", "name", "eth0", "netns", self.internet.name],
            check=True,
        )
        self.exit_ns.run("ip", "addr", "add", f"{self.INTERNET_EXIT}/24", "dev", "eth1")
        self.exit_ns.run("ip", "link", "set", "eth1", "up")
        self.internet.run("ip", "addr", "add", f"{self.INTERNET_HOST}/24", "dev", "eth0")
        self.internet.run("ip", "link", "set", "eth0", "up")
        self.client_ns.run("ip", "route", "add", "default", "via", "198.51.100.254", "dev", "eth0")
        self.client, self.exit = Identity("client", 1), Identity("exit", 2)
        self.client.endpoint, self.exit.endpoint = f"{client_addr}:51820", f"{exit_addr}:51820"
        exit_conf = meshsup_config(tmp, self.exit, [self.client], extra=exit_extra)
        self.exit_conf = with_node_keys(exit_conf, "advertise_exit_node = true")
        conf = meshsup_config(tmp, self.client, [self.exit])
        seen = f'"{self.exit.v6}/128"]'  # the exit may send from anywhere: 0.0.0.0/0 and ::/0 in its allowed IPs
        conf.write_text(conf.read_text().replace(seen, f'"{self.exit.v6}/128", "0.0.0.0/0", "::/0"]'))
        self.client_plain = conf.read_text()  # the client's config without the keys of start_client
        self.client_conf = conf

    def start_exit(self, same_as: Node | None = None) -> Node:
        """The exit node, ready; with `same_as`, that one again (its state dir and interface)."""
        node = self.u.track(Node(self.tmp, "--config", str(self.exit_conf), netns=self.exit_ns, same_as=same_as))
        node.wait_ready()
        return node

    def start_client(self, node_keys: str = 'exit_node = "exit"', same_as: Node | None = None) -> Node:
        """The client, ready, with `node_keys` in its [node] table; with `same_as`, that one again."""
        self.client_conf.write_text(self.client_plain)
        with_node_keys(self.client_conf, node_keys)
        node = self.u.track(Node(self.tmp, "--config", str(self.client_conf), netns=self.client_ns, same_as=same_as))
        node.wait_ready()
        return node

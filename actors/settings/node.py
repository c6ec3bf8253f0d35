"""The [node], [[peers]], [actors] and [supervisor] tables."""

from __future__ import annotations

import contextlib
import ipaddress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meshsup.actors.settings import keys
from meshsup.actors.settings.table import ConfigError, Table

DEFAULT_PORT = 51820
DEFAULT_MTU = 1420
DEFAULT_INTERFACE = "meshsup0"
IFNAMSIZ = 16  # the kernel's limit on an interface name, with its NUL
INTERFACE_RULE = f"1-{IFNAMSIZ - 1} characters, no '/', ':' or white space, not '.' or '..'"
NODE_KEYS = {
    "name",
    "private_key",
    "private_key_file",
    "listen_port",
    "interface",
    "addresses",
    "mtu",
    "advertise_exit_node",
    "advertise_routes",
    "exit_node",
    "exit_node_allow_lan",
}
PEER_KEYS = {
    "name",
    "public_key",
    "preshared_key",
    "preshared_key_file",
    "allowed_ips",
    "endpoints",
    "persistent_keepalive",
}

# With an exit node in use: the mark on the node's own underlay sockets, and the routing table of
# the default route through the exit (the same number, as wg-quick's Table = auto picks).
EXIT_MARK = EXIT_TABLE = 0x4D53

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface
Endpoint = tuple[str, int]  # (literal IP, port), as actors.kernel.types has it


@dataclass(frozen=True, slots=True)
class NodeSettings:
    name: str
    private_key: bytes = field(repr=False)  # kept out of logs and tracebacks; b"": withheld (without_secrets)
    public_key: bytes
    listen_port: int
    interface: str
    addresses: tuple[IPInterface, ...]
    mtu: int
    # Seals disco's NaCl boxes, magicsock's alone; b"": withheld, or not loaded (a node that runs
    # loads it from its state dir: supervisor.cli, keys.load_or_create_disco; parsing writes no file).
    disco_key: bytes = field(default=b"", repr=False)
    # Serving: forward and masquerade for peers toward everything / toward these networks.
    advertise_exit_node: bool = False
    advertise_routes: tuple[IPNetwork, ...] = ()
    # Using: the default route through this peer ("": none), the underlay's LAN kept direct or not.
    exit_node: str = ""
    exit_node_allow_lan: bool = False

    @property
    def fwmark(self) -> int:
        """The firewall mark for the node's own underlay sockets: only with an exit node in use."""
        return EXIT_MARK if self.exit_node else 0


@dataclass(frozen=True, slots=True)
class PeerSettings:
    name: str
    public_key: bytes
    preshared_key: bytes | None = field(repr=False)  # None also where withheld (without_secrets)
    allowed_ips: tuple[IPNetwork, ...]
    endpoints: tuple[Endpoint, ...]
    persistent_keepalive: int  # seconds; 0: off

    @property
    def hosts(self) -> list[IPNetwork]:
        """The single addresses among the allowed IPs: the peer's own mesh addresses."""
        return [n for n in self.allowed_ips if n.prefixlen == n.max_prefixlen]


@dataclass(frozen=True, slots=True)
class ActorCounts:
    """Workers of each scalable kind (actors.registry.SCALABLE)."""

    crypto: int = 2
    dns: int = 1


@dataclass(frozen=True, slots=True)
class SupervisorSettings:
    intensity: int = 5  # at most this many restarts ...
    period: float = 10.0  # ... in this many seconds, or the node stops


def parse_network(text: str) -> IPNetwork:
    try:
        return lean_network(ipaddress.ip_network(text, strict=False))
    except ValueError:
        raise ValueError("not an IP prefix") from None


def lean_network(net: IPNetwork) -> IPNetwork:
    """`net` less the closure ipaddress gives each single-address network for its hosts(), some
    200 bytes (a peer's mesh address is one, in the settings of every actor). Nothing here calls
    hosts(): it would find no hosts in such a network."""
    if net.prefixlen == net.max_prefixlen:
        with contextlib.suppress(AttributeError):  # a Python that makes none
            del net.hosts  # (not through vars(), which would give the object a dict of its own)
    return net


def parse_interface_address(text: str) -> IPInterface:
    try:
        return ipaddress.ip_interface(text)
    except ValueError:
        raise ValueError("not an address with prefix length") from None


def parse_endpoint(text: str) -> Endpoint:
    """host:port or [v6]:port, literal addresses only (no DNS at config time)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError("not host:port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError("host is not an IP address") from None
    return host, int(port)


def valid_interface_name(name: str) -> bool:
    """What the kernel's dev_valid_name accepts."""
    return 0 < len(name) < IFNAMSIZ and name not in (".", "..") and not any(c in "/:" or c.isspace() for c in name)


def format_endpoint(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _label(name: str) -> str:
    if not name or len(name) > 63 or not all(c.isalnum() or c == "-" for c in name) or name[0] == "-":
        raise ValueError("must be a DNS label (letters, digits, '-')")
    return name.lower()


def parse_node(file: str, table: Any, base: Path, state_dir: Path) -> NodeSettings:
    c = Table(file, table, "node", NODE_KEYS)
    private = c.key_material("private_key", "private_key_file", base, required=False)
    if private is None:
        private = keys.load_or_create(state_dir / "private.key")
    public = keys.public_of(private)
    interface = c.get("interface", str, DEFAULT_INTERFACE)
    if not valid_interface_name(interface):
        raise c.fail("interface", f"{interface!r} is not a valid interface name ({INTERFACE_RULE})")
    mtu = c.get("mtu", int, DEFAULT_MTU)
    if not 576 <= mtu <= 65515:
        raise c.fail("mtu", f"{mtu} is outside 576..65515")
    addresses = c.strings("addresses", parse_interface_address) or keys.derived_addresses(public)
    name = c.get("name", str, "node")
    try:
        _label(name)
    except ValueError as err:
        raise c.fail("name", str(err)) from None
    return NodeSettings(
        name=name.lower(),
        private_key=private,
        public_key=public,
        listen_port=c.port("listen_port", DEFAULT_PORT),
        interface=interface,
        addresses=tuple(parse_interface_address(a) for a in addresses),
        mtu=mtu,
        advertise_exit_node=c.get("advertise_exit_node", bool, False),
        advertise_routes=tuple(parse_network(r) for r in c.strings("advertise_routes", parse_network)),
        exit_node=c.get("exit_node", str, "").lower(),
        exit_node_allow_lan=c.get("exit_node_allow_lan", bool, False),
    )


def parse_peer(file: str, table: Any, index: int, base: Path) -> PeerSettings:
    c = Table(file, table, f"peers[{index}]", PEER_KEYS)
    public = c.key_material("public_key", "public_key_file", base, required=True)
    psk = c.key_material("preshared_key", "preshared_key_file", base, required=False)
    assert public is not None
    name = c.get("name", str, f"peer-{public[:4].hex()}")
    try:
        name = _label(name)
    except ValueError as err:
        raise c.fail("name", str(err)) from None
    keepalive = c.get("persistent_keepalive", int, 0)
    if not 0 <= keepalive <= 65535:
        raise c.fail("persistent_keepalive", f"{keepalive} is outside 0..65535 seconds")
    endpoints = c.strings("endpoints", parse_endpoint)
    return PeerSettings(
        name=name,
        public_key=public,
        preshared_key=psk,
        allowed_ips=tuple(parse_network(a) for a in c.strings("allowed_ips", parse_network)),
        endpoints=tuple(parse_endpoint(e) for e in endpoints),
        persistent_keepalive=keepalive,
    )


def check_unique(file: str, node: NodeSettings, peers: list[PeerSettings]) -> None:
    seen_keys = {node.public_key: "node"}
    seen_names = {node.name: "node"}
    for i, p in enumerate(peers):
        if p.public_key in seen_keys:
            raise ConfigError(file, f"peers[{i}].public_key", f"same key as {seen_keys[p.public_key]}")
        if p.name in seen_names:
            raise ConfigError(file, f"peers[{i}].name", f"{p.name!r} is used twice")
        seen_keys[p.public_key] = f"peers[{i}]"
        seen_names[p.name] = f"peers[{i}]"


def check_exit_node(file: str, node: NodeSettings, peers: list[PeerSettings]) -> None:
    """exit_node names a peer that may send from anywhere: its allowed IPs hold a default route."""
    if not node.exit_node:
        return
    found = next((p for p in peers if p.name == node.exit_node), None)
    if found is None:
        raise ConfigError(file, "node.exit_node", f"no peer named {node.exit_node!r}")
    if not any(n.prefixlen == 0 for n in found.allowed_ips):
        raise ConfigError(
            file, "node.exit_node", f"peer {found.name!r} has neither 0.0.0.0/0 nor ::/0 in its allowed_ips"
        )


def parse_actors(file: str, table: Any) -> ActorCounts:
    c = Table(file, table, "actors", {"crypto", "dns"})
    counts, defaults = {}, ActorCounts()
    for kind in ("crypto", "dns"):
        n = c.get(kind, int, getattr(defaults, kind))
        if not 1 <= n <= 64:
            raise c.fail(kind, f"{n} workers is outside 1..64")
        counts[kind] = n
    return ActorCounts(**counts)


def parse_supervisor(file: str, table: Any) -> SupervisorSettings:
    c = Table(file, table, "supervisor", {"intensity", "period"})
    defaults = SupervisorSettings()
    intensity = c.get("intensity", int, defaults.intensity)
    period = c.get("period", (int, float), defaults.period)
    if intensity < 0:
        raise c.fail("intensity", "must be 0 or more")
    if period <= 0:
        raise c.fail("period", "must be more than 0 seconds")
    return SupervisorSettings(intensity, float(period))

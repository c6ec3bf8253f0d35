"""The node's settings: each config section parsed and checked once, into frozen typed objects.

The supervisor reads a config file into `Settings` (`parse`) and hands every
actor the same object, through the bus in its wire form (`to_wire`,
`from_wire`), without the keys to those that do not use them
(`without_secrets`). One module per section: node (with peers, actors,
supervisor), dns, netlog (with logging), relay (a node's [[relays]], and
what `meshsup relay` runs instead), metrics, filter, coordination; a wrong value is a ConfigError naming
the file and the key.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

from meshsup.actors.settings import wire
from meshsup.actors.settings.coordination import CoordinationSettings, parse_coordination
from meshsup.actors.settings.dns import Address, DnsSettings
from meshsup.actors.settings.filter import FilterSettings, parse_filter
from meshsup.actors.settings.metrics import MetricsSettings, parse_metrics
from meshsup.actors.settings.netlog import NetlogSettings, netlog_settings
from meshsup.actors.settings.node import (
    ActorCounts,
    IPNetwork,
    NodeSettings,
    PeerSettings,
    SupervisorSettings,
    check_exit_node,
    check_unique,
    parse_actors,
    parse_node,
    parse_peer,
    parse_supervisor,
)
from meshsup.actors.settings.relay import RelayEntry, check_relays, parse_relay
from meshsup.actors.settings.table import ConfigError, Table

TOP_KEYS = {
    *("node", "peers", "actors", "supervisor", "dns", "netlog", "logging", "relays", "metrics", "filter"),
    "coordination",
}
DNS_DEFAULT: dict[str, Any] = {"listen": ["127.0.0.1:53"], "domain": "mesh", "upstreams": []}
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Settings:
    node: NodeSettings
    peers: tuple[PeerSettings, ...]
    actors: ActorCounts
    supervisor: SupervisorSettings
    dns: DnsSettings  # names and mesh: empty; the DNS controller adds them (dns_for_mesh)
    netlog: NetlogSettings  # with [logging]
    relays: tuple[RelayEntry, ...] = ()
    metrics: MetricsSettings = MetricsSettings()  # the supervisor's alone
    filter: FilterSettings = FilterSettings()
    coordination: CoordinationSettings | None = None  # None: the peers are [[peers]] alone

    def dns_for_mesh(self) -> DnsSettings:
        """The DNS settings with the mesh filled in, from the node and its peers (kept out of
        `dns` so that a change to the peers, as `wg set` makes, leaves no stale copy): the
        names answered (host label -> addresses: the node's, and each peer's single-host
        allowed IPs) and the clients answered (the node's networks, the peers' allowed IPs)."""
        names: dict[str, Sequence[Address]] = {self.node.name: [a.ip for a in self.node.addresses]}
        for p in self.peers:
            names[p.name] = [n.network_address for n in p.hosts]
        return self.dns.with_mesh(names, self._mesh_networks())

    def dns_peers_changed(self, dns: DnsSettings, gone: list[PeerSettings], changed: list[PeerSettings]) -> DnsSettings:
        """What dns_for_mesh gives for these settings, from `dns`, what it gave before the `gone`
        peers went and the `changed` ones changed: only their names are checked, the mesh's
        ranges are the networks as parsed."""
        names: dict[str, Sequence[Address]] = {p.name: [n.network_address for n in p.hosts] for p in changed}
        return dns.with_names_changed([p.name for p in gone], names, self._mesh_networks())

    def _mesh_networks(self) -> list[IPNetwork]:
        """The networks DNS answers the clients of: the node's, and the peers' allowed IPs (as parsed)."""
        return [a.network for a in self.node.addresses] + [n for p in self.peers for n in p.allowed_ips]

    def without_secrets(self) -> Settings:
        """The same settings with no key material: the private key empty, no preshared keys.
        What the actors that use no keys get (actors.registry.settings_for)."""
        return replace(self.without_preshared_keys(), node=replace(self.node, private_key=b"", disco_key=b""))

    def without_preshared_keys(self) -> Settings:
        """The private key kept, no preshared keys: what logs in to DERP relays (actors.registry)."""
        return replace(self, peers=tuple(replace(p, preshared_key=None) for p in self.peers))

    def peer_changes(self, new: Settings) -> tuple[list[PeerSettings], list[bytes]] | None:
        """How `new` differs from these settings when only peers differ: the peers added or changed
        (in their new form) and the keys of those removed; None when anything else differs too."""
        if replace(self, peers=()) != replace(new, peers=()):
            return None
        old = {p.public_key: p for p in self.peers}
        changed = [p for p in new.peers if (o := old.pop(p.public_key, None)) is not p and o != p]
        return changed, list(old)

    def with_peers(self, changed: list[PeerSettings], removed: list[bytes]) -> Settings:
        """These settings with `changed` peers put in place (new ones last) and `removed` ones gone:
        what `peer_changes` took out, put back."""
        by_key = {p.public_key: p for p in changed}
        gone = set(removed)
        kept = tuple(by_key.pop(p.public_key, p) for p in self.peers if p.public_key not in gone)
        return replace(self, peers=kept + tuple(by_key.values()))

    @property
    def holds_secrets(self) -> bool:
        return bool(self.node.private_key) or any(p.preshared_key for p in self.peers)

    @property
    def public_key(self) -> bytes:
        """The node's, as a relay's settings (actors.settings.relay) have theirs."""
        return self.node.public_key

    def to_wire(self) -> dict[str, Any]:
        """msgpack-able, for the bus."""
        return wire.encode(self)

    @classmethod
    def from_wire(cls, data: Any) -> Settings:
        """What to_wire made; wire.WireError if `data` is not that."""
        return wire.decode(cls, data)


def parse(file: str, doc: dict[str, Any], base: Path, state_dir: Path) -> Settings:
    """A whole config document (TOML's tables); relative paths in it are taken from base.
    Without a private key the node's own, in state_dir, is used (made on first start)."""
    top = Table(file, doc, "", TOP_KEYS)
    node = parse_node(file, top.get("node", dict, {}), base, state_dir)
    peers = [parse_peer(file, p, i, base) for i, p in enumerate(top.get("peers", list, []))]
    check_unique(file, node, peers)
    coordination = parse_coordination(file, top.get("coordination", dict, None), base, top.get("node", dict, {}))
    if coordination is None or any(p.name == node.exit_node for p in peers):
        check_exit_node(file, node, peers)  # else the mesh's peer of that name, once it advertises exit
    relays = [parse_relay(file, r, i, base) for i, r in enumerate(top.get("relays", list, []))]
    check_relays(file, relays)
    actors = parse_actors(file, top.get("actors", dict, {}))
    supervisor = parse_supervisor(file, top.get("supervisor", dict, {}))
    dns_table = top.get("dns", dict, None) or default_dns(node)
    dns = _section(file, "dns", lambda: DnsSettings.from_config(dns_table, {}))
    netlog = _section(
        file, "netlog", lambda: netlog_settings(top.get("netlog", dict, {}), top.get("logging", dict, {}), base)
    )
    metrics = parse_metrics(file, top.get("metrics", dict, {}))
    packet_filter = parse_filter(file, top.get("filter", dict, None), node, peers)
    settings = Settings(
        node, tuple(peers), actors, supervisor, dns, netlog, tuple(relays), metrics, packet_filter, coordination
    )
    _section(file, "dns", settings.dns_for_mesh)  # the node's and peers' names must be DNS names too
    return settings


def _section(file: str, section: str, parse: Callable[[], T]) -> T:
    """A section's parser says "dns.upstreams[1]: problem": the same, naming the file."""
    try:
        return parse()
    except ValueError as err:
        key, _, problem = str(err).partition(": ")
        raise ConfigError(file, key if problem else section, problem or key) from None


def default_dns(node: NodeSettings) -> dict[str, Any]:
    """DNS on the node's own mesh address, as MagicDNS: it collides with no local resolver."""
    v4 = [a.ip for a in node.addresses if a.version == 4]
    return {**DNS_DEFAULT, "listen": [f"{v4[0]}:53"] if v4 else DNS_DEFAULT["listen"]}

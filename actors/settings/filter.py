"""The [filter] table: the packet filter's default, its groups and its rules (first match wins).

Peer names and groups resolve here, once, to the peers' allowed IPs (the
node's own name to its addresses): the filter itself sees only networks.
Errors name the key, and for a rule its index ("filter.rules[3].dst").
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any

from meshsup.actors.settings.node import IPNetwork, NodeSettings, PeerSettings
from meshsup.actors.settings.table import Table

ACCEPT, DENY, REJECT = "accept", "deny", "reject"
ACTIONS = (ACCEPT, DENY, REJECT)
FILTER_KEYS = {"default", "outbound", "groups", "rules"}
RULE_KEYS = {"action", "src", "dst", "proto"}
PROTOCOLS = {"tcp": 6, "udp": 17, "icmp": 1, "icmpv6": 58}
ANYWHERE = (ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0"))
GROUP = "group:"


@dataclass(frozen=True, slots=True)
class Destination:
    network: IPNetwork
    first_port: int = 0
    last_port: int = 65535


@dataclass(frozen=True, slots=True)
class FilterRule:
    action: str
    sources: tuple[IPNetwork, ...]
    destinations: tuple[Destination, ...]
    protocol: int | None = None  # None: any


@dataclass(frozen=True, slots=True)
class FilterSettings:
    enabled: bool = False  # no [filter] table: everything passes, no state kept
    default: str = ACCEPT
    outbound: bool = False  # judge what the node sends too (state is kept for it either way)
    rules: tuple[FilterRule, ...] = ()


def parse_filter(
    file: str, table: Any, node: NodeSettings, peers: list[PeerSettings], absent_match_nothing: bool = False
) -> FilterSettings:
    """`absent_match_nothing`: a name that is no peer stands for no address instead of being refused
    (the mesh's policy names nodes that come and go: actors/coord)."""
    if table is None:
        return FilterSettings()
    t = Table(file, table, "filter", FILTER_KEYS)
    default = t.get("default", str, ACCEPT)
    if default not in ACTIONS:
        raise t.fail("default", f"{default!r} is none of {', '.join(ACTIONS)}")
    names: dict[str, tuple[IPNetwork, ...]] = {p.name: p.allowed_ips for p in peers}
    names[node.name] = tuple(ipaddress.ip_network(a.ip) for a in node.addresses)
    group_table = t.get("groups", dict, {})
    groups = Table(file, group_table, "filter.groups", set(group_table))
    members: dict[str, tuple[IPNetwork, ...]] = {}
    for group in groups.table:
        nets: list[IPNetwork] = []
        for name in groups.strings(group):
            if name not in names and not absent_match_nothing:
                raise groups.fail(group, f"{name!r} is no peer")
            nets += names.get(name, ())
        members[group] = tuple(nets)
    rules = [_rule(file, r, i, names, members, absent_match_nothing) for i, r in enumerate(t.get("rules", list, []))]
    return FilterSettings(True, default, t.get("outbound", bool, False), tuple(rules))


def _rule(
    file: str,
    table: Any,
    index: int,
    names: dict[str, tuple[IPNetwork, ...]],
    groups: dict[str, tuple[IPNetwork, ...]],
    absent_match_nothing: bool = False,
) -> FilterRule:
    r = Table(file, table, f"filter.rules[{index}]", RULE_KEYS)
    action = r.get("action", str, required=True)
    if action not in ACTIONS:
        raise r.fail("action", f"{action!r} is none of {', '.join(ACTIONS)}")
    sources: list[IPNetwork] = []
    for item in _required_strings(r, "src"):
        try:
            sources += _hosts(item, names, groups, absent_match_nothing)
        except ValueError as err:
            raise r.fail("src", f"{item!r}: {err}") from None
    destinations: list[Destination] = []
    for item in _required_strings(r, "dst"):
        try:
            host, first, last = _split_ports(item)
            destinations += [Destination(n, first, last) for n in _hosts(host, names, groups, absent_match_nothing)]
        except ValueError as err:
            raise r.fail("dst", f"{item!r}: {err}") from None
    return FilterRule(action, tuple(sources), tuple(destinations), _protocol(r))


def _required_strings(r: Table, k: str) -> list[str]:
    items = r.strings(k)
    if not items:
        raise r.fail(k, "is required (a list of at least one entry)")
    return items


def _protocol(r: Table) -> int | None:
    proto = r.get("proto", (str, int), "any")
    if isinstance(proto, int):
        if not 0 <= proto <= 255:
            raise r.fail("proto", f"{proto} is no protocol number")
        return proto
    if proto == "any":
        return None
    if proto not in PROTOCOLS:
        raise r.fail("proto", f"{proto!r} is none of any, {', '.join(PROTOCOLS)} or a protocol number")
    return PROTOCOLS[proto]


def _hosts(
    item: str,
    names: dict[str, tuple[IPNetwork, ...]],
    groups: dict[str, tuple[IPNetwork, ...]],
    absent_match_nothing: bool = False,
) -> list[IPNetwork]:
    """'*', a CIDR or address, a peer's (or the node's) name, or group:NAME, as networks."""
    if item == "*":
        return list(ANYWHERE)
    if item.startswith(GROUP):
        if item[len(GROUP) :] not in groups:
            raise ValueError("no such group in filter.groups")
        return list(groups[item[len(GROUP) :]])
    if item in names:
        return list(names[item])
    try:
        return [ipaddress.ip_network(item, strict=False)]
    except ValueError:
        if absent_match_nothing and item.replace("-", "").isalnum():
            return []  # a node's name, while it is not in the mesh
        raise ValueError("neither *, a CIDR, a peer's name nor group:NAME") from None


def _split_ports(item: str) -> tuple[str, int, int]:
    """HOST:PORTS ([v6]:PORTS for an IPv6 address) into the host and the port range."""
    if item.startswith("["):
        host, sep, ports = item[1:].partition("]:")
    else:
        host, sep, ports = item.rpartition(":")
    if not sep or not host:
        raise ValueError("expected HOST:PORTS ([ADDRESS]:PORTS for IPv6), PORTS = *, N or N-M")
    if ports == "*":
        return host, 0, 65535
    first, _, last = ports.partition("-")
    try:
        lo, hi = int(first), int(last or first)
    except ValueError:
        raise ValueError(f"{ports!r} is no port or range (*, N or N-M)") from None
    if not 0 <= lo <= hi <= 65535:
        raise ValueError(f"{ports!r} is no port range within 0-65535")
    return host, lo, hi

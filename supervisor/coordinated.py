"""The peers the mesh's bucket gives a node (actors/coord), merged with the config's (sans-IO).

The entry point the supervisor calls is `Coordinated.take` (the coord actor's peer set, whole at
first, then each change of it: checked) and `merge` (the config as a file or `wg set` gave it, plus
that set): the result goes through the same ordered steps as a reload, so only the peers that
changed change (a one-record change in the bucket is a one-peer PeersChanged to the actors).
[[peers]] win: a coordinated peer with the key or the name of a configured one (or of the node)
is left out. The mesh's policy, when there is one, replaces [filter] and the mesh-wide [dns] keys
it names; one that does not parse is refused whole (the last good one stays) and says why.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field, replace
from typing import Any

from meshsup.actors.bus.messages import MeshPeers
from meshsup.actors.settings import ConfigError, Settings
from meshsup.actors.settings.dns import DnsSettings
from meshsup.actors.settings.filter import FilterSettings, parse_filter
from meshsup.actors.settings.keys import b64
from meshsup.actors.settings.node import IPInterface, NodeSettings, PeerSettings
from meshsup.actors.settings.wire import WireError, decode

POLICY_FILE = "(mesh policy)"  # what a policy's errors name as their file


@dataclass
class Coordinated:
    mesh: dict[bytes, PeerSettings] = field(default_factory=dict)  # the mesh's peers by public key
    addresses: tuple[IPInterface, ...] = ()  # the node's, taken from the pools; (): as configured
    revision: int = 0
    seq: int = 0  # the last MeshPeers taken: a change applies to the one before it
    refused: int = 0  # MeshPeers that did not decode, or came after a gap (never applied in part)
    shadowed: list[str] = field(default_factory=list)  # names left out for a [[peers]] entry's key or name
    policy: dict[str, Any] = field(default_factory=dict)
    good_policy: dict[str, Any] = field(default_factory=dict)  # the last that parsed
    policy_error: str = ""  # why the latest did not
    hints: dict[str, dict[str, str]] = field(default_factory=dict)  # MeshPeers.hints, for magicsock

    @property
    def peers(self) -> tuple[PeerSettings, ...]:
        return tuple(self.mesh.values())

    def take(self, msg: MeshPeers) -> str | None:
        """The coord actor's news, whole or not at all: why not ("decode": it does not; "gap":
        a change after one not taken, the whole set is needed), else None. A whole set replaces
        the peers; a change puts its peers in place and takes its removed ones out."""
        try:
            peers = [decode(PeerSettings, p, f"peers[{i}]") for i, p in enumerate(msg.peers)]
            addresses = tuple(ipaddress.ip_interface(a) for a in msg.addresses)
            removed = [bytes(k) for k in msg.removed]
        except (WireError, ValueError, TypeError):
            self.refused += 1
            return "decode"
        if not msg.whole and msg.seq != self.seq + 1:
            self.refused += 1
            return "gap"
        # New containers, never changed in place: the supervisor tells what it has by equality
        mesh, hints = ({}, {}) if msg.whole else (dict(self.mesh), dict(self.hints))
        for key in removed:
            mesh.pop(key, None)
            hints.pop(b64(key), None)
        for p in peers:
            mesh[p.public_key] = p
            hints.pop(b64(p.public_key), None)
        hints.update(msg.hints)
        self.mesh, self.hints, self.seq = mesh, hints, msg.seq
        self.addresses, self.revision, self.policy = addresses, msg.revision, msg.policy
        return None

    def merge(self, static: Settings) -> Settings:
        """`static` with the mesh's peers after its own, and the node's taken addresses."""
        if static.coordination is None:
            return static
        node, dns = static.node, static.dns
        if self.addresses and node.addresses != self.addresses:
            node = replace(node, addresses=self.addresses)
            # DNS listening on the address the node had (the default) follows it to the new one
            old = {(str(a.ip), 53) for a in static.node.addresses if a.version == 4}
            new = next((str(a.ip) for a in self.addresses if a.version == 4), None)
            if new is not None and old & set(dns.listen):
                dns = replace(dns, listen=tuple((new, 53) if hp in old else hp for hp in dns.listen))
        keys = {node.public_key} | {p.public_key for p in static.peers}
        names = {node.name} | {p.name for p in static.peers}
        added, self.shadowed = [], []
        for p in self.peers:
            if p.public_key in keys or p.name in names:
                self.shadowed.append(p.name)
                continue
            keys.add(p.public_key)
            names.add(p.name)
            added.append(p)
        peers = (*static.peers, *added)
        packet_filter, dns = self._with_policy(node, list(peers), static.filter, dns)
        return replace(static, node=node, dns=dns, peers=peers, filter=packet_filter)

    def _with_policy(
        self, node: NodeSettings, peers: list[PeerSettings], packet_filter: FilterSettings, dns: DnsSettings
    ) -> tuple[FilterSettings, DnsSettings]:
        """The policy's filter and DNS keys over the config's: the latest policy, else the last good."""
        self.policy_error = ""
        for policy in (self.policy, self.good_policy):
            if not policy:
                return packet_filter, dns
            try:
                mesh_dns = DnsSettings.from_config(policy.get("dns", {}), {})
                if "filter" in policy:
                    packet_filter = parse_filter(POLICY_FILE, policy["filter"], node, peers, True)
                result = packet_filter, replace(dns, **{k: getattr(mesh_dns, k) for k in policy.get("dns", {})})
            except (ConfigError, ValueError) as err:
                self.policy_error = self.policy_error or str(err)
                continue
            self.good_policy = policy
            return result
        return packet_filter, dns

    def status(self) -> dict[str, object]:
        return {
            "revision": self.revision,
            "peers": sorted(p.name for p in self.mesh.values()),
            "addresses": [str(a) for a in self.addresses],
            "refused": self.refused,
            "shadowed": self.shadowed,
            "policy": bool(self.policy),
            "policy_error": self.policy_error,
        }


def hints_change(before: dict[str, dict[str, str]], after: dict[str, dict[str, str]]) -> dict[str, Any]:
    """magicsock's mesh_hints command that turns `before` into `after`: the hints changed or added,
    and the keys whose hints are gone."""
    changed = {k: v for k, v in after.items() if before.get(k) != v}
    return {"hints": changed, "removed": [k for k in before if k not in after]}


def local_info(magicsock_status: dict[str, Any]) -> dict[str, Any] | None:
    """What the node's record takes from magicsock's status: its disco key, the endpoints it
    found (host addresses and STUN's), and its home relay; None before it has said."""
    disco = magicsock_status.get("disco")
    if not isinstance(disco, dict):
        return None
    home = next((r.get("name", "") for r in magicsock_status.get("relays", []) if r.get("home")), "")
    return {"disco": disco.get("public_key", ""), "endpoints": list(disco.get("endpoints", [])), "relay": home}

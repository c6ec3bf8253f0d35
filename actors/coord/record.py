"""A node's record in the mesh's bucket, and the keys of the bucket: encoding and checking (sans-IO).

Keys: `node.NAME` holds a node's record (JSON, below); `addr.ADDRESS` (dots and colons as '-')
names the public key that holds a mesh address, taken by compare-and-set (alloc.py); `policy`
holds the mesh's filter and DNS settings, which the operator writes (decode_policy). A record
read from the bucket is data from anyone who can write there: it is checked whole before
any of it is used, and refused with the reason, which the actor counts.
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass
from typing import Any

from meshsup.actors.settings.coordination import CoordinationSettings
from meshsup.actors.settings.keys import b64, parse_key
from meshsup.actors.settings.node import Endpoint, IPNetwork, format_endpoint, parse_endpoint, parse_network

MAX_RECORD = 8192  # bytes: a record is a few hundred
MAX_ENDPOINTS = 16
MAX_ROUTES = 64
NODE_PREFIX = "node."
ADDR_PREFIX = "addr."
POLICY_KEY = "policy"
# What the policy may set: a whole [filter], and the [dns] keys that are the mesh's, not a node's.
POLICY_DNS_KEYS = frozenset({"domain", "upstreams", "search", "routes", "rules", "groups", "srv"})
MAX_POLICY = 256 * 1024


class RecordError(ValueError):
    """A record that is not used; `reason` names its counter."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class NodeRecord:
    name: str
    public_key: bytes  # WireGuard's
    disco_key: bytes  # b"": not known yet
    addresses: tuple[IPNetwork, ...]  # single hosts in the mesh's pools
    endpoints: tuple[Endpoint, ...]  # what magicsock found: host addresses and STUN's
    relay: str  # its home relay's name, "" for none
    routes: tuple[IPNetwork, ...] = ()  # advertise_routes
    exit: bool = False  # advertise_exit_node

    def encode(self) -> bytes:
        return json.dumps(
            {
                "v": 1,
                "name": self.name,
                "key": b64(self.public_key),
                "disco": b64(self.disco_key) if self.disco_key else "",
                "addresses": [str(a) for a in self.addresses],
                "endpoints": [format_endpoint(*e) for e in self.endpoints],
                "relay": self.relay,
                "routes": [str(r) for r in self.routes],
                "exit": self.exit,
            },
            separators=(",", ":"),
        ).encode()


def node_key(name: str) -> str:
    return NODE_PREFIX + name


def addr_key(address: IPNetwork) -> str:
    return ADDR_PREFIX + str(address.network_address).replace(".", "-").replace(":", "-")


def decode(key: str, value: bytes, settings: CoordinationSettings) -> NodeRecord:
    """The record under `key`, checked; RecordError if any of it is wrong."""
    doc = _json(value, MAX_RECORD)
    if not isinstance(doc, dict) or doc.get("v") != 1:
        raise RecordError("bad_version")
    name = _field(doc, "name", str)
    if key != node_key(name) or not _label(name):
        raise RecordError("name_mismatch", f"name {name[:64]!r}")
    try:
        public = parse_key(_field(doc, "key", str))
        disco_text = _field(doc, "disco", str)
        disco = parse_key(disco_text) if disco_text else b""
    except ValueError:
        raise RecordError("bad_key") from None
    addresses = tuple(_network(a) for a in _strings(doc, "addresses", 2))
    if not addresses or any(a.prefixlen != a.max_prefixlen or not settings.in_pools(a) for a in addresses):
        raise RecordError("bad_address", ", ".join(map(str, addresses)))
    try:
        endpoints = tuple(parse_endpoint(e) for e in _strings(doc, "endpoints", MAX_ENDPOINTS))
    except ValueError:
        raise RecordError("bad_endpoint") from None
    routes = tuple(_network(r) for r in _strings(doc, "routes", MAX_ROUTES))
    relay = _field(doc, "relay", str)
    if len(relay) > 64:
        raise RecordError("bad_field", "relay")
    return NodeRecord(name, public, disco, addresses, endpoints, relay, routes, _field(doc, "exit", bool))


def decode_policy(value: bytes) -> dict[str, Any]:
    """The policy's JSON: {"filter": {...as [filter]...}, "dns": {...}}, either part optional.
    Its shape is checked here; its values by the settings' own parsers, where the supervisor
    merges it (they need the peers)."""
    doc = _json(value, MAX_POLICY)
    if not isinstance(doc, dict) or set(doc) - {"filter", "dns"}:
        raise RecordError("bad_policy", "a table of filter and dns")
    if not all(isinstance(v, dict) for v in doc.values()):
        raise RecordError("bad_policy", "filter and dns are tables")
    if set(doc.get("dns", {})) - POLICY_DNS_KEYS:
        raise RecordError("bad_policy", f"dns keys other than {', '.join(sorted(POLICY_DNS_KEYS))}")
    return doc


def _json(value: bytes, most: int) -> Any:
    if len(value) > most:
        raise RecordError("too_large", f"{len(value)} bytes")
    try:
        return json.loads(value)
    except (ValueError, UnicodeDecodeError):
        raise RecordError("not_json") from None


def _field(doc: dict[str, Any], name: str, kind: type) -> Any:
    v = doc.get(name)
    if not isinstance(v, kind):
        raise RecordError("bad_field", name)
    return v


def _strings(doc: dict[str, Any], name: str, most: int) -> list[str]:
    v = _field(doc, name, list)
    if len(v) > most or not all(isinstance(s, str) for s in v):
        raise RecordError("bad_field", name)
    return v


def _network(text: str) -> IPNetwork:
    try:
        return parse_network(text)
    except ValueError:
        raise RecordError("bad_address", text[:64]) from None


def _label(name: str) -> bool:
    """What [node] name accepts (a DNS label), lower case."""
    return (
        0 < len(name) <= 63
        and name[0] != "-"
        and all(c.isascii() and (c.isalnum() or c == "-") for c in name)
        and (name == name.lower())
    )


def address_of_key(key: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address an `addr.` key claims, or None if it names none."""
    text = key[len(ADDR_PREFIX) :]
    try:
        return ipaddress.ip_address(text.replace("-", ".") if text.count("-") == 3 else text.replace("-", ":"))
    except ValueError:
        return None

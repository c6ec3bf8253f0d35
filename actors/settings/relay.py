"""A relay's settings (`meshsup relay`): what its workers are given, as a node's Settings are;
and a node's [[relays]] (RelayEntry): the relays it reaches peers through.

Built from the command line by supervisor/relay.py; on the bus in the same
wire form (actors.settings.wire). The supervisor's parts read `actors`,
`supervisor` and `public_key` of either kind of settings.
"""

from __future__ import annotations

import ipaddress
import ssl
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from meshsup.actors.settings import wire
from meshsup.actors.settings.collectors import _valid_host
from meshsup.actors.settings.node import Endpoint, SupervisorSettings, _label, parse_endpoint
from meshsup.actors.settings.table import ConfigError, Table


@dataclass(frozen=True, slots=True)
class RelayConf:
    name: str  # how nodes name the relay
    private_key: bytes = field(repr=False)
    public_key: bytes
    listen: Endpoint  # DERP over HTTP(S)
    stun_listen: Endpoint | None  # STUN's UDP address, None for none
    tls_cert: str  # PEM files, "" for plain HTTP
    tls_key: str
    rate: int  # bytes/s each client may send, 0 for no limit
    burst: int
    mesh_key: str = field(repr=False)  # 64 hex digits: who holds it may watch every login
    url: str  # how a node refers to the relay
    stun: str


@dataclass(frozen=True, slots=True)
class RelayCounts:
    relay: int = 1


@dataclass(frozen=True, slots=True)
class RelaySettings:
    relay: RelayConf
    actors: RelayCounts
    supervisor: SupervisorSettings

    @property
    def public_key(self) -> bytes:
        return self.relay.public_key

    @property
    def holds_secrets(self) -> bool:
        return bool(self.relay.private_key or self.relay.mesh_key)

    def without_secrets(self) -> RelaySettings:
        return replace(self, relay=replace(self.relay, private_key=b"", mesh_key=""))

    def to_wire(self) -> dict[str, Any]:
        return wire.encode(self)

    @classmethod
    def from_wire(cls, data: Any) -> RelaySettings:
        return wire.decode(cls, data)


# --- a node's [[relays]] ---------------------------------------------------------------

RELAY_KEYS = {"name", "url", "stun", "ca_file"}
DEFAULT_STUN_PORT = 3478
DEFAULT_PORTS = {"http": 80, "https": 443}


@dataclass(frozen=True, slots=True)
class RelayEntry:
    """One [[relays]] entry: where a node reaches a DERP relay."""

    name: str
    url: str  # http(s)://HOST[:PORT]/derp, as configured
    host: str  # a literal IP or a DNS name (resolved at connect time)
    port: int
    tls: bool
    stun: Endpoint  # the relay's STUN server
    ca_file: Path | None  # trust this CA instead of the system's, for https

    @property
    def hostport(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_relay(file: str, table: Any, index: int, base: Path) -> RelayEntry:
    c = Table(file, table, f"relays[{index}]", RELAY_KEYS)
    url = c.get("url", str, required=True)
    parts = urlsplit(url)
    if parts.scheme not in DEFAULT_PORTS or not parts.hostname or parts.path != "/derp":
        raise c.fail("url", f"{url!r} is not http://HOST[:PORT]/derp or https://HOST[:PORT]/derp")
    try:
        host = str(ipaddress.ip_address(parts.hostname))
    except ValueError:  # a name: magicsock resolves it when it connects
        host = parts.hostname
        if not _valid_host(host):
            raise c.fail("url", f"{url!r}: HOST is neither an IP address nor a DNS name") from None
    try:
        port = parts.port or DEFAULT_PORTS[parts.scheme]
    except ValueError:
        raise c.fail("url", f"{url!r}: not a port number") from None
    name = c.get("name", str, f"relay-{index}")
    try:
        name = _label(name)
    except ValueError as err:
        raise c.fail("name", str(err)) from None
    stun = (host, DEFAULT_STUN_PORT)
    if "stun" in c.table:
        try:
            stun = parse_endpoint(c.get("stun", str))
        except ValueError as err:
            raise c.fail("stun", f"{c.table['stun']!r}: {err}") from None
    ca_file = None
    if "ca_file" in c.table:
        ca_file = base / c.get("ca_file", str)
        if parts.scheme != "https":
            raise c.fail("ca_file", "only for an https url")
        try:
            ssl.create_default_context(cafile=str(ca_file))
        except (OSError, ssl.SSLError) as err:
            raise c.fail("ca_file", f"{ca_file}: {getattr(err, 'strerror', None) or err}") from None
    return RelayEntry(name, url, host, port, parts.scheme == "https", stun, ca_file)


def check_relays(file: str, relays: list[RelayEntry]) -> None:
    seen: dict[str, int] = {}
    for i, r in enumerate(relays):
        if r.name in seen:
            raise ConfigError(file, f"relays[{i}].name", f"{r.name!r} is also relays[{seen[r.name]}]")
        seen[r.name] = i

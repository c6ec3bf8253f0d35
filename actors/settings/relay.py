"""A relay's settings (`meshsup relay`): what its workers are given, as a node's Settings are.

Built from the command line by supervisor/relay.py; on the bus in the same
wire form (actors.settings.wire). The supervisor's parts read `actors`,
`supervisor` and `public_key` of either kind of settings.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from meshsup.actors.settings import wire
from meshsup.actors.settings.node import Endpoint, SupervisorSettings


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

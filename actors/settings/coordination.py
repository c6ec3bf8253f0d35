"""The [coordination] table: the NATS servers a node finds its mesh through (actors/coord)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meshsup.actors.settings.keys import MESH_V4, MESH_V6
from meshsup.actors.settings.node import IPNetwork, parse_network
from meshsup.actors.settings.table import Table

COORDINATION_KEYS = {
    "servers",
    "mesh",
    "lifetime",
    "replicas",
    "user",
    "password_file",
    "creds_file",
    "ca_file",
    "cert_file",
    "key_file",
    "pool4",
    "pool6",
    "accept_routes",
}
SERVER = re.compile(r"(nats|tls)://[^/\s]+:\d{1,5}")
MESH_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # a JetStream bucket name's characters
DEFAULT_LIFETIME = 30.0  # seconds a record lives unless its node refreshes it (every third of it)


@dataclass(frozen=True, slots=True)
class CoordinationSettings:
    servers: tuple[str, ...]
    mesh: str
    lifetime: float = DEFAULT_LIFETIME
    replicas: int = 1  # the bucket's, when a node creates it: 3 on a 3-server cluster
    user: str = ""
    password_file: Path | None = None
    creds_file: Path | None = None
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    pool4: IPNetwork = MESH_V4  # where addresses are taken from, and the only ones a record may hold
    pool6: IPNetwork = MESH_V6
    accept_routes: bool = False  # peers' advertise_routes go into their allowed IPs
    allocate: bool = False  # [node] gave no addresses: the node takes free ones from the pools

    @property
    def bucket(self) -> str:
        return f"meshsup-{self.mesh}"

    def in_pools(self, net: IPNetwork) -> bool:
        pool = self.pool4 if net.version == 4 else self.pool6
        # (Not subnet_of: it caches the broadcast address on `net`, a record's, kept by thousands.)
        return net.version == pool.version and net.prefixlen >= pool.prefixlen and net.network_address in pool


def parse_coordination(file: str, table: Any, base: Path, node_table: Any) -> CoordinationSettings | None:
    if table is None:
        return None
    c = Table(file, table, "coordination", COORDINATION_KEYS)
    servers = c.strings("servers", _server)
    if not servers:
        raise c.fail("servers", "is required: at least one nats://HOST:PORT")
    mesh = c.get("mesh", str, required=True)
    if not MESH_NAME.fullmatch(mesh):
        raise c.fail("mesh", f"{mesh!r}: 1-64 letters, digits, '_' or '-'")
    lifetime = c.get("lifetime", (int, float), DEFAULT_LIFETIME)
    if not 3 <= lifetime <= 3600:
        raise c.fail("lifetime", f"{lifetime} is outside 3..3600 seconds")
    replicas = c.get("replicas", int, 1)
    if not 1 <= replicas <= 5:
        raise c.fail("replicas", f"{replicas} is outside 1..5")
    files = {k: _file(c, k, base) for k in ("password_file", "creds_file", "ca_file", "cert_file", "key_file")}
    if (files["cert_file"] is None) != (files["key_file"] is None):
        raise c.fail("cert_file", "give both cert_file and key_file, or neither")
    pools = {}
    for k, version, default in (("pool4", 4, MESH_V4), ("pool6", 6, MESH_V6)):
        text = c.get(k, str, str(default))
        try:
            pool = parse_network(text)
        except ValueError as err:
            raise c.fail(k, f"{text!r}: {err}") from None
        if pool.version != version or pool.num_addresses < 4:
            raise c.fail(k, f"{text!r} is not an IPv{version} prefix with room for nodes")
        pools[k] = pool
    return CoordinationSettings(
        servers=tuple(servers),
        mesh=mesh,
        lifetime=float(lifetime),
        replicas=replicas,
        user=c.get("user", str, ""),
        accept_routes=c.get("accept_routes", bool, False),
        allocate=not (isinstance(node_table, dict) and node_table.get("addresses")),
        **files,
        **pools,
    )


def _server(text: str) -> None:
    if not SERVER.fullmatch(text):
        raise ValueError("not nats://HOST:PORT or tls://HOST:PORT")


def _file(c: Table, k: str, base: Path) -> Path | None:
    name = c.get(k, str, None)
    if name is None:
        return None
    path = base / name
    if not path.is_file():
        raise c.fail(k, f"{path} is not a readable file")
    return path


def node_permissions(mesh: str, name: str) -> dict[str, dict[str, list[str]]]:
    """What a node named `name` needs of nats-server to take part in `mesh`, and nothing more: it
    writes its own record and address claims, watches the bucket, and cannot write another's
    record or the policy (the server refuses it: "permissions violation"). For nats-server's
    `authorization { users = [...] }`; the operator makes the bucket (nodes may not)."""
    stream = f"KV_meshsup-{mesh}"
    return {
        "publish": {
            "allow": [
                f"$KV.meshsup-{mesh}.node.{name}",
                f"$KV.meshsup-{mesh}.addr.>",
                f"$JS.API.STREAM.INFO.{stream}",
                f"$JS.API.CONSUMER.CREATE.{stream}",
                f"$JS.API.CONSUMER.CREATE.{stream}.>",
                f"$JS.API.CONSUMER.INFO.{stream}.*",
                f"$JS.API.CONSUMER.DELETE.{stream}.*",
                f"$JS.FC.{stream}.>",
            ]
        },
        "subscribe": {"allow": ["_INBOX.>"]},
    }

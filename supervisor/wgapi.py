"""The node's configuration seen through WireGuard's userspace API, sans-IO.

``device_state`` answers ``get=1`` from the running config and the live
figures the crypto workers report; ``apply_set`` turns a ``set=1`` request
into a new config, which the supervisor then applies with the same ordered
steps as a reload. Semantics follow wireguard-go's ``IpcSet``: an allowed IP
given to one peer is taken from any other, ``update_only`` skips unknown
peers, a peer with the device's own key is ignored.
"""

from __future__ import annotations

import errno
from dataclasses import replace
from typing import Any

from meshsup.actors.settings import PeerSettings, Settings, keys
from meshsup.actors.settings.node import format_endpoint, parse_endpoint
from meshsup.supervisor import uapi

ZERO_KEY = bytes(keys.KEY_LEN)


def peer_status(
    config: Settings, live: dict[str, dict[str, Any]], magicsock: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    """Configured peers with the live figures their owning worker reports (``live``: public
    key -> that worker's status of the peer): `meshsup status` shows these, `wg show` too.
    A peer whose datagrams go through a relay names it, with the latency magicsock measured
    to it (``magicsock``: its status; None while the relay is not connected), and why no direct
    path is used; a peer on a direct path found by disco has that path's latency; either has the
    candidate endpoints disco tried, with their last pong's latency."""
    links = (magicsock or {}).get("relays", [])
    routes = (magicsock or {}).get("relay_routes", {})
    home = next((link["name"] for link in links if link["home"]), None)
    latency = {link["name"]: link["latency_ms"] for link in links}
    found = (magicsock or {}).get("paths", {})  # disco's view of the peers it knows a disco key of
    out = []
    for p in config.peers:
        public = keys.b64(p.public_key)
        seen = live.get(public, {})
        path = seen.get("path")
        relay = routes.get(public, home) if path == "relay" else None
        disco = found.get(public, {})
        if path == "direct" and disco.get("latency_ms") is not None:
            path_latency = disco["latency_ms"]
        else:
            path_latency = latency.get(relay) if relay else None
        out.append(
            {
                "name": p.name,
                "public_key": public,
                "endpoint": seen.get("endpoint") or (format_endpoint(*p.endpoints[0]) if p.endpoints else ""),
                "allowed_ips": [str(n) for n in p.allowed_ips],
                "rx_bytes": seen.get("rx_bytes", 0),
                "tx_bytes": seen.get("tx_bytes", 0),
                "last_handshake": seen.get("last_handshake", 0),
                "staged": seen.get("staged", 0),
                "persistent_keepalive": p.persistent_keepalive,
                "path": path,
                "demoted": seen.get("demoted"),  # why its worker left a disco peer's direct path, while it does
                "relay": relay,
                "latency_ms": path_latency,
                "candidates": disco.get("candidates", []),
                "why": _why(path, disco, seen),
            }
        )
    return out


def _why(path: str | None, disco: dict[str, Any], seen: dict[str, Any]) -> str | None:
    """Why a relayed peer has no direct path: disco's reason, or the worker's demotion."""
    if path != "relay":
        return None
    if not disco:
        return "no disco key from the peer yet (it is told inside the tunnel once a session is up)"
    return disco.get("why") or seen.get("demoted")


def device_state(config: Settings, live: dict[str, dict[str, Any]]) -> uapi.DeviceState:
    """The reply to ``get=1``: the same merge as `meshsup status`, plus the key material."""
    peers = [
        uapi.PeerState(
            public_key=p.public_key,
            preshared_key=p.preshared_key,
            endpoint=parse_endpoint(s["endpoint"]) if s["endpoint"] else None,
            allowed_ips=s["allowed_ips"],
            last_handshake_time_sec=int(s["last_handshake"]),
            rx_bytes=int(s["rx_bytes"]),
            tx_bytes=int(s["tx_bytes"]),
            persistent_keepalive_interval=s["persistent_keepalive"],
        )
        for p, s in zip(config.peers, peer_status(config, live))
    ]
    return uapi.DeviceState(
        private_key=config.node.private_key, listen_port=config.node.listen_port, fwmark=config.node.fwmark, peers=peers
    )


def _new_peer(public: bytes, taken: set[str]) -> PeerSettings:
    name = f"peer-{public[:4].hex()}"
    n = 2
    while name in taken:
        name, n = f"peer-{public[:4].hex()}-{n}", n + 1
    return PeerSettings(
        name=name, public_key=public, preshared_key=None, allowed_ips=(), endpoints=(), persistent_keepalive=0
    )


def apply_set(config: Settings, request: uapi.SetRequest) -> Settings | uapi.UapiError:
    """The config after ``request``, or the error that refuses all of it."""
    node = config.node
    peers: dict[bytes, PeerSettings] = {p.public_key: p for p in config.peers}
    key: bytes | None = None  # the peer the current operations apply to; None: skip them
    created = False
    for op in request.operations:
        if isinstance(op, uapi.PublicKey):
            created = op.key not in peers
            if created and op.key != node.public_key:  # our own key: ignored, as wireguard-go does
                peers[op.key] = _new_peer(op.key, {p.name for p in peers.values()} | {node.name})
            key = op.key if op.key in peers else None
            continue
        if isinstance(op, uapi.PrivateKey):
            if op.key == ZERO_KEY:
                return uapi.UapiError(errno.EINVAL, "a meshsup node cannot run without a private key")
            node = replace(node, private_key=op.key, public_key=keys.public_of(op.key))
            peers.pop(node.public_key, None)
        elif isinstance(op, uapi.ListenPort):
            node = replace(node, listen_port=op.port)
        elif isinstance(op, uapi.Fwmark):
            if op.mark and op.mark != node.fwmark:  # the mark is meshsup's, in use with [node] exit_node
                why = f"fwmark is {node.fwmark} (set by [node] exit_node), not settable"
                return uapi.UapiError(errno.EOPNOTSUPP, why)
        elif isinstance(op, uapi.ReplacePeers):
            peers.clear()
        elif key is None or key not in peers:
            continue  # before any public_key, or for a skipped or removed peer
        elif isinstance(op, uapi.UpdateOnly):
            if created:
                del peers[key]
        elif isinstance(op, uapi.Remove):
            del peers[key]
        elif isinstance(op, uapi.PresharedKey):
            peers[key] = replace(peers[key], preshared_key=None if op.key == ZERO_KEY else op.key)
        elif isinstance(op, uapi.Endpoint):
            peers[key] = replace(peers[key], endpoints=((op.host, op.port),))
        elif isinstance(op, uapi.PersistentKeepaliveInterval):
            peers[key] = replace(peers[key], persistent_keepalive=op.seconds)
        elif isinstance(op, uapi.ReplaceAllowedIps):
            peers[key] = replace(peers[key], allowed_ips=())
        elif isinstance(op, uapi.AllowedIp):
            for k, other in peers.items():  # a prefix routes to one peer only
                if op.network in other.allowed_ips:
                    peers[k] = replace(other, allowed_ips=tuple(n for n in other.allowed_ips if n != op.network))
            peers[key] = replace(peers[key], allowed_ips=(*peers[key].allowed_ips, op.network))
        elif isinstance(op, uapi.ProtocolVersion):
            pass
    return replace(config, node=node, peers=tuple(peers.values()))

"""The node's configuration seen through WireGuard's userspace API, sans-IO.

``device_state`` answers ``get=1`` from the running config and the live
figures the crypto workers report; ``apply_set`` turns a ``set=1`` request
into a new config, which the supervisor then applies with the same ordered
steps as a reload. Semantics follow wireguard-go's ``IpcSet``: an allowed IP
given to one peer is taken from any other, ``update_only`` skips unknown
peers, a peer with the device's own key is ignored.
"""
from __future__ import annotations

import base64
import copy
import errno
from typing import Any

from meshsup.actors.settings import keys
from meshsup.supervisor.config import format_endpoint, parse_endpoint
from meshsup.supervisor.uapi import (AllowedIp, DeviceState, Endpoint, Fwmark, ListenPort, PeerState,
                             PersistentKeepaliveInterval, PresharedKey, PrivateKey, ProtocolVersion,
                             PublicKey, Remove, ReplaceAllowedIps, ReplacePeers, SetRequest, UapiError,
                             UpdateOnly)

Config = dict[str, Any]
ZERO_KEY = bytes(keys.KEY_LEN)


def peer_status(config: Config, live: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Configured peers with the live figures their owning worker reports (``live``: public
    key -> that worker's status of the peer): `meshsup status` shows these, `wg show` too."""
    out = []
    for p in config["peers"]:
        seen = live.get(p["public_key"], {})
        out.append({"name": p["name"], "public_key": p["public_key"],
                    "endpoint": seen.get("endpoint") or (p["endpoints"][0] if p["endpoints"] else ""),
                    "allowed_ips": p["allowed_ips"],
                    "rx_bytes": seen.get("rx_bytes", 0), "tx_bytes": seen.get("tx_bytes", 0),
                    "last_handshake": seen.get("last_handshake", 0),
                    "persistent_keepalive": p["persistent_keepalive"]})
    return out


def device_state(config: Config, live: dict[str, dict[str, Any]]) -> DeviceState:
    """The reply to ``get=1``: the same merge as `meshsup status`, plus the key material."""
    node = config["node"]
    peers = [PeerState(
        public_key=base64.b64decode(s["public_key"]),
        preshared_key=base64.b64decode(p["preshared_key"]) if p["preshared_key"] else None,
        endpoint=parse_endpoint(s["endpoint"]) if s["endpoint"] else None,
        allowed_ips=s["allowed_ips"],
        last_handshake_time_sec=int(s["last_handshake"]),
        rx_bytes=int(s["rx_bytes"]),
        tx_bytes=int(s["tx_bytes"]),
        persistent_keepalive_interval=s["persistent_keepalive"],
    ) for p, s in zip(config["peers"], peer_status(config, live))]
    return DeviceState(private_key=base64.b64decode(node["private_key"]),
                       listen_port=node["listen_port"], peers=peers)


def _new_peer(public: bytes, taken: set[str]) -> dict[str, Any]:
    name = f"peer-{public[:4].hex()}"
    n = 2
    while name in taken:
        name, n = f"peer-{public[:4].hex()}-{n}", n + 1
    return {"name": name, "public_key": keys.b64(public), "preshared_key": "", "allowed_ips": [],
            "endpoints": [], "persistent_keepalive": 0}


def apply_set(config: Config, request: SetRequest) -> Config | UapiError:
    """The config after ``request``, or the error that refuses all of it."""
    new = copy.deepcopy(config)
    node = new["node"]
    peers: dict[str, dict[str, Any]] = {p["public_key"]: p for p in new["peers"]}
    peer: dict[str, Any] | None = None  # the peer the current operations apply to; None: skip them
    created = False
    for op in request.operations:
        if isinstance(op, PublicKey):
            key = keys.b64(op.key)
            created = key not in peers
            if created and key != node["public_key"]:  # our own key: ignored, as wireguard-go does
                peers[key] = _new_peer(op.key, {p["name"] for p in peers.values()} | {node["name"]})
            peer = peers.get(key)
            continue
        if isinstance(op, PrivateKey):
            if op.key == ZERO_KEY:
                return UapiError(errno.EINVAL, "a meshsup node cannot run without a private key")
            node["private_key"], node["public_key"] = keys.b64(op.key), keys.b64(keys.public_of(op.key))
            peers.pop(node["public_key"], None)
        elif isinstance(op, ListenPort):
            node["listen_port"] = op.port
        elif isinstance(op, Fwmark):
            if op.mark:
                return UapiError(errno.EOPNOTSUPP, "fwmark is not supported")
        elif isinstance(op, ReplacePeers):
            peers.clear()
        elif peer is None:
            continue  # before any public_key, or for a skipped or removed peer
        elif isinstance(op, UpdateOnly):
            if created:
                del peers[peer["public_key"]]
                peer = None
        elif isinstance(op, Remove):
            del peers[peer["public_key"]]
            peer = None
        elif isinstance(op, PresharedKey):
            peer["preshared_key"] = "" if op.key == ZERO_KEY else keys.b64(op.key)
        elif isinstance(op, Endpoint):
            peer["endpoints"] = [format_endpoint(op.host, op.port)]
        elif isinstance(op, PersistentKeepaliveInterval):
            peer["persistent_keepalive"] = op.seconds
        elif isinstance(op, ReplaceAllowedIps):
            peer["allowed_ips"] = []
        elif isinstance(op, AllowedIp):
            prefix = str(op.network)
            for other in peers.values():  # a prefix routes to one peer only
                if prefix in other["allowed_ips"]:
                    other["allowed_ips"].remove(prefix)
            peer["allowed_ips"].append(prefix)
        elif isinstance(op, ProtocolVersion):
            pass
    new["peers"] = list(peers.values())
    return new

"""Which crypto worker owns a peer: every stage computes the same answer.

Sharding by peer keeps each peer's packets on one worker, so per-peer order
and nonce order hold with no re-sequencing, and a peer's sessions live in
exactly one process.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Any

from meshsup.actors.routing.allowedips import AllowedIPs, Network
from meshsup.actors.settings import PeerSettings
from meshsup.actors.wire.ip import IPV4_DST, IPV4_HEADER_MIN, IPV6_DST, IPV6_HEADER


def owner(public_key: bytes, workers: int) -> int:
    return int.from_bytes(hashlib.blake2s(public_key, digest_size=4).digest(), "big") % workers


def worker_prefixes(peers: Iterable[PeerSettings], workers: int) -> list[tuple[Network, int]]:
    """Every configured peer's allowed IPs, each with the worker that owns the peer."""
    return [(prefix, owner(p.public_key, workers)) for p in peers for prefix in p.allowed_ips]


def worker_routes(prefixes: Iterable[tuple[Network, int]]) -> AllowedIPs:
    """Destination address -> owning worker, by longest prefix."""
    routes = AllowedIPs()
    for network, worker in prefixes:
        routes.insert(network, worker)
    return routes


def by_owner(packets: Iterable[bytes], routes: AllowedIPs) -> tuple[dict[int, list[bytes]], int]:
    """Outgoing packets grouped by the worker owning their destination, in order; and
    how many have no route."""
    groups: dict[int, list[bytes]] = {}
    unrouted = 0
    last_dst: bytes | None = b""
    w: Any = None
    for p in packets:
        # The destination cut here, not by ip.dst_addr: two calls per packet fewer on the hot path.
        n = len(p)
        version = p[0] >> 4 if n else 0
        if version == 4 and n >= IPV4_HEADER_MIN:
            dst: bytes | None = p[IPV4_DST]
        elif version == 6 and n >= IPV6_HEADER:
            dst = p[IPV6_DST]
        else:
            dst = None
        if dst != last_dst:  # bulk traffic repeats destinations: route once per run
            last_dst = dst
            w = routes.lookup(dst) if dst is not None else None
        if w is None:
            unrouted += 1
        else:
            groups.setdefault(w, []).append(p)
    return groups, unrouted

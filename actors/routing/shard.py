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


class WorkerRoutes:
    """Destination prefix -> the crypto worker that owns the peer holding it, kept peer by peer.

    Where two peers list one prefix, the one set last holds it, as wireguard-go has it (an allowed
    IP given to a peer is taken from another), and only its holder's removal or change takes it
    out: the peer that lost it, going, must not take its successor's route along when both are
    one worker's (the table's values are workers, not peers)."""

    def __init__(self, peers: Iterable[PeerSettings] = (), workers: int = 1) -> None:
        self.routes = AllowedIPs()  # destination -> worker, by longest prefix
        self.workers = workers
        self._prefixes: dict[bytes, tuple[Network, ...]] = {}  # each peer's allowed IPs, as routed
        self._holder: dict[Network, bytes] = {}  # each prefix's peer
        for p in peers:
            self._add(p)

    def change(self, changed: Iterable[PeerSettings], removed: Iterable[bytes]) -> list[Network]:
        """The `changed` peers (as they are now) in place, the `removed` ones out; the prefixes
        whose worker may have changed (each holder's prefixes, as it had and has them)."""
        changed = list(changed)
        touched: list[Network] = []
        for key in [*removed, *(p.public_key for p in changed)]:
            for network in self._prefixes.pop(key, ()):
                if self._holder.get(network) == key:
                    del self._holder[network]
                    self.routes.remove(network, owner(key, self.workers))
                touched.append(network)
        for p in changed:
            touched += self._add(p)
        return touched

    def _add(self, peer: PeerSettings) -> tuple[Network, ...]:
        worker = owner(peer.public_key, self.workers)
        self._prefixes[peer.public_key] = peer.allowed_ips
        for network in peer.allowed_ips:
            self._holder[network] = peer.public_key
            self.routes.insert(network, worker)
        return peer.allowed_ips


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

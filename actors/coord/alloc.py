"""Mesh addresses for a node that was given none (sans-IO), as Tailscale hands them out: one from
the IPv4 pool (100.64.0.0/10) and one from the ULA pool, each held by an `addr.` key that names
its owner's public key. A key is taken by compare-and-set (create if absent, or update at the
revision read), so two nodes never hold the same address: the loser of a race tries the next one.
The candidates follow from the node's key, and a node takes back what it holds, so it keeps its
addresses across restarts; an address whose owner has published no live record for a lifetime
may be taken over.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Iterator
from dataclasses import dataclass

from meshsup.actors.coord.mesh import MeshView
from meshsup.actors.settings.node import IPNetwork

MAX_TRIES = 64  # candidates per pool before giving up (and trying again later)


@dataclass(frozen=True, slots=True)
class Take:
    """Take `address` by writing its key: `revision` 0 creates it, else updates it at that revision."""

    address: IPNetwork
    revision: int


def candidates(pool: IPNetwork, public_key: bytes) -> Iterator[IPNetwork]:
    """Host addresses of `pool` from the key, the same for a key every time; never the pool's
    network or last address."""
    hosts = pool.num_addresses - 2
    for i in range(MAX_TRIES):
        digest = hashlib.blake2s(public_key + i.to_bytes(2, "big"), digest_size=16, person=b"meshaddr").digest()
        host = int.from_bytes(digest, "big") % hosts + 1
        yield ipaddress.ip_network(pool.network_address + host)


def held(view: MeshView, pool: IPNetwork, public_key: bytes) -> IPNetwork | None:
    """The address of `pool` the node holds already (the lowest, if a race left it two)."""
    mine = [a for a, c in view.claims.items() if c.owner == public_key and a.version == pool.version]
    mine = sorted((a for a in mine if a.subnet_of(pool)), key=lambda a: a.network_address)
    return mine[0] if mine else None


def next_take(view: MeshView, pool: IPNetwork, public_key: bytes, refused: set[IPNetwork], now: float) -> Take | None:
    """The next address to try, skipping those a compare-and-set lost: free, or held by a key
    with no live record. None: every candidate is taken."""
    for address in candidates(pool, public_key):
        if address in refused:
            continue
        claim = view.claims.get(address)
        if claim is None:
            return Take(address, 0)
        if claim.owner == public_key or view.abandoned(claim, now):
            return Take(address, claim.revision)
    return None

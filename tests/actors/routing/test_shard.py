"""The crypto workers' and tun-io's table of which worker owns a destination, kept peer by peer,
agrees with a table of which peer holds it (wireguard-go's: a peer set with an allowed IP takes it
from another; a peer removed takes its own along) after any sequence of one-peer changes."""

from __future__ import annotations

import dataclasses
import ipaddress
import random

import pytest

from meshsup.actors.routing.allowedips import AllowedIPs
from meshsup.actors.routing.shard import WorkerRoutes, owner
from meshsup.actors.settings import PeerSettings
from meshsup.actors.settings.keys import generate_private, public_of

# A small pool, so that peers often list the same prefixes.
POOL = [
    *(ipaddress.ip_network(f"100.64.0.{i}/32") for i in range(1, 5)),
    ipaddress.ip_network("10.1.0.0/16"),
    ipaddress.ip_network("10.1.2.0/24"),
    ipaddress.ip_network("fd00::/64"),
    ipaddress.ip_network("0.0.0.0/0"),
]


def peer(key: bytes, rng: random.Random) -> PeerSettings:
    return PeerSettings(
        name=key.hex()[:8],
        public_key=key,
        preshared_key=None,
        endpoints=(),
        persistent_keepalive=0,
        allowed_ips=tuple(rng.sample(POOL, rng.randint(0, 3))),
    )


@pytest.mark.parametrize("workers", [1, 3])
def test_one_peer_changes_keep_each_prefix_with_the_worker_of_the_peer_that_holds_it(workers: int) -> None:
    rng = random.Random(workers)
    keys = [public_of(generate_private()) for _ in range(6)]
    by_peer = AllowedIPs()  # the reference: prefix -> the peer holding it
    table = WorkerRoutes((), workers)
    live: set[bytes] = set()
    for step in range(600):
        key = rng.choice(keys)
        if key in live and rng.random() < 0.4:
            live.discard(key)
            by_peer.remove_peer(key)
            table.change([], [key])
        else:
            p = peer(key, rng)
            live.add(key)
            by_peer.remove_peer(key)
            for network in p.allowed_ips:
                by_peer.insert(network, key)
            table.change([dataclasses.replace(p)], [])
        for network in POOL:
            holder = by_peer.get(network)
            want = None if holder is None else owner(holder, workers)
            assert table.routes.get(network) == want, (step, network)


def test_the_peer_that_lost_a_prefix_leaves_its_successors_route_when_it_goes() -> None:
    """Two subnet routers of one worker list 10.1.0.0/16: the one set last has it, and the other
    going (its record expired) must not take the route along."""
    rng = random.Random(0)
    first, second = (public_of(generate_private()) for _ in range(2))
    shared = (ipaddress.ip_network("10.1.0.0/16"),)
    a = dataclasses.replace(peer(first, rng), allowed_ips=shared)
    b = dataclasses.replace(peer(second, rng), allowed_ips=shared)
    table = WorkerRoutes([a, b], workers=1)
    table.change([], [first])
    assert table.routes.lookup(ipaddress.ip_address("10.1.7.7").packed) == 0

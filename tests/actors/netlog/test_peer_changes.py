"""A change of a few peers among many, applied to netlog's tables peer by peer, leaves them as
building them from every peer anew does."""

from __future__ import annotations

import dataclasses
import ipaddress
import random

from meshsup.actors.netlog.counting import CountsReader
from meshsup.actors.netlog.mesh import Endpoints, change_peers, classifier, endpoint_peers, key_peers
from meshsup.actors.settings import PeerSettings, Settings

from .test_counting import config

# A small pool, so that peers share networks and one going must leave another's in.
NETWORKS = [
    *(ipaddress.ip_network(f"100.64.1.{i}/32") for i in range(1, 9)),
    *(ipaddress.ip_network(f"fd7a:115c:a1e0::{i}/128") for i in range(1, 5)),
    ipaddress.ip_network("10.20.0.0/16"),
    ipaddress.ip_network("10.20.30.0/24"),
    ipaddress.ip_network("fd00:1::/64"),
    ipaddress.ip_network("0.0.0.0/0"),
]


def random_peer(rng: random.Random, template: PeerSettings, serial: int, key: bytes | None = None) -> PeerSettings:
    return dataclasses.replace(
        template,
        name=f"peer{serial}",
        public_key=key or rng.randbytes(32),
        allowed_ips=tuple(rng.sample(NETWORKS, rng.randint(0, 4))),
        # From a small pool too: one peer going must leave another's entry for a shared endpoint.
        endpoints=(("198.51.100.7", 20000 + rng.randrange(6)),) if rng.random() < 0.8 else (),
    )


def one_peer_change(rng: random.Random, settings: Settings, serial: int) -> tuple[list[PeerSettings], list[bytes]]:
    """A random one-peer change: (changed, removed), as a PeersChanged carries them."""
    action = rng.choices(["add", "change", "remove"], [2, 2, 1])[0] if settings.peers else "add"
    template = settings.peers[0] if settings.peers else config().peers[0]
    if action == "add":
        return [random_peer(rng, template, serial)], []
    old = rng.choice(settings.peers)
    if action == "change":
        return [random_peer(rng, template, serial, old.public_key)], []
    return [], [old.public_key]


def test_one_peer_changes_leave_the_tables_a_rebuild_makes() -> None:
    rng = random.Random(18)
    settings = config()
    reader = CountsReader()
    endpoints = Endpoints(settings.peers)
    reader.peers, reader.key_peers = endpoints.by_endpoint, key_peers(settings)
    rules = classifier(settings, anonymize_exit=True)
    probes = [
        ipaddress.ip_address(a)
        for a in ("100.64.1.3", "100.64.1.9", "10.20.30.4", "10.20.1.1", "fd7a:115c:a1e0::2", "fd00:1::9", "8.8.8.8")
    ]
    for serial in range(400):
        changed, removed = one_peer_change(rng, settings, serial)
        keys = {*removed, *(p.public_key for p in changed)}
        gone = [p for p in settings.peers if p.public_key in keys]
        settings = settings.with_peers(changed, removed)
        change_peers(reader, endpoints, rules, gone, changed)

        rebuilt = classifier(settings, anonymize_exit=True)
        assert (rules.mesh, rules.subnets) == (rebuilt.mesh, rebuilt.subnets)
        assert reader.peers == endpoint_peers(settings)
        assert reader.key_peers == key_peers(settings)
        assert [rules.classify(a, b) for a in probes for b in probes] == [
            rebuilt.classify(a, b) for a in probes for b in probes
        ]
    assert 10 < len(settings.peers)  # the changes made a mesh, not a single peer come and gone

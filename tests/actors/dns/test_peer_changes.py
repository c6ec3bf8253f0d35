"""A change of a few peers among many, applied to the DNS controller's names, zone and answered
ranges peer by peer, leaves them as building them from every peer anew does."""

from __future__ import annotations

import dataclasses
import ipaddress
import random
from pathlib import Path

import dns.name
import dns.rdatatype
import dns.reversename

from meshsup.actors.dns.access import Sources
from meshsup.actors.dns.actor import mesh_change
from meshsup.actors.dns.zone import Zone
from meshsup.actors.settings import PeerSettings, Settings, parse
from meshsup.actors.settings.keys import b64, generate_private, public_of

# A small pool, so that peers share addresses and ranges and one going must leave another's in.
NETWORKS = [
    *(ipaddress.ip_network(f"100.64.1.{i}/32") for i in range(1, 9)),
    *(ipaddress.ip_network(f"fd7a:115c:a1e0::{i}/128") for i in range(1, 5)),
    ipaddress.ip_network("10.20.0.0/16"),
    ipaddress.ip_network("fd00:1::/64"),
]
CLIENTS = ["100.64.1.3", "100.64.1.9", "10.20.30.4", "fd7a:115c:a1e0::2", "fd00:1::9", "8.8.8.8"]


def node_settings() -> Settings:
    return parse(
        "test.toml",
        {
            "node": {"name": "alpha", "private_key": b64(generate_private()), "addresses": ["100.64.0.1/32"]},
            "peers": [{"name": "bravo", "public_key": b64(public_of(generate_private())), "allowed_ips": []}],
            "dns": {"listen": ["100.64.0.1:53"], "domain": "mesh"},
        },
        Path("."),
        Path("."),
    )


def random_peer(rng: random.Random, template: PeerSettings, name: str, key: bytes | None = None) -> PeerSettings:
    return dataclasses.replace(
        template,
        name=name,
        public_key=key or rng.randbytes(32),
        allowed_ips=tuple(rng.sample(NETWORKS, rng.randint(0, 3))),
    )


def answers(zone: Zone, labels: set[str]) -> list[tuple[str, str, int | None, list[str]]]:
    """What the zone answers for every name and address that was ever in the mesh."""
    out = []
    questions = [(dns.name.from_text(f"{label}.mesh."), t) for label in sorted(labels) for t in ("A", "AAAA")]
    questions += [(dns.reversename.from_address(str(n.network_address)), "PTR") for n in NETWORKS]
    for qname, qtype in questions:
        answer = zone.answer(qname, dns.rdatatype.from_text(qtype), 1)
        if answer is None:  # not the zone's: an address no name has
            out.append((str(qname), qtype, None, []))
        else:
            out.append((str(qname), qtype, answer.rcode, sorted(r.to_text() for rrset in answer.answer for r in rrset)))
    return out


def test_one_peer_changes_leave_the_names_and_ranges_a_rebuild_makes() -> None:
    rng = random.Random(18)
    settings = node_settings()
    template = settings.peers[0]
    dns_settings = settings.dns_for_mesh()
    zone = Zone(dns_settings.domain, dns_settings.names)
    sources = Sources(dns_settings.sources)
    labels = {"alpha", "bravo"}
    for serial in range(300):
        action = rng.choices(["add", "change", "remove"], [2, 2, 1])[0] if settings.peers else "add"
        if action == "add":
            changed, removed = [random_peer(rng, template, f"peer{serial}")], []
        else:
            old = rng.choice(settings.peers)
            changed, removed = (
                ([random_peer(rng, template, old.name, old.public_key)], [])
                if action == "change"
                else ([], [old.public_key])
            )
        labels.update(p.name for p in changed)
        keys = {*removed, *(p.public_key for p in changed)}
        gone = [p for p in settings.peers if p.public_key in keys]
        settings = settings.with_peers(changed, removed)
        dns_settings, names, ranges = mesh_change(settings, dns_settings, gone, changed)
        zone.change_names(names)
        sources.change(*ranges)

        rebuilt = settings.dns_for_mesh()
        assert dns_settings == rebuilt
        assert sources.networks == Sources(rebuilt.sources).networks
        assert [sources(c).allowed for c in CLIENTS] == [Sources(rebuilt.sources)(c).allowed for c in CLIENTS]
        assert answers(zone, labels) == answers(Zone(rebuilt.domain, rebuilt.names), labels)
    assert 10 < len(settings.peers)  # the changes made a mesh, not a single peer come and gone

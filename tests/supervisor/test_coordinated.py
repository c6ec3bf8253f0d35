"""The mesh's peers merged into the config: [[peers]] win, the node's taken addresses replace
the derived ones, and a peer set that does not decode changes nothing."""

from __future__ import annotations

import ipaddress
from pathlib import Path

from meshsup.actors.bus.messages import MeshPeers
from meshsup.actors.settings import Settings, parse
from meshsup.actors.settings.keys import b64, generate_private, public_of
from meshsup.actors.settings.node import PeerSettings
from meshsup.actors.settings.wire import encode
from meshsup.supervisor.coordinated import Coordinated, hints_change, local_info
from meshsup.supervisor.health import COORDINATION_GRACE, Health
from meshsup.supervisor.supervision import ActorProc

STATIC_PEER = public_of(generate_private())


def static(tmp_path: Path) -> Settings:
    doc = {
        "node": {"name": "alpha", "private_key": b64(generate_private())},
        "peers": [{"name": "bravo", "public_key": b64(STATIC_PEER), "allowed_ips": ["100.64.0.2/32"]}],
        "coordination": {"servers": ["nats://198.51.100.10:4222"], "mesh": "m"},
    }
    return parse("node.toml", doc, tmp_path, tmp_path)


def peer(name: str, key: bytes, v4: str) -> PeerSettings:
    return PeerSettings(name, key, None, (ipaddress.ip_network(v4),), (("198.51.100.3", 51820),), 0)


def test_mesh_peers_join_the_configured_ones(tmp_path: Path) -> None:
    s = static(tmp_path)
    mesh = Coordinated()
    charlie = peer("charlie", public_of(generate_private()), "100.64.0.3/32")
    clash_key = peer("impostor", STATIC_PEER, "100.64.0.4/32")
    clash_name = peer("bravo", public_of(generate_private()), "100.64.0.5/32")
    taken = ["100.64.7.7/32", "fd7a:115c:a1e0::77/128"]
    wire = [encode(p) for p in (charlie, clash_key, clash_name)]
    assert mesh.take(MeshPeers(revision=9, peers=wire, addresses=taken, policy={})) is None
    merged = mesh.merge(s)
    assert [p.name for p in merged.peers] == ["bravo", "charlie"]
    assert merged.peers[0].public_key == STATIC_PEER
    assert [str(a) for a in merged.node.addresses] == taken
    assert merged.dns.listen == (("100.64.7.7", 53),)  # the default listen follows the address
    assert mesh.shadowed == ["impostor", "bravo"]


def test_a_peer_set_that_does_not_decode_changes_nothing(tmp_path: Path) -> None:
    mesh = Coordinated()
    good = peer("charlie", public_of(generate_private()), "100.64.0.3/32")
    assert mesh.take(MeshPeers(revision=1, peers=[encode(good)], addresses=[], policy={})) is None
    assert "decode" == mesh.take(MeshPeers(revision=2, peers=[encode(good), {"name": 1}], addresses=[], policy={}))
    assert mesh.peers == (good,) and mesh.revision == 1 and mesh.refused == 1


def test_local_info_from_magicsock_status() -> None:
    assert local_info({}) is None
    status = {
        "disco": {"public_key": "k", "endpoints": ["198.51.100.1:51820"]},
        "relays": [{"name": "r1", "home": False}, {"name": "r2", "home": True}],
    }
    assert local_info(status) == {"disco": "k", "endpoints": ["198.51.100.1:51820"], "relay": "r2"}


def test_the_mesh_policy_replaces_filter_and_dns_keys_or_is_refused_whole(tmp_path: Path) -> None:
    s = static(tmp_path)
    mesh = Coordinated()
    charlie = peer("charlie", public_of(generate_private()), "100.64.0.3/32")
    policy = {
        "filter": {
            "default": "deny",
            "groups": {"ops": ["charlie", "gone"]},
            "rules": [{"action": "accept", "src": ["group:ops", "gone"], "dst": ["*:22"], "proto": "tcp"}],
        },
        "dns": {"domain": "corp"},
    }
    assert mesh.take(MeshPeers(revision=1, peers=[encode(charlie)], addresses=[], policy=policy)) is None
    merged = mesh.merge(s)
    assert merged.filter.enabled and merged.filter.default == "deny"
    assert merged.filter.rules[0].sources == (ipaddress.ip_network("100.64.0.3/32"),)  # "gone" matches nothing
    assert merged.dns.domain == "corp" and merged.dns.listen == s.dns.listen
    bad = {"filter": {"default": "maybe"}}
    assert mesh.take(MeshPeers(revision=2, peers=[encode(charlie)], addresses=[], policy=bad)) is None
    again = mesh.merge(s)
    assert again.filter == merged.filter and again.dns.domain == "corp"
    assert "filter.default" in mesh.policy_error


def test_unreachable_nats_servers_are_a_health_warning_after_a_grace() -> None:
    health = Health()

    def coord(down_for: float) -> ActorProc:
        status = {"up": not down_for, "down_for": down_for, "last_error": "disconnected"}
        return ActorProc("coord", "coord", state="running", status=status)

    health.update(1000.0, [coord(COORDINATION_GRACE - 1)], 10.0)
    assert health.warnings() == []
    health.update(1001.0, [coord(COORDINATION_GRACE + 5)], 10.0)
    (warning,) = health.warnings()
    assert warning.code == "coordination-unreachable" and "last known state" in warning.message
    assert "disconnected" in warning.message
    health.update(1002.0, [coord(0.0)], 10.0)
    assert health.warnings() == []


def test_a_change_of_the_mesh_is_a_one_peer_change_of_the_config(tmp_path: Path) -> None:
    """After the whole set, a MeshPeers carries the peers changed and the keys gone: merged, the
    config differs in those alone (the sequencer sends them as one PeersChanged). One after a
    change not taken is refused and asks for the whole set; [[peers]] still win."""
    s = static(tmp_path)
    mesh = Coordinated()
    many = [peer(f"n{i}", public_of(generate_private()), f"100.64.1.{i}/32") for i in range(1, 50)]
    hint = {"relay": "r1", "disco": ""}
    whole = MeshPeers(1, [encode(p) for p in many], [], {}, {b64(many[0].public_key): hint}, seq=1)
    assert mesh.take(whole) is None
    before = mesh.merge(s)
    moved = peer("n2", many[1].public_key, "100.64.2.2/32")
    change = MeshPeers(2, [encode(moved)], [], {}, {}, seq=2, whole=False, removed=[many[0].public_key])
    assert mesh.take(change) is None
    after = mesh.merge(s)
    assert before.peer_changes(after) == ([moved], [many[0].public_key])
    assert mesh.hints == {}  # n1's hint went with it
    # A change after one that never came: refused, nothing changed
    skipped = MeshPeers(4, [encode(peer("n3", many[2].public_key, "100.64.2.3/32"))], [], {}, {}, seq=4, whole=False)
    assert mesh.take(skipped) == "gap" and mesh.merge(s) == after and mesh.refused == 1
    # A mesh peer taking a configured peer's key stays left out when it changes
    impostor = peer("impostor", STATIC_PEER, "100.64.0.4/32")
    assert mesh.take(MeshPeers(3, [encode(impostor)], [], {}, {}, seq=3, whole=False)) is None
    assert mesh.merge(s) == after and mesh.shadowed == ["impostor"]
    assert mesh.take(MeshPeers(5, [], [], {}, {}, seq=4, whole=False, removed=[STATIC_PEER])) is None
    assert mesh.merge(s) == after  # bravo, configured, stays


def test_magicsock_is_told_the_hints_that_changed() -> None:
    before = {"a": {"relay": "r1", "disco": ""}, "b": {"relay": "r2", "disco": ""}, "c": {"relay": "r1", "disco": ""}}
    after = {"a": {"relay": "r1", "disco": ""}, "b": {"relay": "r3", "disco": ""}, "d": {"relay": "r1", "disco": "k"}}
    change = hints_change(before, after)
    assert change == {"hints": {"b": after["b"], "d": after["d"]}, "removed": ["c"]}
    mine = {k: v for k, v in before.items() if k not in change["removed"]} | change["hints"]
    assert mine == after

"""The coordination core: records checked, the mesh view's revisions, expiry and pauses, and
address allocation by compare-and-set (sans-IO)."""

from __future__ import annotations

import ipaddress
import json
import tomllib
from pathlib import Path

import pytest

from meshsup.actors.coord import alloc
from meshsup.actors.coord.mesh import MeshView, owner_text
from meshsup.actors.coord.record import NodeRecord, RecordError, addr_key, address_of_key, decode, node_key
from meshsup.actors.settings import ConfigError, parse
from meshsup.actors.settings.coordination import CoordinationSettings
from meshsup.actors.settings.keys import b64, generate_private, public_of

SETTINGS = CoordinationSettings(servers=("nats://127.0.0.1:4222",), mesh="t", lifetime=30.0)
net = ipaddress.ip_network


def key() -> bytes:
    return public_of(generate_private())


def record(name: str, public: bytes, v4: str, **kw: object) -> NodeRecord:
    fields = dict(
        name=name,
        public_key=public,
        disco_key=key(),
        addresses=(net(v4), net("fd7a:115c:a1e0::1")),
        endpoints=(("198.51.100.1", 51820),),
        relay="r1",
    )
    fields.update(kw)
    return NodeRecord(**fields)  # type: ignore[arg-type]


def test_a_record_round_trips() -> None:
    r = record("alpha", key(), "100.64.0.1", routes=(net("10.20.0.0/16"),), exit=True)
    assert decode(node_key("alpha"), r.encode(), SETTINGS) == r


@pytest.mark.parametrize(
    ("mangle", "reason"),
    [
        (lambda d: b"{not json", "not_json"),
        (lambda d: json.dumps({**d, "v": 2}).encode(), "bad_version"),
        (lambda d: json.dumps({**d, "name": "bravo"}).encode(), "name_mismatch"),
        (lambda d: json.dumps({**d, "key": "AAAA"}).encode(), "bad_key"),
        (lambda d: json.dumps({**d, "addresses": ["10.0.0.1/32"]}).encode(), "bad_address"),
        (lambda d: json.dumps({**d, "addresses": ["100.64.0.0/24"]}).encode(), "bad_address"),
        (lambda d: json.dumps({**d, "addresses": []}).encode(), "bad_address"),
        (lambda d: json.dumps({**d, "endpoints": ["nowhere"]}).encode(), "bad_endpoint"),
        (lambda d: json.dumps({**d, "exit": "yes"}).encode(), "bad_field"),
        (lambda d: b" " * 9000, "too_large"),
    ],
)
def test_a_bad_record_is_refused_with_its_reason(mangle, reason) -> None:  # type: ignore[no-untyped-def]
    doc = json.loads(record("alpha", key(), "100.64.0.1").encode())
    with pytest.raises(RecordError) as err:
        decode(node_key("alpha"), mangle(doc), SETTINGS)
    assert err.value.reason == reason


def test_address_keys_name_their_address() -> None:
    for a in ("100.64.3.4", "fd7a:115c:a1e0::7"):
        assert address_of_key(addr_key(net(a))) == ipaddress.ip_address(a)
    assert address_of_key("addr.nonsense") is None


def test_peers_come_and_go_by_revision_and_replays_change_nothing() -> None:
    me, b = key(), key()
    view = MeshView(SETTINGS)
    assert view.apply(node_key("bravo"), record("bravo", b, "100.64.0.2").encode(), 5, 0.0, 100.0) is None
    peers = view.peers(me)
    assert [(p.name, p.public_key) for p in peers] == [("bravo", b)]
    assert peers[0].allowed_ips == (net("100.64.0.2/32"), net("fd7a:115c:a1e0::1/128"))
    assert peers[0].endpoints == (("198.51.100.1", 51820),)
    # The same revision again (a resumed watch) is dropped, even as a deletion.
    assert view.apply(node_key("bravo"), None, 5, 0.0, 101.0) == "replayed"
    assert len(view.peers(me)) == 1
    view.apply(node_key("bravo"), None, 6, 0.0, 101.0)
    assert view.peers(me) == []


def test_a_bad_update_keeps_the_last_good_record() -> None:
    view = MeshView(SETTINGS)
    b = key()
    view.apply(node_key("bravo"), record("bravo", b, "100.64.0.2").encode(), 1, 0.0, 0.0)
    assert view.apply(node_key("bravo"), b"garbage", 2, 0.0, 1.0) == "not_json"
    assert [p.name for p in view.peers(key())] == ["bravo"]
    assert view.dropped["not_json"] == 1


def test_records_expire_unless_refreshed_and_not_while_the_bucket_is_away() -> None:
    view = MeshView(SETTINGS)
    b, c = key(), key()
    view.apply(node_key("bravo"), record("bravo", b, "100.64.0.2").encode(), 1, 10.0, 0.0)  # written 10 s ago
    view.apply(node_key("charlie"), record("charlie", c, "100.64.0.3").encode(), 2, 0.0, 0.0)
    assert view.expire(19.0) == []
    assert view.expire(20.0) == [node_key("bravo")]
    view.pause(25.0)
    assert view.expire(100.0) == []  # an outage tears nothing down
    view.resume(100.0)  # 75 s away: added to the record's life
    assert view.expire(104.0) == []
    assert view.expire(105.0) == [node_key("charlie")]
    # A record older than its lifetime when read is dead already.
    view.apply(node_key("delta"), record("delta", key(), "100.64.0.4").encode(), 3, 31.0, 200.0)
    assert view.peers(key()) == []


def test_the_first_holder_of_a_key_or_address_keeps_it() -> None:
    view = MeshView(SETTINGS)
    b = key()
    view.apply(node_key("bravo"), record("bravo", b, "100.64.0.2").encode(), 1, 0.0, 0.0)
    view.apply(node_key("mallory"), record("mallory", key(), "100.64.0.2").encode(), 2, 0.0, 0.0)
    view.apply(node_key("eve"), record("eve", b, "100.64.0.9").encode(), 3, 0.0, 0.0)
    assert [p.name for p in view.peers(key())] == ["bravo"]
    assert view.conflicts == 2


def test_routes_and_exit_only_when_asked_for() -> None:
    r = record("bravo", key(), "100.64.0.2", routes=(net("10.20.0.0/16"),), exit=True)
    plain, accepting = MeshView(SETTINGS), MeshView(CoordinationSettings(("nats://h:1",), "t", accept_routes=True))
    for view in (plain, accepting):
        view.apply(node_key("bravo"), r.encode(), 1, 0.0, 0.0)
    assert net("10.20.0.0/16") not in plain.peers(key())[0].allowed_ips
    assert net("10.20.0.0/16") in accepting.peers(key())[0].allowed_ips
    assert net("0.0.0.0/0") in plain.peers(key(), exit_node="bravo")[0].allowed_ips
    assert net("0.0.0.0/0") not in plain.peers(key())[0].allowed_ips


def test_allocation_takes_a_free_address_and_never_a_held_one() -> None:
    view = MeshView(SETTINGS)
    me, other = key(), key()
    pool = SETTINGS.pool4
    first = alloc.next_take(view, pool, me, set(), 0.0)
    assert first is not None and first.revision == 0 and first.address.subnet_of(pool)
    assert first.address.prefixlen == 32 and first.address != net(pool.network_address)
    # Someone else took it first (their create won): it is skipped, the next candidate tried.
    view.apply(addr_key(first.address), owner_text(other), 4, 0.0, 0.0)
    second = alloc.next_take(view, pool, me, {first.address}, 1.0)
    assert second is not None and second.address != first.address and second.revision == 0
    # Its owner publishes no record: after a lifetime the claim may be taken over, at its revision.
    again = alloc.next_take(view, pool, me, set(), SETTINGS.lifetime + 1)
    assert again == alloc.Take(first.address, 4)
    # With a live record the owner keeps it.
    view.apply(node_key("other"), record("other", other, str(first.address.network_address)).encode(), 5, 0, 40)
    assert alloc.next_take(view, pool, me, set(), 41.0) == second


def test_a_node_takes_back_what_it_holds() -> None:
    view = MeshView(SETTINGS)
    me = key()
    view.apply(addr_key(net("100.64.9.9")), owner_text(me), 1, 0.0, 0.0)
    view.apply(addr_key(net("fd7a:115c:a1e0::9")), b64(me).encode(), 2, 0.0, 0.0)
    assert alloc.held(view, SETTINGS.pool4, me) == net("100.64.9.9/32")
    assert alloc.held(view, SETTINGS.pool6, me) == net("fd7a:115c:a1e0::9/128")
    assert alloc.held(view, SETTINGS.pool4, key()) is None


def test_the_policy_is_taken_whole_or_not_at_all() -> None:
    view = MeshView(SETTINGS)
    good = {"filter": {"default": "deny"}, "dns": {"domain": "corp"}}
    assert view.apply("policy", json.dumps(good).encode(), 1, 0.0, 0.0) is None
    assert view.policy == good
    for bad, reason in (
        (b"[1]", "bad_policy"),
        (json.dumps({"dns": {"listen": ["0.0.0.0:53"]}}).encode(), "bad_policy"),  # a node's key, not the mesh's
        (json.dumps({"filter": [1]}).encode(), "bad_policy"),
        (b"\xff", "not_json"),
    ):
        assert view.apply("policy", bad, view.revision + 1, 0.0, 0.0).startswith(reason)
        assert view.policy == good
    view.apply("policy", None, view.revision + 1, 0.0, 0.0)
    assert view.policy == {}


def test_exit_node_may_name_a_peer_of_the_mesh(tmp_path: Path) -> None:
    """With [coordination], exit_node may name no [[peers]] entry (the mesh's node of that name, once
    it advertises exit); without, or naming a [[peers]] entry that is no exit, it is refused."""
    node = f'[node]\nname = "client"\nprivate_key_file = "{tmp_path / "k"}"\nexit_node = "exit"\n'
    (tmp_path / "k").write_text(b64(generate_private()))
    (tmp_path / "k").chmod(0o600)
    mesh = '[coordination]\nservers = ["nats://127.0.0.1:4222"]\nmesh = "t"\n'
    assert parse("t.toml", tomllib.loads(node + mesh), tmp_path, tmp_path).node.exit_node == "exit"
    with pytest.raises(ConfigError, match="no peer named 'exit'"):
        parse("t.toml", tomllib.loads(node), tmp_path, tmp_path)
    static = f'[[peers]]\nname = "exit"\npublic_key = "{b64(key())}"\nallowed_ips = ["100.64.0.9/32"]\n'
    with pytest.raises(ConfigError, match="neither 0.0.0.0/0"):
        parse("t.toml", tomllib.loads(node + mesh + static), tmp_path, tmp_path)


def test_an_address_claimed_by_another_key_is_counted_and_decides_only_a_contest() -> None:
    """Claims are a cross-check: a mismatch is counted and noted with the record's key; it never
    removes a record alone (anyone may write a claim), nor a working peer; between two live records
    holding one address, the one the claim names gets it."""
    view = MeshView(SETTINGS)
    a, b, forger, me = key(), key(), key(), key()
    view.apply(addr_key(net("100.64.0.1/32")), owner_text(forger), 1, 0.0, 0.0)  # a forged claim
    view.apply(node_key("alpha"), record("alpha", a, "100.64.0.1").encode(), 2, 0.0, 0.0)
    assert view.mismatches == 1 and view.notes == [("node.alpha", f"100.64.0.1/32 is claimed by {b64(forger)}")]
    assert [p.name for p in view.peers(me)] == ["alpha"]  # kept: the claim's owner has no record holding it
    # bravo takes the address by claim and publishes it: alpha was a working peer and stays
    view.apply(addr_key(net("100.64.0.1/32")), owner_text(b), 3, 0.0, 0.0)
    view.apply(node_key("bravo"), record("bravo", b, "100.64.0.1").encode(), 4, 0.0, 0.0)
    assert view.mismatches == 2  # alpha's address, now claimed by bravo
    assert [p.name for p in view.peers(me)] == ["alpha"] and view.conflicts == 1
    # a reader that never had alpha as a peer gives the address to the record the claim names
    fresh = MeshView(SETTINGS)
    fresh.apply(node_key("alpha"), record("alpha", a, "100.64.0.1").encode(), 2, 0.0, 0.0)
    fresh.apply(addr_key(net("100.64.0.1/32")), owner_text(b), 3, 0.0, 0.0)
    fresh.apply(node_key("bravo"), record("bravo", b, "100.64.0.1").encode(), 4, 0.0, 0.0)
    assert [p.name for p in fresh.peers(me)] == ["bravo"] and fresh.mismatches == 1
    # an address with no claim (configured, not taken from the pool) is no mismatch
    plain = MeshView(SETTINGS)
    plain.apply(node_key("alpha"), record("alpha", a, "100.64.0.7").encode(), 1, 0.0, 0.0)
    assert plain.mismatches == 0 and [p.name for p in plain.peers(me)] == ["alpha"]


def test_hints_for_magicsock_are_the_peers_home_relays_and_disco_keys() -> None:
    view = MeshView(SETTINGS)
    a, b, me = key(), key(), key()
    alpha = record("alpha", a, "100.64.0.1")
    bravo = record("bravo", b, "100.64.0.2", addresses=(net("100.64.0.2"),), relay="", disco_key=b"")
    view.apply(node_key("alpha"), alpha.encode(), 1, 0.0, 0.0)
    view.apply(node_key("bravo"), bravo.encode(), 2, 0.0, 0.0)
    assert view.hints(view.peers(me)) == {b64(a): {"relay": "r1", "disco": b64(alpha.disco_key)}}
    assert view.hints([]) == {}  # only for the peers given

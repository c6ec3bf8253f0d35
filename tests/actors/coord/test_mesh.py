"""The coordination core: records checked, the mesh view's revisions, expiry and pauses, and
address allocation by compare-and-set (sans-IO)."""

from __future__ import annotations

import ipaddress
import json
import random
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


def test_a_record_that_runs_out_while_our_own_write_is_unheard_waits_for_it() -> None:
    """A server lost, the stream's new leader not yet elected: no one's write lands, ours neither.
    A record that ran out after our write went unheard may be a victim of the same, not dead."""
    view = MeshView(SETTINGS)
    view.apply(node_key("bravo"), record("bravo", key(), "100.64.0.2").encode(), 1, 0.0, 0.0)  # until 30
    view.apply(node_key("charlie"), record("charlie", key(), "100.64.0.3").encode(), 2, 0.0, 10.0)  # until 40
    assert view.expire(35.0, heard_until=32.0) == [node_key("bravo")]  # ran out before: dead
    assert view.expire(45.0, heard_until=32.0) == []
    assert view.expire(45.0) == [node_key("charlie")]  # our write heard back: charlie's did not come


def test_records_expire_unless_refreshed_and_not_while_the_bucket_is_away() -> None:
    view = MeshView(SETTINGS)
    b, c = key(), key()
    view.apply(node_key("bravo"), record("bravo", b, "100.64.0.2").encode(), 1, 10.0, 0.0)  # written 10 s ago
    view.apply(node_key("charlie"), record("charlie", c, "100.64.0.3").encode(), 2, 0.0, 0.0)
    assert view.expire(19.0) == []
    assert view.expire(20.0) == [node_key("bravo")]
    view.pause(25.0)
    assert view.expire(100.0) == []  # an outage tears nothing down
    view.resume(100.0)  # 75 s away: added to the record's life, and at least half a lifetime left
    assert view.expire(114.0) == []
    assert view.expire(115.0) == [node_key("charlie")]
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


def numbered(i: int, public: bytes, **kw: object) -> NodeRecord:
    """Record `i` of many, with addresses of its own."""
    v4, v6 = f"100.64.{i // 250}.{i % 250 + 1}", f"fd7a:115c:a1e0::1:{i:x}"
    return record(f"n{i}", public, v4, **{"addresses": (net(v4), net(v6)), **kw})


def test_a_change_of_one_record_among_many_is_a_one_peer_change() -> None:
    view, me = MeshView(SETTINGS), key()
    keys = [key() for _ in range(200)]
    for i, k in enumerate(keys):
        view.apply(node_key(f"n{i}"), numbered(i, k).encode(), i + 1, 0.0, 0.0)
    first = view.update(me)
    assert len(first.peers) == 200 and first.removed == [] and len(first.hints) == 200
    assert not view.update(me)  # nothing changed since
    moved = numbered(7, keys[7], endpoints=(("198.51.100.9", 4000),))
    view.apply(node_key("n7"), moved.encode(), 300, 0.0, 1.0)
    change = view.update(me)
    assert [(p.name, p.endpoints) for p in change.peers] == [("n7", (("198.51.100.9", 4000),))]
    assert change.removed == [] and list(change.hints) == [b64(keys[7])]
    view.apply(node_key("n7"), moved.encode(), 301, 0.0, 2.0)  # refreshed as it was
    assert not view.update(me)
    newcomer = key()
    view.apply(node_key("n500"), numbered(500, newcomer).encode(), 302, 0.0, 3.0)
    assert [p.name for p in view.update(me).peers] == ["n500"]
    view.apply(node_key("n3"), None, 303, 0.0, 4.0)
    change = view.update(me)
    assert change.peers == [] and change.removed == [keys[3]]
    assert len(view.peers(me)) == 200


def alone(name: str, public: bytes, v4: str) -> NodeRecord:
    return record(name, public, v4, addresses=(net(v4),))


def test_a_conflict_is_decided_again_when_the_first_holder_leaves() -> None:
    """bravo wants alpha's address and charlie's: left out while alpha is there; then charlie,
    a working peer, keeps its own. A key held twice: the record renamed later waits its turn."""
    view, me = MeshView(SETTINGS), key()
    a, b, c = key(), key(), key()
    view.apply(node_key("alpha"), alone("alpha", a, "100.64.0.1").encode(), 1, 0, 0)
    view.apply(node_key("charlie"), alone("charlie", c, "100.64.0.3").encode(), 2, 0, 0)
    both = (net("100.64.0.1"), net("100.64.0.3"))
    view.apply(node_key("bravo"), record("bravo", b, "100.64.0.1", addresses=both).encode(), 3, 0, 0)
    assert [p.name for p in view.update(me).peers] == ["alpha", "charlie"] and view.conflicts == 1
    view.apply(node_key("alpha"), None, 4, 0.0, 0.0)
    change = view.update(me)
    assert change.removed == [a] and change.peers == [] and view.conflicts == 1  # charlie keeps 100.64.0.3
    view.apply(node_key("charlie"), None, 5, 0.0, 0.0)
    change = view.update(me)
    assert change.removed == [c] and [p.name for p in change.peers] == ["bravo"] and view.conflicts == 0
    # bravo's key published again under another name: it waits until the first record goes
    view.apply(node_key("bravo2"), alone("bravo2", b, "100.64.0.9").encode(), 6, 0, 0)
    assert not view.update(me) and view.conflicts == 1
    view.apply(node_key("bravo"), None, 7, 0.0, 0.0)
    change = view.update(me)
    assert [p.name for p in change.peers] == ["bravo2"] and change.removed == [] and view.conflicts == 0


def test_an_expired_record_is_a_removed_peer() -> None:
    view, me, b = MeshView(SETTINGS), key(), key()
    view.apply(node_key("n1"), numbered(1, b).encode(), 1, 0.0, 0.0)
    assert len(view.update(me).peers) == 1
    assert view.expire(29.0) == [] and view.expire(30.0) == [node_key("n1")]
    assert view.update(me).removed == [b]


def test_deciding_where_records_changed_agrees_with_deciding_over_all() -> None:
    """Random records contending for a few keys and addresses, claims among them: after each
    entry, the peers decided where records changed are those a decision over every record makes
    (the same rule: working peers first, then agreed claims, then the first holder)."""
    rng = random.Random(7)
    me, keys = key(), [key() for _ in range(6)]
    addresses = [net(f"100.64.0.{i}") for i in range(1, 9)]
    view, working = MeshView(SETTINGS), set()
    for revision in range(1, 400):
        name = f"n{rng.randrange(12)}"
        if rng.random() < 0.15:
            view.apply(addr_key(rng.choice(addresses)), owner_text(rng.choice([*keys, me])), revision, 0.0, 0.0)
        elif rng.random() < 0.2:
            view.apply(node_key(name), None, revision, 0.0, 0.0)
        else:
            held = tuple(rng.sample(addresses, rng.choice([1, 1, 2])))
            r = record(name, rng.choice([*keys, me]), "100.64.0.1", addresses=held)
            view.apply(node_key(name), r.encode(), revision, 0.0, 0.0)
        view.update(me)
        got = {k: peer.public_key for k, (peer, _) in view.chosen.items()}
        assert got == everything_decided(view, me, working)
        working = set(got.values())


def everything_decided(view: MeshView, me: bytes, working: set[bytes]) -> dict[str, bytes]:
    """Record key -> public key of the peers one decision over every record makes."""

    def precedence(k: str) -> tuple[bool, bool, int, str]:
        live = view.records[k]
        r = live.record
        agreed = all(view.claims[a].owner == r.public_key for a in r.addresses if a in view.claims)
        return r.public_key not in working, not agreed, live.since, k

    taken_keys, taken_addrs, out = {me}, set(), {}
    for k in sorted(view.records, key=precedence):
        r = view.records[k].record
        if r.public_key not in taken_keys and not taken_addrs & set(r.addresses):
            taken_keys.add(r.public_key)
            taken_addrs.update(r.addresses)
            out[k] = r.public_key
    return out

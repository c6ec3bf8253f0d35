"""The mesh as the bucket says it is (sans-IO): entries in, with their revision and age; live
records and address claims out, turned into the peers the supervisor applies.

- Entries are taken in revision order, each once: one at or below the last revision seen is a
  replay (a watch resumed after a reconnect may repeat some) and changes nothing.
- A record lives `lifetime` seconds from when it was written (its age when read counts) unless
  its node writes it again; a deleted key ends it at once.
- A record that fails its checks leaves the key's last good record in place: bad input never
  removes a working peer. It is counted by reason, with the key, for the actor to log.
- While the bucket cannot be reached nothing expires: the mesh runs on its last known state,
  and the time away is added to every record's life when the watch is back.
- Address claims (`addr.` keys, alloc.py) are a cross-check, not a gate: a record holding an
  address whose claim names another key is counted and noted with the record's key. Claims are
  first-come but anyone may write one, so a mismatch alone never leaves a record out (a forged
  claim would then remove a working peer, or bar a node whose addresses are configured, which
  claims none). It decides only a real contest: when two live records hold one address, the
  one the claim names gets it, unless the other is a peer already (working peers stay).
- The peers are decided again only where records changed (`update`): records contend only with
  those sharing a public key or an address with them, so a change is decided within its group
  (the records linked to it through shared keys and addresses, its old ones included), in the
  same order as a decision over all; a one-record change yields a one-peer change.
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from dataclasses import dataclass, field
from math import inf
from typing import Any

from meshsup.actors.coord.record import (
    ADDR_PREFIX,
    NODE_PREFIX,
    POLICY_KEY,
    NodeRecord,
    RecordError,
    address_of_key,
    decode,
    decode_policy,
)
from meshsup.actors.settings.coordination import CoordinationSettings
from meshsup.actors.settings.keys import b64, parse_key
from meshsup.actors.settings.node import IPNetwork, PeerSettings

DEFAULT_ROUTES = (ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0"))


@dataclass(slots=True)
class Live:
    record: NodeRecord
    since: int  # the revision this key first held this public key: the older holder wins a conflict
    expires: float  # monotonic


@dataclass(slots=True)
class Claim:
    owner: bytes  # the public key holding the address
    revision: int
    settled: float  # monotonic: from then on, with no live record of its owner, it may be taken over


@dataclass
class Change:
    """How the peers changed since the last `update`: peers added or changed (or only their hint),
    the public keys of those gone, and the hints of the changed ones that have any."""

    peers: list[PeerSettings] = field(default_factory=list)
    removed: list[bytes] = field(default_factory=list)
    hints: dict[str, dict[str, str]] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.peers or self.removed)


@dataclass
class MeshView:
    settings: CoordinationSettings
    records: dict[str, Live] = field(default_factory=dict)  # by key; changed only through _put and _drop
    claims: dict[IPNetwork, Claim] = field(default_factory=dict)
    revision: int = 0  # the last revision taken: a resumed watch starts after it
    paused_at: float | None = None
    dropped: Counter[str] = field(default_factory=Counter)
    applied: int = 0
    policy: dict[str, Any] = field(default_factory=dict)  # {}: none; a bad one leaves the last good
    mismatches: int = 0  # records seen holding an address whose claim names another key
    notes: list[tuple[str, str]] = field(default_factory=list)  # (record's key, what): for the actor to log
    # What the peers are decided from, kept as records come and go: the records holding each
    # public key and address, the records decided again at the next update (all, when None), and
    # the outcome: the peers by record key, with their hints, and the records left out.
    # (Tuples: one holder is the rule, and a tuple of one is a fifth of a set's size.)
    by_key: dict[bytes, tuple[str, ...]] = field(default_factory=dict)
    by_addr: dict[IPNetwork, tuple[str, ...]] = field(default_factory=dict)
    touched: set[str] | None = None
    chosen: dict[str, tuple[PeerSettings, dict[str, str]]] = field(default_factory=dict)
    left_out: set[str] = field(default_factory=set)
    decided_for: tuple[bytes, str] | None = None  # the own key and exit node the peers were decided for
    next_expiry: float = inf  # no record expires before then
    names: list[str] | None = None  # the records' names, sorted, for status (every heartbeat); None: stale

    @property
    def conflicts(self) -> int:
        """Live records left out: a key or address held first by another."""
        return len(self.left_out)

    def apply(self, key: str, value: bytes | None, revision: int, age: float, now: float) -> str | None:
        """One entry (value None: deleted or purged), `age` seconds old when read. The reason it
        was refused, if it was (counted), else None."""
        if revision <= self.revision:
            self.dropped["replayed"] += 1
            return "replayed"
        self.revision = revision
        if key.startswith(NODE_PREFIX):
            return self._record(key, value, revision, max(0.0, age), now)
        if key.startswith(ADDR_PREFIX):
            return self._claim(key, value, revision, now + self.settings.lifetime - max(0.0, age))
        if key == POLICY_KEY:
            return self._policy(value)
        return None  # keys of later versions

    def _policy(self, value: bytes | None) -> str | None:
        try:
            self.policy = decode_policy(value) if value is not None else {}
        except RecordError as err:
            self.dropped[err.reason] += 1
            return str(err)
        return None

    def _record(self, key: str, value: bytes | None, revision: int, age: float, now: float) -> str | None:
        if value is None:
            self._drop(key)
            self.applied += 1
            return None
        try:
            record = decode(key, value, self.settings)
        except RecordError as err:
            self.dropped[err.reason] += 1
            return str(err)
        life = self.settings.lifetime - age
        if life <= 0:
            self._drop(key)  # written by a node that stopped refreshing it long ago
            return None
        known = self.records.get(key)
        since = known.since if known is not None and known.record.public_key == record.public_key else revision
        if known is not None and known.record == record:
            known.expires = now + life  # refreshed as it was: nothing to decide again
            self.next_expiry = min(self.next_expiry, known.expires)
        else:
            self._put(key, Live(record, since, now + life))
        self.applied += 1
        if known is None or known.record.addresses != record.addresses or known.record.public_key != record.public_key:
            for address in record.addresses:
                self._cross_check(key, record, address)
        return None

    def _put(self, key: str, live: Live) -> None:
        self._drop(key)
        self.names = None
        self.records[key] = live
        self.by_key[live.record.public_key] = (*self.by_key.get(live.record.public_key, ()), key)
        for address in live.record.addresses:
            self.by_addr[address] = (*self.by_addr.get(address, ()), key)
        self.next_expiry = min(self.next_expiry, live.expires)
        self._touch(key)

    def _drop(self, key: str) -> None:
        """`key`'s record gone; those it contended with are decided again (it may have held them off)."""
        live = self.records.pop(key, None)
        if live is None:
            return
        self.names = None
        self._touch(key)
        self._unhold(self.by_key, live.record.public_key, key)
        for address in live.record.addresses:
            self._unhold(self.by_addr, address, key)

    def _unhold(self, holders: dict[Any, tuple[str, ...]], index: Any, key: str) -> None:
        held = tuple(k for k in holders[index] if k != key)
        if self.touched is not None:
            self.touched.update(held)
        if held:
            holders[index] = held
        else:
            del holders[index]

    def _touch(self, key: str) -> None:
        if self.touched is not None:
            self.touched.add(key)

    def _cross_check(self, key: str, record: NodeRecord, address: IPNetwork) -> None:
        """A claim of `address` naming another key than `record`'s: counted and noted."""
        claim = self.claims.get(address)
        if claim is not None and claim.owner != record.public_key:
            self.mismatches += 1
            self.notes.append((key, f"{address} is claimed by {b64(claim.owner)}"))

    def _claim(self, key: str, value: bytes | None, revision: int, settled: float) -> str | None:
        address = address_of_key(key)
        if address is None:
            self.dropped["bad_claim"] += 1
            return "bad_claim"
        net = ipaddress.ip_network(address)
        holders = self.by_addr.get(net, ())
        if value is None:
            if self.claims.pop(net, None) is not None and self.touched is not None:
                self.touched.update(holders)  # the claim ranked its holders
            return None
        try:
            owner = parse_key(value.decode())
        except (ValueError, UnicodeDecodeError):
            self.dropped["bad_claim"] += 1
            return "bad_claim"
        known = self.claims.get(net)
        self.claims[net] = Claim(owner, revision, settled)
        if known is None or known.owner != owner:
            if self.touched is not None:
                self.touched.update(holders)
            for k in holders:
                self._cross_check(k, self.records[k].record, net)
        return None

    def expire(self, now: float, heard_until: float = inf) -> list[str]:
        """The keys whose records ran out, removed; none while the bucket is away. `heard_until`:
        since then a write of our own has not come back, so the bucket may hear no one's (a server
        lost, a stream without a leader yet): a record that ran out after it is kept until it does
        (or, if that takes long, until the bucket is back: `pause`)."""
        until = min(now, heard_until)
        if self.paused_at is not None or until < self.next_expiry:
            return []
        gone = [k for k, live in self.records.items() if live.expires <= until]
        for k in gone:
            self._drop(k)
        self.next_expiry = min((live.expires for live in self.records.values()), default=inf)
        return gone

    def pause(self, now: float) -> None:
        if self.paused_at is None:
            self.paused_at = now

    def resume(self, now: float) -> None:
        """The bucket back: the time away added to each record's life, and each given at least
        half a lifetime from now, for its node to reconnect too and write it again (every third
        of one): an outage must not make peers whose records were about to be refreshed expire."""
        if self.paused_at is None:
            return
        away, self.paused_at = now - self.paused_at, None
        floor = now + self.settings.lifetime / 2
        for live in self.records.values():
            live.expires = max(live.expires + away, floor)
        self.next_expiry = min((live.expires for live in self.records.values()), default=inf)

    def abandoned(self, claim: Claim, now: float) -> bool:
        """A claim whose owner has had a lifetime to publish its record, and has none live."""
        return claim.settled <= now and claim.owner not in self.by_key

    def update(self, own_key: bytes, exit_node: str = "") -> Change:
        """Decide the peers again where records changed since the last update (all of them the
        first time, or for another own key or exit node): the live records but the node's own, as
        peers. Of records holding one key or address, a working peer keeps it, else the one its
        claims agree with, else the one that held it first (the others are left out, counted)."""
        if self.touched is None or self.decided_for != (own_key, exit_node):
            group = set(self.records) | set(self.chosen) | self.left_out
        else:
            group = self._linked(self.touched)
        self.touched, self.decided_for = set(), (own_key, exit_node)
        before = {self.chosen[k][0].public_key: self.chosen.pop(k) for k in group if k in self.chosen}
        working = set(before)
        self.left_out -= group

        def precedence(k: str) -> tuple[bool, bool, int, str]:
            live = self.records[k]
            r = live.record
            agreed = all(self.claims[a].owner == r.public_key for a in r.addresses if a in self.claims)
            return r.public_key not in working, not agreed, live.since, k

        taken_keys, taken_addrs = {own_key}, set()
        after: dict[bytes, tuple[PeerSettings, dict[str, str]]] = {}
        for k in sorted((k for k in group if k in self.records), key=precedence):
            r = self.records[k].record
            if r.public_key in taken_keys or taken_addrs.intersection(r.addresses):
                if r.public_key != own_key:
                    self.left_out.add(k)
                continue
            taken_keys.add(r.public_key)
            taken_addrs.update(r.addresses)
            self.chosen[k] = after[r.public_key] = (self._peer(r, exit_node), self._hint(r))
        change = Change(removed=[key for key in before if key not in after])
        for key, (peer, hint) in after.items():
            if before.get(key) != (peer, hint):
                change.peers.append(peer)
                if hint:
                    change.hints[b64(key)] = hint
        return change

    def _linked(self, keys: set[str]) -> set[str]:
        """`keys` and every record linked to them through shared public keys and addresses."""
        group, frontier = set(keys), list(keys)
        while frontier:
            live = self.records.get(frontier.pop())
            if live is None:
                continue
            r = live.record
            for held in (self.by_key[r.public_key], *(self.by_addr[a] for a in r.addresses)):
                fresh = [k for k in held if k not in group]
                group.update(fresh)
                frontier += fresh
        return group

    def _peer(self, r: NodeRecord, exit_node: str) -> PeerSettings:
        allowed = list(r.addresses)
        if self.settings.accept_routes:
            allowed += [n for n in r.routes if n.prefixlen > 0]
        if r.exit and exit_node == r.name:
            allowed += DEFAULT_ROUTES
        return PeerSettings(r.name, r.public_key, None, tuple(allowed), r.endpoints, 0)

    @staticmethod
    def _hint(r: NodeRecord) -> dict[str, str]:
        """What a peer's record says for magicsock: the home relay, a first hint where to reach a
        peer not heard from yet; the disco key, to cross-check TSMP's. {}: nothing."""
        return {"relay": r.relay, "disco": b64(r.disco_key) if r.disco_key else ""} if r.relay or r.disco_key else {}

    def peers(self, own_key: bytes, exit_node: str = "") -> list[PeerSettings]:
        """Every peer, by name, once decided again where needed (update)."""
        self.update(own_key, exit_node)
        return sorted((peer for peer, _ in self.chosen.values()), key=lambda p: p.name)

    def hints(self, peers: list[PeerSettings] | None = None) -> dict[str, dict[str, str]]:
        """The hints of `peers` (all the peers' when None) that have any, by public key (base64)."""
        keys = None if peers is None else {p.public_key for p in peers}
        return {
            b64(peer.public_key): hint
            for peer, hint in self.chosen.values()
            if hint and (keys is None or peer.public_key in keys)
        }

    def status(self) -> dict[str, object]:
        if self.names is None:
            self.names = sorted(k[len(NODE_PREFIX) :] for k in self.records)
        return {
            "revision": self.revision,
            "records": self.names,
            "claims": len(self.claims),
            "applied": self.applied,
            "dropped": dict(self.dropped),
            "conflicts": self.conflicts,
            "claim_mismatches": self.mismatches,
            "paused": self.paused_at is not None,
        }


def owner_text(public_key: bytes) -> bytes:
    """What an `addr.` key holds: the owner's public key."""
    return b64(public_key).encode()

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
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from dataclasses import dataclass, field
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


@dataclass
class Live:
    record: NodeRecord
    since: int  # the revision this key first held this public key: the older holder wins a conflict
    expires: float  # monotonic


@dataclass
class Claim:
    owner: bytes  # the public key holding the address
    revision: int
    settled: float  # monotonic: from then on, with no live record of its owner, it may be taken over


@dataclass
class MeshView:
    settings: CoordinationSettings
    records: dict[str, Live] = field(default_factory=dict)  # by key
    claims: dict[IPNetwork, Claim] = field(default_factory=dict)
    revision: int = 0  # the last revision taken: a resumed watch starts after it
    paused_at: float | None = None
    dropped: Counter[str] = field(default_factory=Counter)
    applied: int = 0
    policy: dict[str, Any] = field(default_factory=dict)  # {}: none; a bad one leaves the last good
    conflicts: int = 0  # live records left out by the last peers(): a key or address held first by another
    mismatches: int = 0  # records seen holding an address whose claim names another key
    notes: list[tuple[str, str]] = field(default_factory=list)  # (record's key, what): for the actor to log
    working: frozenset[bytes] = frozenset()  # the public keys the last peers() gave

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
            self.records.pop(key, None)
            self.applied += 1
            return None
        try:
            record = decode(key, value, self.settings)
        except RecordError as err:
            self.dropped[err.reason] += 1
            return str(err)
        life = self.settings.lifetime - age
        if life <= 0:
            self.records.pop(key, None)  # written by a node that stopped refreshing it long ago
            return None
        known = self.records.get(key)
        since = known.since if known is not None and known.record.public_key == record.public_key else revision
        self.records[key] = Live(record, since, now + life)
        self.applied += 1
        if known is None or known.record.addresses != record.addresses or known.record.public_key != record.public_key:
            for address in record.addresses:
                self._cross_check(key, record, address)
        return None

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
        if value is None:
            self.claims.pop(net, None)
            return None
        try:
            owner = parse_key(value.decode())
        except (ValueError, UnicodeDecodeError):
            self.dropped["bad_claim"] += 1
            return "bad_claim"
        known = self.claims.get(net)
        self.claims[net] = Claim(owner, revision, settled)
        if known is None or known.owner != owner:
            for k, live in self.records.items():
                if net in live.record.addresses:
                    self._cross_check(k, live.record, net)
        return None

    def expire(self, now: float) -> list[str]:
        """The keys whose records ran out, removed; none while the bucket is away."""
        if self.paused_at is not None:
            return []
        gone = [k for k, live in self.records.items() if live.expires <= now]
        for k in gone:
            del self.records[k]
        return gone

    def pause(self, now: float) -> None:
        if self.paused_at is None:
            self.paused_at = now

    def resume(self, now: float) -> None:
        if self.paused_at is None:
            return
        away, self.paused_at = now - self.paused_at, None
        for live in self.records.values():
            live.expires += away

    def abandoned(self, claim: Claim, now: float) -> bool:
        """A claim whose owner has had a lifetime to publish its record, and has none live."""
        return claim.settled <= now and not any(live.record.public_key == claim.owner for live in self.records.values())

    def peers(self, own_key: bytes, exit_node: str = "") -> list[PeerSettings]:
        """The live records but the node's own, as peers, by name: of records holding one key or
        address, a working peer keeps it, else the one its claims agree with, else the one that held it
        first (the others are counted as conflicts and left out)."""
        taken_keys, taken_addrs = {own_key}, set()
        out, self.conflicts = [], 0

        def precedence(live: Live) -> tuple[bool, bool, int]:
            r = live.record
            agreed = all(self.claims[a].owner == r.public_key for a in r.addresses if a in self.claims)
            return r.public_key not in self.working, not agreed, live.since

        for live in sorted(self.records.values(), key=precedence):
            r = live.record
            if r.public_key in taken_keys or taken_addrs & set(r.addresses):
                self.conflicts += r.public_key != own_key
                continue
            taken_keys.add(r.public_key)
            taken_addrs.update(r.addresses)
            allowed = list(r.addresses)
            if self.settings.accept_routes:
                allowed += [n for n in r.routes if n.prefixlen > 0]
            if r.exit and exit_node == r.name:
                allowed += DEFAULT_ROUTES
            out.append(PeerSettings(r.name, r.public_key, None, tuple(allowed), r.endpoints, 0))
        self.working = frozenset(p.public_key for p in out)
        return sorted(out, key=lambda p: p.name)

    def hints(self, peers: list[PeerSettings]) -> dict[str, dict[str, str]]:
        """What `peers`' records say for magicsock, by public key (base64): the home relay, a first
        hint where to reach a peer not heard from yet; the disco key, to cross-check TSMP's."""
        keys = {p.public_key for p in peers}
        return {
            b64(r.public_key): {"relay": r.relay, "disco": b64(r.disco_key) if r.disco_key else ""}
            for r in (live.record for live in self.records.values())
            if r.public_key in keys and (r.relay or r.disco_key)
        }

    def status(self) -> dict[str, object]:
        return {
            "revision": self.revision,
            "records": sorted(k[len(NODE_PREFIX) :] for k in self.records),
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

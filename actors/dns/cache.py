"""The response cache: bounded LRU, TTL clamps, negative caching, serve-stale.

- Keyed by name (case-insensitive), type, class, DO bit and view (the
  upstream set chosen by the client's source, "" for everyone).
- Positive answers live for the smallest answer TTL; negative answers
  (NXDOMAIN and NODATA) for min(SOA TTL, SOA MINIMUM) (RFC 2308 section 5);
  a negative answer without SOA is not cached. Both are clamped to
  [min_ttl, max_ttl]. SERVFAIL, REFUSED and the like are not cached.
- TTLs served count down from when the answer was stored.
- Serve-stale (RFC 8767): for stale_ttl seconds past expiry an entry may
  still be served, when every upstream failed, with a TTL of 30 seconds.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import dns.name
import dns.rcode
import dns.rdatatype
import dns.rrset

from actors.dns.message import Answer

# RFC 8767 section 4: the TTL on a stale answer.
STALE_ANSWER_TTL = 30

TtlOf = Callable[[dns.rrset.RRset], int]


@dataclass(frozen=True)
class CacheKey:
    name: dns.name.Name  # dnspython compares and hashes names case-insensitively
    qtype: int
    qclass: int
    do: bool
    view: str = ""


@dataclass
class _Entry:
    answer: Answer  # RRset TTLs are the clamped TTLs at stored_at
    stored_at: float
    ttl: int

    def expires_at(self) -> float:
        return self.stored_at + self.ttl


@dataclass
class CacheCounters:
    hits: int = 0
    misses: int = 0
    stale_hits: int = 0
    stores: int = 0
    not_cacheable: int = 0
    evictions: int = 0
    expired: int = 0
    flushes: int = 0

    def as_dict(self) -> dict[str, int]:
        return {f"cache_{k}": v for k, v in self.__dict__.items()}


def _with_ttl(rrsets: tuple[dns.rrset.RRset, ...], ttl_of: TtlOf) -> tuple[dns.rrset.RRset, ...]:
    out = []
    for rrset in rrsets:
        copy = rrset.copy()
        copy.ttl = ttl_of(rrset)
        out.append(copy)
    return tuple(out)


def _negative_ttl(answer: Answer) -> int | None:
    for rrset in answer.authority:
        if rrset.rdtype == dns.rdatatype.SOA and len(rrset):
            return min(rrset.ttl, rrset[0].minimum)
    return None


@dataclass
class DnsCache:
    size: int
    min_ttl: int = 0
    max_ttl: int = 86400
    stale_ttl: int = 0  # 0: serve-stale off
    counters: CacheCounters = field(default_factory=CacheCounters)
    _entries: OrderedDict[CacheKey, _Entry] = field(default_factory=OrderedDict)

    def __len__(self) -> int:
        return len(self._entries)

    def _clamp(self, ttl: int) -> int:
        return max(self.min_ttl, min(self.max_ttl, ttl))

    def put(self, key: CacheKey, answer: Answer, now: float) -> Answer | None:
        """Store answer; returns it as stored (TTLs clamped), or None if not cacheable."""
        ttl = self._lifetime(answer)
        if ttl is None or ttl <= 0 or self.size <= 0:
            self.counters.not_cacheable += 1
            return None
        negative = not answer.answer or answer.rcode == dns.rcode.NXDOMAIN
        # The SOA of a negative answer carries the negative TTL (RFC 2308 section 3).
        stored = self._retimed(
            answer, lambda r: ttl if negative and r.rdtype == dns.rdatatype.SOA else self._clamp(r.ttl)
        )
        self._entries[key] = _Entry(stored, now, ttl)
        self._entries.move_to_end(key)
        self.counters.stores += 1
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)
            self.counters.evictions += 1
        return stored

    def _lifetime(self, answer: Answer) -> int | None:
        if answer.rcode not in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
            return None
        ttls = [r.ttl for r in answer.answer]
        if answer.rcode == dns.rcode.NXDOMAIN or not ttls:
            negative = _negative_ttl(answer)
            if negative is None:
                return None
            ttls.append(negative)
        return self._clamp(min(ttls))

    def get(self, key: CacheKey, now: float) -> Answer | None:
        """A fresh answer with TTLs counted down, or None."""
        entry = self._lookup(key, now)
        if entry is None or now >= entry.expires_at():
            self.counters.misses += 1
            return None
        self.counters.hits += 1
        elapsed = max(0.0, now - entry.stored_at)
        return self._retimed(entry.answer, lambda r: max(0, int(r.ttl - elapsed)))

    def get_stale(self, key: CacheKey, now: float) -> Answer | None:
        """An expired answer still inside the stale window, or None."""
        entry = self._lookup(key, now)
        if entry is None:
            return None
        self.counters.stale_hits += 1
        return self._retimed(entry.answer, lambda r: STALE_ANSWER_TTL)

    def _lookup(self, key: CacheKey, now: float) -> _Entry | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if now >= entry.expires_at() + self.stale_ttl:
            del self._entries[key]
            self.counters.expired += 1
            return None
        self._entries.move_to_end(key)
        return entry

    @staticmethod
    def _retimed(answer: Answer, ttl_of: TtlOf) -> Answer:
        return replace(
            answer,
            answer=_with_ttl(answer.answer, ttl_of),
            authority=_with_ttl(answer.authority, ttl_of),
            additional=_with_ttl(answer.additional, ttl_of),
        )

    def flush(self) -> None:
        self._entries.clear()
        self.counters.flushes += 1

"""The response cache: bounded, TTL clamps, negative caching, serve-stale.

- Bounded, the CLOCK approximation of least recently used out first: a hit
  only marks its entry used (no reordering per hit, on the fast path or
  not), and the oldest entry, if used since it was last looked at, gets a
  second chance at the young end instead of going. The order is a deque of
  keys beside a plain dict: an OrderedDict would cost an entry 80 bytes more.
- Keyed by name (case-insensitive: its lowercase wire form), type, class,
  DO bit and view (the upstream set chosen by the client's source, "" for
  everyone).
- Positive answers live for the smallest answer TTL; negative answers
  (NXDOMAIN and NODATA) for min(SOA TTL, SOA MINIMUM) (RFC 2308 section 5);
  a negative answer without SOA is not cached. Both are clamped to
  [min_ttl, max_ttl]. SERVFAIL, REFUSED and the like are not cached.
- TTLs served count down from when the answer was stored.
- Serve-stale (RFC 8767): for stale_ttl seconds past expiry an entry may
  still be served, when every upstream failed, with a TTL of 30 seconds.

Answers are upstream answers as bytes (wire.WireAnswer).
"""

from __future__ import annotations

import struct
from collections import deque
from dataclasses import dataclass, field

import dns.rcode

from meshsup.actors.dns.wire import AD, HEADER, QR, SOA, TYPE_CLASS, WireAnswer, parse_answer

_NOERROR, _NXDOMAIN = int(dns.rcode.NOERROR), int(dns.rcode.NXDOMAIN)  # plain ints: compared per answer
# Keys the order may hold beyond twice the entries before it is made again.
ORDER_SLACK = 1024
# RFC 8767 section 4: the TTL on a stale answer.
STALE_ANSWER_TTL = 30


# What an answer is kept under (and a forward merged by): the question, the DO
# bit and the view, in one bytes object, as cache_key() makes it.
CacheKey = bytes
_KEY = struct.Struct("!HHBB")  # qtype, qclass, DO, the name's length; then the name and the view


def cache_key(name: bytes, qtype: int, qclass: int, do: bool, view: str = "") -> CacheKey:
    """name: the question's name in lowercase wire form. Bytes rather than a
    tuple: an entry a full cache holds by the hundred thousand costs less."""
    return _KEY.pack(qtype, qclass, do, len(name)) + name + view.encode()


def key_question(key: CacheKey) -> tuple[bytes, int, int]:
    """The name (lowercase wire form), type and class a key was made of."""
    qtype, qclass, _, length = _KEY.unpack_from(key)
    return key[_KEY.size : _KEY.size + length], qtype, qclass


class CacheEntry:
    """An answer kept, once asked for again: the cache keeps one not asked for
    since as bytes (most names are asked once, and bytes take a fraction of
    the memory), and reads them again when it is first served."""

    __slots__ = ("key", "answer", "stored_at", "ttl", "used")

    def __init__(self, key: CacheKey, answer: WireAnswer, stored_at: float, ttl: int) -> None:
        self.key = key
        self.answer = answer  # TTLs are the clamped TTLs at stored_at
        self.stored_at = stored_at
        self.ttl = ttl
        self.used = False  # looked up (or answered on the fast path) since eviction last passed it over

    def expires_at(self) -> float:
        return self.stored_at + self.ttl

    def answer_at(self, now: float) -> WireAnswer:
        """The answer with its TTLs counted down to now."""
        elapsed = max(0.0, now - self.stored_at)
        return self.answer.retimed(lambda ttl, _: max(0, int(ttl - elapsed)))


# An entry kept as bytes: when it was stored, its lifetime, the answer's flags
# (rcode and AD) and counts; then its records, as the upstream wrote them.
_STAMP = struct.Struct("!dIHHHH")


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


@dataclass
class DnsCache:
    size: int
    min_ttl: int = 0
    max_ttl: int = 86400
    stale_ttl: int = 0  # 0: serve-stale off
    counters: CacheCounters = field(default_factory=CacheCounters)
    # An entry not asked for since it was stored: bytes (_STAMP, then the records).
    _entries: dict[CacheKey, CacheEntry | bytes] = field(default_factory=dict)
    # Keys from the oldest stored (or given a second chance) to the youngest; also
    # keys since dropped or stored again, passed over when they come up.
    _order: deque[CacheKey] = field(default_factory=deque)

    def __len__(self) -> int:
        return len(self._entries)

    def table(self) -> dict[CacheKey, CacheEntry | bytes]:
        """The entries by key, the same dict for the cache's life: a key in it is the cache's to
        answer (or to find stale), which the native forwarder (forwarder.c) looks up before it forwards."""
        return self._entries

    def _clamp(self, ttl: int) -> int:
        return max(self.min_ttl, min(self.max_ttl, ttl))

    def put(self, key: CacheKey, answer: WireAnswer, now: float) -> WireAnswer | None:
        """Store answer; returns it as stored (TTLs clamped), or None if not cacheable."""
        rcode, answers, ttls = answer.rcode, answer.counts[0], answer.ttls
        # min() and max() parse keyword arguments on every call: a lone record (the
        # usual answer) is read without them.
        low, high = (ttls[0], ttls[0]) if len(ttls) == 1 else (min(ttls, default=0), max(ttls, default=0))
        # Its lifetime: positive answers live for their lowest answer TTL,
        # negative ones (NXDOMAIN, NODATA) as their SOA says; nothing else is kept.
        if rcode == _NOERROR and answers:
            negative, lowest = False, low if answers == len(ttls) else min(ttls[:answers])
        elif (rcode == _NOERROR or rcode == _NXDOMAIN) and answer.negative_ttl is not None:
            negative, lowest = True, min((answer.negative_ttl, *ttls[:answers]))
        else:
            self.counters.not_cacheable += 1
            return None
        min_ttl, max_ttl = self.min_ttl, self.max_ttl
        ttl = lowest if min_ttl <= lowest <= max_ttl else self._clamp(lowest)
        if ttl <= 0 or self.size <= 0:
            self.counters.not_cacheable += 1
            return None
        stored: CacheEntry | bytes
        if not negative and min_ttl <= low and high <= max_ttl:
            # The usual case: nothing to clamp, so the upstream's records can be kept as they are.
            flags = rcode | (AD if answer.authenticated else 0)
            stored, kept = _STAMP.pack(now, ttl, flags, *answer.counts) + answer.records, answer
        else:
            # The SOA of a negative answer carries the negative TTL (RFC 2308 section 3).
            kept = answer.retimed(
                lambda was, rtype: ttl if negative and rtype == SOA else self._clamp(was), keep_addresses=False
            )
            stored = CacheEntry(key, kept, now, ttl)
        entries, order = self._entries, self._order
        entries[key] = stored
        order.append(key)
        self.counters.stores += 1
        while len(entries) > self.size:
            oldest = order.popleft()
            entry = entries.get(oldest)
            if entry is None:
                continue  # dropped since
            if isinstance(entry, CacheEntry) and entry.used:
                entry.used = False
                order.append(oldest)
            else:
                del entries[oldest]
                self.counters.evictions += 1
        if len(order) > 2 * len(entries) + ORDER_SLACK:
            # Mostly keys dropped since (expired, stored again): start again from the dict's order.
            self._order = deque(entries)
        return kept

    def get(self, key: CacheKey, now: float) -> WireAnswer | None:
        """A fresh answer with TTLs counted down, or None."""
        entry = self.fresh(key, now)
        return entry.answer_at(now) if entry is not None else None

    def fresh(self, key: CacheKey, now: float) -> CacheEntry | None:
        """The entry for key if it has not expired, or None."""
        entry = self._lookup(key, now)
        if entry is None or now >= entry.stored_at + entry.ttl:
            self.counters.misses += 1
            return None
        self.counters.hits += 1
        return entry

    def get_stale(self, key: CacheKey, now: float) -> WireAnswer | None:
        """An expired answer still inside the stale window, or None."""
        entry = self._lookup(key, now)
        if entry is None:
            return None
        self.counters.stale_hits += 1
        return entry.answer.retimed(lambda ttl, rtype: STALE_ANSWER_TTL)

    def _lookup(self, key: CacheKey, now: float) -> CacheEntry | None:
        entries = self._entries
        entry = entries.get(key)
        if entry is None:
            return None
        stored_at, ttl = _STAMP.unpack_from(entry)[:2] if isinstance(entry, bytes) else (entry.stored_at, entry.ttl)
        if now >= stored_at + ttl + self.stale_ttl:
            del entries[key]
            self.counters.expired += 1
            return None
        if isinstance(entry, bytes):
            entry = entries[key] = CacheEntry(key, _read(key, entry), stored_at, ttl)
        entry.used = True
        return entry

    def flush(self) -> None:
        self._entries.clear()
        self._order.clear()
        self.counters.flushes += 1


def _read(key: CacheKey, kept: bytes) -> WireAnswer:
    """The answer an entry kept as bytes holds: its message made again (the
    question as long as it was, so the records' compression pointers still
    point where they did) and read as when it came in, which it passed."""
    _, _, flags, an, ns, ar = _STAMP.unpack_from(kept)
    name, qtype, qclass = key_question(key)
    message = HEADER.pack(0, QR | flags, 1, an, ns, ar) + name + TYPE_CLASS.pack(qtype, qclass) + kept[_STAMP.size :]
    answer = parse_answer(message, name, qtype, qclass, learn=False)
    assert isinstance(answer, WireAnswer), answer
    return answer

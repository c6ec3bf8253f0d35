"""Answers straight from wire bytes, for questions asked before.

Stub resolvers ask the same questions again and again, byte for byte but for
the ID (and for an EDNS cookie, which changes every time: wire.query_key).
A query whose bytes after the ID equal a query answered before gets that
answer again without being parsed: the prepared reply is copied, the ID
patched in, the TTLs counted down and, for the mesh's own names, several
addresses shuffled. Being identical, the query would have passed the same
hygiene checks and got the same reply (the same size limit, flags, EDNS),
so the full path stays the one place that decides what a reply says.

Only replies that depend on nothing but the question are prepared: local
names, rule rejections (static until the settings change) and cache hits
(until their TTL runs out; from the second time a question is asked, so a
name asked once costs no entry). A table per transport, as the size limit differs
between UDP and TCP; bounded, oldest entry out first.
"""

from __future__ import annotations

import itertools
import math
import random
import struct
from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import Any

from meshsup.actors.dns import wire

STATIC = float("inf")
_ADDRESS_TYPES = (wire.A, wire.AAAA)


@dataclass(frozen=True, slots=True)
class Layout:
    """Where the TTLs of a reply are, and which runs of address records may be shuffled."""

    ttls: tuple[tuple[int, int], ...]  # (offset, TTL as written)
    runs: tuple[tuple[int, int, int], ...]  # (offset, records, record size) in the answer section


def layout(reply: bytes) -> Layout:
    """Read a reply's record layout; WireError if it is not well formed."""
    try:
        qdcount, an, ns, ar = struct.unpack_from("!HHHH", reply, 4)
        offset = wire.HEADER_LEN
        for _ in range(qdcount):
            offset = wire.read_name(reply, offset) + wire.TYPE_CLASS.size
        ttls: list[tuple[int, int]] = []
        runs: list[tuple[int, int, int]] = []
        run: list[tuple[int, int]] = []  # (offset, size) of the records of the current run
        run_key: tuple[bytes, int] | None = None  # its owner and type

        def close_run() -> None:
            if len(run) > 1 and len({size for _, size in run}) == 1:
                runs.append((run[0][0], len(run), run[0][1]))
            run.clear()

        for index in range(an + ns + ar):
            start = offset
            fixed = wire.read_name(reply, offset)
            rtype, _, ttl, rdlength = wire.RR_FIXED.unpack_from(reply, fixed)
            offset = fixed + wire.RR_FIXED.size + rdlength
            if offset > len(reply):
                raise wire.WireError("record runs past the end")
            if rtype != wire.OPT:  # the OPT's TTL field holds EDNS flags, not a TTL
                ttls.append((fixed + 4, ttl))
            key = (reply[start:fixed], rtype) if index < an and rtype in _ADDRESS_TYPES else None
            if key is None or key != run_key:
                close_run()
            run_key = key
            if key is not None:
                run.append((start, offset - start))
        close_run()
        if offset != len(reply):
            raise wire.WireError("trailing bytes")
    except (IndexError, struct.error) as exc:
        raise wire.WireError(str(exc)) from None
    return Layout(tuple(ttls), tuple(runs))


SHUFFLE_VARIANTS = 24  # orders kept of a run of addresses: every order of up to 4


def _orders(count: int, rng: random.Random) -> list[tuple[int, ...]]:
    if math.factorial(count) <= SHUFFLE_VARIANTS:
        return list(itertools.permutations(range(count)))
    return [tuple(rng.sample(range(count), count)) for _ in range(SHUFFLE_VARIANTS)]


def _shuffled(reply: bytes, runs: tuple[tuple[int, int, int], ...], rng: random.Random) -> tuple[bytes, ...]:
    """The reply (without its ID) in several orders of each run of address records."""
    if not runs:
        return (reply[2:],)
    orders = [_orders(count, rng) for _, count, _ in runs]
    variants = max(len(o) for o in orders)
    bodies = []
    for variant in range(variants):
        out = bytearray(reply)
        for (offset, count, size), run_orders in zip(runs, orders):
            order = run_orders[variant] if len(run_orders) == variants else rng.choice(run_orders)
            records = [reply[offset + i * size : offset + (i + 1) * size] for i in order]
            out[offset : offset + count * size] = b"".join(records)
        bodies.append(bytes(out[2:]))
    return tuple(bodies)


class Prepared:
    """A reply ready for any query with the same question: static (local names,
    in several orders of their addresses) or counting down from born (cache hits).
    Only the ID differs between queries; TTLs change once a second, so the
    counted-down body is made once a second, not once a query."""

    __slots__ = (
        "reply",
        "ttls",
        "born",
        "expires",
        "counter",
        "tally",
        "cache_entry",
        "_bodies",
        "_rng",
        "_body",
        "_after",
        "_until",
    )

    def __init__(
        self,
        reply: bytes,
        layout: Layout,
        *,
        counter: str,
        born: float,
        expires: float,
        cache_entry: Any,
        rng: random.Random,
    ) -> None:
        self.reply = reply
        self.ttls = layout.ttls  # not the Layout: one object less per cached answer for the collector to walk
        self.born = born
        self.expires = expires
        self.counter = counter  # what a hit counts as
        # ... and with the reply's rcode: one key, a string for its cached hash, so a hit costs what it did
        self.tally = f"{counter} {reply[3] & 0x0F}"
        self.cache_entry = cache_entry  # the cache entry it came from: a hit marks it used
        self._rng = rng
        self._bodies = _shuffled(reply, layout.runs, rng) if expires == STATIC else ()
        self._body = b""
        self._after = self._until = math.nan  # the body is good for after < now <= until

    def render(self, query_id: bytes, now: float) -> bytes:
        bodies = self._bodies
        if bodies:
            return query_id + (bodies[0] if len(bodies) == 1 else bodies[self._rng.randrange(len(bodies))])
        if not self._after < now <= self._until:
            # int(ttl - elapsed), as the cache counts, is ttl - ceil(elapsed) for whole TTLs.
            step = math.ceil(now - self.born) if now > self.born else 0
            out = bytearray(self.reply)
            for offset, ttl in self.ttls:
                wire.TTL.pack_into(out, offset, max(0, ttl - step))
            self._body = bytes(out[2:])
            self._after = self.born + step - 1 if step else -math.inf
            self._until = self.born + step
        return query_id + self._body


def prepare(
    reply: bytes,
    rng: random.Random,
    *,
    counter: str = "",
    born: float = 0.0,
    expires: float = STATIC,
    cache_entry: Any = None,
    ttls: tuple[tuple[int, int], ...] | None = None,
) -> Prepared | None:
    """reply made ready for the fast path; None if it is not a well-formed message.
    Static replies get their runs of addresses shuffled. ttls: where the TTLs
    are, if the caller knows (then the reply is not read, and not shuffled)."""
    try:
        found = Layout(ttls, ()) if ttls is not None else layout(reply)
    except wire.WireError:
        return None
    return Prepared(reply, found, counter=counter, born=born, expires=expires, cache_entry=cache_entry, rng=rng)


class FastAnswers:
    """Prepared replies by the query's key (wire.query_key), one table per transport.
    Hits are counted here, by transport and by the counter each reply names."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.answered: Counter[str] = Counter()  # by transport
        self.hits: Counter[str] = Counter()  # by Prepared.tally: "counter rcode"
        self._tables: dict[str, OrderedDict[bytes, Prepared]] = {"udp": OrderedDict(), "tcp": OrderedDict()}

    def __len__(self) -> int:
        return sum(len(table) for table in self._tables.values())

    def lookup(self, query: bytes, transport: str, now: float) -> bytes | None:
        """The reply to query, or None."""
        table = self._tables.get(transport)
        if table is None:
            return None
        key = wire.query_key(query)
        prepared = table.get(key)
        if prepared is None:
            return None
        if now >= prepared.expires:
            del table[key]
            return None
        self.answered[transport] += 1
        self.hits[prepared.tally] += 1
        if prepared.cache_entry is not None:
            prepared.cache_entry.used = True
        return prepared.render(query[:2], now)

    def keep(self, query: bytes, transport: str, prepared: Prepared) -> None:
        """Answer later queries with the same key as query with prepared."""
        table = self._tables.get(transport)
        if table is None or self.size <= 0:
            return
        key = wire.query_key(query)
        table[key] = prepared
        table.move_to_end(key)
        while len(table) > self.size:
            table.popitem(last=False)

    def clear(self, size: int | None = None) -> None:
        """Forget every prepared reply (and take a new size, if given)."""
        for table in self._tables.values():
            table.clear()
        if size is not None:
            self.size = size

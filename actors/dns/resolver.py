"""The DNS controller's sans-IO core: queries in, actions out.

A query goes through, in order: hygiene (message.py), the local zone
(zone.py), Docker's ndots rule, request routing (rules.py), the cache
(cache.py), merging and the in-flight cap (inflight.py), and finally one
upstream after another (upstream.py). The IO side carries out the actions:

- Reply: send wire back to the client (source/transport/ctx say where);
- Forward: send query to upstream, then call on_upstream_answer or
  on_upstream_failure (timeouts included) with the same key and upstream;
- Drop: nothing to send, the reason is already counted;
- Learned: names and addresses learned from upstream answers, for the bus;
- Log: something worth a (rate-limited) log line.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass
from typing import Any

import dns.rcode
import dns.rdatatype

from actors.dns.cache import CacheKey, DnsCache
from actors.dns.inflight import Admission, Flight, InflightTable, RateLimiter
from actors.dns.message import (
    Answer,
    ErrorReply,
    Ignored,
    Query,
    make_forward_query,
    parse_query,
    parse_response,
    render,
)
from actors.dns.rules import Reject, Route, Router, SourceOverride
from actors.dns.settings import DnsSettings
from actors.dns.upstream import FailoverPlan, Upstream, should_failover, without_own
from actors.dns.zone import Zone

Source = tuple[Any, ...]  # (ip, port) of the client


@dataclass(frozen=True)
class Reply:
    wire: bytes
    source: Source
    transport: str
    ctx: object = None


@dataclass(frozen=True)
class Forward:
    key: CacheKey
    upstream: Upstream
    query: bytes
    timeout: float


@dataclass(frozen=True)
class Drop:
    reason: str
    source: Source
    transport: str
    ctx: object = None


@dataclass(frozen=True)
class Learned:
    name: str
    addresses: tuple[str, ...]


@dataclass(frozen=True)
class Log:
    event: str
    fields: dict[str, Any]


Action = Reply | Forward | Drop | Learned | Log


@dataclass(frozen=True)
class _Waiter:
    query: Query
    source: Source
    transport: str
    ctx: object


def _cache_shape(s: DnsSettings) -> tuple[Any, ...]:
    """What cached answers depend on: a change here flushes the cache."""
    return (
        s.upstreams, s.routes, s.rules, s.groups, s.source_overrides,
        s.cache_size, s.cache_min_ttl, s.cache_max_ttl, s.serve_stale, s.stale_ttl,
    )  # fmt: skip


class Resolver:
    def __init__(self, settings: DnsSettings, *, rng: random.Random | None = None) -> None:
        self.counters: Counter[str] = Counter()
        self._rng = rng or random.Random()
        self._inflight: InflightTable[_Waiter] = InflightTable(settings.max_inflight)
        self._cap_log = RateLimiter()
        self._cache = DnsCache(0)
        self.settings = settings
        self.reconfigure(settings, force=True)

    def reconfigure(self, settings: DnsSettings, *, force: bool = False) -> None:
        """Take new settings; flights under way finish with their old plan."""
        old, self.settings = self.settings, settings
        self._zone = Zone(settings.domain, settings.names, settings.srv, settings.ttl, self._rng)
        own = settings.listen
        self._router = Router(
            rules=settings.rules,
            routes=[Route(r.suffix, without_own(r.upstreams, own)) for r in settings.routes],
            groups={name: without_own(ups, own) for name, ups in settings.groups.items()},
            default=without_own(settings.upstreams, own),
            overrides=[SourceOverride(o.network, without_own(o.upstreams, own)) for o in settings.source_overrides],
        )
        self._inflight.cap = settings.max_inflight
        if force or _cache_shape(old) != _cache_shape(settings):
            self._cache = DnsCache(
                size=settings.cache_size,
                min_ttl=settings.cache_min_ttl,
                max_ttl=settings.cache_max_ttl,
                stale_ttl=settings.stale_ttl if settings.serve_stale else 0,
                counters=self._cache.counters,
            )

    def flush_cache(self) -> None:
        self._cache.flush()

    def stats(self) -> dict[str, int]:
        """Counters and gauges for status."""
        return {
            **self.counters,
            **self._cache.counters.as_dict(),
            "cache_entries": len(self._cache),
            "inflight": len(self._inflight),
            "inflight_cap_logs_suppressed": self._cap_log.suppressed,
        }

    def handle(self, query_wire: bytes, source: Source, transport: str, now: float, ctx: object = None) -> list[Action]:
        """A query from a client. Never raises on bad input."""
        self.counters[f"queries_{transport}"] += 1
        parsed = parse_query(query_wire)
        if isinstance(parsed, Ignored):
            self.counters[parsed.reason] += 1
            return [Drop(parsed.reason, source, transport, ctx)]
        if isinstance(parsed, ErrorReply):
            self.counters[parsed.reason] += 1
            return [Reply(parsed.wire, source, transport, ctx)]
        waiter = _Waiter(parsed, source, transport, ctx)
        local = self._zone.answer(parsed.qname, parsed.qtype, parsed.qclass)
        if local is not None:
            self.counters["local_answers"] += 1
            return [self._reply(waiter, local)]
        if self._held_back_by_ndots(parsed):
            # Docker: with ndots set, a single-label name is not sent out; the
            # client goes on with its search domains.
            self.counters["ndots_not_forwarded"] += 1
            return [self._reply(waiter, Answer(dns.rcode.NOERROR))]
        decision = self._router.route(parsed.qname.to_text(), parsed.qtype, str(source[0]) if source else "")
        if isinstance(decision, Reject):
            self.counters["rejected_by_rule"] += 1
            return [self._reply(waiter, Answer(self.settings.reject_rcode_value))]
        key = CacheKey(parsed.qname, parsed.qtype, parsed.qclass, parsed.do, decision.view)
        cached = self._cache.get(key, now)
        if cached is not None:
            return [self._reply(waiter, cached)]
        admission = self._inflight.admit(
            key, waiter, lambda: Flight(make_forward_query(parsed), FailoverPlan(decision.upstreams), now)
        )
        if admission is Admission.MERGED:
            self.counters["merged"] += 1
            return []
        if admission is Admission.FULL:
            self.counters["refused_inflight_cap"] += 1
            actions: list[Action] = [self._reply(waiter, Answer(dns.rcode.REFUSED))]
            if self._cap_log.allow(now):
                actions.append(Log("dns_inflight_cap_reached", {"cap": self._inflight.cap}))
            return actions
        self.counters["forwarded"] += 1
        return self._attempt(key, now)

    def on_upstream_answer(self, key: CacheKey, upstream: Upstream, wire: bytes, now: float) -> list[Action]:
        """The upstream answered the Forward for key. Never raises on bad input."""
        flight = self._current(key, upstream)
        if flight is None:
            return []
        message = parse_response(wire, flight.waiters[0].query.question)
        if isinstance(message, str):
            return self._failed(key, f"upstream_{message}", now)
        rcode = int(message.rcode())
        if should_failover(rcode):
            return self._failed(key, f"upstream_{dns.rcode.to_text(rcode).lower()}", now)
        answer = Answer.from_message(message)
        answer = self._cache.put(key, answer, now) or answer
        self._inflight.finish(key)
        self.counters["upstream_answers"] += 1
        return [*self._learned(answer), *(self._reply(w, answer) for w in flight.waiters)]

    def on_upstream_failure(self, key: CacheKey, upstream: Upstream, reason: str, now: float) -> list[Action]:
        """The Forward for key failed: timeout, connection refused, TLS error..."""
        if self._current(key, upstream) is None:
            return []
        return self._failed(key, f"upstream_{reason}", now)

    def _current(self, key: CacheKey, upstream: Upstream) -> Flight[_Waiter] | None:
        flight = self._inflight.get(key)
        if flight is None or flight.plan.current != upstream:
            self.counters["upstream_late"] += 1
            return None
        return flight

    def _attempt(self, key: CacheKey, now: float) -> list[Action]:
        flight = self._inflight.get(key)
        assert flight is not None
        upstream = flight.plan.next()
        if upstream is None:
            return self._exhausted(key, now)
        if flight.plan.attempts > 1:
            self.counters["failovers"] += 1
        return [Forward(key, upstream, flight.query, self.settings.timeout)]

    def _failed(self, key: CacheKey, reason: str, now: float) -> list[Action]:
        self.counters[reason] += 1
        return self._attempt(key, now)

    def _exhausted(self, key: CacheKey, now: float) -> list[Action]:
        flight = self._inflight.finish(key)
        assert flight is not None
        answer = self._cache.get_stale(key, now) if self.settings.serve_stale else None
        if answer is not None:
            self.counters["stale_answers"] += 1
        else:
            self.counters["servfail_exhausted"] += 1
            answer = Answer(dns.rcode.SERVFAIL)
        return [self._reply(w, answer) for w in flight.waiters]

    def _held_back_by_ndots(self, query: Query) -> bool:
        return (
            self.settings.ndots > 0
            and query.qtype in (dns.rdatatype.A, dns.rdatatype.AAAA)
            and len(query.qname.labels) == 2  # one label and the root
        )

    def _reply(self, waiter: _Waiter, answer: Answer) -> Reply:
        try:
            wire = render(waiter.query, answer, waiter.transport)
        except Exception:  # an upstream record dnspython parsed but cannot write back
            self.counters["render_errors"] += 1
            wire = render(waiter.query, Answer(dns.rcode.SERVFAIL), waiter.transport)
        return Reply(wire, waiter.source, waiter.transport, waiter.ctx)

    @staticmethod
    def _learned(answer: Answer) -> list[Learned]:
        return [
            Learned(rrset.name.to_text(omit_final_dot=True).lower(), tuple(r.address for r in rrset))
            for rrset in answer.answer
            if rrset.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA)
        ]

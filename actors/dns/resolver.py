"""The DNS controller's sans-IO core: queries in, actions out.

A query goes through, in order: hygiene (message.py), ANY (answered
minimally, RFC 8482: one HINFO "RFC8482", never forwarded), the local zone
(zone.py), Docker's ndots rule, request routing (rules.py), the cache
(cache.py), merging and the in-flight cap, whole and per client prefix
(inflight.py, access.py), and finally one upstream after another
(upstream.py), in the order the group's policy gives (choice.py).
Replies that depend on the question alone are prepared for the fast path
(fastpath.py), an upstream's answer once its question comes again and is
answered from the cache: the IO side
offers every query to fast() first and calls handle() only when that has no
reply (and the native forwarder, forwarder.c, did not take it: native_route()
says what it may take, resume() takes back what it could not finish).
The IO side carries out the actions:

- Reply: send wire back to the client (source/transport/ctx say where);
- Forward: send query to upstream, then call on_upstream_answer or
  on_upstream_failure (timeouts included) with the same key and upstream;
- Drop: nothing to send, the reason is already counted;
- Learned: names and addresses learned from upstream answers, for the bus
  (only while `learning` is set);
- Log: something worth a (rate-limited) log line.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

import dns.rcode
import dns.rdatatype
import dns.rrset

from meshsup.actors.dns.access import prefix_of, share
from meshsup.actors.dns.cache import CacheEntry, CacheKey, DnsCache, cache_key
from meshsup.actors.dns.choice import Upstreams
from meshsup.actors.dns.fastpath import FastAnswers, prepare
from meshsup.actors.dns.inflight import Admission, Elsewhere, Flight, InflightTable, RateLimiter
from meshsup.actors.dns.latency import LatencyBuckets
from meshsup.actors.dns.message import (
    Answer,
    Ignored,
    Query,
    make_forward_query,
    parse_query,
    parse_response,
    render,
    reply_ttls,
)
from meshsup.actors.dns.rules import ForwardTo, Reject, Router
from meshsup.actors.dns.upstream import FAILOVER_RCODES, FailoverPlan, without_own
from meshsup.actors.dns.wire import WireAnswer, label_count
from meshsup.actors.dns.zone import Zone
from meshsup.actors.settings.dns import DnsSettings
from meshsup.actors.settings.dnstypes import FAILOVER, RANDOM, Route, SourceOverride, Upstream, UpstreamGroup

Source = tuple[Any, ...]  # (ip, port) of the client

# Prepared local replies (and rejections) the fast path keeps beside the cache's.
LOCAL_ENTRIES = 4096


# Actions and waiters are tuples, made by position (a query makes a few: no Python __init__ for each).
class Reply(NamedTuple):
    wire: bytes
    source: Source
    transport: str
    ctx: object = None


class Forward(NamedTuple):
    key: CacheKey
    upstream: Upstream
    query: bytes
    timeout: float


class Drop(NamedTuple):
    reason: str
    source: Source
    transport: str
    ctx: object = None


@dataclass(slots=True)
class Learned:
    name: str
    addresses: tuple[str, ...]


@dataclass(slots=True)
class Log:
    event: str
    fields: dict[str, Any]


Action = Reply | Forward | Drop | Learned | Log


class _Waiter(NamedTuple):
    query: Query
    source: Source
    transport: str
    ctx: object
    wire: bytes  # the query as it came, the fast path's key


# Why the native forwarder may hand a forward back that says nothing of its upstream.
_NOT_THE_UPSTREAMS = frozenset({"truncated", "render", "internal", "closed"})

_tuple = tuple.__new__
_ANY = int(dns.rdatatype.ANY)  # a plain int: compared per query


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
        self.upstream_latency = LatencyBuckets()
        self.rcodes: Counter[int] = Counter()  # replies the full path made, by rcode (the header's 4 bits)
        self._cache = DnsCache(0)
        self._fast = FastAnswers(0)
        # The reply to a query answered before, from its bytes alone; None: call handle().
        self.fast = self._fast.lookup
        self.settings = settings
        # Whether anyone wants Learned actions: reading addresses out of every
        # answer is half the work of taking it in.
        self.learning = True
        self.upstreams = Upstreams(self._rng)
        self.reconfigure(settings, force=True)

    def change_names(self, settings: DnsSettings, names: Mapping[str, Sequence[str]]) -> None:
        """New settings that differ from these in the mesh's names and ranges alone: the names given
        change in the zone (see Zone.change_names), the rest stays."""
        self.settings = settings
        self._zone.change_names(names)
        self._fast.clear()  # answers of the names changed may be kept there

    def reconfigure(self, settings: DnsSettings, *, force: bool = False) -> None:
        """Take new settings; flights under way finish with their old plan."""
        old, self.settings = self.settings, settings
        self._zone = Zone(settings.domain, settings.names, settings.srv, settings.ttl, self._rng)
        own = settings.listen
        self._router = Router(
            rules=settings.rules,
            routes=[Route(r.suffix, without_own(r.upstreams, own)) for r in settings.routes],
            groups={name: replace(g, upstreams=without_own(g.upstreams, own)) for name, g in settings.groups.items()},
            default=UpstreamGroup(without_own(settings.upstreams, own), settings.policy),
            overrides=[SourceOverride(o.network, without_own(o.upstreams, own)) for o in settings.source_overrides],
        )
        self.upstreams.keep(
            [(settings.upstreams, settings.policy), *((r.upstreams, FAILOVER) for r in settings.routes)]
            + [(g.upstreams, g.policy) for g in settings.groups.values()]
            + [(o.upstreams, FAILOVER) for o in settings.source_overrides]
        )
        self._inflight.cap = settings.max_inflight
        self._inflight.share = share(settings.max_inflight)
        self._fast.clear(size=settings.cache_size + LOCAL_ENTRIES)  # the zone or the routes may have changed
        # With per-source upstreams, the same question may have different answers.
        self._fast_cache_hits = not settings.source_overrides and not self._router.by_destination
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
        self._fast.clear()

    def stats(self) -> dict[str, int]:
        """Counters and gauges for status; the fast path's answers counted as the full path counts them."""
        stats: Counter[str] = Counter(self.counters)
        stats.update(self._cache.counters.as_dict())
        rcodes = Counter(self.rcodes)
        native = self._inflight.elsewhere
        if native is not None:
            stats.update(native.counters())
            rcodes.update(native.rcodes())
        for tally, n in self._fast.hits.items():
            counter, _, rcode = tally.rpartition(" ")
            stats[counter] += n
            rcodes[int(rcode)] += n
        stats.update({f"queries_{transport}": n for transport, n in self._fast.answered.items()})
        stats.update({f"replies_{dns.rcode.to_text(rcode).lower()}": n for rcode, n in rcodes.items()})
        return {
            **stats,
            "cache_entries": len(self._cache),
            "fast_entries": len(self._fast),
            "fast_answers": sum(self._fast.answered.values()),
            "inflight": len(self._inflight) + (len(native) if native is not None else 0),
            "inflight_cap_logs_suppressed": self._cap_log.suppressed,
        }

    def handle(
        self,
        query_wire: bytes,
        source: Source,
        transport: str,
        now: float,
        ctx: object = None,
        destination: str = "",
        resumed: bool = False,
        tried: Upstream | None = None,
    ) -> list[Action]:
        """A query from a client (destination: where an intercepted one was sent). Never raises on bad input.
        resumed: one the native forwarder handed back (see resume), counted where it came in; tried:
        the upstream it asked first, if it failed."""
        counters = self.counters
        if not resumed:
            counters["queries_" + transport] += 1
        parsed = parse_query(query_wire)
        if parsed.__class__ is not Query:  # an error reply or nothing
            counters[parsed.reason] += 1
            if isinstance(parsed, Ignored):
                return [_tuple(Drop, (parsed.reason, source, transport, ctx))]
            self.rcodes[parsed.wire[3] & 0x0F] += 1
            return [_tuple(Reply, (parsed.wire, source, transport, ctx))]
        waiter = _tuple(_Waiter, (parsed, source, transport, ctx, query_wire))
        if parsed.qtype == _ANY:
            # An amplifier's favourite question: one small record instead, for every name.
            counters["any_minimised"] += 1
            return [self._reply(waiter, self._rfc8482(parsed), keep="any_minimised")]
        # The wire check first: most names are not the zone's, and spare it a dnspython Name.
        if self._zone.covers(parsed.qname_key):
            local = self._zone.answer(parsed.qname, parsed.qtype, parsed.qclass)
            if local is not None:
                counters["local_answers"] += 1
                return [self._reply(waiter, local, keep="local_answers")]
        if self.settings.ndots and self._held_back_by_ndots(parsed):
            # Docker: with ndots set, a single-label name is not sent out; the
            # client goes on with its search domains.
            counters["ndots_not_forwarded"] += 1
            return [self._reply(waiter, Answer(dns.rcode.NOERROR), keep="ndots_not_forwarded")]
        decision = self._router.only or self._router.route(
            parsed.name_text, parsed.qtype, str(source[0]) if source else "", destination
        )
        if decision.__class__ is Reject:
            counters["rejected_by_rule"] += 1
            # A refusal by destination is not the question's: the fast path, which knows only that, keeps none.
            keep = "" if self._router.by_destination else "rejected_by_rule"
            return [self._reply(waiter, Answer(self.settings.reject_rcode_value), keep=keep)]
        key = cache_key(parsed.qname_key, parsed.qtype, parsed.qclass, parsed.do, decision.view)
        cached = self._cache.fresh(key, now)
        if cached is not None:
            return [self._reply_cached(waiter, cached, now)]
        admission = self._inflight.admit(
            key, waiter, self._flight, parsed, decision, now, tried, owner=prefix_of(str(source[0])) if source else None
        )
        if admission is not Admission.STARTED:
            return self._not_started(admission, waiter, now, resumed)
        if not resumed:
            counters["forwarded"] += 1
        return self._attempt(key, now)

    def _flight(self, query: Query, decision: ForwardTo, now: float, tried: Upstream | None) -> Flight[_Waiter]:
        """A forward of query as decided, started now (after tried, if it was asked elsewhere first)."""
        order = self.upstreams.order(decision.upstreams, decision.policy)
        plan = FailoverPlan(order) if tried is None else FailoverPlan.after(order, tried)
        return Flight(make_forward_query(query), plan, now)

    def _not_started(self, admission: Admission, waiter: _Waiter, now: float, resumed: bool = False) -> list[Action]:
        """A query that joined a forward under way, or was refused one of its own."""
        if admission is Admission.MERGED:
            if not resumed:  # else it was counted as merged where it came in
                self.counters["merged"] += 1
            return []
        if admission is Admission.OWNER_FULL:
            self.counters["refused_source_inflight_cap"] += 1
            return [self._reply(waiter, Answer(dns.rcode.REFUSED))]
        self.counters["refused_inflight_cap"] += 1
        actions: list[Action] = [self._reply(waiter, Answer(dns.rcode.REFUSED))]
        if self._cap_log.allow(now):
            actions.append(Log("dns_inflight_cap_reached", {"cap": self._inflight.cap}))
        return actions

    def on_upstream_answer(self, key: CacheKey, upstream: Upstream, wire: bytes, now: float) -> list[Action]:
        """The upstream answered the Forward for key. Never raises on bad input."""
        flight = self._current(key, upstream)
        if flight is None:
            return []
        waiters = flight.waiters
        answer = parse_response(wire, waiters[0].query, self.learning)
        rtt = now - flight.plan.sent
        if answer.__class__ is str:
            return self._failed(key, upstream, f"upstream_{answer}", now, rtt)
        if answer.rcode in FAILOVER_RCODES:
            return self._failed(key, upstream, f"upstream_{dns.rcode.to_text(answer.rcode).lower()}", now, rtt)
        self.upstreams.answered(upstream, rtt, now)
        stored = self._cache.put(key, answer, now) or answer  # TTLs as the cache keeps them
        self._inflight.finish(key)
        self.counters["upstream_answers"] += 1
        self.upstream_latency.observe(now - flight.started)
        # Not kept for the fast path yet: that waits for the question to come again
        # (most names are asked once; preparing for them would cost time and memory).
        actions: list[Action] = [self._reply(waiter, stored) for waiter in waiters]
        if answer.addresses:
            actions += [Learned(name, addresses) for name, addresses in answer.addresses]
        return actions

    def on_upstream_failure(self, key: CacheKey, upstream: Upstream, reason: str, now: float) -> list[Action]:
        """The Forward for key failed: timeout, connection refused, TLS error..."""
        if self._current(key, upstream) is None:
            return []
        return self._failed(key, upstream, f"upstream_{reason}", now)

    def _current(self, key: CacheKey, upstream: Upstream) -> Flight[_Waiter] | None:
        flight = self._inflight.get(key)
        if flight is None or flight.plan.current is not upstream:  # the very object Forward carried
            self.counters["upstream_late"] += 1
            return None
        return flight

    def _attempt(self, key: CacheKey, now: float) -> list[Action]:
        flight = self._inflight.get(key)
        assert flight is not None
        upstream = flight.plan.next(now)
        if upstream is None:
            return self._exhausted(key, now)
        self.upstreams.sent(upstream)
        if flight.plan.attempts > 1:
            self.counters["failovers"] += 1
        return [_tuple(Forward, (key, upstream, flight.query, self.settings.timeout))]

    def _failed(
        self, key: CacheKey, upstream: Upstream, reason: str, now: float, rtt: float | None = None
    ) -> list[Action]:
        """The attempt failed: with rtt, on an answer that would not do; without, on none."""
        self.counters[reason] += 1
        if rtt is None:
            self.upstreams.failed(upstream, reason, now)
        else:
            self.upstreams.answered(upstream, rtt, now, reason)
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

    # -- the native forwarder (forwarder.c) --------------------------------

    def attach(self, native: Elsewhere) -> None:
        """The native forwarder: its flights count against the in-flight cap and shares, its counters in stats."""
        self._inflight.elsewhere = native

    def native_route(self) -> dict[str, Any] | None:
        """What the native forwarder may take now, as Forwarder.configure's keywords
        (host and port: the upstream's); None if nothing. It takes what the route of
        every name would send to one plain UDP upstream (no rules, routes or
        per-source upstreams; not the random policy, which picks per query): the
        default group's first choice now. The names of the local zone, with ndots
        the one-label ones, and questions the cache has are left here."""
        group = self._router.only
        if group is None or group.policy == RANDOM or not group.upstreams:
            return None
        first = self.upstreams.order(group.upstreams, group.policy)[0]
        if first.scheme != "udp" or first.named:
            return None
        flights, owned = self._inflight.tables()
        settings = self.settings
        return {
            "upstream": first,
            "host": first.host,
            "port": first.port,
            "timeout": settings.timeout,
            "cap": self._inflight.cap,
            "share": self._inflight.share,
            "decline": self._zone.suffixes(),
            "single_label": bool(settings.ndots),
            "learn": self.learning,
            "view": group.view.encode(),
            "put": self._cache.put,
            "cached": self._cache.table(),
            "their_flights": flights,
            "their_owned": owned,
        }

    def native_answered(self, answered: list[tuple[Upstream, float, WireAnswer]], now: float) -> list[Action]:
        """Forwards the native forwarder saw answered (and replied to, and cached), each
        (upstream, rtt, answer): counted as ours are; the addresses learned from them."""
        upstreams, observe = self.upstreams, self.upstream_latency.observe
        actions: list[Action] = []
        for upstream, rtt, answer in answered:
            upstreams.sent(upstream)
            upstreams.answered(upstream, rtt, now)
            observe(rtt)
            if answer.addresses:
                actions += [Learned(name, addresses) for name, addresses in answer.addresses]
        return actions

    def resume(
        self, reason: str, upstream: Upstream, rtt: float | None, waiters: list[tuple[Any, ...]], now: float
    ) -> list[Action]:
        """A forward the native forwarder handed back: its upstream failed (rtt: after how long it
        answered, None if it did not), or the reason is not the upstream's (truncated: asked again
        here, which goes over TCP; render, internal, closed). Each waiter, (query, source, ctx,
        owner, fields), goes on here from the next upstream, or from the cache if it has it now."""
        self.upstreams.sent(upstream)
        tried = None
        if reason not in _NOT_THE_UPSTREAMS:
            tried = upstream
            self.counters[f"upstream_{reason}"] += 1
            if rtt is None:
                self.upstreams.failed(upstream, reason, now)
            else:
                self.upstreams.answered(upstream, rtt, now, reason)
        actions: list[Action] = []
        for query, source, ctx, _, _ in waiters:
            actions += self.handle(query, source, "udp", now, ctx, resumed=True, tried=tried)
        return actions

    def _rfc8482(self, query: Query) -> Answer:
        """RFC 8482 section 4.2: a synthesised HINFO with CPU "RFC8482" and an empty OS."""
        hinfo = dns.rrset.from_text(query.qname, self.settings.ttl, query.qclass, "HINFO", '"RFC8482" ""')
        return Answer(dns.rcode.NOERROR, answer=(hinfo,))

    @staticmethod
    def _held_back_by_ndots(query: Query) -> bool:
        return (
            query.qtype in (dns.rdatatype.A, dns.rdatatype.AAAA)
            and label_count(query.qname_wire) == 2  # one label and the root
        )

    def _render(self, waiter: _Waiter, answer: Answer | WireAnswer) -> bytes | None:
        try:
            return render(waiter.query, answer, waiter.transport)
        except Exception:  # an upstream record dnspython parsed but cannot write back
            self.counters["render_errors"] += 1
            return None

    def _reply(self, waiter: _Waiter, answer: Answer | WireAnswer, keep: str = "") -> Reply:
        """The reply carrying answer; with keep (the counter a hit bumps), a
        static reply kept for the fast path, several local addresses shuffled."""
        wire = self._render(waiter, answer)
        if wire is None:
            wire = render(waiter.query, Answer(dns.rcode.SERVFAIL), waiter.transport)
        elif keep:
            prepared = prepare(wire, self._rng, counter=keep)
            if prepared is not None:
                self._fast.keep(waiter.wire, waiter.transport, prepared)
        self.rcodes[wire[3] & 0x0F] += 1
        return _tuple(Reply, (wire, waiter.source, waiter.transport, waiter.ctx))

    def _reply_cached(self, waiter: _Waiter, entry: CacheEntry, now: float) -> Reply:
        """The reply from a cache entry, TTLs counted down; kept for the fast path until it expires."""
        wire = self._render(waiter, entry.answer)
        prepared = None
        if wire is not None:
            prepared = prepare(
                wire,
                self._rng,
                counter="cache_hits",
                born=entry.stored_at,
                expires=entry.expires_at(),
                cache_entry=entry,
                ttls=reply_ttls(waiter.query, entry.answer, wire),
            )
        if prepared is None:
            return self._reply(waiter, entry.answer_at(now))
        if self._fast_cache_hits:
            self._fast.keep(waiter.wire, waiter.transport, prepared)
        if now > entry.stored_at:  # else nothing has counted down yet: the rendered reply is it
            wire = prepared.render(waiter.wire[:2], now)
        self.rcodes[wire[3] & 0x0F] += 1
        return _tuple(Reply, (wire, waiter.source, waiter.transport, waiter.ctx))

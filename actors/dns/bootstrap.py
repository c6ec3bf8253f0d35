"""Host names of upstreams (``tls://dns.example``), resolved through the
bootstrap servers: plain DNS over UDP to the addresses `[dns] bootstrap`
gives, never the controller itself (its upstreams are what needs resolving).

- ``addresses_of``: sans-IO, the addresses an answer gives a name (through
  its CNAME chain) and how long they may be used.
- ``Bootstrap``: asks the servers in order (A, then AAAA if there is no A),
  and keeps each name's addresses. Queries for a name not known yet wait on
  its one lookup; once its TTL is up, the next query starts a new lookup and
  goes on to the addresses had meanwhile, which also serve on while the name
  cannot be resolved again (a server seldom moves, and its certificate is
  still checked by name).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace

import dns.asyncquery
import dns.exception
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype

from meshsup.actors.settings.dnstypes import Upstream

QUERY_TIMEOUT = 2.0  # per bootstrap server and query type
MIN_TTL = 1.0  # an answer with TTL 0 would mean a lookup before every query
MAX_TTL = 86400.0
MAX_CHAIN = 8  # CNAMEs followed within one answer


def addresses_of(answer: dns.message.Message, name: dns.name.Name, rdtype: int) -> tuple[tuple[str, ...], float]:
    """The addresses of type rdtype the answer gives name, and the least TTL on the
    way to them (CNAMEs included); none if it gives none."""
    owner, ttl = name, MAX_TTL
    for _ in range(MAX_CHAIN):
        alias = answer.get_rrset(answer.answer, owner, dns.rdataclass.IN, dns.rdatatype.CNAME)
        if alias is None:
            break
        owner, ttl = alias[0].target, min(ttl, alias.ttl)
    found = answer.get_rrset(answer.answer, owner, dns.rdataclass.IN, rdtype)
    if found is None:
        return (), 0.0
    return tuple(rdata.address for rdata in found), max(MIN_TTL, min(ttl, found.ttl))


@dataclass(frozen=True, slots=True)
class _Known:
    addresses: tuple[str, ...]
    expires: float  # loop time


class Bootstrap:
    """The addresses of upstream host names, from the bootstrap servers."""

    def __init__(self, servers: Sequence[tuple[str, int]], counters: Counter[str]) -> None:
        self._servers = tuple(servers)
        self._counters = counters
        self._known: dict[str, _Known] = {}
        self._lookups: dict[str, asyncio.Task[_Known | None]] = {}

    async def resolve(self, upstream: Upstream) -> Upstream | None:
        """The upstream at an address of its host name, with that name to verify
        its certificate by; None if the name cannot be resolved."""
        host = upstream.host
        known = self._known.get(host)
        if known is None:
            # Shielded: a query that times out leaves the lookup to those still waiting on it.
            known = await asyncio.shield(self._lookup_once(host))
            if known is None:
                return None
        elif known.expires <= asyncio.get_running_loop().time():
            self._lookup_once(host)  # meanwhile, the addresses had
        return replace(upstream, host=known.addresses[0], server_name=host)

    def _lookup_once(self, host: str) -> asyncio.Task[_Known | None]:
        """The lookup of host under way, or a new one; what it finds is kept."""
        lookup = self._lookups.get(host)
        if lookup is None:
            lookup = self._lookups[host] = asyncio.get_running_loop().create_task(self._lookup(host))
            lookup.add_done_callback(lambda _: self._lookups.pop(host, None))
        return lookup

    async def _lookup(self, host: str) -> _Known | None:
        name = dns.name.from_text(host)
        for rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
            for server, port in self._servers:
                self._counters["bootstrap_queries"] += 1
                try:
                    answer = await dns.asyncquery.udp(
                        dns.message.make_query(name, rdtype), server, timeout=QUERY_TIMEOUT, port=port
                    )
                except (dns.exception.DNSException, OSError, ValueError):
                    self._counters["bootstrap_failures"] += 1
                    continue  # the next server
                if answer.rcode() != dns.rcode.NOERROR:
                    self._counters["bootstrap_failures"] += 1
                    continue
                addresses, ttl = addresses_of(answer, name, rdtype)
                if addresses:
                    known = self._known[host] = _Known(addresses, asyncio.get_running_loop().time() + ttl)
                    return known
                break  # this server says the name has none of this type: try the other type
        return None

    def close(self) -> None:
        for lookup in self._lookups.values():
            lookup.cancel()

    async def wait_closed(self) -> None:
        """Until the lookups close() cancelled have ended."""
        await asyncio.gather(*self._lookups.values(), return_exceptions=True)

"""The rules, compiled for a flow's first packet: first match wins, indexed by protocol and port.

Addresses become integer ranges and each rule's destination ports ranges;
`RuleSet.judge` takes a flow key (actors.filter.flowkey). The rules that can
match a (protocol, port) pair are worked out once per pair and kept, so a
thousand rules on other ports cost a new flow nothing but the dict lookup;
only those candidates are matched against the addresses.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from meshsup.actors.filter.flowkey import TCP, UDP
from meshsup.actors.settings.filter import ACCEPT, FilterRule, FilterSettings
from meshsup.actors.settings.node import IPNetwork

MAX_CANDIDATE_LISTS = 4096  # (protocol, port) pairs remembered; a port scan clears and starts over
_PORTED = frozenset({TCP, UDP})


class Span(NamedTuple):
    """Addresses lo..hi of one IP version (4 or 6), and ports first..last."""

    version: int
    lo: int
    hi: int
    first_port: int = 0
    last_port: int = 65535


class Compiled(NamedTuple):
    index: int
    action: str
    protocol: int | None
    sources: tuple[Span, ...]
    destinations: tuple[Span, ...]


def span(network: IPNetwork, first_port: int = 0, last_port: int = 65535) -> Span:
    lo = int(network.network_address)
    return Span(network.version, lo, lo + network.num_addresses - 1, first_port, last_port)


def compile_rule(index: int, rule: FilterRule) -> Compiled:
    sources = tuple(span(n) for n in rule.sources)
    destinations = tuple(span(d.network, d.first_port, d.last_port) for d in rule.destinations)
    return Compiled(index, rule.action, rule.protocol, sources, destinations)


class RuleSet:
    def __init__(self, settings: FilterSettings) -> None:
        self.default = settings.default if settings.enabled else ACCEPT
        self.rules: Sequence[Compiled] = [compile_rule(i, r) for i, r in enumerate(settings.rules)]
        self._candidates: dict[tuple[int, int | None], list[Compiled]] = {}

    def judge(self, key: bytes) -> tuple[str, int | None]:
        """(action, index of the rule that decided; None: the default) for a flow's key."""
        a = (len(key) - 5) // 2
        proto = key[0]
        # ICMP and protocols without ports match on addresses alone, as Tailscale's filter does.
        port = int.from_bytes(key[3 + 2 * a :], "big") if proto in _PORTED else None
        pair = (proto, port)
        candidates = self._candidates.get(pair)
        if candidates is None:
            candidates = self._candidates_for(proto, port)
        if candidates:
            version = 4 if a == 4 else 6
            src = int.from_bytes(key[1 : 1 + a], "big")
            dst = int.from_bytes(key[1 + a : 1 + 2 * a], "big")
            for rule in candidates:
                if _holds(rule.sources, version, src, None) and _holds(rule.destinations, version, dst, port):
                    return rule.action, rule.index
        return self.default, None

    def _candidates_for(self, proto: int, port: int | None) -> list[Compiled]:
        if len(self._candidates) >= MAX_CANDIDATE_LISTS:
            self._candidates.clear()
        found = [
            r
            for r in self.rules
            if r.protocol in (None, proto)
            and (port is None or any(d.first_port <= port <= d.last_port for d in r.destinations))
        ]
        self._candidates[(proto, port)] = found
        return found


def _holds(spans: tuple[Span, ...], version: int, address: int, port: int | None) -> bool:
    for s in spans:
        if s.version == version and s.lo <= address <= s.hi:
            if port is None or s.first_port <= port <= s.last_port:
                return True
    return False

"""Request routing: dae-style rules, split-DNS routes, per-source upstreams.

Order of decision for a forwarded query:
1. rules, first match wins: ``reject``, a named upstream group (its policy
   orders its upstreams: choice.py), or ``asis`` (stop evaluating rules and
   route normally);
2. split-DNS routes, the most specific suffix wins;
3. the upstreams for the client's source network, if one is configured
   (Docker's per-source external servers);
4. the default upstreams (a group too, with `dns.policy`).
Routes and per-source upstreams fail over in order.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from meshsup.actors.settings.dnstypes import (
    ASIS,
    FAILOVER,
    REJECT,
    IPNetwork,
    Matcher,
    Route,
    Rule,
    SourceOverride,
    Upstream,
    UpstreamGroup,
    normalize_name,
)


def is_under(name: str, suffix: str) -> bool:
    """Label-wise suffix test: a.b.example is under b.example, ab.example is not."""
    return name == suffix or name.endswith("." + suffix)


def matches(matcher: Matcher, name: str, qtype: int, destination: str = "") -> bool:
    """name is normalized (lowercase, no trailing dot); destination is the
    address an intercepted query was sent to ("" for any other query)."""
    match matcher.kind:
        case "full":
            return name == matcher.pattern
        case "suffix":
            return is_under(name, matcher.pattern)
        case "keyword":
            return matcher.pattern in name
        case "regex":
            assert matcher.regex is not None
            return matcher.regex.search(name) is not None
        case "dst":
            assert matcher.network is not None
            return _within(destination, matcher.network)
        case _:
            return qtype == matcher.qtype


def _within(address: str, network: IPNetwork) -> bool:
    if not address:
        return False
    try:
        return ipaddress.ip_address(address) in network
    except ValueError:
        return False


@dataclass(frozen=True)
class Reject:
    reason: str


@dataclass(frozen=True)
class ForwardTo:
    upstreams: tuple[Upstream, ...]
    # Answers from a per-source upstream set live in their own cache view,
    # so one client's view never leaks to another.
    view: str
    via: str
    policy: str = FAILOVER


Decision = Reject | ForwardTo


class Router:
    def __init__(
        self,
        *,
        rules: Sequence[Rule],
        routes: Sequence[Route],
        groups: Mapping[str, UpstreamGroup],
        default: UpstreamGroup,
        overrides: Sequence[SourceOverride] = (),
    ) -> None:
        missing = {r.action for r in rules} - {REJECT, ASIS} - set(groups)
        if missing:
            raise ValueError(f"rules name unknown upstream groups: {', '.join(sorted(missing))}")
        self._rules = tuple(rules)
        # Most specific first: more labels means a longer, narrower suffix.
        self._routes = tuple(sorted(routes, key=lambda r: r.suffix.count("."), reverse=True))
        self._overrides = tuple(overrides)
        self._to_default = ForwardTo(default.upstreams, "", "default", default.policy)
        # With nothing to match, every name goes the same way: callers may skip route().
        self.only = None if self._rules or self._routes or self._overrides else self._to_default
        # Whether a decision may depend on where an intercepted query was sent, not
        # only on the question: then what it routes to a group is cached apart.
        self.by_destination = any(r.matcher.kind == "dst" for r in self._rules)
        self._groups = {
            name: ForwardTo(g.upstreams, f"group {name}" if self.by_destination else "", f"group {name}", g.policy)
            for name, g in groups.items()
        }

    def route(self, qname: str, qtype: int, source_ip: str, destination: str = "") -> Decision:
        """destination: the original destination of an intercepted query, else ""."""
        name = normalize_name(qname)
        for index, rule in enumerate(self._rules):
            if not matches(rule.matcher, name, qtype, destination):
                continue
            if rule.action == REJECT:
                return Reject(f"rule {index}")
            if rule.action == ASIS:
                break
            return self._groups[rule.action]
        for route in self._routes:
            if is_under(name, route.suffix):
                return ForwardTo(route.upstreams, "", f"route {route.suffix}")
        override = self._override_for(source_ip)
        if override is not None:
            return ForwardTo(override.upstreams, str(override.network), f"source {override.network}")
        return self._to_default

    def _override_for(self, source_ip: str) -> SourceOverride | None:
        if not self._overrides:
            return None
        try:
            address = ipaddress.ip_address(source_ip)
        except ValueError:
            return None
        return next((o for o in self._overrides if address in o.network), None)

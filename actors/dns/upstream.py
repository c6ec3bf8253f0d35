"""Upstream resolvers: URL parsing and the sans-IO failover plan.

An upstream is written as a URL, ``udp://198.51.100.53``, ``tcp://...``,
``tls://IP[:853][#name]`` or ``https://IP[:443][/path][#name]``. The host
must be an IP literal: the controller cannot resolve the names of its own
upstreams. The optional ``#name`` is the TLS name to verify (as unbound's
``forward-addr: IP@853#name``); without it the certificate must carry the IP.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import dns.rcode

DEFAULT_PORTS: dict[str, int] = {"udp": 53, "tcp": 53, "tls": 853, "https": 443}
DEFAULT_DOH_PATH = "/dns-query"
# Docker tries at most three external servers per query (maxExtDNS).
MAX_ATTEMPTS = 3
# A SERVFAIL or REFUSED may be local to that server: ask the next one.
FAILOVER_RCODES = frozenset({dns.rcode.SERVFAIL, dns.rcode.REFUSED})


@dataclass(frozen=True)
class Upstream:
    scheme: str
    host: str
    port: int
    path: str = ""
    server_name: str = ""
    # Worked out once: an upstream is hashed and counted for every query sent to it.
    counter: str = field(init=False, repr=False, compare=False)
    _hash: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "counter", f"upstream_queries_{self.scheme}")
        object.__setattr__(self, "_hash", hash((self.scheme, self.host, self.port, self.path, self.server_name)))

    def __hash__(self) -> int:
        return self._hash

    @property
    def tls_name(self) -> str:
        """The name the upstream's certificate must match."""
        return self.server_name or self.host

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        name = f"#{self.server_name}" if self.server_name else ""
        return f"{self.scheme}://{host}:{self.port}{self.path}{name}"


def parse_upstream(url: str) -> Upstream:
    """Parse an upstream URL; ValueError says what is wrong."""
    if not isinstance(url, str):
        raise ValueError(f"upstream must be a URL string, not {type(url).__name__}")
    parts = urlsplit(url.strip())
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS:
        raise ValueError(f"{url!r}: scheme must be one of udp, tcp, tls, https")
    if parts.query or parts.username or parts.password:
        raise ValueError(f"{url!r}: query strings and credentials are not supported")
    try:
        host = parts.hostname or ""
        port = parts.port or DEFAULT_PORTS[scheme]
    except ValueError as exc:  # urlsplit rejects a port out of range or not a number
        raise ValueError(f"{url!r}: {exc}") from None
    try:
        host = str(ipaddress.ip_address(host))
    except ValueError:
        raise ValueError(f"{url!r}: host must be an IP address") from None
    if scheme == "https":
        path = parts.path or DEFAULT_DOH_PATH
    elif parts.path not in ("", "/"):
        raise ValueError(f"{url!r}: a path is only meaningful for https://")
    else:
        path = ""
    if parts.fragment and scheme not in ("tls", "https"):
        raise ValueError(f"{url!r}: '#name' is only meaningful for tls:// and https://")
    return Upstream(scheme, host, port, path, parts.fragment.lower())


def is_own_address(upstream: Upstream, listen: Iterable[tuple[str, int]]) -> bool:
    """True if sending to upstream would reach one of our own listeners."""
    if upstream.scheme not in ("udp", "tcp"):
        return False
    target = ipaddress.ip_address(upstream.host)
    for host, port in listen:
        if port != upstream.port:
            continue
        own = ipaddress.ip_address(host)
        if own == target or (own.is_unspecified and target.is_loopback and own.version == target.version):
            return True
    return False


def without_own(upstreams: Sequence[Upstream], listen: Iterable[tuple[str, int]]) -> tuple[Upstream, ...]:
    """Drop upstreams that are the controller itself (a forwarding loop)."""
    listen = tuple(listen)
    return tuple(u for u in upstreams if not is_own_address(u, listen))


def should_failover(rcode: int) -> bool:
    return rcode in FAILOVER_RCODES


class FailoverPlan:
    """The upstreams one query may try, in order, at most MAX_ATTEMPTS."""

    def __init__(self, upstreams: Sequence[Upstream]) -> None:
        self._remaining = list(upstreams[:MAX_ATTEMPTS])
        self.current: Upstream | None = None
        self.attempts = 0

    def next(self) -> Upstream | None:
        """The next upstream to try, or None when the plan is exhausted."""
        self.current = self._remaining.pop(0) if self._remaining else None
        if self.current is not None:
            self.attempts += 1
        return self.current

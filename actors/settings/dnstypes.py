"""The plain data a ``[dns]`` table is made of: upstreams, upstream groups, rule
matches, routes, per-source upstreams, SRV records. Parsing and checking live here; what the
controller does with them (matching a query, forwarding it) lives in actors.dns.

An upstream is written as a URL, ``udp://198.51.100.53``, ``tcp://...``,
``tls://HOST[:853][#name]``, ``https://HOST[:443][/path][#name]`` or
``doq://HOST[:853][#name]`` (DNS over QUIC, RFC 9250). The host of udp:// and
tcp:// must be an IP literal; that of an encrypted upstream may be a host
name, which the controller resolves through the ``bootstrap`` servers and
whose certificate must then carry that name. The optional ``#name`` is the
TLS name to verify for an IP host (as unbound's ``forward-addr:
IP@853#name``); without it the certificate must carry the IP.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import dns.rdatatype

DEFAULT_PORTS: dict[str, int] = {"udp": 53, "tcp": 53, "tls": 853, "https": 443, "doq": 853}
ENCRYPTED = frozenset({"tls", "https", "doq"})  # the schemes that verify a certificate, by name or IP
# A host name (RFC 1123), as an upstream's host: letters, digits, '-', and at least one dot.
HOST_NAME = re.compile(r"(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z]([a-z0-9-]{0,61}[a-z0-9])?")
DEFAULT_DOH_PATH = "/dns-query"
MATCH_KINDS = ("full", "suffix", "keyword", "regex", "qtype", "dst")
REJECT = "reject"
ASIS = "asis"
# How a group picks the upstream a query goes to first (actors.dns.choice).
FAILOVER, MIN_LATENCY, RANDOM = POLICIES = ("failover", "min_latency", "random")

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def normalize_name(name: str) -> str:
    """Lowercase, no trailing dot: the form every matcher compares."""
    return name.lower().rstrip(".")


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

    @property
    def named(self) -> bool:
        """Its host is a name, to resolve through the bootstrap servers (not an IPv6 or IPv4 literal)."""
        return ":" not in self.host and not self.host.replace(".", "").isdigit()

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
        raise ValueError(f"{url!r}: scheme must be one of udp, tcp, tls, https, doq")
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
        host = _host_name(url, scheme, host.rstrip("."), parts.fragment)
    if scheme == "https":
        path = parts.path or DEFAULT_DOH_PATH
    elif parts.path not in ("", "/"):
        raise ValueError(f"{url!r}: a path is only meaningful for https://")
    else:
        path = ""
    if parts.fragment and scheme not in ENCRYPTED:
        raise ValueError(f"{url!r}: '#name' is only meaningful for tls://, https:// and doq://")
    return Upstream(scheme, host, port, path, parts.fragment.lower())


def _host_name(url: str, scheme: str, host: str, fragment: str) -> str:
    if scheme not in ENCRYPTED:
        raise ValueError(f"{url!r}: host must be an IP address (a name only for tls, https, doq)")
    if not HOST_NAME.fullmatch(host):
        raise ValueError(f"{url!r}: host must be an IP address or a host name")
    if fragment:
        raise ValueError(f"{url!r}: '#name' is for an IP host; a host name is itself the TLS name")
    return host


@dataclass(frozen=True)
class Matcher:
    """What a rule matches: KIND:PATTERN, checked (a regex compiles, a query type exists)."""

    kind: str
    pattern: str
    qtype: int = 0  # the query type of a qtype match
    network: IPNetwork | None = None  # a dst match's: the intercepted query's original destination in it
    # Compiled once, from the pattern: a rule is tried on every forwarded query.
    regex: re.Pattern[str] | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "regex", re.compile(self.pattern, re.IGNORECASE) if self.kind == "regex" else None)

    @classmethod
    def parse(cls, text: str) -> Matcher:
        if not isinstance(text, str) or ":" not in text:
            raise ValueError(f"match {text!r} must be KIND:PATTERN, KIND one of {', '.join(MATCH_KINDS)}")
        kind, _, pattern = text.partition(":")
        kind, pattern = kind.strip().lower(), pattern.strip()
        if kind not in MATCH_KINDS:
            raise ValueError(f"match {text!r}: unknown kind {kind!r}, expected one of {', '.join(MATCH_KINDS)}")
        if not pattern:
            raise ValueError(f"match {text!r}: empty pattern")
        if kind == "regex":
            try:
                return cls(kind, pattern)
            except re.error as exc:
                raise ValueError(f"match {text!r}: bad regex: {exc}") from None
        if kind == "dst":
            try:
                network = ipaddress.ip_network(pattern, strict=False)
            except ValueError:
                raise ValueError(f"match {text!r}: not an address or prefix") from None
            return cls(kind, str(network), network=network)
        if kind == "qtype":
            try:
                qtype = int(pattern) if pattern.isdigit() else dns.rdatatype.from_text(pattern.upper())
            except dns.rdatatype.UnknownRdatatype:
                raise ValueError(f"match {text!r}: unknown query type") from None
            return cls(kind, pattern.upper(), int(qtype))
        return cls(kind, normalize_name(pattern))


@dataclass(frozen=True)
class Rule:
    matcher: Matcher
    action: str  # REJECT, ASIS or an upstream group name


@dataclass(frozen=True)
class UpstreamGroup:
    upstreams: tuple[Upstream, ...]
    policy: str = FAILOVER


@dataclass(frozen=True)
class Route:
    suffix: str
    upstreams: tuple[Upstream, ...]


@dataclass(frozen=True)
class SourceOverride:
    network: IPNetwork
    upstreams: tuple[Upstream, ...]


@dataclass(frozen=True)
class SrvRecord:
    name: str  # fully qualified, e.g. "_http._tcp.mesh"
    target: str  # fully qualified, e.g. "alpha.mesh"
    port: int
    priority: int = 0
    weight: int = 0

"""The DNS controller's settings, built from the ``[dns]`` TOML table.

Every wrong value raises ValueError naming the key (``dns.upstreams[1]: ...``)
so the config loader can refuse the file before anything starts.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import dns.exception
import dns.name
import dns.rcode

from meshsup.actors.settings.dnstypes import (
    ASIS,
    FAILOVER,
    POLICIES,
    REJECT,
    IPNetwork,
    Matcher,
    Route,
    Rule,
    SourceOverride,
    SrvRecord,
    Upstream,
    UpstreamGroup,
    normalize_name,
    parse_upstream,
)

DNS_KEYS = frozenset(
    {
        "listen",
        "domain",
        "upstreams",
        "policy",
        "bootstrap",
        "set_os_resolver",
        "search",
        "routes",
        "rules",
        "groups",
        "ttl",
        "cache_size",
        "cache_min_ttl",
        "cache_max_ttl",
        "serve_stale",
        "stale_ttl",
        "max_inflight",
        "timeout",
        "tcp_idle_timeout",
        "ndots",
        "reject_rcode",
        "ca_file",
        "srv",
        "source_overrides",
        "allow",
        "rate_limit",
        "rate_limit_window",
        "rate_limit_slip",
        "intercept",
    }
)
REJECT_RCODES = {"noerror": dns.rcode.NOERROR, "nxdomain": dns.rcode.NXDOMAIN}
MAX_TTL = 2**31 - 1  # RFC 2181 section 8
# DNS interception (`intercept`): the addresses of the controller's interception
# sockets, which the router's ingress program (meshsup.bpf.intercept) hands DNS to,
# and the mark and routing table that deliver it locally. IPv4: a loopback
# address of its own; IPv6 has one loopback address, so the socket is bound
# (transparent) to one of the discard-only prefix (RFC 6666), which no packet
# reaches otherwise. UDP is on port 53, the port its replies must come from (a
# reply takes the socket's port); a TCP connection takes its ports from the
# client's SYN, so the listener is on a port of its own, leaving 53 free for a
# wildcard `listen`.
INTERCEPT_V4 = "127.0.0.153"
INTERCEPT_V6 = "100::53"
INTERCEPT_UDP_PORT = 53
INTERCEPT_TCP_PORT = 54
INTERCEPT_MARK = INTERCEPT_TABLE = 0x4453
IFNAME = re.compile(r"[^/\s:]{1,15}")  # what the kernel takes as an interface name (dev_valid_name)
# A name's address: as written in the config, or parsed already (the node's and the peers').
Address = str | ipaddress.IPv4Address | ipaddress.IPv6Address
# Host names (RFC 1123) plus the underscore that SRV owner names need.
LABEL = re.compile(r"[a-z0-9_]([a-z0-9_-]{0,62})")


@dataclass(frozen=True)
class DnsSettings:
    listen: tuple[tuple[str, int], ...] = (("127.0.0.1", 53),)
    domain: str = "mesh"
    upstreams: tuple[Upstream, ...] = ()
    policy: str = FAILOVER  # the default upstreams' (they are a group too)
    # Plain DNS servers (address, port) that resolve the host names of upstreams
    # (tls://dns.example): by default the udp:// and tcp:// upstreams given by address.
    bootstrap: tuple[tuple[str, int], ...] = ()
    set_os_resolver: bool = False
    search: tuple[str, ...] = ()  # resolv.conf's search domains after `domain` (set_os_resolver)
    routes: tuple[Route, ...] = ()
    rules: tuple[Rule, ...] = ()
    groups: dict[str, UpstreamGroup] = field(default_factory=dict)
    names: dict[str, tuple[str, ...]] = field(default_factory=dict)
    ttl: int = 600
    cache_size: int = 4096
    cache_min_ttl: int = 0
    cache_max_ttl: int = 86400
    serve_stale: bool = False
    stale_ttl: int = 86400  # how long past expiry a stale answer may still be served
    max_inflight: int = 1024
    timeout: float = 2.0  # per upstream attempt
    tcp_idle_timeout: float = 10.0
    ndots: int = 0
    reject_rcode: str = "noerror"
    ca_file: str | None = None
    srv: tuple[SrvRecord, ...] = ()
    source_overrides: tuple[SourceOverride, ...] = ()
    # Who is answered besides loopback (access.py): the mesh's ranges, from the
    # node's addresses and peers (a range two peers route, twice: one going leaves
    # it answered), and the prefixes of `allow`.
    mesh: tuple[IPNetwork, ...] = ()
    allow: tuple[IPNetwork, ...] = ()
    rate_limit: int = 100  # UDP responses a second per client prefix; 0: no limit
    rate_limit_window: float = 5.0
    rate_limit_slip: int = 2
    intercept: tuple[str, ...] = ()  # interfaces whose DNS, to any address, the controller answers

    @property
    def reject_rcode_value(self) -> int:
        return REJECT_RCODES[self.reject_rcode]

    @property
    def nameservers(self) -> list[str]:
        """The listen addresses resolv.conf can name: those on port 53 (it has no
        port), an unspecified address as the loopback one."""
        out = []
        for host, port in self.listen:
            if port == 53:
                address = ipaddress.ip_address(host)
                if address.is_unspecified:
                    address = ipaddress.ip_address("::1" if address.version == 6 else "127.0.0.1")
                out.append(str(address))
        return list(dict.fromkeys(out))

    @property
    def sources(self) -> tuple[IPNetwork, ...]:
        """The networks whose clients are answered, loopback aside."""
        return self.mesh + self.allow

    def with_mesh(self, names: Mapping[str, Sequence[Address]], mesh: Sequence[IPNetwork]) -> DnsSettings:
        """These settings answering for `names` (host label -> addresses) as the mesh's own, and
        answering the clients of the `mesh` networks (as parsed: the node's and the peers')."""
        return replace(self, names=_names(names), mesh=tuple(mesh))

    def with_names_changed(
        self, gone: Sequence[str], names: Mapping[str, Sequence[Address]], mesh: Sequence[IPNetwork]
    ) -> DnsSettings:
        """These settings with the `gone` host labels out and `names` in (only those are checked),
        answering the clients of the `mesh` networks: with_mesh for a change of a few peers."""
        kept = dict(self.names)
        for label in gone:
            kept.pop(_dns_name(label, f"names.{label}"), None)
        return replace(self, names={**kept, **_names(names)}, mesh=tuple(mesh))

    @classmethod
    def from_config(
        cls, dns_table: Mapping[str, Any], names: Mapping[str, list[str]], mesh: Sequence[str] = ()
    ) -> DnsSettings:
        unknown = set(dns_table) - DNS_KEYS
        if unknown:
            raise ValueError(f"dns: unknown keys {', '.join(sorted(unknown))}")
        t = _Table(dns_table)
        domain = t.get("domain", cls.domain, str, _dns_name)
        groups = t.get("groups", {}, dict, _groups)
        upstreams = t.get("upstreams", [], list, _upstreams)
        listen = t.get("listen", [f"{h}:{p}" for h, p in cls.listen], list, _listen)
        settings = cls(
            listen=listen,
            domain=domain,
            upstreams=upstreams,
            policy=t.get("policy", FAILOVER, str, _policy),
            bootstrap=t.get("bootstrap", None, list, _listen) or _plain_servers(upstreams),
            set_os_resolver=t.get("set_os_resolver", cls.set_os_resolver, bool),
            search=t.get("search", [], list, _search),
            routes=t.get("routes", [], list, _routes),
            rules=t.get("rules", [], list, lambda v, k: _rules(v, k, set(groups))),
            groups=groups,
            names=_names(names),
            ttl=t.get("ttl", cls.ttl, int, _between(0, MAX_TTL)),
            cache_size=t.get("cache_size", cls.cache_size, int, _between(0, 10_000_000)),
            cache_min_ttl=t.get("cache_min_ttl", cls.cache_min_ttl, int, _between(0, MAX_TTL)),
            cache_max_ttl=t.get("cache_max_ttl", cls.cache_max_ttl, int, _between(0, MAX_TTL)),
            serve_stale=t.get("serve_stale", cls.serve_stale, bool),
            stale_ttl=t.get("stale_ttl", cls.stale_ttl, int, _between(0, MAX_TTL)),
            max_inflight=t.get("max_inflight", cls.max_inflight, int, _between(1, 1_000_000)),
            timeout=t.get("timeout", cls.timeout, float, _between(0.01, 60.0)),
            tcp_idle_timeout=t.get("tcp_idle_timeout", cls.tcp_idle_timeout, float, _between(0.1, 3600.0)),
            ndots=t.get("ndots", cls.ndots, int, _between(0, 15)),
            reject_rcode=t.get("reject_rcode", cls.reject_rcode, str, _reject_rcode),
            ca_file=t.get("ca_file", None, str, _ca_file),
            srv=t.get("srv", [], list, lambda v, k: _srv(v, k, domain)),
            source_overrides=t.get("source_overrides", [], list, _overrides),
            mesh=_networks(list(mesh), "mesh"),
            allow=t.get("allow", [], list, _networks),
            rate_limit=t.get("rate_limit", cls.rate_limit, int, _between(0, 1_000_000)),
            rate_limit_window=t.get("rate_limit_window", cls.rate_limit_window, float, _between(1.0, 3600.0)),
            rate_limit_slip=t.get("rate_limit_slip", cls.rate_limit_slip, int, _between(0, 10)),
            intercept=t.get("intercept", [], list, _interfaces),
        )
        if settings.cache_min_ttl > settings.cache_max_ttl:
            raise ValueError("dns.cache_min_ttl: greater than dns.cache_max_ttl")
        _check_bootstrap(settings)
        if settings.set_os_resolver and not settings.nameservers:
            raise ValueError("dns.set_os_resolver: needs a dns.listen address on port 53 (resolv.conf has no ports)")
        return settings


class _Table:
    """Typed access to the TOML table; every error names its key."""

    def __init__(self, table: Mapping[str, Any]) -> None:
        self._table = table

    def get(self, key: str, default: Any, kind: type, convert: Callable[[Any, str], Any] | None = None) -> Any:
        value = self._table.get(key, default)
        name = f"dns.{key}"
        if value is not None:
            value = _typed(value, kind, name)
        return convert(value, name) if convert is not None and value is not None else value


def _typed(value: Any, kind: type, name: str) -> Any:
    # bool is an int to Python but never a number in a config file.
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, bool) != (kind is bool) or not isinstance(value, kind):
        raise ValueError(f"{name}: expected {kind.__name__}, got {type(value).__name__}")
    return value


def _between(low: float, high: float) -> Callable[[Any, str], Any]:
    def check(value: Any, name: str) -> Any:
        if not low <= value <= high:
            raise ValueError(f"{name}: {value} is outside {low}..{high}")
        return value

    return check


def host_label(name: str) -> str:
    """A mesh name as `names` keys it (ValueError if it is not a DNS name)."""
    return _dns_name(name, f"names.{name}")


def _dns_name(text: str, name: str) -> str:
    if LABEL.fullmatch(text):  # one plain label (a peer's name, thousands of them): its normal form already
        return text
    try:
        parsed = dns.name.from_text(text, origin=None)
    except dns.exception.DNSException as exc:
        raise ValueError(f"{name}: {text!r} is not a valid DNS name: {exc}") from None
    if len(parsed.labels) == 0 or parsed == dns.name.root:
        raise ValueError(f"{name}: empty name")
    normalized = normalize_name(parsed.to_text())
    if not all(LABEL.fullmatch(label) for label in normalized.split(".")):
        raise ValueError(f"{name}: {text!r} has a label that is not letters, digits, '-' or '_'")
    return normalized


def _listen(value: list[Any], name: str) -> tuple[tuple[str, int], ...]:
    if not value:
        raise ValueError(f"{name}: at least one listen address is needed")
    out = []
    for i, item in enumerate(value):
        key = f"{name}[{i}]"
        text = _typed(item, str, key)
        host, sep, port = text.rpartition(":")
        if not sep or text.endswith("]") or (text.count(":") > 1 and not host.startswith("[")):
            host, port = text, "53"  # a bare address, v4 or v6
        host = host.strip("[]")
        try:
            address = str(ipaddress.ip_address(host))
            number = int(port)
        except ValueError:
            raise ValueError(f"{key}: {text!r} is not ADDRESS:PORT") from None
        if not 0 < number < 65536:
            raise ValueError(f"{key}: port {number} out of range")
        if address in (INTERCEPT_V4, INTERCEPT_V6):
            raise ValueError(f"{key}: {address} is kept for the interception sockets (dns.intercept)")
        out.append((address, number))
    return tuple(dict.fromkeys(out))


def _interfaces(value: list[Any], name: str) -> tuple[str, ...]:
    out = []
    for i, item in enumerate(value):
        key = f"{name}[{i}]"
        text = _typed(item, str, key)
        if not IFNAME.fullmatch(text) or text in (".", ".."):
            raise ValueError(f"{key}: {text!r} is not an interface name")
        out.append(text)
    return tuple(dict.fromkeys(out))


def _search(value: list[Any], name: str) -> tuple[str, ...]:
    return tuple(_dns_name(_typed(v, str, f"{name}[{i}]"), f"{name}[{i}]") for i, v in enumerate(value))


def _upstreams(value: list[Any], name: str) -> tuple[Upstream, ...]:
    out = []
    for i, item in enumerate(value):
        try:
            out.append(parse_upstream(item))
        except ValueError as exc:
            raise ValueError(f"{name}[{i}]: {exc}") from None
    return tuple(out)


def _plain_servers(upstreams: tuple[Upstream, ...]) -> tuple[tuple[str, int], ...]:
    """The default bootstrap: the upstreams that need no resolving nor certificate."""
    return tuple(dict.fromkeys((u.host, u.port) for u in upstreams if u.scheme in ("udp", "tcp")))


def _check_bootstrap(settings: DnsSettings) -> None:
    """A host name needs a bootstrap server, and a bootstrap server that is this
    controller would ask itself (then its named upstream) for that name."""
    lists = [settings.upstreams, *(g.upstreams for g in settings.groups.values())]
    lists += [r.upstreams for r in settings.routes] + [o.upstreams for o in settings.source_overrides]
    named = next((u for upstreams in lists for u in upstreams if u.named), None)
    if named is None:
        return
    if not settings.bootstrap:
        raise ValueError(f"dns.bootstrap: {named} names its host: give the addresses of servers to resolve it")
    for i, (host, port) in enumerate(settings.bootstrap):
        target = ipaddress.ip_address(host)
        for own_host, own_port in settings.listen:
            own = ipaddress.ip_address(own_host)
            if port == own_port and (own == target or (own.is_unspecified and target.is_loopback)):
                raise ValueError(f"dns.bootstrap[{i}]: {host} port {port} is this controller's own listener")


def _tables(value: list[Any], name: str, required: tuple[str, ...], optional: tuple[str, ...] = ()) -> list[dict]:
    for i, item in enumerate(value):
        key = f"{name}[{i}]"
        if not isinstance(item, dict):
            raise ValueError(f"{key}: expected a table")
        missing = [k for k in required if k not in item]
        extra = set(item) - set(required) - set(optional)
        if missing:
            raise ValueError(f"{key}: missing {', '.join(missing)}")
        if extra:
            raise ValueError(f"{key}: unknown keys {', '.join(sorted(extra))}")
    return value


def _routes(value: list[Any], name: str) -> tuple[Route, ...]:
    out = []
    for i, item in enumerate(_tables(value, name, ("suffix", "upstreams"))):
        key = f"{name}[{i}]"
        suffix = _dns_name(_typed(item["suffix"], str, f"{key}.suffix"), f"{key}.suffix")
        ups = _upstreams(_typed(item["upstreams"], list, f"{key}.upstreams"), f"{key}.upstreams")
        if not ups:
            raise ValueError(f"{key}.upstreams: empty")
        out.append(Route(suffix, ups))
    return tuple(out)


def _groups(value: dict[str, Any], name: str) -> dict[str, UpstreamGroup]:
    """NAME = [URLs] (failover), or the table form: [dns.groups.NAME] upstreams = [URLs], policy = "..."."""
    out = {}
    for group, spec in value.items():
        key = f"{name}.{group}"
        if group in (REJECT, ASIS):
            raise ValueError(f"{key}: {group!r} is a reserved action name")
        if isinstance(spec, dict):
            extra = set(spec) - {"upstreams", "policy"}
            if extra:
                raise ValueError(f"{key}: unknown keys {', '.join(sorted(extra))}")
            if "upstreams" not in spec:
                raise ValueError(f"{key}: missing upstreams")
            urls_key = f"{key}.upstreams"
            ups = _upstreams(_typed(spec["upstreams"], list, urls_key), urls_key)
            policy = _policy(_typed(spec.get("policy", FAILOVER), str, f"{key}.policy"), f"{key}.policy")
        elif isinstance(spec, list):
            urls_key, policy = key, FAILOVER
            ups = _upstreams(spec, key)
        else:
            raise ValueError(f"{key}: expected a list of upstream URLs or a table, got {type(spec).__name__}")
        if not ups:
            raise ValueError(f"{urls_key}: empty")
        out[group] = UpstreamGroup(ups, policy)
    return out


def _policy(value: str, name: str) -> str:
    if value not in POLICIES:
        raise ValueError(f"{name}: {value!r} is not one of {', '.join(POLICIES)}")
    return value


def _rules(value: list[Any], name: str, groups: set[str]) -> tuple[Rule, ...]:
    out = []
    for i, item in enumerate(_tables(value, name, ("match", "action"))):
        key = f"{name}[{i}]"
        try:
            matcher = Matcher.parse(_typed(item["match"], str, f"{key}.match"))
        except ValueError as exc:
            raise ValueError(f"{key}.match: {exc}") from None
        action = _typed(item["action"], str, f"{key}.action")
        if action not in (REJECT, ASIS) and action not in groups:
            raise ValueError(f"{key}.action: {action!r} is not reject, asis or a group in dns.groups")
        out.append(Rule(matcher, action))
    return tuple(out)


def _reject_rcode(value: str, name: str) -> str:
    if value.lower() not in REJECT_RCODES:
        raise ValueError(f"{name}: expected one of {', '.join(REJECT_RCODES)}")
    return value.lower()


def _ca_file(value: str, name: str) -> str:
    if not os.path.isfile(value):
        raise ValueError(f"{name}: {value!r} is not a readable file")
    return value


def _srv(value: list[Any], name: str, domain: str) -> tuple[SrvRecord, ...]:
    out = []
    for i, item in enumerate(_tables(value, name, ("name", "target", "port"), ("priority", "weight"))):
        key = f"{name}[{i}]"
        numbers = {}
        for field_name in ("port", "priority", "weight"):
            numbers[field_name] = _between(0, 65535)(
                _typed(item.get(field_name, 0), int, f"{key}.{field_name}"), f"{key}.{field_name}"
            )
        out.append(
            SrvRecord(
                name=_in_domain(_typed(item["name"], str, f"{key}.name"), domain, f"{key}.name"),
                target=_in_domain(_typed(item["target"], str, f"{key}.target"), domain, f"{key}.target", inside=False),
                **numbers,
            )
        )
    return tuple(out)


def _in_domain(text: str, domain: str, name: str, inside: bool = True) -> str:
    """A relative name is under the domain; a name with a trailing dot is absolute."""
    full = _dns_name(text if text.endswith(".") else f"{text}.{domain}.", name)
    if inside and not (full == domain or full.endswith("." + domain)):
        raise ValueError(f"{name}: {text!r} is not under the domain {domain!r}")
    return full


def _overrides(value: list[Any], name: str) -> tuple[SourceOverride, ...]:
    out = []
    for i, item in enumerate(_tables(value, name, ("source", "upstreams"))):
        key = f"{name}[{i}]"
        try:
            network = ipaddress.ip_network(_typed(item["source"], str, f"{key}.source"), strict=False)
        except ValueError as exc:
            raise ValueError(f"{key}.source: {exc}") from None
        ups = _upstreams(_typed(item["upstreams"], list, f"{key}.upstreams"), f"{key}.upstreams")
        out.append(SourceOverride(network, ups))
    return tuple(out)


def _networks(value: list[Any], name: str) -> tuple[IPNetwork, ...]:
    out = []
    for i, item in enumerate(value):
        key = f"{name}[{i}]"
        try:
            out.append(ipaddress.ip_network(_typed(item, str, key), strict=False))
        except ValueError as exc:
            raise ValueError(f"{key}: {exc}") from None
    return tuple(dict.fromkeys(out))


def _names(names: Mapping[str, Sequence[Address]]) -> dict[str, tuple[str, ...]]:
    out: dict[str, tuple[str, ...]] = {}
    for label, addresses in names.items():
        key = f"names.{label}"
        host = _dns_name(_typed(label, str, key), key)
        parsed = []
        for address in addresses:
            if isinstance(address, ipaddress.IPv4Address | ipaddress.IPv6Address):  # the node's and peers', parsed
                parsed.append(str(address))
                continue
            try:
                # Config addresses may carry a prefix length (100.64.0.1/32).
                parsed.append(str(ipaddress.ip_interface(address).ip))
            except (ValueError, TypeError):
                raise ValueError(f"{key}: {address!r} is not an IP address") from None
        out[host] = tuple(dict.fromkeys(out.get(host, ()) + tuple(parsed)))
    return out

"""The [netlog] and [logging] tables, and what the node's config says about its traffic.

`netlog_settings` is the one parser of both tables: the supervisor calls it
to refuse a wrong config at start, the netlog actor to apply it. Errors are
ValueErrors starting with the key at fault ("netlog.interval: ...").
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meshsup.actors.settings.collectors import CollectorConfig, parse_collectors
from meshsup.actors.netlog.daemonlog import LEVELS
from meshsup.actors.netlog.flows import DEFAULT_MAX_RECORD_BYTES, MIN_RECORD_BYTES, Classifier, format_endpoint, parse_endpoint

NETLOG_KEYS = frozenset({"interval", "collectors", "anonymize_exit", "max_record_bytes"})
LOGGING_KEYS = frozenset({"collectors", "level"})
LOG_KINDS = ("syslog", "http")  # a log line is no flow: IPFIX cannot carry it


@dataclass(frozen=True)
class NetlogSettings:
    interval: float = 5.0  # seconds per record window
    anonymize_exit: bool = True
    max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES
    collectors: tuple[CollectorConfig, ...] = ()
    log_level: str = "info"  # the least severe log events shipped
    log_collectors: tuple[CollectorConfig, ...] = ()


def netlog_settings(config: dict[str, Any]) -> NetlogSettings:
    netlog = _table(config.get("netlog", {}), "netlog", NETLOG_KEYS)
    logging = _table(config.get("logging", {}), "logging", LOGGING_KEYS)
    source = str(config.get("source", ""))
    base_dir = Path(source).resolve().parent if source and not source.startswith("(") else None
    interval = netlog.get("interval", 5.0)
    if isinstance(interval, bool) or not isinstance(interval, (int, float)) or not 0 < interval <= 3600:
        raise ValueError(f"netlog.interval: expected seconds in (0, 3600], got {interval!r}")
    anonymize = netlog.get("anonymize_exit", True)
    if not isinstance(anonymize, bool):
        raise ValueError(f"netlog.anonymize_exit: expected true or false, got {anonymize!r}")
    cap = netlog.get("max_record_bytes", DEFAULT_MAX_RECORD_BYTES)
    if isinstance(cap, bool) or not isinstance(cap, int) or cap < MIN_RECORD_BYTES:
        raise ValueError(f"netlog.max_record_bytes: expected an integer of at least {MIN_RECORD_BYTES}, got {cap!r}")
    level = logging.get("level", "info")
    if level not in LEVELS:
        raise ValueError(f"logging.level: expected one of {', '.join(LEVELS)}, got {level!r}")
    return NetlogSettings(
        interval=float(interval),
        anonymize_exit=anonymize,
        max_record_bytes=cap,
        collectors=tuple(parse_collectors(netlog.get("collectors", []), base_dir)),
        log_level=level,
        log_collectors=tuple(parse_collectors(logging.get("collectors", []), base_dir, "logging.collectors", LOG_KINDS)),
    )


def _table(value: object, name: str, keys: frozenset[str]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError(f"{name}: expected a table")
    for key in value:
        if key not in keys:
            raise ValueError(f"{name}.{key}: unknown key (known: {', '.join(sorted(keys))})")
    return value


def _networks(prefixes: list[str]) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    return [ipaddress.ip_network(p, strict=False) for p in prefixes]


def classifier(config: dict[str, Any], anonymize_exit: bool) -> Classifier:
    """Mesh: the node's own networks and the peers' single addresses (as DNS names them).
    Subnets: the peers' other routes, but default routes, which make a peer an exit node.
    Skipped: the node's DNS listeners."""
    mesh = [str(ipaddress.ip_interface(a).network) for a in config["node"]["addresses"]]
    subnets = []
    for peer in config["peers"]:
        for net in _networks(peer["allowed_ips"]):
            if net.prefixlen == net.max_prefixlen:
                mesh.append(str(net))
            elif net.prefixlen:
                subnets.append(str(net))
    return Classifier(mesh, subnets, (), anonymize_exit, service_endpoints=_dns_listeners(config))


def _dns_listeners(config: dict[str, Any]) -> list[tuple[str, int]]:
    from meshsup.actors.dns.actor import dns_settings  # the DNS actor's own reading of [dns]

    try:
        return list(dns_settings(config).listen)
    except ValueError:  # refused at start already; a node without it still logs flows
        return []


def endpoint_peers(config: dict[str, Any]) -> dict[str, str]:
    """Each configured endpoint ("host:port") -> its peer's mesh address as "ip:0", IPv4 first."""
    out = {}
    for peer in config["peers"]:
        hosts = sorted(
            (net.network_address for net in _networks(peer["allowed_ips"]) if net.prefixlen == net.max_prefixlen),
            key=lambda a: a.version,
        )
        if not hosts:
            continue
        for text in peer["endpoints"]:
            endpoint = parse_endpoint(text)
            if endpoint is not None:
                out[format_endpoint(*endpoint)] = format_endpoint(hosts[0], 0)
    return out

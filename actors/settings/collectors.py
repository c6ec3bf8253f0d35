"""Collector configuration: the [[netlog.collectors]] tables, checked before anything starts.

Every error is a ValueError whose message starts with the key at fault,
e.g. "netlog.collectors[1].address: ...", so the supervisor can prefix the
file name and show it as is.
"""

from __future__ import annotations

import ipaddress
import re
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

# The schemes each kind accepts: syslog over TCP or TLS (RFC 5425), IPFIX over UDP.
SCHEMES = {"syslog": ("tcp", "tls"), "ipfix": ("udp",), "http": ("http", "https")}
_DEFAULT_PORTS = {"http": 80, "https": 443}
_TLS_SCHEMES = ("tls", "https")
_COMMON_KEYS = frozenset({"kind", "address", "name"})
_KIND_KEYS = {
    "syslog": frozenset({"ca_file", "spool_max_records", "spool_max_bytes"}),
    "ipfix": frozenset({"template_interval", "max_message_size"}),
    "http": frozenset({"ca_file", "gzip", "format", "batch_records", "spool_max_records", "spool_max_bytes"}),
}
# http bodies: a JSON array of records, or journal export entries (systemd-journal-remote).
HTTP_FORMATS = ("json", "journal")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # also a spool directory name
_HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")


@dataclass(frozen=True)
class CollectorConfig:
    name: str
    kind: str  # syslog | ipfix | http
    scheme: str  # tcp | tls | udp | http | https
    host: str
    port: int
    path: str = ""  # http only
    ca_file: Path | None = None  # None: the system's trust store
    gzip: bool = False
    format: str = "json"  # http only: json | journal
    batch_records: int = 64
    spool_max_records: int = 10_000
    spool_max_bytes: int = 64 << 20
    template_interval: float = 60.0
    max_message_size: int = 1400

    @property
    def tls(self) -> bool:
        return self.scheme in _TLS_SCHEMES

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}{self.path}"


def parse_collectors(
    tables: object,
    base_dir: Path | None = None,
    where: str = "netlog.collectors",
    kinds: tuple[str, ...] = tuple(SCHEMES),
) -> list[CollectorConfig]:
    """Validate a list of TOML tables; relative ca_file paths are taken from base_dir."""
    if not isinstance(tables, list):
        raise ValueError(f"{where}: expected an array of tables ([[{where}]])")
    configs = [_parse_one(table, f"{where}[{i}]", base_dir, i, kinds) for i, table in enumerate(tables)]
    seen: set[str] = set()
    for i, config in enumerate(configs):
        if config.name in seen:
            raise ValueError(f"{where}[{i}].name: duplicate collector name {config.name!r}")
        seen.add(config.name)
    return configs


def _parse_one(table: object, where: str, base_dir: Path | None, index: int, kinds: tuple[str, ...]) -> CollectorConfig:
    if not isinstance(table, dict):
        raise ValueError(f"{where}: expected a table")
    kind = table.get("kind")
    if kind not in kinds:
        raise ValueError(f"{where}.kind: expected one of {', '.join(kinds)}, got {kind!r}")
    allowed = _COMMON_KEYS | _KIND_KEYS[kind]
    for key in table:
        if key not in allowed:
            raise ValueError(f"{where}.{key}: unknown key for a {kind} collector (known: {', '.join(sorted(allowed))})")
    if "address" not in table:
        raise ValueError(f"{where}.address: missing")
    scheme, host, port, path = _parse_address(table["address"], kind, f"{where}.address")
    name = table.get("name", f"{kind}-{index}")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"{where}.name: expected letters, digits, '_', '.', '-' (at most 64), got {name!r}")
    ca_file = table.get("ca_file")
    if ca_file is not None:
        if scheme not in _TLS_SCHEMES:
            raise ValueError(f"{where}.ca_file: only used with tls:// or https:// addresses")
        ca_file = _load_ca(ca_file, base_dir, f"{where}.ca_file")
    gzip = table.get("gzip", False)
    if not isinstance(gzip, bool):
        raise ValueError(f"{where}.gzip: expected true or false, got {gzip!r}")
    body_format = table.get("format", "json")
    if body_format not in HTTP_FORMATS:
        raise ValueError(f"{where}.format: expected one of {', '.join(HTTP_FORMATS)}, got {body_format!r}")
    if gzip and body_format == "journal":
        raise ValueError(f'{where}.gzip: systemd-journal-remote takes no compressed bodies (format = "journal")')
    numbers: dict[str, Any] = {
        key: _positive(table[key], f"{where}.{key}", allow_fraction=key == "template_interval")
        for key in ("batch_records", "spool_max_records", "spool_max_bytes", "template_interval", "max_message_size")
        if key in table
    }
    if numbers.get("max_message_size", 1400) < 512:
        raise ValueError(f"{where}.max_message_size: at least 512 bytes")
    return CollectorConfig(name, kind, scheme, host, port, path, ca_file, gzip, body_format, **numbers)


def _parse_address(value: object, kind: str, where: str) -> tuple[str, str, int, str]:
    if not isinstance(value, str):
        raise ValueError(f"{where}: expected a string like {SCHEMES[kind][0]}://127.0.0.1:6514")
    parts = urlsplit(value)
    schemes = SCHEMES[kind]
    if parts.scheme not in schemes:
        shown = " or ".join(f"{s}://" for s in schemes)
        raise ValueError(f"{where}: a {kind} collector needs {shown}, got {value!r}")
    try:
        port = parts.port or _DEFAULT_PORTS.get(parts.scheme)
    except ValueError:
        raise ValueError(f"{where}: bad port in {value!r}") from None
    host = parts.hostname
    if not host or not _valid_host(host):
        raise ValueError(f"{where}: bad or missing host in {value!r}")
    if port is None:
        raise ValueError(f"{where}: a port is needed in {value!r}")
    if parts.username is not None or parts.query or parts.fragment:
        raise ValueError(f"{where}: credentials, query and fragment are not allowed in {value!r}")
    if kind != "http" and parts.path:
        raise ValueError(f"{where}: no path expected in {value!r}")
    return parts.scheme, host, port, parts.path or ("/" if kind == "http" else "")


def _valid_host(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return len(host) <= 253 and all(_HOST_LABEL.fullmatch(label) for label in host.split("."))


def _load_ca(value: object, base_dir: Path | None, where: str) -> Path:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{where}: expected a file path")
    path = Path(value)
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    try:
        ssl.create_default_context().load_verify_locations(cafile=str(path))
    except (OSError, ssl.SSLError) as e:
        raise ValueError(f"{where}: cannot load CA certificates from {path}: {e}") from None
    return path


def _positive(value: object, where: str, allow_fraction: bool) -> int | float:
    ok_types = (int, float) if allow_fraction else (int,)
    if isinstance(value, bool) or not isinstance(value, ok_types) or value <= 0:
        raise ValueError(f"{where}: expected a positive {'number' if allow_fraction else 'integer'}, got {value!r}")
    return float(value) if allow_fraction else int(value)

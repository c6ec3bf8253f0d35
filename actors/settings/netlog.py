"""The [netlog] and [logging] tables.

`netlog_settings` is the one parser of both tables. Errors are ValueErrors
starting with the key at fault ("netlog.interval: ...").
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meshsup.actors.settings.collectors import CollectorConfig, parse_collectors

# structlog's level names, ordered; "exception" is logged at error level.
LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40, "critical": 50}
DEFAULT_MAX_RECORD_BYTES = 256 * 1024  # Tailscale's maxLogSize
MIN_RECORD_BYTES = 1024  # room for the header plus a few entries
NETLOG_KEYS = frozenset({"interval", "collectors", "anonymize_exit", "max_record_bytes"})
LOGGING_KEYS = frozenset({"collectors", "level"})
LOG_KINDS = ("syslog", "http")  # a log line is no flow: IPFIX cannot carry it


@dataclass(frozen=True, slots=True)
class NetlogSettings:
    interval: float = 5.0  # seconds per record window
    anonymize_exit: bool = True
    max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES
    collectors: tuple[CollectorConfig, ...] = ()
    log_level: str = "info"  # the least severe log events shipped
    log_collectors: tuple[CollectorConfig, ...] = ()


def netlog_settings(netlog_table: object, logging_table: object, base_dir: Path | None) -> NetlogSettings:
    """Relative ca_file paths are taken from base_dir (the config file's)."""
    netlog = _table(netlog_table, "netlog", NETLOG_KEYS)
    logging = _table(logging_table, "logging", LOGGING_KEYS)
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
        log_collectors=tuple(
            parse_collectors(logging.get("collectors", []), base_dir, "logging.collectors", LOG_KINDS)
        ),
    )


def _table(value: object, name: str, keys: frozenset[str]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError(f"{name}: expected a table")
    for key in value:
        if key not in keys:
            raise ValueError(f"{name}.{key}: unknown key (known: {', '.join(sorted(keys))})")
    return value

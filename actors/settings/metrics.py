"""The [metrics] table: where the supervisor serves Prometheus's /metrics (off without it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from meshsup.actors.settings.node import Endpoint, parse_endpoint
from meshsup.actors.settings.table import Table

METRICS_KEYS = {"listen"}


@dataclass(frozen=True, slots=True)
class MetricsSettings:
    listen: Endpoint | None = None  # (literal IP, port); None: no metrics served


def parse_metrics(file: str, table: Any) -> MetricsSettings:
    c = Table(file, table, "metrics", METRICS_KEYS)
    listen = c.get("listen", str, None)
    if listen is None:
        return MetricsSettings()
    try:
        return MetricsSettings(parse_endpoint(listen))
    except ValueError as err:
        raise c.fail("listen", f"{listen!r}: {err}") from None

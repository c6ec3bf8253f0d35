"""Prometheus's text exposition format (version 0.0.4), sans-IO: metric families in, text out.

Why not `prometheus-client`: it is built around counters that live in the
process that exports them, registered once and incremented in place. What
the supervisor exports are snapshots of other processes' counters (the
actors' heartbeats), whole and new on every scrape: a dozen lines that
render them serve better than building the client's registry each time,
and keep the supervisor free of a dependency for it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

Kind = Literal["counter", "gauge", "histogram"]
Labels = tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class Histogram:
    """Cumulative counts per upper bound (ascending, without +Inf), their sum and total count."""

    bounds: Sequence[float]
    cumulative: Sequence[int]
    total: float
    count: int


@dataclass
class Family:
    """One metric: its name, type, help, and a value per distinct label set."""

    name: str
    kind: Kind
    help: str
    samples: dict[Labels, float | Histogram] = field(default_factory=dict)

    def add(self, value: float | Histogram, **labels: str) -> None:
        """A sample; the same labels again add to it (several sources summed into one series)."""
        key = tuple(sorted(labels.items()))
        old = self.samples.get(key)
        if old is None or isinstance(value, Histogram) or isinstance(old, Histogram):
            self.samples[key] = value
        else:
            self.samples[key] = old + value


def escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def number(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(float(value))


def _labels(labels: Labels) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{escape_label(v)}"' for k, v in labels) + "}"


def render(families: Iterable[Family]) -> str:
    """The text a scrape gets; families without samples are left out."""
    out: list[str] = []
    for f in families:
        if not f.samples:
            continue
        out.append(f"# HELP {f.name} {escape_help(f.help)}")
        out.append(f"# TYPE {f.name} {f.kind}")
        for labels, value in f.samples.items():
            if isinstance(value, Histogram):
                for bound, count in zip([*value.bounds, math.inf], [*value.cumulative, value.count]):
                    le = labels + (("le", number(bound)),)
                    out.append(f"{f.name}_bucket{_labels(le)} {count}")
                out.append(f"{f.name}_sum{_labels(labels)} {number(value.total)}")
                out.append(f"{f.name}_count{_labels(labels)} {value.count}")
            else:
                out.append(f"{f.name}{_labels(labels)} {number(value)}")
    return "\n".join(out) + "\n" if out else ""

"""The in-flight table (merging, cap) and the log rate limiter."""

from __future__ import annotations

from meshsup.actors.dns.inflight import Admission, Flight, InflightTable, RateLimiter
from meshsup.actors.dns.upstream import FailoverPlan
from meshsup.actors.settings.dnstypes import parse_upstream


def test_inflight_merges_and_caps():
    table: InflightTable[str] = InflightTable(cap=2)
    make = lambda: Flight(b"q", FailoverPlan([parse_upstream("udp://198.51.100.1")]), 0.0)  # noqa: E731
    assert table.admit("k1", "w1", make) is Admission.STARTED
    assert table.admit("k1", "w2", make) is Admission.MERGED
    assert table.admit("k2", "w3", make) is Admission.STARTED
    assert table.admit("k3", "w4", make) is Admission.FULL
    assert table.finish("k1").waiters == ["w1", "w2"]
    assert table.admit("k3", "w4", make) is Admission.STARTED


def test_rate_limiter():
    limiter = RateLimiter(2.0)
    assert [limiter.allow(t) for t in (0.0, 0.5, 1.9, 2.0, 2.1)] == [True, False, False, True, False]
    assert limiter.suppressed == 3

"""A group's policy over its upstreams' latency and liveness, and the probe schedule (choice.py)."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from meshsup.actors.dns import choice
from meshsup.actors.dns.choice import DEAD_AFTER, IDLE_PROBE, PROBE_MAX, PROBE_MIN, Upstreams
from meshsup.actors.dns.resolver import Resolver
from meshsup.actors.settings.dnstypes import parse_upstream
from tests.actors.dns.helpers import CLIENT, only_forward, query_wire, settings, upstream_answer

A, B, C = (parse_upstream(f"udp://198.51.100.{i}") for i in (1, 2, 3))
GROUP = (A, B, C)


def book(policy: str = "min_latency", seed: int = 1) -> Upstreams:
    upstreams = Upstreams(random.Random(seed))
    upstreams.keep([(GROUP, policy)])
    return upstreams


def kill(upstreams: Upstreams, upstream, now: float) -> None:
    for i in range(DEAD_AFTER):
        upstreams.failed(upstream, "upstream_timeout", now + i * 0.01)


def test_min_latency_orders_by_moving_average_unmeasured_last():
    u = book()
    assert u.order(GROUP, "min_latency") == [A, B, C]  # nothing known: as configured
    u.answered(C, 0.050, 1.0)
    u.answered(B, 0.001, 1.0)
    assert u.order(GROUP, "min_latency") == [B, C, A]
    for now in range(2, 10):  # B slows down: its average follows, past C's
        u.answered(B, 0.200, float(now))
    assert u.order(GROUP, "min_latency") == [C, B, A]
    assert u.status()[str(C)]["latency_ms"] == 50.0


def test_moving_average_weighs_the_newest_by_its_weight():
    u = book()
    u.answered(A, 0.010, 1.0)
    u.answered(A, 0.020, 2.0)
    assert u.status()[str(A)]["latency_ms"] == pytest.approx(10 + choice.EWMA_WEIGHT * 10)


def test_a_dead_upstream_leaves_every_policy_and_all_dead_are_tried_anyway():
    u = book()
    u.answered(A, 0.001, 1.0)
    u.failed(A, "upstream_timeout", 2.0)
    assert u.status()[str(A)]["state"] == "alive"  # one lost answer is no death
    assert u.order(GROUP, "min_latency")[0] == A
    u.failed(A, "upstream_timeout", 3.0)
    assert u.status()[str(A)]["state"] == "dead"
    assert u.order(GROUP, "min_latency") == [B, C]
    assert u.order(GROUP, "failover") == [B, C]
    assert A not in u.order(GROUP, "random")
    kill(u, B, 4.0)
    kill(u, C, 4.0)
    assert u.order(GROUP, "failover") == GROUP  # nothing left alive: try them all, in order


def test_an_answer_with_any_rcode_proves_it_alive():
    u = book()
    u.failed(A, "upstream_timeout", 1.0)
    u.answered(A, 0.002, 2.0, "upstream_servfail")
    u.failed(A, "upstream_timeout", 3.0)
    state = u.status()[str(A)]
    assert state["state"] == "alive" and state["failures"] == 3 and not state["ok"]


def test_random_spreads_over_the_live_ones():
    u = book("random")
    kill(u, C, 0.0)
    firsts = Counter(u.order(GROUP, "random")[0] for _ in range(400))
    assert set(firsts) == {A, B} and min(firsts.values()) > 150


def test_failover_keeps_the_order_and_measures_nothing():
    u = book("failover")
    assert u.order(GROUP, "failover") is GROUP
    assert u.probes(100.0) == []  # alive, and nobody compares their latencies


def test_min_latency_upstreams_are_probed_at_once_then_when_idle():
    u = book()
    assert u.probes(1.0) == [A, B, C]
    assert u.probes(1.1) == []  # one probe at a time
    for upstream in GROUP:
        u.probed(upstream, 1.05)
    assert u.status()[str(A)]["latency_ms"] == 50.0
    u.answered(A, 0.001, 5.0)  # A is busy with live queries
    idle = 1.05 + IDLE_PROBE * (1 + choice.JITTER)
    assert u.probes(idle) == [B, C]
    assert u.status()[str(B)]["probes"] == 2


def test_dead_upstream_probes_are_paced_and_back_off():
    u = book("failover")
    kill(u, A, 0.0)
    sent = []
    now = 0.0
    while now < 200.0:  # however often asked, probes follow the schedule
        for upstream in u.probes(now):
            sent.append(now)
            u.probed(upstream, now + 0.5, "timeout")
        now += 0.05
    gaps = [b - a for a, b in zip(sent, sent[1:])]
    low, high = 1 - choice.JITTER, 1 + choice.JITTER
    assert PROBE_MIN * low <= sent[0] <= PROBE_MIN * high + 0.05
    for i, gap in enumerate(gaps):  # each unanswered probe doubles the wait, up to PROBE_MAX
        wait = min(PROBE_MIN * 2**i, PROBE_MAX)
        assert 0.5 + wait * low <= gap <= 0.5 + wait * high + 0.05, (i, gaps)
    assert len(sent) <= 12 and u.status()[str(A)]["state"] == "dead"


def test_a_dead_upstream_returns_once_it_answers_a_probe_with_a_fresh_figure():
    u = book()
    u.answered(A, 0.300, 0.0)
    kill(u, A, 1.0)
    assert u.probes(1.5) == [B, C]  # the idle ones; A's first probe waits PROBE_MIN
    due = 1.01 + PROBE_MIN * (1 + choice.JITTER) + 0.01
    assert u.probes(due) == [A]
    u.probed(A, due + 0.002)
    state = u.status()[str(A)]
    assert state["state"] == "alive" and state["latency_ms"] == 2.0  # not averaged with its old 300 ms
    assert u.order(GROUP, "min_latency")[0] == A


def test_live_failures_do_not_hasten_probes():
    u = book("failover")
    kill(u, A, 0.0)
    (first,) = [t / 100 for t in range(0, 200) if A in u.probes(t / 100)]
    for i in range(100):  # a flood of failures while the probe is out
        u.failed(A, "upstream_timeout", first + i * 0.001)
    assert u.probes(first + 0.2) == []


def test_keep_forgets_and_adds():
    u = book()
    kill(u, A, 0.0)
    u.keep([((B, C), "failover")])
    assert set(u.status()) == {str(B), str(C)}
    u.keep([(GROUP, "failover")])
    assert u.status()[str(A)]["state"] == "alive" and u.order(GROUP, "failover") is GROUP


def test_resolver_sends_a_min_latency_group_to_the_fastest_and_skips_the_dead():
    resolver = Resolver(settings(upstreams=[str(u) for u in GROUP], policy="min_latency"))
    upstreams = resolver.upstreams
    for upstream, rtt in ((A, 0.050), (B, 0.001), (C, 0.020)):
        upstreams.answered(upstream, rtt, 0.5)
    forward = only_forward(resolver.handle(query_wire("a.example"), CLIENT, "udp", 1.0))
    assert str(forward.upstream) == str(B)
    resolver.on_upstream_answer(forward.key, forward.upstream, upstream_answer(forward), 1.004)
    status = upstreams.status()[str(B)]
    assert status["chosen"] == 1 and status["latency_ms"] == pytest.approx(1 + choice.EWMA_WEIGHT * 3)
    for i in range(DEAD_AFTER):  # B stops answering: the next query goes to C, then A
        forward = only_forward(resolver.handle(query_wire(f"b{i}.example"), CLIENT, "udp", 2.0 + i))
        assert str(forward.upstream) == str(B)
        forward = only_forward(resolver.on_upstream_failure(forward.key, forward.upstream, "timeout", 2.5 + i))
        assert str(forward.upstream) == str(C)
    forward = only_forward(resolver.handle(query_wire("c.example"), CLIENT, "udp", 10.0))
    assert str(forward.upstream) == str(C)
    assert upstreams.status()[str(B)]["state"] == "dead"

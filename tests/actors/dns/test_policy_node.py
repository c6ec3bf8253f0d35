"""A min_latency group in a running node: three dnsmasq upstreams in the node's
namespace, one behind a forwarder that delays it 50 ms (no netem here), one dead
(stopped with SIGSTOP: its socket takes queries and nothing answers). What each
upstream got is read from dnsmasq's own query log, and from the node's status
and metrics."""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import dns.message
import dns.rcode
import pytest

from meshsup.actors.dns.choice import DEAD_AFTER
from tests.actors.dns.upstream_fakes import DelayingForwarder
from tests.dns_fixtures import Dnsmasq, need_tool, node_config, start_dnsmasq, udp_exchange, url
from tests.nodes import Netns, Node
from tests.topology import Identity

pytestmark = pytest.mark.netns

ALPHA = Identity("alpha", 1)
METRICS = "127.0.0.1:9273"  # the namespace's own loopback
TIMEOUT = 0.5
DELAY = 0.05


def queries(upstream: Dnsmasq, prefix: str) -> int:
    """Client queries (prefix0.pool.test, prefix1...) in the upstream's query log."""
    pattern = re.compile(rf"query\[A\] {prefix}[0-9]+\.pool\.test from ")
    return sum(1 for line in upstream.log.read_text().splitlines() if pattern.search(line))


def pause(upstream: Dnsmasq) -> None:
    os.kill(upstream.process.popen.pid, signal.SIGSTOP)


def resume(upstream: Dnsmasq) -> None:
    os.kill(upstream.process.popen.pid, signal.SIGCONT)


@pytest.fixture
def lab(node_factory: Callable[..., Node], netns: Callable[..., Netns], tmp_path: Path) -> Iterator[dict[str, Any]]:
    need_tool("dnsmasq", "curl")
    ns = netns()
    things: dict[str, Any] = {"ns": ns}
    stoppable: list[Any] = []
    try:
        for name in ("fast", "backend", "dead"):
            things[name] = start_dnsmasq(tmp_path, ["--address=/test/203.0.113.7"], ns=ns, name=name)
            stoppable.append(things[name])
        things["slow"] = DelayingForwarder((things["backend"].host, things["backend"].port), DELAY, ns=ns)
        stoppable.append(things["slow"])
        pause(things["dead"])
        group = {"upstreams": [url(things["dead"]), url(things["slow"]), url(things["fast"])], "policy": "min_latency"}
        dns_table = {
            "listen": ["127.0.0.1:53"],
            "timeout": TIMEOUT,
            "groups": {"pool": group},
            "rules": [{"match": "suffix:pool.test", "action": "pool"}],
        }
        config = node_config(tmp_path, ALPHA, [], dns_table)
        config.write_text(config.read_text() + f'\n[metrics]\nlisten = "{METRICS}"\n')
        node = things["node"] = node_factory("--config", str(config), "--dns-workers", "1", ns=ns)
        node.wait_ready(timeout=60)
        yield things
    finally:
        if "node" in things:
            things["node"].close()
        for paused in ("fast", "dead"):
            if paused in things:
                resume(things[paused])
        for thing in reversed(stoppable):
            thing.stop()


def upstreams(node: Node) -> dict[str, dict[str, Any]]:
    return node.actors()["dns-0"]["upstreams"]


def metrics(ns: Netns) -> dict[str, float]:
    text = ns.run("curl", "-sf", f"http://{METRICS}/metrics").stdout
    return {
        line.rpartition(" ")[0]: float(line.rpartition(" ")[2])
        for line in text.splitlines()
        if line.startswith("meshsup_dns_upstream_")
    }


def answered(node: Node, count: int) -> dict[str, int]:
    """The DNS counters once status has seen count upstream answers."""
    return node.wait(
        lambda: (c := node.counters()["dns"])["upstream_answers"] == count and c, what=f"{count} upstream answers"
    )


def ask(ns: Netns, name: str) -> float:
    """Ask the node for name; the seconds the answer took (it must be the dnsmasq one)."""
    start = time.monotonic()
    wire = udp_exchange("127.0.0.1", 53, dns.message.make_query(name, "A").to_wire(), timeout=5, ns=ns)
    took = time.monotonic() - start
    assert wire is not None, name
    answer = dns.message.from_wire(wire)
    assert answer.rcode() == dns.rcode.NOERROR and answer.answer[0][0].address == "203.0.113.7", answer
    return took


def test_min_latency_prefers_the_fast_one_skips_the_dead_and_fails_over_to_the_slow(lab: dict[str, Any]) -> None:
    ns, node, fast, slow, backend, dead = (lab[k] for k in ("ns", "node", "fast", "slow", "backend", "dead"))
    fast_url, slow_url, dead_url = url(fast), url(slow), url(dead)
    # The probes measure the two that answer, and find the third dead, before any query.
    seen = node.wait(
        lambda: (
            (u := upstreams(node))[dead_url]["state"] == "dead"
            and u[fast_url]["latency_ms"] is not None
            and u[slow_url]["latency_ms"] is not None
            and u
        ),
        what="the probes' verdicts",
    )
    # The delay shows in full; the fast one's figure is below the slow one's (not below the delay
    # itself: on a loaded machine a loopback answer alone has been measured at 55 ms).
    assert seen[slow_url]["latency_ms"] >= DELAY * 1000
    assert seen[slow_url]["latency_ms"] > seen[fast_url]["latency_ms"]

    took = [ask(ns, f"n{i}.pool.test") for i in range(40)]
    counters = answered(node, 40)
    assert counters.get("upstream_timeout", 0) == counters.get("failovers", 0) == 0, took  # none waited on the dead one
    assert queries(fast, "n") >= 36 and queries(backend, "n") <= 4  # most went to the fastest
    assert queries(fast, "n") + queries(backend, "n") == 40
    status = upstreams(node)
    assert status[fast_url]["chosen"] >= 36 and status[dead_url]["chosen"] == 0
    m = metrics(ns)
    label = 'actor="dns-0",upstream="{}"'.format
    assert m[f"meshsup_dns_upstream_alive{{{label(dead_url)}}}"] == 0
    assert m[f"meshsup_dns_upstream_alive{{{label(fast_url)}}}"] == 1
    assert m[f"meshsup_dns_upstream_rtt_seconds{{{label(fast_url)}}}"] < DELAY
    assert m[f"meshsup_dns_upstream_rtt_seconds{{{label(slow_url)}}}"] >= DELAY
    assert m[f"meshsup_dns_upstream_chosen_total{{{label(fast_url)}}}"] >= 36
    table = {line.split()[0]: line.split() for line in node.cli("status").stdout.splitlines() if "://" in line}
    assert [table[u][1:3] for u in (dead_url, slow_url, fast_url)] == [
        ["dns-0", "dead"],
        ["dns-0", "alive"],
        ["dns-0", "alive"],
    ]

    # The fast one stops answering: after DEAD_AFTER timeouts the slow one takes every query.
    pause(fast)
    took = [ask(ns, f"p{i}.pool.test") for i in range(20)]
    counters = answered(node, 60)
    # Only the queries before it was found dead waited for it (fewer, if a probe found it first).
    assert 1 <= counters["upstream_timeout"] == counters["failovers"] <= DEAD_AFTER, took
    assert queries(backend, "p") == 20
    assert node.wait(lambda: upstreams(node)[fast_url]["state"] == "dead", what="fast found dead")
    m = metrics(ns)
    assert m[f"meshsup_dns_upstream_alive{{{label(fast_url)}}}"] == 0

    # What reached the dead one's socket, read once it runs again: probes, never a query.
    resume(dead)
    node.wait(lambda: "query[NS] . from" in dead.log.read_text(), what="the dead one's queued probes logged")
    assert queries(dead, "n") == queries(dead, "p") == 0

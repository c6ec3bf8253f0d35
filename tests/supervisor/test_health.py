"""The health warnings, sans-IO: each raised, kept with its `since` while it stands, and cleared."""

from __future__ import annotations

from typing import Any

from meshsup.supervisor.health import (
    ACTOR_RESTARTING,
    COLLECTOR_UNREACHABLE,
    DNS_FORWARD_FAILING,
    LISTEN_PORT_LOST,
    NO_HANDSHAKE_AFTER,
    PEER_NO_HANDSHAKE,
    WAITING_GRACE,
    Health,
    no_handshake_after,
)
from meshsup.supervisor.supervision import ActorProc

T0 = 1_800_000_000.0  # unix seconds
PERIOD = 10.0


def peer(staged: int = 0, last_handshake: float = 0, name: str = "bravo") -> dict[str, Any]:
    return {
        "name": name,
        "public_key": f"key-{name}",
        "endpoint": "198.51.100.9:51820",
        "last_handshake": last_handshake,
        "staged": staged,
    }


def codes(health: Health) -> dict[tuple[str, str], float]:
    """(code, subject) -> since, of every warning standing."""
    return {(w.code, w.subject): w.since for w in health.warnings()}


def test_a_peer_with_packets_waiting_and_no_handshake_for_three_minutes() -> None:
    h = Health()
    h.update(T0, [], PERIOD, [peer(staged=1)])
    h.update(T0 + NO_HANDSHAKE_AFTER - 1, [], PERIOD, [peer(staged=3)])
    assert codes(h) == {}
    h.update(T0 + NO_HANDSHAKE_AFTER, [], PERIOD, [peer(staged=3)])
    assert codes(h) == {(PEER_NO_HANDSHAKE, "bravo"): T0 + NO_HANDSHAKE_AFTER}
    (w,) = h.warnings()
    assert "bravo" in w.message and "3 queued" in w.message and "never" in w.message and "198.51.100.9" in w.message
    # It stands, with the same since, across a worker dropping its queue on giving up (one update).
    h.update(T0 + 181, [], PERIOD, [peer(staged=0)])
    h.update(T0 + 182, [], PERIOD, [peer(staged=1)])
    assert codes(h) == {(PEER_NO_HANDSHAKE, "bravo"): T0 + NO_HANDSHAKE_AFTER}
    # A handshake clears it.
    h.update(T0 + 202, [], PERIOD, [peer(staged=0, last_handshake=T0 + 202)])
    assert codes(h) == {}


def test_no_packets_waiting_no_warning_and_it_clears_when_they_stop() -> None:
    h = Health()
    h.update(T0, [], PERIOD, [peer()])
    h.update(T0 + 1000, [], PERIOD, [peer()])  # a quiet peer nobody sends to is no problem
    assert codes(h) == {}
    h.update(T0 + 1001, [], PERIOD, [peer(staged=2, last_handshake=T0)])
    assert set(codes(h)) == {(PEER_NO_HANDSHAKE, "bravo")}
    h.update(T0 + 1001 + WAITING_GRACE / 2, [], PERIOD, [peer(last_handshake=T0)])
    assert set(codes(h)) == {(PEER_NO_HANDSHAKE, "bravo")}  # within the grace
    h.update(T0 + 1002 + WAITING_GRACE, [], PERIOD, [peer(last_handshake=T0)])
    assert codes(h) == {}


def test_a_restarted_worker_forgetting_the_handshake_restarts_the_clock() -> None:
    h = Health()
    h.update(T0, [], PERIOD, [peer(last_handshake=T0)])
    h.update(T0 + 500, [], PERIOD, [peer(staged=1)])  # last_handshake 0: a new worker, handshaking now
    assert codes(h) == {}
    h.update(T0 + 500 + NO_HANDSHAKE_AFTER, [], PERIOD, [peer(staged=1)])
    assert set(codes(h)) == {(PEER_NO_HANDSHAKE, "bravo")}


def test_the_threshold_follows_the_test_timing_only_in_tests() -> None:
    timing = {"MESHSUP_TEST_TIMING": "rekey_timeout=1,reject_after_time=6"}
    assert no_handshake_after(timing) == NO_HANDSHAKE_AFTER
    assert no_handshake_after({**timing, "MESHSUP_TEST_FAULTS": "1"}) == 6.0
    assert no_handshake_after({"MESHSUP_TEST_FAULTS": "1"}) == NO_HANDSHAKE_AFTER


def dns(upstreams: dict[str, tuple[bool, float | None]], name: str = "dns-0") -> ActorProc:
    status = {
        url: {"ok": ok, "at": at, "error": "" if ok else "upstream_timeout"} for url, (ok, at) in upstreams.items()
    }
    return ActorProc(name, "dns", state="running", status={"upstreams": status})


A, B = "udp://198.51.100.53:53", "tls://198.51.100.54:853"


def test_every_dns_upstream_failing() -> None:
    h = Health()
    h.update(T0, [dns({A: (False, 1.0), B: (True, 2.0)})], PERIOD)
    assert codes(h) == {}  # one still answers
    h.update(T0 + 1, [dns({A: (False, 1.0), B: (False, 3.0)})], PERIOD)
    assert codes(h) == {(DNS_FORWARD_FAILING, ""): T0 + 1}
    (w,) = h.warnings()
    assert A in w.message and B in w.message and "upstream_timeout" in w.message
    h.update(T0 + 2, [dns({A: (False, 4.0), B: (False, 3.0)})], PERIOD)
    assert codes(h) == {(DNS_FORWARD_FAILING, ""): T0 + 1}
    h.update(T0 + 3, [dns({A: (True, 5.0), B: (False, 3.0)})], PERIOD)
    assert codes(h) == {}


def test_dns_workers_merged_by_the_latest_outcome() -> None:
    h = Health()
    # dns-1 answered by A long ago; dns-0 saw it fail since: failing.
    h.update(T0, [dns({A: (False, 9.0)}), dns({A: (True, 2.0)}, "dns-1")], PERIOD)
    assert set(codes(h)) == {(DNS_FORWARD_FAILING, "")}
    h.update(T0 + 1, [dns({A: (False, 9.0)}), dns({A: (True, 10.0)}, "dns-1")], PERIOD)
    assert codes(h) == {}
    h.update(T0 + 2, [dns({})], PERIOD)  # nothing asked yet: nothing known to fail
    assert codes(h) == {}
    # A worker lists every configured upstream: one it never asked (at None) does not count.
    h.update(T0 + 3, [dns({A: (False, 11.0), B: (True, None)})], PERIOD)
    assert set(codes(h)) == {(DNS_FORWARD_FAILING, "")}


def netlog(*collectors: dict[str, Any]) -> ActorProc:
    return ActorProc("netlog", "netlog", state="running", status={"collectors": list(collectors)})


def collector(failures: int, spooled: int, what: str = "logs") -> dict[str, Any]:
    error = "connect to tcp://127.0.0.1:6514: Connection refused" if failures else ""
    return {
        "what": what,
        "name": "central",
        "address": "tcp://127.0.0.1:6514",
        "failures": failures,
        "error": error,
        "spooled": spooled,
    }


def test_a_collector_unreachable_with_its_spool_depth() -> None:
    h = Health()
    h.update(T0, [netlog(collector(0, 5, "flows"), collector(0, 0))], PERIOD)
    assert codes(h) == {}
    h.update(T0 + 1, [netlog(collector(1, 17, "flows"), collector(0, 0))], PERIOD)
    assert codes(h) == {(COLLECTOR_UNREACHABLE, "flows/central"): T0 + 1}
    (w,) = h.warnings()
    assert "flow-log collector central" in w.message and "17 records spooled" in w.message
    assert "Connection refused" in w.message
    h.update(T0 + 2, [netlog(collector(3, 40, "flows"), collector(2, 9))], PERIOD)
    flows, logs = (COLLECTOR_UNREACHABLE, "flows/central"), (COLLECTOR_UNREACHABLE, "logs/central")
    assert codes(h) == {flows: T0 + 1, logs: T0 + 2}
    assert "40 records spooled" in h.warnings()[0].message and "9 log lines spooled" in h.warnings()[1].message
    h.update(T0 + 3, [netlog(collector(0, 0, "flows"), collector(2, 9))], PERIOD)
    assert codes(h) == {logs: T0 + 2}


def test_an_actor_restarting_repeatedly_within_the_period() -> None:
    h = Health()
    dns0 = ActorProc("dns-0", "dns", state="running", exit_reason="exited with status 70")
    h.update(T0, [dns0], PERIOD)
    for i in (1, 2):
        dns0.restarts = i
        h.update(T0 + i, [dns0], PERIOD)
    assert codes(h) == {}
    dns0.restarts = 3
    h.update(T0 + 3, [dns0], PERIOD)
    assert codes(h) == {(ACTOR_RESTARTING, "dns-0"): T0 + 3}
    assert "restarted 3 times in the last 10 s" in h.warnings()[0].message
    assert "exited with status 70" in h.warnings()[0].message
    dns0.restarts = 5  # two more in one update
    h.update(T0 + 4, [dns0], PERIOD)
    assert codes(h) == {(ACTOR_RESTARTING, "dns-0"): T0 + 3}
    h.update(T0 + 2.5 + PERIOD, [dns0], PERIOD)  # the first two are out of the period
    assert codes(h) == {(ACTOR_RESTARTING, "dns-0"): T0 + 3}
    h.update(T0 + 3.5 + PERIOD, [dns0], PERIOD)  # only the two at T0 + 4 are left
    assert codes(h) == {}


def test_restarts_before_the_first_update_do_not_count() -> None:
    h = Health()
    h.update(T0, [ActorProc("router", "router", restarts=4)], PERIOD)
    assert codes(h) == {}


def magicsock(port: int | None) -> ActorProc:
    return ActorProc("magicsock", "magicsock", state="running", status={} if port is None else {"port": port})


def test_the_listen_port_lost() -> None:
    h = Health()
    h.update(T0, [magicsock(None)], PERIOD, listen_port=41641)  # before its first heartbeat
    h.update(T0 + 1, [magicsock(41641)], PERIOD, listen_port=41641)
    assert codes(h) == {}
    h.update(T0 + 2, [magicsock(41641)], PERIOD, listen_port=41642)  # a reload it could not follow
    assert codes(h) == {(LISTEN_PORT_LOST, ""): T0 + 2}
    assert "UDP port 41642" in h.warnings()[0].message and "still on 41641" in h.warnings()[0].message
    h.update(T0 + 3, [magicsock(41641)], PERIOD, listen_port=41642)
    assert codes(h) == {(LISTEN_PORT_LOST, ""): T0 + 2}
    h.update(T0 + 4, [magicsock(41642)], PERIOD, listen_port=41642)
    assert codes(h) == {}
    h.update(T0 + 5, [magicsock(40000)], PERIOD, listen_port=0)  # any port will do
    h.update(T0 + 6, [magicsock(40000)], PERIOD)  # a relay: no listen port of a node
    assert codes(h) == {}


def test_the_json_form() -> None:
    h = Health()
    h.update(T0 + 0.7, [magicsock(1)], PERIOD, listen_port=2)
    (w,) = h.warnings()
    assert w.to_json() == {"code": LISTEN_PORT_LOST, "subject": "", "message": w.message, "since": int(T0)}

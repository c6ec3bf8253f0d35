"""The node's Prometheus series, made from what the supervisor already holds, sans-IO.

Every actor reports its counters in its heartbeats (every 0.2 s) and
`meshsup status` merges them; a scrape renders that same snapshot, so
metrics cost the data path nothing it does not count already, and the
supervisor only the scrape's own rendering. Inputs: the CLI's status (the
peers as `meshsup status` shows them), the actor tree's entries (state,
restarts, last heartbeat, raw status), `now` (monotonic) and `wall` (unix
time, for the seconds since a handshake).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from meshsup.supervisor.exposition import Family, Histogram, Kind
from meshsup.supervisor.supervision import ActorProc

STATES = ("starting", "running", "backoff", "stopping", "stopped")

# The counters each kind counts a packet or datagram lost by (the map atop actors/crypto/actor.py).
DROPS: Mapping[str, frozenset[str]] = {
    "crypto": frozenset(
        {
            "no_route",
            "bad_packet",
            "no_peer",
            "no_endpoint",
            "staged_overflow",
            "handshake_timeout",
            "unknown_type",
            "no_session",
            "expired_session",
            "decrypt_failed",
            "replay",
            "allowed_ips",
            "bad_length",
            "bad_mac1",
            "rate_limited",
            "bad_initiation",
            "unknown_peer",
            "handshake_replay",
            "bad_response",
            "bad_cookie_reply",
            "tun_dropped",
            "udp_rx_dropped",
            "udp_tx_dropped",
            "bus_full",
        }
    ),
    "tun-io": frozenset({"no_route", "no_tun", "tx_dropped", "bus_full"}),
    "magicsock": frozenset(
        {
            "not_wireguard",
            "not_listening",
            "tx_dropped",
            "relay_unreachable",
            "bad_relayed_endpoint",
            "relay_tx_dropped",
            "relay_unknown_peer",
            "disco_tx_dropped",
            "disco_relay_unreachable",
        }
    ),
}

# The DNS actor's counters by what answered (the fast path's answers are counted in these too).
DNS_SOURCES = {
    "local_answers": "local",
    "cache_hits": "cache",
    "upstream_answers": "upstream",
    "stale_answers": "stale",
}
DNS_REFUSALS = {
    "refused_inflight_cap": "inflight_cap",
    "refused_source_inflight_cap": "source_inflight_cap",
    "rejected_by_rule": "rule",
}
NETLOG_SHIPPING = {
    "sent": "records (IPFIX: datagrams) written to the collector",
    "delivered": "records the collector confirmed, removed from the spool",
    "errors": "failed connects, writes and requests",
    "dropped": "records lost here: spool or queue full, or refused for good",
}


def families(status: dict[str, Any], actors: Iterable[ActorProc], now: float, wall: float) -> list[Family]:
    fams = _Families()
    _node(fams, status)
    for a in actors:
        _actor(fams, a, now)
        if a.kind == "dns":
            _dns(fams, a)
        elif a.kind == "netlog":
            _netlog(fams, a)
    for reason, n in status.get("supervisor", {}).get("bus_dropped", {}).items():
        fams.counter("bus_dropped", "bus frames dropped, by receiver and reason").add(
            n, actor="supervisor", reason=reason
        )
    for p in status.get("peers", []):
        _peer(fams, p, wall)
    _filter(fams, status.get("filter", {}))
    _health(fams, status.get("health", []))
    return list(fams.all.values())


class _Families:
    """Each family made once, on first use, in the order first used."""

    def __init__(self) -> None:
        self.all: dict[str, Family] = {}

    def _get(self, name: str, kind: Kind, help: str) -> Family:
        full = f"meshsup_{name}"
        if full not in self.all:
            self.all[full] = Family(full, kind, help)
        return self.all[full]

    def counter(self, name: str, help: str) -> Family:
        return self._get(f"{name}_total", "counter", help)

    def gauge(self, name: str, help: str) -> Family:
        return self._get(name, "gauge", help)

    def histogram(self, name: str, help: str) -> Family:
        return self._get(name, "histogram", help)


def _node(fams: _Families, status: dict[str, Any]) -> None:
    node = status.get("node")
    if not node:
        return
    fams.gauge("node_info", "the node: name, public key, interface").add(
        1, name=node["name"], public_key=node["public_key"], interface=node["interface"]
    )
    fams.gauge("node_ready", "1 once every actor has started").add(int(node["ready"]))
    fams.gauge("config_generation", "configurations applied since start, counting the first").add(node["generation"])


def _actor(fams: _Families, a: ActorProc, now: float) -> None:
    ids = {"actor": a.name, "kind": a.kind}
    fams.gauge("actor_up", "1 while the actor runs").add(int(a.state == "running"), **ids)
    state = fams.gauge("actor_state", "the actor's state: 1 for the one it is in")
    for s in STATES:
        state.add(int(a.state == s), **ids, state=s)
    fams.counter("actor_restarts", "restarts after the actor died or hung").add(a.restarts, **ids)
    if a.process is not None:
        fams.gauge("actor_heartbeat_age_seconds", "since the actor's last heartbeat").add(
            max(0.0, now - a.last_beat), **ids
        )
    for reason, n in a.status.get("bus_dropped", {}).items():
        fams.counter("bus_dropped", "bus frames dropped, by receiver and reason").add(n, actor=a.name, reason=reason)
    counters = a.status.get("counters", {})
    if counters:  # every reason, counted or not yet, so that each series exists from the start
        for reason in sorted(DROPS.get(a.kind, ())):
            fams.counter("dataplane_dropped", "packets or datagrams dropped, by actor and reason").add(
                counters.get(reason, 0), actor=a.name, reason=reason
            )
    if a.kind == "crypto" and "handshakes" in counters:
        fams.counter("handshakes", "WireGuard handshakes completed, by crypto worker").add(
            counters["handshakes"], actor=a.name
        )


def _peer(fams: _Families, p: dict[str, Any], wall: float) -> None:
    ids = {"peer": p["name"], "public_key": p["public_key"]}
    fams.counter("peer_rx_bytes", "bytes received from the peer").add(p["rx_bytes"], **ids)
    fams.counter("peer_tx_bytes", "bytes sent to the peer").add(p["tx_bytes"], **ids)
    if p["last_handshake"]:
        fams.gauge("peer_last_handshake_timestamp_seconds", "unix time of the peer's latest handshake").add(
            p["last_handshake"], **ids
        )
        fams.gauge("peer_handshake_age_seconds", "since the peer's latest handshake").add(
            max(0.0, wall - p["last_handshake"]), **ids
        )
    if p.get("path"):
        fams.gauge("peer_path", "1 for the path the peer's traffic takes (direct or relay)").add(
            1, **ids, path=p["path"], relay=p.get("relay") or ""
        )
    if p.get("latency_ms") is not None:
        fams.gauge("peer_latency_seconds", "round trip on the peer's path (disco's, or the relay's)").add(
            p["latency_ms"] / 1000, **ids, path=p["path"] or ""
        )


def _filter(fams: _Families, f: dict[str, Any]) -> None:
    """The packet filter's figures, once it is on: hits by rule, drops by reason, flows."""
    if not f.get("enabled"):
        return
    for rule in f.get("rules", []):
        fams.counter("filter_rule_hits", "flows (or refused packets) a filter rule decided, by its index").add(
            rule["hits"], rule=str(rule["index"]), action=rule["action"]
        )
    for reason, n in f.get("drops", {}).items():
        fams.counter("filter_dropped", "packets the filter refused, by reason").add(n, reason=reason)
    fams.gauge("filter_flows", "flows in the filter's connection tables").add(f.get("flows", 0))
    fams.counter("filter_evictions", "flows evicted from a full connection table").add(f.get("evictions", 0))
    fams.counter("filter_cut", "live flows cut because new rules no longer allow them").add(f.get("cut", 0))


def _health(fams: _Families, warnings: list[dict[str, Any]]) -> None:
    """One series per standing warning (and a count, 0 when healthy, so an alert has a series to watch)."""
    fams.gauge("health_warnings", "health warnings standing").add(len(warnings))
    for w in warnings:
        fams.gauge("health_warning_since_timestamp_seconds", "unix time a standing warning was raised").add(
            w["since"], code=w["code"], subject=w["subject"]
        )


def _dns(fams: _Families, a: ActorProc) -> None:
    c = a.status.get("counters", {})
    ids = {"actor": a.name}
    for transport in ("udp", "tcp"):
        fams.counter("dns_queries", "DNS queries received, by transport").add(
            c.get(f"queries_{transport}", 0), **ids, transport=transport
        )
    for key, n in c.items():
        if key.startswith("replies_"):
            fams.counter("dns_replies", "DNS replies sent, by rcode (fast path included)").add(
                n, **ids, rcode=key.removeprefix("replies_").upper()
            )
    for key, source in DNS_SOURCES.items():
        fams.counter("dns_answers", "DNS answers by source (fast path answers included)").add(
            c.get(key, 0), **ids, source=source
        )
    fams.counter("dns_fast_path_answers", "DNS answers the fast path gave (also counted by source)").add(
        c.get("fast_answers", 0), **ids
    )
    for key, reason in DNS_REFUSALS.items():
        fams.counter("dns_refused", "DNS queries refused, by reason").add(c.get(key, 0), **ids, reason=reason)
    fams.counter("dns_servfail", "DNS queries answered SERVFAIL: every upstream failed").add(
        c.get("servfail_exhausted", 0), **ids
    )
    fams.gauge("dns_cache_entries", "answers in the DNS cache").add(c.get("cache_entries", 0), **ids)
    fams.gauge("dns_inflight", "DNS queries forwarded and awaiting an answer").add(c.get("inflight", 0), **ids)
    latency = a.status.get("upstream_latency")
    if latency:
        fams.histogram("dns_upstream_latency_seconds", "from forwarding a query to its answer").add(
            Histogram(latency["bounds"], latency["cumulative"], latency["sum"], latency["count"]), **ids
        )
    for url, u in a.status.get("upstreams", {}).items():
        up = {**ids, "upstream": url}
        fams.gauge("dns_upstream_alive", "1 while a DNS upstream answers, 0 once found dead (choice.py)").add(
            int(u.get("state") != "dead"), **up
        )
        if u.get("latency_ms") is not None:
            fams.gauge("dns_upstream_rtt_seconds", "a DNS upstream's moving average round trip").add(
                u["latency_ms"] / 1000, **up
            )
        fams.counter("dns_upstream_chosen", "forwards sent to a DNS upstream").add(u.get("chosen", 0), **up)
        fams.counter("dns_upstream_probes", "probes sent to a DNS upstream (dead, or idle in min_latency)").add(
            u.get("probes", 0), **up
        )


def _netlog(fams: _Families, a: ActorProc) -> None:
    c = a.status.get("counters", {})
    fams.counter("netlog_records", "flow records made").add(c.get("records", 0))
    fams.counter("netlog_log_lines", "log lines taken in for shipping").add(c.get("log_lines", 0))
    fams.counter("netlog_log_lines_lost", "log lines lost before shipping").add(c.get("log_lines_lost", 0))
    for key, n in c.items():
        stream, _, rest = key.partition(".")
        collector, _, what = rest.rpartition(".")
        if stream in ("flows", "logs") and what in NETLOG_SHIPPING:
            fams.counter(f"netlog_{what}", NETLOG_SHIPPING[what]).add(n, stream=stream, collector=collector)
        elif stream in ("flows", "logs") and what == "spooled":
            fams.gauge("netlog_spool_records", "records waiting in the collector's spool").add(
                n, stream=stream, collector=collector
            )

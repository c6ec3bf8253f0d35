"""Metrics: the [metrics] table, the text format, the series made from a node's state, and the
HTTP endpoint's answers. End to end, with Debian's prometheus scraping a node: test_metrics_node.py."""

from __future__ import annotations

import math
import re
import socket
from pathlib import Path
from typing import Any

import pytest

from meshsup.actors.dns.choice import DEAD_AFTER, Upstreams
from meshsup.actors.dns.latency import LatencyBuckets
from meshsup.actors.settings import ConfigError, Settings, parse
from meshsup.actors.settings.dnstypes import parse_upstream
from meshsup.actors.settings.metrics import MetricsSettings
from meshsup.supervisor.exposition import CONTENT_TYPE, Family, Histogram, render
from meshsup.supervisor.metrics import DROPS, families
from meshsup.supervisor.metrics_front import MetricsFront
from meshsup.supervisor.scrape import MAX_CONNECTIONS, MAX_REQUEST, ScrapeServer, answer
from meshsup.supervisor.supervision import ActorProc

# --- config -----------------------------------------------------------------


def _parse(tmp_path: Path, metrics: object) -> Settings:
    return parse("node.toml", {"metrics": metrics}, tmp_path, tmp_path)


def test_metrics_off_without_the_table_and_on_with_listen(tmp_path):
    assert parse("node.toml", {}, tmp_path, tmp_path).metrics == MetricsSettings(None)
    assert _parse(tmp_path, {"listen": "127.0.0.1:9273"}).metrics.listen == ("127.0.0.1", 9273)
    assert _parse(tmp_path, {"listen": "[::1]:9273"}).metrics.listen == ("::1", 9273)


@pytest.mark.parametrize(
    ("table", "key", "problem"),
    [
        ({"listen": "localhost:9273"}, "metrics.listen", "'localhost:9273': host is not an IP address"),
        ({"listen": "127.0.0.1"}, "metrics.listen", "'127.0.0.1': not host:port"),
        ({"listen": "127.0.0.1:0"}, "metrics.listen", "'127.0.0.1:0': not host:port"),
        ({"listen": 9273}, "metrics.listen", "must be str, not int"),
        ({"port": 9273}, "metrics.port", "unknown key"),
        ("on", "metrics", "must be dict, not str"),
    ],
)
def test_a_wrong_metrics_value_is_refused_naming_file_and_key(tmp_path, table, key, problem):
    with pytest.raises(ConfigError) as caught:
        _parse(tmp_path, table)
    assert (caught.value.file, caught.value.key, caught.value.problem) == ("node.toml", key, problem)


def test_metrics_settings_survive_the_bus(tmp_path):
    settings = _parse(tmp_path, {"listen": "[::1]:9273"})
    assert Settings.from_wire(settings.to_wire()) == settings


# --- the text format ----------------------------------------------------------

SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{([a-zA-Z_]\w*="(\\.|[^"\\])*",?)*\})? (\S+)$')


def _lines(text: str) -> tuple[dict[str, tuple[str, str]], list[str]]:
    """HELP and TYPE per family, and the sample lines; every line must be one of those."""
    meta: dict[str, tuple[str, str]] = {}
    samples = []
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name, _, help = line[7:].partition(" ")
            assert name not in meta, f"family {name} twice"
            meta[name] = (help, "")
        elif line.startswith("# TYPE "):
            name, _, kind = line[7:].partition(" ")
            assert meta[name][1] == "", f"TYPE of {name} twice"
            meta[name] = (meta[name][0], kind)
        else:
            assert SAMPLE.match(line), line
            samples.append(line)
    return meta, samples


def test_help_and_label_values_are_escaped_as_the_format_says():
    f = Family("meshsup_x", "gauge", 'back\\slash "quoted"\nnext line')
    f.add(1, name='a "b"\\c\nd')
    text = render([f])
    assert text == (
        '# HELP meshsup_x back\\\\slash "quoted"\\nnext line\n'
        "# TYPE meshsup_x gauge\n"
        'meshsup_x{name="a \\"b\\"\\\\c\\nd"} 1\n'
    )
    _lines(text)


def test_numbers_and_types():
    c, g = Family("meshsup_c_total", "counter", "c"), Family("meshsup_g", "gauge", "g")
    c.add(3, reason="x")
    c.add(4, reason="x")  # the same series from two sources: summed
    g.add(0.25)
    g.add(math.inf, side="up")
    g.add(math.nan, side="none")
    meta, samples = _lines(render([c, g, Family("meshsup_empty", "gauge", "none")]))
    assert meta == {"meshsup_c_total": ("c", "counter"), "meshsup_g": ("g", "gauge")}
    assert samples == [
        'meshsup_c_total{reason="x"} 7',
        "meshsup_g 0.25",
        'meshsup_g{side="up"} +Inf',
        'meshsup_g{side="none"} NaN',
    ]


def test_a_histogram_has_cumulative_buckets_up_to_inf_a_sum_and_a_count():
    buckets = LatencyBuckets((0.01, 0.1))
    for seconds in (0.005, 0.01, 0.05, 3.0):
        buckets.observe(seconds)
    snap = buckets.snapshot()
    h = Family("meshsup_lat_seconds", "histogram", "lat")
    h.add(Histogram(snap["bounds"], snap["cumulative"], snap["sum"], snap["count"]), actor="dns-0")
    _, samples = _lines(render([h]))
    assert samples == [
        'meshsup_lat_seconds_bucket{actor="dns-0",le="0.01"} 2',
        'meshsup_lat_seconds_bucket{actor="dns-0",le="0.1"} 3',
        'meshsup_lat_seconds_bucket{actor="dns-0",le="+Inf"} 4',
        'meshsup_lat_seconds_sum{actor="dns-0"} 3.065',
        'meshsup_lat_seconds_count{actor="dns-0"} 4',
    ]


# --- the series -------------------------------------------------------------------

KEY = "JzQzpWPKkim+5zyc5q4IEOTBL3+E69VF8XzelreVKzM="


def _status() -> dict:
    peer = {
        "name": "bravo",
        "public_key": KEY,
        "rx_bytes": 348,
        "tx_bytes": 404,
        "last_handshake": 1000,
        "path": "direct",
        "relay": None,
        "latency_ms": 2.5,
    }
    idle = {**peer, "name": "charlie", "public_key": "x" * 43 + "=", "last_handshake": 0, "path": None}
    node = {"name": "alpha", "public_key": KEY, "interface": "wg0", "ready": True, "generation": 2}
    packet_filter = {
        "enabled": True,
        "rules": [{"index": 0, "action": "accept", "hits": 5}, {"index": 1, "action": "reject", "hits": 1}],
        "drops": {"reject": 1, "default_deny": 3},
        "flows": 4,
        "evictions": 0,
        "cut": 1,
    }
    health = [{"code": "peer-no-handshake", "subject": "charlie", "message": "...", "since": 900}]
    return {
        "node": node,
        "peers": [peer, idle],
        "supervisor": {"bus_dropped": {"malformed": 2}},
        "filter": packet_filter,
        "health": health,
    }


def _upstreams() -> dict[str, Any]:
    """A min_latency group as a DNS worker reports it: one upstream answering, one found dead."""
    fast, dead = parse_upstream("udp://198.51.100.53"), parse_upstream("udp://198.51.100.54")
    upstreams = Upstreams()
    upstreams.keep([((fast, dead), "min_latency")])
    for _ in range(3):
        upstreams.sent(fast)
    upstreams.answered(fast, 0.004, 1.0)
    for now in range(DEAD_AFTER):
        upstreams.failed(dead, "upstream_timeout", float(now))
    return upstreams.status()


def _actors() -> list[ActorProc]:
    crypto = ActorProc("crypto-0", "crypto", process=object(), state="running", restarts=3, last_beat=99.5)
    crypto.status = {"counters": {"decrypt_failed": 4, "handshakes": 2}, "bus_dropped": {"malformed": 1}}
    dns = ActorProc("dns-0", "dns", process=object(), state="running", last_beat=99.9)
    latency = LatencyBuckets()
    latency.observe(0.02)
    dns.status = {
        "counters": {
            "queries_udp": 9,
            "cache_hits": 5,
            "upstream_answers": 1,
            "cache_entries": 7,
            "replies_nxdomain": 2,
        },
        "upstream_latency": latency.snapshot(),
        "upstreams": _upstreams(),
    }
    netlog = ActorProc("netlog", "netlog", process=object(), state="running", last_beat=99.9)
    netlog.status = {
        "counters": {"records": 3, "flows.my.collector.sent": 3, "flows.my.collector.spooled": 1, "logs.sys.dropped": 2}
    }
    return [crypto, dns, netlog, ActorProc("tun-io", "tun-io", state="backoff", restarts=1)]


def _series(text: str) -> dict[str, float]:
    return {line.rpartition(" ")[0]: float(line.rpartition(" ")[2]) for line in _lines(text)[1]}


def test_the_series_of_a_node():
    s = _series(render(families(_status(), _actors(), now=100.0, wall=1030.0)))
    bravo = f'peer="bravo",public_key="{KEY}"'
    assert s['meshsup_actor_up{actor="crypto-0",kind="crypto"}'] == 1
    assert s['meshsup_actor_up{actor="tun-io",kind="tun-io"}'] == 0
    assert s['meshsup_actor_state{actor="tun-io",kind="tun-io",state="backoff"}'] == 1
    assert s['meshsup_actor_state{actor="tun-io",kind="tun-io",state="running"}'] == 0
    assert s['meshsup_actor_restarts_total{actor="crypto-0",kind="crypto"}'] == 3
    assert s['meshsup_actor_heartbeat_age_seconds{actor="crypto-0",kind="crypto"}'] == 0.5
    assert not any(k.startswith('meshsup_actor_heartbeat_age_seconds{actor="tun-io"') for k in s)  # no process
    assert s['meshsup_bus_dropped_total{actor="crypto-0",reason="malformed"}'] == 1
    assert s['meshsup_bus_dropped_total{actor="supervisor",reason="malformed"}'] == 2
    assert s['meshsup_dataplane_dropped_total{actor="crypto-0",reason="decrypt_failed"}'] == 4
    assert s['meshsup_dataplane_dropped_total{actor="crypto-0",reason="replay"}'] == 0  # there before it counts
    assert len([k for k in s if k.startswith("meshsup_dataplane_dropped_total")]) == len(DROPS["crypto"])
    assert s['meshsup_handshakes_total{actor="crypto-0"}'] == 2
    assert s[f"meshsup_peer_rx_bytes_total{{{bravo}}}"] == 348
    assert s[f"meshsup_peer_tx_bytes_total{{{bravo}}}"] == 404
    assert s[f"meshsup_peer_last_handshake_timestamp_seconds{{{bravo}}}"] == 1000
    assert s[f"meshsup_peer_handshake_age_seconds{{{bravo}}}"] == 30
    assert s[f'meshsup_peer_path{{path="direct",{bravo},relay=""}}'] == 1
    assert s[f'meshsup_peer_latency_seconds{{path="direct",{bravo}}}'] == 0.0025
    assert not any('peer="charlie"' in k and "handshake" in k for k in s)  # never shook hands
    assert s['meshsup_dns_queries_total{actor="dns-0",transport="udp"}'] == 9
    assert s['meshsup_dns_answers_total{actor="dns-0",source="cache"}'] == 5
    assert s['meshsup_dns_cache_entries{actor="dns-0"}'] == 7
    assert s['meshsup_dns_replies_total{actor="dns-0",rcode="NXDOMAIN"}'] == 2
    assert s['meshsup_dns_upstream_latency_seconds_bucket{actor="dns-0",le="0.025"}'] == 1
    assert s['meshsup_dns_upstream_latency_seconds_bucket{actor="dns-0",le="0.01"}'] == 0
    fast, dead = 'actor="dns-0",upstream="udp://198.51.100.53:53"', 'actor="dns-0",upstream="udp://198.51.100.54:53"'
    assert s[f"meshsup_dns_upstream_alive{{{fast}}}"] == 1 and s[f"meshsup_dns_upstream_alive{{{dead}}}"] == 0
    assert s[f"meshsup_dns_upstream_rtt_seconds{{{fast}}}"] == 0.004
    assert f"meshsup_dns_upstream_rtt_seconds{{{dead}}}" not in s  # never answered: no figure
    assert s[f"meshsup_dns_upstream_chosen_total{{{fast}}}"] == 3
    assert s[f"meshsup_dns_upstream_probes_total{{{dead}}}"] == 0
    assert s['meshsup_netlog_sent_total{collector="my.collector",stream="flows"}'] == 3
    assert s['meshsup_netlog_spool_records{collector="my.collector",stream="flows"}'] == 1
    assert s['meshsup_netlog_dropped_total{collector="sys",stream="logs"}'] == 2
    assert s["meshsup_node_ready"] == 1
    assert s['meshsup_filter_rule_hits_total{action="reject",rule="1"}'] == 1
    assert s['meshsup_filter_dropped_total{reason="default_deny"}'] == 3
    assert (s["meshsup_filter_flows"], s["meshsup_filter_cut_total"]) == (4, 1)
    assert s["meshsup_health_warnings"] == 1
    assert s['meshsup_health_warning_since_timestamp_seconds{code="peer-no-handshake",subject="charlie"}'] == 900


def test_a_healthy_node_without_a_filter_has_a_zero_warning_count_and_no_filter_series():
    status = {**_status(), "filter": {"enabled": False}, "health": []}
    s = _series(render(families(status, _actors(), now=100.0, wall=1030.0)))
    assert s["meshsup_health_warnings"] == 0
    assert not any(k.startswith("meshsup_filter_") or "warning_since" in k for k in s)


def test_no_series_twice_and_every_name_follows_the_conventions():
    meta, samples = _lines(render(families(_status(), _actors(), now=100.0, wall=1030.0)))
    keys = [line.rpartition(" ")[0] for line in samples]
    assert len(keys) == len(set(keys))
    for name, (_, kind) in meta.items():
        assert name.startswith("meshsup_")
        assert name.endswith("_total") == (kind == "counter"), name


# --- the endpoint ----------------------------------------------------------------


def _render() -> str:
    return "meshsup_x 1\n"


@pytest.mark.parametrize(
    ("request_head", "status"),
    [
        (b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", 200),
        (b"GET /metrics?x=1 HTTP/1.0\r\n\r\n", 200),
        (b"GET / HTTP/1.1\r\n\r\n", 404),
        (b"POST /metrics HTTP/1.1\r\n\r\n", 405),
        (b"GET /metrics\r\n\r\n", 400),
        (b"\x16\x03\x01garbage\r\n\r\n", 400),
        (b"GET " + b"a" * MAX_REQUEST, 400),
    ],
)
def test_requests_and_their_answers(request_head, status):
    response = answer(request_head, _render)
    assert response is not None and response.status == status
    assert response.wire().startswith(f"HTTP/1.1 {status} ".encode())


def test_an_incomplete_head_waits_and_head_gets_no_body():
    assert answer(b"GET /metrics HTTP/1.1\r\n", _render) is None
    head = answer(b"HEAD /metrics HTTP/1.1\r\n\r\n", _render)
    assert head is not None and head.wire().endswith(b"Content-Length: 12\r\nConnection: close\r\n\r\n")


def _pump(server: ScrapeServer) -> None:
    for fd in list(server.fds()) + list(server.want_write()):
        server.on_ready(fd)


def test_the_server_answers_on_its_socket_and_bounds_its_connections():
    server = ScrapeServer(("127.0.0.1", 0), _render)
    port = server.listener.getsockname()[1]
    try:
        idle = []
        for _ in range(MAX_CONNECTIONS + 4):  # clients that never ask: the oldest make room for newer ones
            idle.append(socket.create_connection(("127.0.0.1", port), timeout=5))
            _pump(server)
        assert len(server.conns) == MAX_CONNECTIONS
        client = socket.create_connection(("127.0.0.1", port), timeout=5)
        client.sendall(b"GET /metrics HTTP/1.1\r\n\r\n")
        for _ in range(10):
            _pump(server)
        assert len(server.conns) <= MAX_CONNECTIONS
        client.settimeout(5)
        reply = b""
        while chunk := client.recv(4096):
            reply += chunk
        assert reply.startswith(b"HTTP/1.1 200 OK\r\n")
        assert f"Content-Type: {CONTENT_TYPE}\r\n".encode() in reply and reply.endswith(b"\r\n\r\nmeshsup_x 1\n")
        for s in (*idle, client):
            s.close()
    finally:
        server.close()


class _Log:
    def __init__(self) -> None:
        self.errors: list[str] = []

    def info(self, *args: object, **kw: object) -> None:
        pass

    def error(self, message: str, **kw: object) -> None:
        self.errors.append(message)


def test_a_taken_address_is_refused_at_start_and_kept_from_on_reload(tmp_path):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    log = _Log()
    front = MetricsFront(None, dict, log)  # type: ignore[arg-type]
    try:
        assert front.serve(_parse(tmp_path, {"listen": f"127.0.0.1:{port}"})) == (
            f"cannot serve metrics on 127.0.0.1:{port}: Address already in use"
        )
        assert front.serve(_parse(tmp_path, {})) is None and front.server is None
        free = socket.socket()
        free.bind(("127.0.0.1", 0))
        other = free.getsockname()[1]
        free.close()
        front.follow(_parse(tmp_path, {"listen": f"127.0.0.1:{other}"}))
        assert front.server is not None and front.server.listener.getsockname() == ("127.0.0.1", other)
        front.follow(_parse(tmp_path, {"listen": f"127.0.0.1:{port}"}))  # taken: the old one stays
        assert front.server.listener.getsockname() == ("127.0.0.1", other)
        assert log.errors == [f"cannot serve metrics on 127.0.0.1:{port}: Address already in use"]
        front.follow(_parse(tmp_path, {}))  # off
        assert front.server is None
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", other), timeout=1)
    finally:
        front.close()
        taken.close()

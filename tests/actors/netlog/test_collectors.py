"""Flow records shipped to real collectors on loopback: rsyslog, nfcapd, HTTP, TLS syslog."""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from meshsup.actors.netlog.flows import Classifier, FlowTable, Record
from meshsup.actors.netlog.shipper import Shipper
from meshsup.actors.settings.collectors import CollectorConfig, parse_collectors
from tests.netlog_fixtures import (
    HttpCollector,
    Nfcapd,
    Rsyslog,
    SyslogReceiver,
    free_port,
    make_certificate,
    wait_until,
)
from tests.netlog_loop import ship_through_loop

RESTART_PAUSE = 2.0  # the "collector stopped for 30 s", shortened
CLASSIFIER = Classifier(["100.64.0.0/10", "fd7a:115c:a1e0::/48"], ["10.20.0.0/16"], ["100.100.100.100"])


def window_record(table: FlowTable, ident: int, now: float) -> Record:
    """One window whose single virtual flow has source port 10000+ident: the record's id."""
    table.add((6, f"100.64.0.1:{10000 + ident}", "100.64.0.2:80"), ident + 1, 100 * (ident + 1), 1, 60)
    [record] = table.close_window(now)
    return record


def record_id(record: object) -> int:
    assert isinstance(record, dict)
    return int(record["virtualTraffic"][0]["src"].rsplit(":", 1)[1]) - 10000


def shipper_for(tables: list[dict[str, Any]], spool_root: Path, **kw: Any) -> Shipper:
    options = {"confirm_delay": 0.2, "backoff_base": 0.05, "backoff_cap": 0.3} | kw
    return Shipper(parse_collectors(tables), spool_root, "alpha", **options)


def pump_for(shipper: Shipper, seconds: float) -> None:
    end = time.time() + seconds
    while time.time() < end:
        shipper.pump(time.time())
        time.sleep(0.02)


@pytest.fixture
def rsyslog(tmp_path: Path) -> Iterator[Rsyslog]:
    with Rsyslog(tmp_path / "rsyslog", free_port()) as collector:
        yield collector


@pytest.fixture
def nfcapd(tmp_path: Path) -> Iterator[Nfcapd]:
    with Nfcapd(tmp_path / "nfcapd", free_port()) as collector:
        yield collector


@pytest.fixture
def http_collector() -> Iterator[HttpCollector]:
    collector = HttpCollector()
    try:
        yield collector
    finally:
        collector.close()


# --- syslog ------------------------------------------------------------------


def test_rsyslog_receives_each_record_once_as_rfc5424_with_json(rsyslog: Rsyslog, tmp_path: Path) -> None:
    rsyslog.start()
    shipper = shipper_for([{"kind": "syslog", "address": f"tcp://127.0.0.1:{rsyslog.port}"}], tmp_path / "spool")
    table = FlowTable("node-alpha", CLASSIFIER, start=time.time())
    sent = [window_record(table, i, time.time()) for i in range(20)]
    for i in range(1500):  # one large window (~150 KiB): long octet-counted frames
        table.add((17, f"100.64.1.{i % 200 + 1}:{i + 1}", "10.20.0.1:53"), 1, 80, 1, 120)
    big = table.close_window(time.time())
    shipper.submit(sent + big, time.time())
    try:
        assert shipper.flush(time.time() + 10)
        # One more record behind them on the same connection: once rsyslog wrote it, it wrote
        # whatever came before it, a duplicate included.
        last = window_record(table, 99, time.time())
        shipper.submit([last], time.time())
        assert shipper.flush(time.time() + 10)
    finally:
        shipper.close()
    assert wait_until(lambda: any(json.loads(m["msg"]) == last for m in rsyslog.messages()), 10)
    messages = rsyslog.messages()
    assert [json.loads(m["msg"]) for m in messages] == sent + big + [last]
    first = messages[0]
    assert (first["hostname"], first["app_name"], first["msgid"]) == ("alpha", "meshsup", "flowlog")
    assert first["sd"] == (f'[meshsup@32473 nodeId="node-alpha" start="{sent[0]["start"]}" end="{sent[0]["end"]}"]')
    assert not list((tmp_path / "spool" / "syslog-0").iterdir())  # delivered records left the spool


def test_records_spooled_while_rsyslog_is_down_all_arrive_after_restart(rsyslog: Rsyslog, tmp_path: Path) -> None:
    """A steady stream of records; the collector stops mid-stream and the node restarts meanwhile."""
    rsyslog.start()
    tables = [{"kind": "syslog", "address": f"tcp://127.0.0.1:{rsyslog.port}"}]
    shipper = shipper_for(tables, tmp_path / "spool")
    table = FlowTable("node-alpha", CLASSIFIER, start=time.time())
    next_id = 0

    def produce(seconds: float) -> None:
        nonlocal next_id
        end = time.time() + seconds
        while time.time() < end:
            shipper.submit([window_record(table, next_id, time.time())], time.time())
            next_id += 1
            pump_for(shipper, 0.05)

    try:
        produce(1.0)
        sent_before_stop = next_id
        rsyslog.stop()
        produce(RESTART_PAUSE / 2)
        shipper.close()  # the netlog actor restarts: only the spool on disk carries over
        shipper = shipper_for(tables, tmp_path / "spool")
        produce(RESTART_PAUSE / 2)
        assert len(shipper.senders[0].spool) > 0  # type: ignore[attr-defined]
        (down,) = shipper.collectors()  # what the node's health warns of
        assert down["failures"] > 0 and "refused" in str(down["error"])
        assert down["spooled"] == len(shipper.senders[0].spool) > 0  # type: ignore[attr-defined]
        rsyslog.start()
        produce(0.5)
        assert shipper.flush(time.time() + 15)
        (up,) = shipper.collectors()
        assert (up["failures"], up["error"], up["spooled"]) == (0, "", 0)
    finally:
        shipper.close()
    assert wait_until(lambda: len({record_id(json.loads(m["msg"])) for m in rsyslog.messages()}) >= next_id, 10)
    counts = Counter(record_id(json.loads(m["msg"])) for m in rsyslog.messages())
    assert set(counts) == set(range(next_id))  # none lost
    # At least once: only records in flight when the collector went away may come twice.
    assert sum(counts.values()) - next_id <= sent_before_stop


def test_a_bounded_spool_drops_the_oldest_and_the_next_record_says_so(rsyslog: Rsyslog, tmp_path: Path) -> None:
    tables = [{"kind": "syslog", "address": f"tcp://127.0.0.1:{rsyslog.port}", "spool_max_records": 3}]
    shipper = shipper_for(tables, tmp_path / "spool")
    table = FlowTable("node-alpha", CLASSIFIER, start=time.time())
    shipper.pump(time.time())  # collector not running yet: nothing can leave
    for i in range(6):
        shipper.submit([window_record(table, i, time.time())], time.time())
    assert shipper.stats()["syslog-0"].dropped == 3
    rsyslog.start()
    try:
        assert shipper.flush(time.time() + 10)
    finally:
        shipper.close()
    assert wait_until(lambda: len(rsyslog.messages()) >= 3, 10)
    received = [json.loads(m["msg"]) for m in rsyslog.messages()]
    assert [record_id(r) for r in received] == [3, 4, 5]
    assert sum(r.get("dropped", 0) for r in received) == 3  # every loss is reported
    assert received[0]["dropped"] == 1
    assert 'dropped="1"' in rsyslog.messages()[0]["sd"]


def test_syslog_over_tls_with_a_private_ca(tmp_path: Path) -> None:
    cert, key = make_certificate(tmp_path)
    receiver = SyslogReceiver(tls=(cert, key))
    address = f"tls://127.0.0.1:{receiver.port}"
    table = FlowTable("node-alpha", CLASSIFIER, start=time.time())
    records = [window_record(table, i, time.time()) for i in range(5)]
    (tmp_path / "other").mkdir()
    other_ca, _ = make_certificate(tmp_path / "other")
    untrusting = shipper_for([{"kind": "syslog", "address": address, "ca_file": str(other_ca)}], tmp_path / "bad")
    shipper = shipper_for([{"kind": "syslog", "address": address, "ca_file": str(cert)}], tmp_path / "spool")
    try:
        untrusting.submit(records, time.time())
        stats = untrusting.stats()["syslog-0"]
        # pump never waits: the handshake goes on over a few pumps until the certificate is refused
        assert wait_until(lambda: untrusting.pump(time.time()) or stats.errors > 0, 5)
        assert stats.errors == 1 and "CERTIFICATE_VERIFY_FAILED" in stats.last_error
        assert len(untrusting.senders[0].spool) == 5  # type: ignore[attr-defined]
        shipper.submit(records, time.time())
        assert shipper.flush(time.time() + 10)
        assert wait_until(lambda: len(receiver.frames) >= 5, 5)
    finally:
        shipper.close()
        untrusting.close()
        receiver.close()
    for frame, record in zip(receiver.frames, records):
        header = re.match(rb"<134>1 \S+Z alpha meshsup \d+ flowlog \[meshsup@32473 [^\]]*\] ", frame)
        assert header is not None, frame[:120]
        assert json.loads(frame[header.end() :]) == record
    assert len(receiver.frames) == 5


def test_records_a_collector_left_unread_when_it_reset_are_sent_again(tmp_path: Path) -> None:
    receiver = SyslogReceiver(reset_first=True)
    shipper = shipper_for([{"kind": "syslog", "address": f"tcp://127.0.0.1:{receiver.port}"}], tmp_path / "spool")
    table = FlowTable("node-alpha", CLASSIFIER, start=time.time())
    records = [window_record(table, i, time.time()) for i in range(5)]
    try:
        shipper.submit(records, time.time())
        assert shipper.flush(time.time() + 10)
        assert wait_until(lambda: len(receiver.frames) >= 5, 5)
    finally:
        shipper.close()
        receiver.close()
    assert receiver.resets == 1 and shipper.stats()["syslog-0"].errors == 1
    assert [record_id(json.loads(f.split(b"] ", 1)[1])) for f in receiver.frames] == list(range(5))


# --- ipfix -------------------------------------------------------------------


def test_nfcapd_reads_back_flows_with_forward_and_reverse_counters(nfcapd: Nfcapd, tmp_path: Path) -> None:
    nfcapd.start()
    shipper = shipper_for([{"kind": "ipfix", "address": f"udp://127.0.0.1:{nfcapd.port}"}], tmp_path / "spool")
    table = FlowTable("node-alpha", CLASSIFIER, start=time.time())
    expected: dict[tuple[str, str, str, str, str], tuple[int, int, int, int]] = {}
    for window in range(2):
        for i in range(40):
            port = 20000 + window * 100 + i
            counts = (i + 1, 1000 * (i + 1), 2 * i + 1, 70 * i + 40)
            table.add((6, f"100.64.0.1:{port}", "100.64.0.2:443"), *counts)
            expected[("100.64.0.1", str(port), "100.64.0.2", "443", "TCP")] = counts
        table.add((17, f"[fd7a:115c:a1e0::1]:{5000 + window}", "[fd7a:115c:a1e0::2]:53"), 3, 240, 3, 600)
        expected[("fd7a:115c:a1e0::1", str(5000 + window), "fd7a:115c:a1e0::2", "53", "UDP")] = (3, 240, 3, 600)
        shipper.submit(table.close_window(time.time()), time.time())
        shipper.pump(time.time())
    exporter = shipper.senders[0].exporter  # type: ignore[attr-defined]
    try:
        assert shipper.flush(time.time() + 5)
        assert exporter.counters.messages > 2  # split to stay under 1400 bytes
        assert wait_until(nfcapd.drained, 10), "nfcapd left datagrams on its socket"
    finally:
        shipper.close()
    nfcapd.stop()
    path = nfcapd.last_file()
    flows = {
        (f["sa"], f["sp"], f["da"], f["dp"], f["pr"]): tuple(int(f[k]) for k in ("ipkt", "ibyt", "opkt", "obyt"))
        for f in nfcapd.flows(path)
    }
    assert flows == expected
    stats = nfcapd.stats(path)
    assert stats["Flows"] == str(len(expected))
    assert stats["Sequence failures"] == "0"


# --- http --------------------------------------------------------------------


@pytest.mark.parametrize("use_gzip", [False, True])
def test_http_retries_429_and_503_honouring_retry_after(
    http_collector: HttpCollector, tmp_path: Path, use_gzip: bool
) -> None:
    http_collector.script = [(429, {"Retry-After": "1"}), (503, {})]
    config = {
        "kind": "http",
        "address": f"http://127.0.0.1:{http_collector.port}/flows",
        "gzip": use_gzip,
        "batch_records": 4,
    }
    shipper = shipper_for([config], tmp_path / "spool")
    # The delay chosen after each refusal, as the sender chose it: a busy machine may retry later, never sooner.
    backoff, delays = shipper.senders[0].backoff, []  # type: ignore[attr-defined]
    choose = backoff.failure

    def failure(now: float, retry_after: float | None = None) -> float:
        delays.append(choose(now, retry_after))
        return delays[-1]

    backoff.failure = failure
    table = FlowTable("node-alpha", CLASSIFIER, start=time.time())
    records = [window_record(table, i, time.time()) for i in range(10)]
    shipper.submit(records, time.time())
    try:
        assert shipper.flush(time.time() + 10)
    finally:
        shipper.close()
    reqs = http_collector.requests
    assert [r.status for r in reqs[:3]] == [429, 503, 200]
    assert delays[0] == 1.0 and reqs[1].at - reqs[0].at >= 1.0  # Retry-After: 1 was honoured
    assert len(delays) == 2 and delays[1] <= 0.3  # no hint: a short backoff, at most backoff_cap
    assert reqs[1].records == reqs[0].records  # the refused batch went again
    assert sorted(map(record_id, http_collector.accepted())) == list(range(10))  # all, once each
    assert http_collector.accepted() == records
    assert all(r.headers.get("Content-Type") == "application/json" for r in reqs)
    assert all((r.headers.get("Content-Encoding") == "gzip") == use_gzip for r in reqs)
    assert shipper.stats()["http-0"].retries == 2


def test_http_refusal_is_not_retried_and_the_next_record_reports_the_loss(
    http_collector: HttpCollector, tmp_path: Path
) -> None:
    http_collector.script = [(400, {})]
    config = {"kind": "http", "address": f"http://127.0.0.1:{http_collector.port}/", "batch_records": 2}
    shipper = shipper_for([config], tmp_path / "spool")
    table = FlowTable("node-alpha", CLASSIFIER, start=time.time())
    try:
        shipper.submit([window_record(table, i, time.time()) for i in range(2)], time.time())
        assert shipper.flush(time.time() + 5)
        shipper.submit([window_record(table, 2, time.time())], time.time())
        assert shipper.flush(time.time() + 5)
    finally:
        shipper.close()
    assert [r.status for r in http_collector.requests] == [400, 200]
    [record] = http_collector.accepted()
    assert record_id(record) == 2 and record["dropped"] == 2
    assert shipper.stats()["http-0"].rejected == 2


@pytest.mark.parametrize("keep_alive", [False, True])
def test_the_actor_loop_ships_as_fast_as_the_collector_answers_not_at_its_tick_pace(
    tmp_path: Path, keep_alive: bool
) -> None:
    """With the loop's heartbeat an hour, only the collector's socket can wake it: a batch a tick would
    take 10 hours. Each request costs a turn or two of the loop (connect, answer), never a busy loop."""
    batch, requests = 64, 10
    table = FlowTable("node-alpha", CLASSIFIER, start=time.time())
    records = [window_record(table, i, time.time()) for i in range(batch * requests)]
    collector = HttpCollector(keep_alive=keep_alive)
    try:
        config = {"kind": "http", "address": f"http://127.0.0.1:{collector.port}/flows", "batch_records": batch}
        run = ship_through_loop(tmp_path / "loop", [config], records, heartbeat=3600.0, timeout=60.0)
    finally:
        collector.close()
    assert sorted(map(record_id, collector.accepted())) == list(range(batch * requests))
    assert len(collector.requests) == requests
    assert run.ticks <= 3 * requests + 10, run


# --- configuration -----------------------------------------------------------


def test_valid_collector_configs(tmp_path: Path) -> None:
    cert, _ = make_certificate(tmp_path)
    configs = parse_collectors(
        [
            {"kind": "syslog", "address": "tcp://127.0.0.1:6514"},
            {"kind": "syslog", "address": "tls://localhost:6514", "ca_file": cert.name, "name": "secure"},
            {"kind": "ipfix", "address": "udp://[::1]:4739", "template_interval": 30},
            {"kind": "http", "address": "https://127.0.0.1/ingest", "gzip": True},
        ],
        base_dir=tmp_path,
    )
    assert [c.name for c in configs] == ["syslog-0", "secure", "ipfix-2", "http-3"]
    assert configs[1] == CollectorConfig("secure", "syslog", "tls", "localhost", 6514, "", cert)
    assert configs[1].tls and not configs[0].tls
    assert (configs[2].host, configs[2].port, configs[2].template_interval) == ("::1", 4739, 30.0)
    assert (configs[3].port, configs[3].path, configs[3].gzip) == (443, "/ingest", True)


@pytest.mark.parametrize(
    "table, message",
    [
        ({"kind": "kafka", "address": "tcp://127.0.0.1:1"}, r"\[0\]\.kind: expected one of syslog, ipfix, http"),
        ({"kind": "syslog", "address": "tcp://127.0.0.1:1", "colour": "red"}, r"\[0\]\.colour: unknown key"),
        ({"kind": "ipfix", "address": "udp://127.0.0.1:1", "gzip": True}, r"\[0\]\.gzip: unknown key for a ipfix"),
        ({"kind": "syslog"}, r"\[0\]\.address: missing"),
        ({"kind": "syslog", "address": "udp://127.0.0.1:514"}, r"\[0\]\.address: .*needs tcp:// or tls://"),
        ({"kind": "ipfix", "address": "tcp://127.0.0.1:4739"}, r"\[0\]\.address: .*needs udp://"),
        ({"kind": "syslog", "address": "tcp://127.0.0.1"}, r"\[0\]\.address: a port is needed"),
        ({"kind": "syslog", "address": "tcp://127.0.0.1:99999"}, r"\[0\]\.address: bad port"),
        ({"kind": "syslog", "address": "tcp://bad_host!:1"}, r"\[0\]\.address: bad or missing host"),
        ({"kind": "syslog", "address": "tcp://127.0.0.1:1/path"}, r"\[0\]\.address: no path"),
        ({"kind": "http", "address": "http://u:p@127.0.0.1/"}, r"\[0\]\.address: credentials"),
        ({"kind": "http", "address": "http://127.0.0.1/", "gzip": "yes"}, r"\[0\]\.gzip: expected true or false"),
        ({"kind": "http", "address": "http://127.0.0.1/", "batch_records": 0}, r"\[0\]\.batch_records: expected"),
        ({"kind": "syslog", "address": "tcp://127.0.0.1:1", "ca_file": "ca.pem"}, r"\[0\]\.ca_file: only used"),
        ({"kind": "syslog", "address": "tls://127.0.0.1:1", "ca_file": "missing.pem"}, r"\[0\]\.ca_file: cannot load"),
        ({"kind": "syslog", "address": "tls://127.0.0.1:1", "ca_file": "garbage.pem"}, r"\[0\]\.ca_file: cannot load"),
        ({"kind": "syslog", "address": "tcp://127.0.0.1:1", "name": "../x"}, r"\[0\]\.name: expected"),
    ],
)
def test_wrong_collector_configs_are_refused_naming_the_key(
    tmp_path: Path, table: dict[str, object], message: str
) -> None:
    (tmp_path / "garbage.pem").write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    with pytest.raises(ValueError, match=r"^netlog\.collectors" + message):
        parse_collectors([table], base_dir=tmp_path)


def test_duplicate_names_and_non_list_are_refused() -> None:
    twice = [{"kind": "ipfix", "address": "udp://127.0.0.1:1", "name": "a"}] * 2
    with pytest.raises(ValueError, match=r"collectors\[1\]\.name: duplicate"):
        parse_collectors(twice)
    with pytest.raises(ValueError, match=r"^netlog\.collectors: expected an array"):
        parse_collectors({"kind": "ipfix"})

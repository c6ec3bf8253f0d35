"""Unit tests of the sans-IO flow-logging cores: aggregation, syslog, IPFIX, retry, spool."""

from __future__ import annotations

import random
import struct
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime
from ipaddress import ip_address
from pathlib import Path

import pytest

from meshsup.actors.netlog.flows import Classifier, FlowTable, Traffic, encode_record
from meshsup.actors.netlog.ipfix import REVERSE_PEN, TEMPLATE_IPV4, TEMPLATE_IPV6, IpfixExporter
from meshsup.actors.netlog.retry import Backoff, parse_retry_after
from meshsup.actors.netlog.spool import Spool
from meshsup.actors.netlog.syslog import (
    OctetCountingDecoder,
    SDElement,
    SyslogMessage,
    encode_message,
    frame,
)

T0 = 1_700_000_000.0
MESH = ["100.64.0.0/10", "fd7a:115c:a1e0::/48"]
SUBNETS = ["10.20.0.0/16"]
DNS = "100.100.100.100"


def classifier(anonymize_exit: bool = True) -> Classifier:
    return Classifier(MESH, SUBNETS, [DNS], anonymize_exit=anonymize_exit)


def table(**kw: object) -> FlowTable:
    return FlowTable("node-a", classifier(), start=T0, **kw)  # type: ignore[arg-type]


def parse_time(text: str) -> float:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%f%z").timestamp()


# --- flows -------------------------------------------------------------------


def test_traffic_is_classified_like_tailscale() -> None:
    t = table()
    t.add((6, "100.64.0.1:40000", "100.64.0.2:22"), 1, 60, 1, 60)  # mesh to mesh
    t.add((6, "[fd7a:115c:a1e0::1]:40000", "[fd7a:115c:a1e0::2]:443"), 2, 200, 0, 0)  # mesh v6
    t.add((17, "100.64.0.1:5000", "10.20.3.4:53"), 1, 70, 1, 120)  # behind a peer's route
    t.add((6, "100.64.0.1:40001", "93.184.216.34:443"), 5, 500, 4, 4000)  # via exit
    t.add((17, "100.64.0.1:5353", f"{DNS}:53"), 1, 60, 1, 90)  # the node's own DNS
    [record] = t.close_window(T0 + 5)
    assert record["virtualTraffic"] == [
        {"proto": 6, "src": "100.64.0.1:40000", "dst": "100.64.0.2:22",
         "txPkts": 1, "txBytes": 60, "rxPkts": 1, "rxBytes": 60},
        {"proto": 6, "src": "[fd7a:115c:a1e0::1]:40000", "dst": "[fd7a:115c:a1e0::2]:443",
         "txPkts": 2, "txBytes": 200},
    ]  # fmt: skip
    assert record["subnetTraffic"] == [
        {"proto": 17, "src": "100.64.0.1:5000", "dst": "10.20.3.4:53",
         "txPkts": 1, "txBytes": 70, "rxPkts": 1, "rxBytes": 120}
    ]  # fmt: skip
    assert record["exitTraffic"] == [{"proto": 6, "txPkts": 5, "txBytes": 500, "rxPkts": 4, "rxBytes": 4000}]
    assert "physicalTraffic" not in record
    assert t.counters.skipped == 1
    c = classifier()
    assert c.classify(ip_address("8.8.8.8"), ip_address(DNS)) is Traffic.SKIPPED
    assert c.classify(ip_address("10.20.0.1"), ip_address("8.8.8.8")) is Traffic.SUBNET


def test_deltas_of_one_connection_are_summed_and_exit_traffic_merged_per_protocol() -> None:
    t = table()
    conn = (6, "100.64.0.1:1000", "100.64.0.2:80")
    for _ in range(3):
        t.add(conn, 2, 100, 1, 40)
    t.add((6, "100.64.0.1:1", "1.1.1.1:443"), 1, 10, 0, 0)
    t.add((6, "100.64.0.1:2", "8.8.8.8:443"), 2, 20, 0, 0)
    t.add((17, "100.64.0.1:3", "9.9.9.9:53"), 1, 5, 1, 50)
    [record] = t.close_window(T0 + 1)
    assert record["virtualTraffic"] == [
        {"proto": 6, "src": "100.64.0.1:1000", "dst": "100.64.0.2:80",
         "txPkts": 6, "txBytes": 300, "rxPkts": 3, "rxBytes": 120}
    ]  # fmt: skip
    assert record["exitTraffic"] == [
        {"proto": 6, "txPkts": 3, "txBytes": 30},
        {"proto": 17, "txPkts": 1, "txBytes": 5, "rxPkts": 1, "rxBytes": 50},
    ]
    assert not any("src" in e or "dst" in e for e in record["exitTraffic"])


def test_exit_traffic_keeps_addresses_when_anonymisation_is_off() -> None:
    t = FlowTable("node-a", classifier(anonymize_exit=False), start=T0)
    t.add((6, "100.64.0.1:1", "1.1.1.1:443"), 1, 10, 0, 0)
    t.add((6, "100.64.0.1:2", "8.8.8.8:443"), 2, 20, 0, 0)
    [record] = t.close_window(T0 + 1)
    assert [e["dst"] for e in record["exitTraffic"]] == ["1.1.1.1:443", "8.8.8.8:443"]


def test_physical_traffic_is_reported_per_peer_endpoint() -> None:
    t = table()
    t.add_physical("100.64.0.2:0", "198.51.100.2:51820", 10, 1480, 8, 1200)
    t.add_physical("100.64.0.2:0", "198.51.100.2:51820", 1, 148, 0, 0)
    [record] = t.close_window(T0 + 1)
    assert record["physicalTraffic"] == [
        {"src": "100.64.0.2:0", "dst": "198.51.100.2:51820",
         "txPkts": 11, "txBytes": 1628, "rxPkts": 8, "rxBytes": 1200}
    ]  # fmt: skip


def test_windows_have_rfc3339_bounds_and_idle_windows_yield_nothing() -> None:
    t = table()
    t.add((6, "100.64.0.1:1", "100.64.0.2:2"), 1, 1, 0, 0)
    [first] = t.close_window(T0 + 5.25)
    assert set(first) == {"nodeId", "start", "end", "virtualTraffic"}
    assert first["nodeId"] == "node-a"
    assert first["start"] == "2023-11-14T22:13:20.000000Z"
    assert first["end"] == "2023-11-14T22:13:25.250000Z"
    assert t.close_window(T0 + 10) == []  # nothing counted
    t.add((6, "100.64.0.1:1", "100.64.0.2:2"), 1, 1, 0, 0)
    [third] = t.close_window(T0 + 15)
    assert parse_time(third["start"]) == pytest.approx(T0 + 10)
    assert third["virtualTraffic"][0]["txPkts"] == 1  # counts restarted with the window


def test_a_large_window_is_split_into_records_under_the_size_cap() -> None:
    t = table(max_record_bytes=4096)
    expected = {}
    for i in range(300):
        src = f"100.64.{i // 250}.{i % 250 + 1}:{1000 + i}"
        t.add((6, src, "100.64.0.2:80"), i + 1, 100 * (i + 1), 0, 0)
        expected[src] = i + 1
    for i in range(20):
        t.add((17, f"100.64.0.1:{i + 1}", "10.20.0.1:53"), 1, 50, 1, 100)
    records = t.close_window(T0 + 5)
    assert len(records) > 5
    assert t.counters.split_records == len(records) - 1
    seen = {}
    for r in records:
        assert len(encode_record(r)) <= 4096
        assert r is records[-1] or len(encode_record(r)) > 4096 - 150  # closed only when the next entry won't fit
        assert (r["start"], r["end"]) == (records[0]["start"], records[0]["end"])
        seen.update({e["src"]: e["txPkts"] for e in r.get("virtualTraffic", [])})
    assert seen == expected
    assert sum(len(r.get("subnetTraffic", [])) for r in records) == 20


def test_the_next_record_carries_the_dropped_count() -> None:
    t = table()
    t.note_dropped(3)
    t.note_dropped(2)
    t.add((6, "100.64.0.1:1", "100.64.0.2:2"), 1, 1, 0, 0)
    [record] = t.close_window(T0 + 1)
    assert record["dropped"] == 5
    t.add((6, "100.64.0.1:1", "100.64.0.2:2"), 1, 1, 0, 0)
    [later] = t.close_window(T0 + 2)
    assert "dropped" not in later
    t.note_dropped(1)
    assert t.close_window(T0 + 3)[0]["dropped"] == 1  # reported even in an idle window


@pytest.mark.parametrize(
    "conn, counts",
    [
        ([6, "100.64.0.1:1", "100.64.0.2:2"], (1, 1, 1, 1)),  # not a tuple
        ((6, "100.64.0.1", "100.64.0.2:2"), (1, 1, 1, 1)),  # no port
        ((6, "100.64.0.1:70000", "100.64.0.2:2"), (1, 1, 1, 1)),
        ((6, "fd7a:115c:a1e0::1:80", "100.64.0.2:2"), (1, 1, 1, 1)),  # v6 without brackets
        ((6, "not-an-ip:1", "100.64.0.2:2"), (1, 1, 1, 1)),
        ((300, "100.64.0.1:1", "100.64.0.2:2"), (1, 1, 1, 1)),
        ((6, "100.64.0.1:1", "100.64.0.2:2"), (-1, 1, 1, 1)),
        ((6, "100.64.0.1:1", "100.64.0.2:2"), (True, 1, 1, 1)),
        ((6, "100.64.0.1:1", "100.64.0.2:2"), (1.5, 1, 1, 1)),
        ((6, ["unhashable"], "100.64.0.2:2"), (1, 1, 1, 1)),
    ],
)
def test_bad_input_is_a_counted_drop(conn: object, counts: tuple[object, ...]) -> None:
    t = table()
    t.add(conn, *counts)  # type: ignore[arg-type]
    t.add_physical("nonsense", "198.51.100.2:51820", 1, 1, 1, 1)
    assert t.counters.bad_input == 2
    assert t.close_window(T0 + 1) == []


# --- syslog ------------------------------------------------------------------


def test_syslog_message_matches_rfc5424_with_escaped_structured_data() -> None:
    m = SyslogMessage(
        facility=16,
        severity=6,
        timestamp=0.5,
        hostname="alpha",
        app_name="meshsup",
        procid="42",
        msgid="flowlog",
        structured_data=(SDElement("flow@32473", (("node", 'a"b\\c]d'), ("n", "1"))),),
        msg='{"k":1}',
    )
    assert encode_message(m) == (
        b'<134>1 1970-01-01T00:00:00.500000Z alpha meshsup 42 flowlog [flow@32473 node="a\\"b\\\\c\\]d" n="1"] {"k":1}'
    )


def test_syslog_header_uses_nilvalues_and_sanitises_fields() -> None:
    assert encode_message(SyslogMessage()) == b"<134>1 - - - - - -"
    out = encode_message(SyslogMessage(severity=3, hostname="my host", app_name="x" * 60, msg="h\u00e9"))
    # UTF-8 message marked with a BOM
    assert out == b"<131>1 - my_host " + b"x" * 48 + b" - - - \xef\xbb\xbfh\xc3\xa9"
    with pytest.raises(ValueError):
        SyslogMessage(facility=24)


def test_octet_counting_round_trips_across_any_chunking() -> None:
    messages = [encode_message(SyslogMessage(msgid=str(i), msg="x" * i * 37)) for i in range(20)]
    stream = b"".join(frame(m) for m in messages)
    assert stream.startswith(b"%d <134>1" % len(messages[0]))
    rng = random.Random(7)
    decoder = OctetCountingDecoder()
    got: list[bytes] = []
    pos = 0
    while pos < len(stream):
        step = rng.randint(1, 50)
        got += decoder.feed(stream[pos : pos + step])
        pos += step
    assert got == messages and decoder.errors == 0


@pytest.mark.parametrize("garbage", [b"abc <134>1", b"012 x", b"99999999999 x", b"12345678901234"])
def test_a_malformed_frame_length_is_counted(garbage: bytes) -> None:
    decoder = OctetCountingDecoder()
    assert decoder.feed(garbage) == []
    assert decoder.errors == 1
    assert decoder.feed(b"3 abc") == []  # the stream cannot be resynchronised


# --- ipfix -------------------------------------------------------------------


@dataclass
class Message:
    version: int
    time: int
    seq: int
    domain: int
    sets: list[tuple[int, bytes]]


def parse_ipfix(message: bytes) -> Message:
    """A small independent IPFIX reader for the assertions."""
    version, length, export_time, sequence, domain = struct.unpack_from("!HHIII", message)
    assert length == len(message)
    sets, pos = [], 16
    while pos < length:
        set_id, set_len = struct.unpack_from("!HH", message, pos)
        sets.append((set_id, message[pos + 4 : pos + set_len]))
        pos += set_len
    assert pos == length
    return Message(version, export_time, sequence, domain, sets)


def parse_templates(body: bytes) -> dict[int, list[tuple[int, int, int]]]:
    templates, pos = {}, 0
    while pos < len(body):
        tid, count = struct.unpack_from("!HH", body, pos)
        pos += 4
        fields = []
        for _ in range(count):
            ie, flen = struct.unpack_from("!HH", body, pos)
            pos += 4
            pen = 0
            if ie & 0x8000:
                (pen,) = struct.unpack_from("!I", body, pos)
                pos += 4
            fields.append((ie & 0x7FFF, flen, pen))
        templates[tid] = fields
    return templates


def window(entries: list[dict[str, object]], start: float = T0, kind: str = "virtualTraffic") -> dict[str, object]:
    return {
        "nodeId": "n",
        "start": datetime.fromtimestamp(start, UTC).isoformat(),
        "end": datetime.fromtimestamp(start + 5, UTC).isoformat(),
        kind: entries,
    }


def test_ipfix_templates_carry_ipv4_ipv6_and_rfc5103_reverse_counters() -> None:
    [msg] = IpfixExporter().encode([window([{"proto": 6, "src": "100.64.0.1:1", "dst": "100.64.0.2:2"}])], T0)
    parsed = parse_ipfix(msg)
    assert parsed.version == 10 and parsed.seq == 0 and parsed.time == int(T0) and parsed.domain == 1
    set_id, body = parsed.sets[0]
    assert set_id == 2
    templates = parse_templates(body)
    common = [(2, 8, 0), (1, 8, 0), (2, 8, REVERSE_PEN), (1, 8, REVERSE_PEN), (152, 8, 0), (153, 8, 0)]
    assert templates[TEMPLATE_IPV4] == [(4, 1, 0), (7, 2, 0), (11, 2, 0), (8, 4, 0), (12, 4, 0)] + common
    assert templates[TEMPLATE_IPV6] == [(4, 1, 0), (7, 2, 0), (11, 2, 0), (27, 16, 0), (28, 16, 0)] + common


def test_ipfix_data_records_hold_the_counters_and_window() -> None:
    entries = [
        {"proto": 17, "src": "100.64.0.1:5000", "dst": "100.64.0.2:53",
         "txPkts": 3, "txBytes": 300, "rxPkts": 2, "rxBytes": 250},
        {"proto": 6, "src": "[fd7a:115c:a1e0::1]:443", "dst": "[fd7a:115c:a1e0::2]:8443", "txPkts": 1, "txBytes": 60},
    ]  # fmt: skip
    [msg] = IpfixExporter().encode([window(entries)], T0)
    data = dict(parse_ipfix(msg).sets)
    v4 = struct.unpack("!BHH4s4sQQQQQQ", data[TEMPLATE_IPV4])
    assert v4 == (17, 5000, 53, bytes([100, 64, 0, 1]), bytes([100, 64, 0, 2]),
                  3, 300, 2, 250, int(T0 * 1000), int((T0 + 5) * 1000))  # fmt: skip
    v6 = struct.unpack("!BHH16s16sQQQQQQ", data[TEMPLATE_IPV6])
    assert v6[:3] == (6, 443, 8443) and v6[5:9] == (1, 60, 0, 0)


def test_ipfix_messages_stay_under_the_size_cap_and_sequence_counts_data_records() -> None:
    exporter = IpfixExporter(max_message_size=600)
    entries = [{"proto": 6, "src": f"100.64.0.1:{i}", "dst": "100.64.0.2:80", "txPkts": i} for i in range(50)]
    messages = exporter.encode([window(entries), window(entries[:7], kind="subnetTraffic")], T0)
    assert len(messages) > 5
    expected_seq = 0
    packets = []
    for m in messages:
        assert len(m) <= 600
        parsed = parse_ipfix(m)
        assert parsed.seq == expected_seq
        for sid, body in parsed.sets:
            if sid == TEMPLATE_IPV4:
                for off in range(0, len(body), 61):
                    packets.append(struct.unpack_from("!BHH4s4sQ", body, off)[5])
                    expected_seq += 1
    assert sorted(packets) == sorted(list(range(50)) + list(range(7)))
    assert exporter.sequence == 57
    [later] = exporter.encode([window(entries[:1])], T0 + 1)
    assert parse_ipfix(later).seq == 57


def test_ipfix_templates_are_resent_only_after_the_interval() -> None:
    exporter = IpfixExporter(template_interval=30)
    rec = [window([{"proto": 6, "src": "100.64.0.1:1", "dst": "100.64.0.2:2"}])]

    def set_ids(now: float) -> list[int]:
        return [sid for m in exporter.encode(rec, now) for sid, _ in parse_ipfix(m).sets]

    assert set_ids(T0) == [2, TEMPLATE_IPV4]
    assert set_ids(T0 + 29) == [TEMPLATE_IPV4]
    assert set_ids(T0 + 30) == [2, TEMPLATE_IPV4]


def test_ipfix_exports_anonymised_exit_traffic_and_counts_bad_entries() -> None:
    exporter = IpfixExporter()
    bad = [
        window([{"proto": 6, "txPkts": 4}], kind="exitTraffic"),  # exported as 0.0.0.0
        window([{"proto": 6, "src": "100.64.0.1:1", "dst": "[fd7a:115c:a1e0::2]:2"}]),  # mixed families
        window([{"proto": 6, "src": "100.64.0.1:1", "dst": "100.64.0.2:2", "txPkts": -1}]),
        window(["not a dict"]),  # type: ignore[list-item]
        {"start": "yesterday", "end": "today", "virtualTraffic": []},
        "not a record",
    ]
    messages = exporter.encode(bad, T0)  # type: ignore[arg-type]
    assert exporter.counters.bad_entries == 5
    assert exporter.counters.data_records == 1
    assert len(messages) == 1
    assert IpfixExporter().encode([], T0) == []


# --- retry -------------------------------------------------------------------


def test_backoff_grows_exponentially_with_jitter_up_to_the_cap() -> None:
    b = Backoff(base=1, cap=8, jitter=0.5, rng=random.Random(1))
    delays = [b.failure(100.0) for _ in range(6)]
    for delay, full in zip(delays, [1, 2, 4, 8, 8, 8]):
        assert full * 0.5 <= delay <= full
    assert len(set(delays)) == len(delays)  # jittered, not lockstep
    assert not b.ready(100.0) and b.ready(100.0 + delays[-1])
    b.success()
    assert b.ready(0) and b.failure(0) <= 1


def test_backoff_honours_retry_after() -> None:
    b = Backoff(base=0.1, cap=1, max_hint=120)
    assert b.failure(10.0, retry_after=30) == 30
    assert not b.ready(39.9) and b.ready(40.0)
    assert b.failure(10.0, retry_after=10_000) == 120


def test_retry_after_parses_seconds_and_http_dates() -> None:
    assert parse_retry_after("7", T0) == 7
    date = format_datetime(datetime.fromtimestamp(T0 + 90, UTC), usegmt=True)
    assert parse_retry_after(date, T0) == pytest.approx(90)
    assert parse_retry_after(date, T0 + 1000) == 0
    assert parse_retry_after("soon", T0) is None
    assert parse_retry_after(None, T0) is None


# --- spool -------------------------------------------------------------------


def rec(i: int, pad: int = 0) -> dict[str, object]:
    return {"nodeId": "n", "i": i, "pad": "x" * pad}


def test_spool_lists_oldest_first_and_survives_a_restart(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s")
    names = [spool.append(rec(i)) for i in range(5)]
    assert spool.entries() == names
    spool.remove(names[0])
    (tmp_path / "s" / "00000000000000000099.json.tmp").write_bytes(b"half a rec")  # a crash mid-write
    again = Spool(tmp_path / "s")
    assert [again.read(n)["i"] for n in again.entries()] == [1, 2, 3, 4]  # type: ignore[index]
    newest = again.append(rec(5))
    assert again.entries()[-1] == newest and newest > names[-1]
    assert not list((tmp_path / "s").glob("*.tmp"))
    assert again.size_bytes == sum(p.stat().st_size for p in (tmp_path / "s").iterdir())


def test_a_full_spool_drops_the_oldest_and_the_next_record_carries_the_count(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_records=3)
    for i in range(5):
        spool.append(rec(i))
    kept = [spool.read(n) for n in spool.entries()]
    assert [r["i"] for r in kept] == [2, 3, 4]  # type: ignore[index]
    assert [r.get("dropped") for r in kept] == [None, 1, 1]  # type: ignore[union-attr]
    assert spool.dropped == 2
    # Dropping a record that itself carried a count carries that count on too.
    spool.append(rec(5))  # evicts #2
    spool.append(rec(6))  # evicts #3, which carried 1
    assert spool.read(spool.entries()[-1])["dropped"] == 2  # type: ignore[index]


def test_spool_is_bounded_by_bytes(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=1000)
    for i in range(10):
        spool.append(rec(i, pad=200))
        assert spool.size_bytes <= 1000
    assert len(spool) == 4 and spool.dropped == 6
    big = spool.append(rec(99, pad=5000))  # the newest record is always kept
    # It reports all ten records lost: four now, six by the counts they carried.
    assert spool.entries() == [big] and spool.read(big)["dropped"] == 10  # type: ignore[index]


def test_discarded_and_corrupt_records(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    a, b, c = (spool.append(rec(i)) for i in range(3))
    spool.discard([a, b])
    (tmp_path / c).write_bytes(b"{not json")
    assert spool.read(c) is None and spool.corrupt == 1 and len(spool) == 0
    assert spool.read(spool.append(rec(3)))["dropped"] == 2  # type: ignore[index]

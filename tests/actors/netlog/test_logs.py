"""The node's own logs on their way to collectors: unit tests of the intake, the renderings and the push."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import zmq

from meshsup.actors.bus.codec import decode
from meshsup.actors.bus.endpoints import Runtime
from meshsup.actors.bus.messages import LogLine
from meshsup.actors.log import LogPush, log_endpoint
from meshsup.actors.netlog.daemonlog import LogIntake
from meshsup.actors.netlog.formats import flow_journal, log_journal, log_syslog
from meshsup.actors.netlog.journal_export import encode_entry, field_name
from meshsup.actors.netlog.syslog import encode_message

T0 = 1_700_000_000.0


def line(actor: str = "tun-io", pid: int = 42, level: str = "info", **kw: object) -> str:
    return json.dumps(
        {
            "event": "listening",
            "actor": actor,
            "pid": pid,
            "level": level,
            "timestamp": "2023-11-14T22:13:20.250000Z",
            **kw,
        }
    )


def test_lines_below_the_level_are_filtered_and_gaps_are_reported_on_the_next_record() -> None:
    intake = LogIntake("info")
    assert intake.feed(7, line(), T0) is not None  # a sender's first line: no gap yet
    assert intake.feed(8, line(level="debug"), T0) is None  # filtered, not lost
    assert intake.feed(12, line(), T0) == {**json.loads(line()), "dropped": 3}  # 9, 10, 11 never came
    assert intake.feed(0, line(pid=43), T0) is not None  # another process: its own sequence
    assert intake.feed(13, "not json", T0) is None and intake.feed(14, "[1]", T0) is None
    assert (intake.counters.filtered, intake.counters.lost, intake.counters.malformed) == (1, 3, 2)
    assert intake.feed(15, line(level="exception"), T0) is not None  # structlog's log.exception


def test_a_log_storm_is_cut_by_the_rate_limit_and_the_next_record_says_how_much() -> None:
    intake = LogIntake("info", rate=10, burst=5)
    kept = [intake.feed(i, line(), T0) for i in range(8)]
    assert sum(r is not None for r in kept) == 5 and intake.counters.rate_limited == 3
    record = intake.feed(8, line(), T0 + 0.2)  # tokens come back at 10 a second
    assert record is not None and record["dropped"] == 3


def test_a_log_record_is_rfc5424_naming_the_actor_and_its_severity() -> None:
    record = json.loads(line(actor="magicsock", level="warning", port=51820))
    message = encode_message(log_syslog(record, T0 + 60, "alpha"))
    assert message.startswith(
        b'<28>1 2023-11-14T22:13:20.250000Z alpha meshsup 42 log [meshsup@32473 actor="magicsock" level="warning"] {'
    )
    assert json.loads(message.split(b"] ", 1)[1]) == record


def test_journal_export_entries_as_systemd_journal_remote_reads_them() -> None:
    entry = encode_entry([("MESSAGE", "two\nlines"), ("MESHSUP_actor", "tun-io"), ("__REALTIME_TIMESTAMP", "5")])
    assert entry == (
        b"MESSAGE\n" + struct.pack("<Q", 9) + b"two\nlines\nMESHSUP_ACTOR=tun-io\n__REALTIME_TIMESTAMP=5\n\n"
    )
    assert field_name("_pid") == "PID" and field_name("9lives!") == "LIVES_" and field_name("") == "FIELD"
    fields = dict(log_journal(json.loads(line(port=51820))))
    assert fields["MESSAGE"] == "listening" and fields["PRIORITY"] == "6" and fields["SYSLOG_PID"] == "42"
    assert fields["MESHSUP_actor"] == "tun-io" and fields["MESHSUP_port"] == "51820"
    assert fields["__REALTIME_TIMESTAMP"] == str(int(T0 * 1e6) + 250_000)
    flow = {"nodeId": "k", "start": "2023-11-14T22:13:20.000000Z", "end": "2023-11-14T22:13:25.000000Z"}
    fields = dict(flow_journal(flow))
    assert json.loads(fields["MESSAGE"]) == flow and fields["MESHSUP_end"] == flow["end"]
    assert fields["__REALTIME_TIMESTAMP"] == str(int((T0 + 5) * 1e6))


def test_every_event_is_pushed_without_blocking_and_drops_leave_a_gap(tmp_path: Path) -> None:
    runtime = Runtime(tmp_path)
    runtime.create()
    push = LogPush(runtime)
    try:
        for i in range(LogPush.HWM + 10):  # netlog is not there yet: the queue fills, then drops
            assert push(None, "info", {"event": f"e{i}"}) == {"event": f"e{i}"}
        assert push.dropped > 0 and push.seq == LogPush.HWM + 10
        pull = push.ctx.socket(zmq.PULL)
        pull.bind(log_endpoint(runtime))
        assert pull.poll(5000)
        received = []
        while pull.poll(200):
            msg = decode(pull.recv())
            assert isinstance(msg, LogLine)
            received.append(msg)
        pull.close(0)
    finally:
        push.sock.close(0)
        push.ctx.term()
    assert [m.seq for m in received] == list(range(len(received)))  # oldest kept, in order
    assert len(received) + push.dropped == LogPush.HWM + 10
    assert json.loads(received[0].line) == {"event": "e0"}

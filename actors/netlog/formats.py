"""How records look at a collector: an RFC 5424 message, a journal export entry.

Flow records (flows.py) and the node's own log events (daemonlog.py) are
spooled, retried and posted the same way; only these renderings differ.
Both put the whole record, as JSON, in the message, and its identifying
fields in structured data (syslog) or in fields of their own (journal).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from meshsup.actors.netlog.daemonlog import level_of
from meshsup.actors.netlog.flows import Record, encode_record
from meshsup.actors.netlog.journal_export import REALTIME
from meshsup.actors.netlog.syslog import FACILITY_LOCAL0, SEVERITY_INFO, SDElement, SyslogMessage

SD_ID = "meshsup@32473"  # 32473: the private enterprise number reserved for examples (RFC 5612)
APP_NAME = "meshsup"
FACILITY_DAEMON = 3
SEVERITIES = {"debug": 7, "info": 6, "warning": 4, "error": 3, "critical": 2}
Fields = list[tuple[str, str]]


@dataclass(frozen=True)
class RecordFormat:
    syslog: Callable[[Record, float, str], SyslogMessage]  # (record, now, hostname)
    journal: Callable[[Record], Fields]


def _micros(text: object) -> str | None:
    """An RFC 3339 time as journal microseconds, or None if it is not one."""
    try:
        return str(round(datetime.fromisoformat(str(text).replace("Z", "+00:00")).timestamp() * 1e6))
    except ValueError:
        return None


def _dropped(record: Record) -> Fields:
    return [("dropped", str(record["dropped"]))] if "dropped" in record else []


def flow_syslog(record: Record, now: float, hostname: str) -> SyslogMessage:
    params = tuple((k, str(record[k])) for k in ("nodeId", "start", "end", "dropped") if k in record)
    return SyslogMessage(
        facility=FACILITY_LOCAL0,
        severity=SEVERITY_INFO,
        timestamp=now,
        hostname=hostname,
        app_name=APP_NAME,
        procid=str(os.getpid()),
        msgid="flowlog",
        structured_data=(SDElement(SD_ID, params),),
        msg=encode_record(record).decode(),
    )


def flow_journal(record: Record) -> Fields:
    fields = [
        ("MESSAGE", encode_record(record).decode()),
        ("PRIORITY", str(SEVERITY_INFO)),
        ("SYSLOG_FACILITY", str(FACILITY_LOCAL0)),
        ("SYSLOG_IDENTIFIER", APP_NAME),
        ("MESHSUP_RECORD", "flowlog"),
    ]
    fields += [(f"MESHSUP_{k}", str(record[k])) for k in ("nodeId", "start", "end", "dropped") if k in record]
    end = _micros(record.get("end"))
    return fields + ([(REALTIME, end)] if end else [])


def log_syslog(record: Record, now: float, hostname: str) -> SyslogMessage:
    level = level_of(record)
    actor = str(record.get("actor", ""))
    when = _micros(record.get("timestamp"))
    return SyslogMessage(
        facility=FACILITY_DAEMON,
        severity=SEVERITIES[level],
        timestamp=int(when) / 1e6 if when else now,
        hostname=hostname,
        app_name=APP_NAME,
        procid=str(record.get("pid", "")),
        msgid="log",
        structured_data=(SDElement(SD_ID, (("actor", actor), ("level", level), *_dropped(record))),),
        msg=encode_record(record).decode(),
    )


def log_journal(record: Record) -> Fields:
    level = level_of(record)
    fields = [
        ("MESSAGE", str(record.get("event", ""))),
        ("PRIORITY", str(SEVERITIES[level])),
        ("SYSLOG_FACILITY", str(FACILITY_DAEMON)),
        ("SYSLOG_IDENTIFIER", APP_NAME),
        ("SYSLOG_PID", str(record.get("pid", ""))),
        ("MESHSUP_RECORD", "log"),
    ]
    for key, value in record.items():
        if key not in ("event", "pid", "timestamp"):
            fields.append((f"MESHSUP_{key}", value if isinstance(value, str) else json.dumps(value)))
    when = _micros(record.get("timestamp"))
    return fields + ([(REALTIME, when)] if when else [])


FLOWS = RecordFormat(flow_syslog, flow_journal)
LOGS = RecordFormat(log_syslog, log_journal)

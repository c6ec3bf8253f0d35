"""IPFIX (RFC 7011) export of flow records, with RFC 5103 reverse counters (sans-IO).

Each traffic entry of a record (virtual, subnet, exit) becomes one
biflow data record: tx counts are the forward direction (src to dst), rx
counts the reverse one. Physical (underlay) traffic is not exported: it is
the same bytes again, wrapped in WireGuard. Anonymised exit entries have no
addresses and go out as 0.0.0.0:0 -> 0.0.0.0:0 per protocol.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from meshsup.actors.netlog.flows import RECORD_KINDS, Record, Traffic, parse_endpoint

IPFIX_VERSION = 10
TEMPLATE_SET_ID = 2
REVERSE_PEN = 29305  # RFC 5103: reverse information elements
TEMPLATE_IPV4 = 256
TEMPLATE_IPV6 = 257
_HEADER = struct.Struct("!HHIII")  # version, length, export time, sequence, domain
_SET_HEADER = struct.Struct("!HH")
_ENTERPRISE_BIT = 0x8000
_MIN_MESSAGE = 512  # a header, the templates and at least one data record
_EXPORTED = tuple(k for k in RECORD_KINDS if k is not Traffic.PHYSICAL)


@dataclass(frozen=True)
class FieldSpec:
    element_id: int
    length: int
    enterprise: int = 0


def _fields(src_ie: int, dst_ie: int, addr_len: int) -> tuple[FieldSpec, ...]:
    # Order matches the struct layouts below.
    return (
        FieldSpec(4, 1),  # protocolIdentifier
        FieldSpec(7, 2),  # sourceTransportPort
        FieldSpec(11, 2),  # destinationTransportPort
        FieldSpec(src_ie, addr_len),
        FieldSpec(dst_ie, addr_len),
        FieldSpec(2, 8),  # packetDeltaCount
        FieldSpec(1, 8),  # octetDeltaCount
        FieldSpec(2, 8, REVERSE_PEN),  # reversePacketDeltaCount
        FieldSpec(1, 8, REVERSE_PEN),  # reverseOctetDeltaCount
        FieldSpec(152, 8),  # flowStartMilliseconds
        FieldSpec(153, 8),  # flowEndMilliseconds
    )


TEMPLATES: dict[int, tuple[FieldSpec, ...]] = {
    TEMPLATE_IPV4: _fields(8, 12, 4),  # sourceIPv4Address, destinationIPv4Address
    TEMPLATE_IPV6: _fields(27, 28, 16),  # sourceIPv6Address, destinationIPv6Address
}
_DATA = {
    TEMPLATE_IPV4: struct.Struct("!BHH4s4sQQQQQQ"),
    TEMPLATE_IPV6: struct.Struct("!BHH16s16sQQQQQQ"),
}


def encode_template_set() -> bytes:
    body = b""
    for template_id, fields in TEMPLATES.items():
        body += struct.pack("!HH", template_id, len(fields))
        for f in fields:
            if f.enterprise:
                body += struct.pack("!HHI", f.element_id | _ENTERPRISE_BIT, f.length, f.enterprise)
            else:
                body += struct.pack("!HH", f.element_id, f.length)
    return _SET_HEADER.pack(TEMPLATE_SET_ID, _SET_HEADER.size + len(body)) + body


_TEMPLATE_SET = encode_template_set()


@dataclass
class IpfixCounters:
    data_records: int = 0
    messages: int = 0
    bad_entries: int = 0  # entries or records that could not be exported


def _millis(timestamp: object) -> int | None:
    if not isinstance(timestamp, str):
        return None
    try:
        moment = datetime.fromisoformat(timestamp)
    except ValueError:
        return None
    if moment.tzinfo is None:
        return None  # an RFC 3339 time always has an offset
    millis = int(moment.timestamp() * 1000)
    return millis if 0 <= millis < 2**64 else None


_ANY = (ipaddress.IPv4Address(0), 0)


def _data_record(entry: object, start_ms: int, end_ms: int) -> tuple[int, bytes] | None:
    """(template id, packed data record) for one traffic entry; None when malformed."""
    if not isinstance(entry, dict):
        return None
    src = parse_endpoint(entry["src"]) if "src" in entry else _ANY
    dst = parse_endpoint(entry["dst"]) if "dst" in entry else _ANY
    values = [entry.get(k, 0) for k in ("proto", "txPkts", "txBytes", "rxPkts", "rxBytes")]
    if src is None or dst is None or src[0].version != dst[0].version:
        return None
    if not all(type(v) is int and 0 <= v < 2**64 for v in values) or values[0] > 255:
        return None
    template_id = TEMPLATE_IPV4 if src[0].version == 4 else TEMPLATE_IPV6
    proto, tx_pkts, tx_bytes, rx_pkts, rx_bytes = values
    return template_id, _DATA[template_id].pack(
        proto, src[1], dst[1], src[0].packed, dst[0].packed,
        tx_pkts, tx_bytes, rx_pkts, rx_bytes, start_ms, end_ms,
    )  # fmt: skip


class IpfixExporter:
    """Turns records into IPFIX messages for one observation domain over UDP.

    The sequence number of a message is the count of data records sent
    before it. Templates go out in the first message and again every
    `template_interval` seconds, since a UDP collector may have missed them
    or restarted.
    """

    def __init__(
        self,
        observation_domain: int = 1,
        max_message_size: int = 1400,
        template_interval: float = 60.0,
    ) -> None:
        if max_message_size < _MIN_MESSAGE:
            raise ValueError(f"max_message_size must be at least {_MIN_MESSAGE}")
        self.observation_domain = observation_domain
        self.max_message_size = max_message_size
        self.template_interval = template_interval
        self.counters = IpfixCounters()
        self.sequence = 0
        self._templates_sent_at: float | None = None

    def encode(self, records: Iterable[Record], now: float) -> list[bytes]:
        data = self._data_records(records)
        if not data:
            return []
        messages: list[bytes] = []
        sets: list[bytes] = []
        if self._templates_sent_at is None or now - self._templates_sent_at >= self.template_interval:
            sets.append(_TEMPLATE_SET)
            self._templates_sent_at = now
        size = _HEADER.size + sum(map(len, sets))
        current: tuple[int, list[bytes]] | None = None  # the data set being filled
        count = 0  # data records in the message being built
        for template_id, rec in data:
            opens_set = current is None or current[0] != template_id
            if size + len(rec) + (_SET_HEADER.size if opens_set else 0) > self.max_message_size:
                messages.append(self._message(sets, current, count, now))
                sets, current, count, size, opens_set = [], None, 0, _HEADER.size, True
            if opens_set:
                if current is not None:
                    sets.append(_data_set(*current))
                current = (template_id, [])
                size += _SET_HEADER.size
            assert current is not None
            current[1].append(rec)
            size += len(rec)
            count += 1
        messages.append(self._message(sets, current, count, now))
        return messages

    def _data_records(self, records: Iterable[Record]) -> list[tuple[int, bytes]]:
        out: list[tuple[int, bytes]] = []
        for record in records:
            if not isinstance(record, dict):
                self.counters.bad_entries += 1
                continue
            start_ms, end_ms = _millis(record.get("start")), _millis(record.get("end"))
            if start_ms is None or end_ms is None:
                self.counters.bad_entries += 1
                continue
            for kind in _EXPORTED:
                entries = record.get(kind.value, [])
                for entry in entries if isinstance(entries, list) else [None]:
                    packed = _data_record(entry, start_ms, end_ms)
                    if packed is None:
                        self.counters.bad_entries += 1
                    else:
                        out.append(packed)
        return out

    def _message(self, sets: list[bytes], current: tuple[int, list[bytes]] | None, count: int, now: float) -> bytes:
        body = b"".join(sets) + (_data_set(*current) if current is not None else b"")
        header = _HEADER.pack(
            IPFIX_VERSION, _HEADER.size + len(body), int(now) & 0xFFFFFFFF, self.sequence, self.observation_domain
        )
        self.sequence = (self.sequence + count) & 0xFFFFFFFF
        self.counters.data_records += count
        self.counters.messages += 1
        return header + body


def _data_set(template_id: int, records: list[bytes]) -> bytes:
    body = b"".join(records)
    return _SET_HEADER.pack(template_id, _SET_HEADER.size + len(body)) + body

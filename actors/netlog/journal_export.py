"""systemd's Journal Export Format (sans-IO): the body systemd-journal-remote takes over HTTP.

An entry is one "NAME=value" line per field, ended by an empty line; a value
holding a newline is written as NAME, a newline, its length (u64 little
endian), the bytes and a newline. Names are upper-case letters, digits and
'_', at most 64, not starting with '_' (those are the journal's own) or a
digit; other names are mended rather than refused.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterable

CONTENT_TYPE = "application/vnd.fdo.journal"
REALTIME = "__REALTIME_TIMESTAMP"  # an address field the sender may set: microseconds since the epoch
_NOT_NAME = re.compile(r"[^A-Z0-9_]")
_MAX_NAME = 64


def field_name(key: str) -> str:
    name = _NOT_NAME.sub("_", key.upper()).lstrip("_0123456789")[:_MAX_NAME]
    return name or "FIELD"


def encode_entry(fields: Iterable[tuple[str, str]]) -> bytes:
    out = bytearray()
    for key, value in fields:
        name = (key if key == REALTIME else field_name(key)).encode()
        data = value.encode()
        if b"\n" in data:
            out += name + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
        else:
            out += name + b"=" + data + b"\n"
    return bytes(out + b"\n")

"""RFC 5424 syslog messages and RFC 6587 octet-counting framing (sans-IO).

Header fields are sanitised rather than refused: a hostname with a space
would otherwise shift every later field, so characters outside PRINTUSASCII
become '_' and fields are cut to their RFC lengths. Empty fields become the
NILVALUE '-'.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from meshsup.actors.netlog.flows import rfc3339

FACILITY_LOCAL0 = 16
SEVERITY_INFO = 6
NILVALUE = "-"
BOM = b"\xef\xbb\xbf"
# RFC 5424 section 6: maximum lengths of the header fields.
_MAX_HOSTNAME, _MAX_APP_NAME, _MAX_PROCID, _MAX_MSGID, _MAX_SD_NAME = 255, 48, 128, 32, 32
_PARAM_ESCAPES = str.maketrans({"\\": "\\\\", '"': '\\"', "]": "\\]"})
_SD_NAME_FORBIDDEN = frozenset('= ]"')


@dataclass(frozen=True)
class SDElement:
    """One structured-data element: [sd_id name="value" ...]."""

    sd_id: str
    params: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class SyslogMessage:
    facility: int = FACILITY_LOCAL0
    severity: int = SEVERITY_INFO
    timestamp: float | None = None  # seconds since the epoch; None is NILVALUE
    hostname: str = ""
    app_name: str = ""
    procid: str = ""
    msgid: str = ""
    structured_data: tuple[SDElement, ...] = field(default=())
    msg: str = ""

    def __post_init__(self) -> None:
        if not 0 <= self.facility <= 23 or not 0 <= self.severity <= 7:
            raise ValueError("facility must be 0..23 and severity 0..7")


def _header_field(value: str, max_len: int) -> str:
    cleaned = "".join(c if 33 <= ord(c) <= 126 else "_" for c in value[:max_len])
    return cleaned or NILVALUE


def _sd_name(value: str) -> str:
    cleaned = "".join(c if 33 <= ord(c) <= 126 and c not in _SD_NAME_FORBIDDEN else "_" for c in value[:_MAX_SD_NAME])
    return cleaned or "_"


def encode_structured_data(elements: tuple[SDElement, ...]) -> str:
    if not elements:
        return NILVALUE
    return "".join(
        "[" + _sd_name(e.sd_id) + "".join(f' {_sd_name(k)}="{v.translate(_PARAM_ESCAPES)}"' for k, v in e.params) + "]"
        for e in elements
    )


def encode_message(m: SyslogMessage) -> bytes:
    """The SYSLOG-MSG bytes: HEADER SP STRUCTURED-DATA [SP MSG]."""
    header = " ".join(
        (
            f"<{m.facility * 8 + m.severity}>1",
            rfc3339(m.timestamp) if m.timestamp is not None else NILVALUE,
            _header_field(m.hostname, _MAX_HOSTNAME),
            _header_field(m.app_name, _MAX_APP_NAME),
            _header_field(m.procid, _MAX_PROCID),
            _header_field(m.msgid, _MAX_MSGID),
            encode_structured_data(m.structured_data),
        )
    ).encode()
    if not m.msg:
        return header
    # MSG-ANY for plain ASCII; UTF-8 text is marked with a BOM as section 6.4 asks.
    body = m.msg.encode() if m.msg.isascii() else BOM + m.msg.encode()
    return header + b" " + body


def frame(message: bytes) -> bytes:
    """RFC 6587 octet counting (also RFC 5425's framing over TLS): MSG-LEN SP SYSLOG-MSG."""
    return b"%d %b" % (len(message), message)


class OctetCountingDecoder:
    """Reassembles octet-counted frames from a byte stream.

    A malformed length poisons the stream (there is no way to resynchronise),
    so it is counted and the decoder discards everything after it.
    """

    def __init__(self, max_frame: int = 1 << 20) -> None:
        self.max_frame = max_frame
        self._max_digits = len(str(max_frame))
        self.errors = 0
        self._buffer = bytearray()
        self._broken = False

    def feed(self, data: bytes) -> list[bytes]:
        if self._broken:
            return []
        self._buffer += data
        frames: list[bytes] = []
        while True:
            space = self._buffer.find(b" ", 0, self._max_digits + 1)
            if space < 0:
                if len(self._buffer) > self._max_digits:
                    self._fail()
                return frames
            digits = bytes(self._buffer[:space])
            if not digits.isdigit() or digits.startswith(b"0") or int(digits) > self.max_frame:
                self._fail()
                return frames
            end = space + 1 + int(digits)
            if len(self._buffer) < end:
                return frames
            frames.append(bytes(self._buffer[space + 1 : end]))
            del self._buffer[:end]

    def _fail(self) -> None:
        self.errors += 1
        self._broken = True
        self._buffer.clear()

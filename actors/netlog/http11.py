"""An HTTP/1.1 POST and its response, as bytes (sans-IO).

The response is read as it arrives and bounded: a collector that answers
with endless headers or an endless body (chunked or with a huge
Content-Length) fails the request once `max_bytes` came in, instead of
being read for ever. The body is only counted, never kept: shipping needs
the status and Retry-After only.
"""

from __future__ import annotations

import enum

MAX_HEADERS = 100  # as http.client: a collector sending more is not answering a POST


class HttpError(Exception):
    """A response that is not HTTP/1.x or is longer than allowed."""


def post_request(host: str, port: int, tls: bool, path: str, headers: dict[str, str], body: bytes) -> bytes:
    """The request's bytes. The Host header names the port unless it is the scheme's default."""
    shown = f"[{host}]" if ":" in host else host
    if port != (443 if tls else 80):
        shown += f":{port}"
    fields = {"Host": shown, "Accept-Encoding": "identity", **headers, "Content-Length": str(len(body))}
    head = f"POST {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in fields.items()) + "\r\n"
    return head.encode("latin-1") + body


class _State(enum.Enum):
    HEAD = enum.auto()
    BODY = enum.auto()  # Content-Length bytes left
    CHUNK_SIZE = enum.auto()
    CHUNK_DATA = enum.auto()
    CHUNK_END = enum.auto()  # the CRLF after a chunk's data
    TRAILER = enum.auto()
    UNTIL_CLOSE = enum.auto()  # no length given: the body ends with the connection
    DONE = enum.auto()


class ResponseReader:
    """Feed it what the connection delivers; `done` once the whole response is in."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.received = 0
        self.status = 0
        self.headers: dict[str, str] = {}  # lower-case names; repeated fields joined by ", "
        self.keep_alive = False  # the connection may carry the next request
        self.extra = False  # bytes came after the response: the connection is not to be reused
        self._version = b""
        self._fields: list[str] = []
        self._state = _State.HEAD
        self._left = 0
        self._buf = bytearray()

    @property
    def done(self) -> bool:
        return self._state is _State.DONE

    def feed(self, data: bytes) -> None:
        self.received += len(data)
        if self.received > self.max_bytes:
            raise HttpError(f"response longer than {self.max_bytes} bytes")
        if self.done:
            self.extra = self.extra or bool(data)
            return
        self._buf += data
        self._parse()

    def eof(self) -> None:
        """The collector closed the connection."""
        if self._state is _State.UNTIL_CLOSE:
            self._state = _State.DONE
        elif not self.done:
            raise HttpError("connection closed before the response was complete")

    def _parse(self) -> None:
        while self._buf and not self.done:
            if self._state in (_State.BODY, _State.CHUNK_DATA, _State.UNTIL_CLOSE):
                taken = len(self._buf) if self._state is _State.UNTIL_CLOSE else min(self._left, len(self._buf))
                del self._buf[:taken]
                self._left -= taken
                if self._left == 0 and self._state is not _State.UNTIL_CLOSE:
                    self._state = _State.DONE if self._state is _State.BODY else _State.CHUNK_END
                continue
            end = self._buf.find(b"\n")
            if end < 0:
                return
            line = bytes(self._buf[:end]).rstrip(b"\r")
            del self._buf[: end + 1]
            self._line(line)
        if self.done and self._buf:
            self.extra = True

    def _line(self, line: bytes) -> None:
        if self._state is _State.HEAD:
            if not self.status:
                self._status_line(line)
            elif line:
                self._header(line)
            else:
                self._head_done()
        elif self._state is _State.CHUNK_SIZE:
            size = line.split(b";", 1)[0].strip()
            try:
                self._left = int(size, 16)
            except ValueError:
                raise HttpError(f"bad chunk size {size[:20]!r}") from None
            if self._left < 0:
                raise HttpError(f"bad chunk size {size[:20]!r}")
            self._state = _State.CHUNK_DATA if self._left else _State.TRAILER
        elif self._state is _State.CHUNK_END:
            if line:
                raise HttpError("chunk longer than its size")
            self._state = _State.CHUNK_SIZE
        elif self._state is _State.TRAILER and not line:
            self._state = _State.DONE

    def _status_line(self, line: bytes) -> None:
        parts = line.split(b" ", 2)
        if (
            len(parts) < 2
            or parts[0] not in (b"HTTP/1.0", b"HTTP/1.1")
            or not (len(parts[1]) == 3 and parts[1].isdigit())
        ):
            raise HttpError(f"not an HTTP/1.x status line: {line[:40]!r}")
        self._version, self.status = parts[0], int(parts[1])

    def _header(self, line: bytes) -> None:
        name, colon, value = line.partition(b":")
        if not colon or not name.strip():
            raise HttpError(f"bad header line {line[:40]!r}")
        key, text = name.strip().lower().decode("latin-1"), value.strip().decode("latin-1")
        if len(self._fields) >= MAX_HEADERS:
            raise HttpError(f"more than {MAX_HEADERS} header fields")
        self._fields.append(key)
        self.headers[key] = f"{self.headers[key]}, {text}" if key in self.headers else text

    def _head_done(self) -> None:
        if 100 <= self.status < 200:  # an interim answer (100 Continue): the real one follows
            self.status, self.headers, self._fields = 0, {}, []
            return
        connection = {t.strip().lower() for t in self.headers.get("connection", "").split(",")}
        self.keep_alive = self._version == b"HTTP/1.1" and "close" not in connection
        length = self.headers.get("content-length")
        if self.status in (204, 304):
            self._state = _State.DONE
        elif "chunked" in self.headers.get("transfer-encoding", "").lower():
            self._state = _State.CHUNK_SIZE
        elif length is not None:
            if not length.isdigit():
                raise HttpError(f"bad Content-Length {length[:20]!r}")
            self._left = int(length)
            self._state = _State.BODY if self._left else _State.DONE
        else:
            self._state = _State.UNTIL_CLOSE
            self.keep_alive = False

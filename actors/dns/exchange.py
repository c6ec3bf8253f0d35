"""What every upstream client shares (transport.py's UDP, TCP, TLS and HTTP/1.1
ones, doh2.py's, doq.py's): the errors an exchange ends with, the check that an
answer is the one to its query, and one more try for a reused connection lost."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

MAX_MESSAGE = 65535
QR_BYTE = 0x80  # in the third octet of a message


class UpstreamError(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ConnectionLost(ConnectionError):
    """The connection ended before our answer came."""


def answer_for(query: bytes, answer: bytes, wire_id: bytes) -> bytes:
    """Check the answer belongs to the query on the wire; give it the query's own ID."""
    if len(answer) < 12 or answer[:2] != wire_id or not answer[2] & QR_BYTE:
        raise UpstreamError("mismatched")
    return query[:2] + answer[2:]


async def exchange_once_more(connect: Callable[[], Coroutine[Any, Any, tuple[Any, bool]]], query: bytes) -> bytes:
    """query on the shared connection `connect` gives (with whether it was open before). A server
    may close an idle connection at any time (RFC 7766 section 6.2.3): a reused one that was lost
    gets one more try on a new connection."""
    connection, reused = await connect()
    try:
        return await connection.exchange(query)
    except ConnectionLost:
        if not reused:
            raise
    connection, _ = await connect()
    return await connection.exchange(query)

# The types of forwarder.c's Forwarder (the C source documents each method).
from collections.abc import Callable, Hashable
from typing import Any

# (reason, upstream, rtt or None, waiters: [(query, source, ctx, owner, fields)])
Returned = list[tuple[str, Any, float | None, list[tuple[Any, ...]]]]
Replies = list[tuple[Any, bytes, Any, Hashable | None]]  # (ctx, reply, source, owner)
Answered = list[tuple[Any, float, Any]]  # (upstream, rtt, wire.WireAnswer)

BURST: int  # queries a socket carries at most
SOCKET_LIFE: float  # seconds a socket takes queries for at most

class Forwarder:
    def __init__(
        self,
        plain_query: Callable[..., Any],
        parse_answer: Callable[..., Any],
        assemble: Callable[..., bytes],
        cut: Callable[..., bytes],
    ) -> None: ...
    def configure(
        self,
        upstream: Any,
        host: str = ...,
        port: int = ...,
        *,
        timeout: float = ...,
        cap: int = ...,
        share: int = ...,
        decline: tuple[bytes, ...] = ...,
        single_label: bool = ...,
        learn: bool = ...,
        view: bytes = ...,
        put: Callable[..., Any] = ...,
        cached: dict[Any, Any] = ...,
        their_flights: dict[Any, Any] = ...,
        their_owned: dict[Any, int] = ...,
    ) -> None: ...
    def take(self, query: bytes, source: Any, ctx: Any, owner: Hashable | None, now: float) -> bool: ...
    def send(self) -> Returned: ...
    def readable(self, now: float) -> tuple[Replies, Answered, Returned]: ...
    def expire(self, now: float) -> Returned: ...
    def owned(self, owner: Hashable) -> int: ...
    def busy(self) -> bool: ...
    def counters(self) -> dict[str, int]: ...
    def rcodes(self) -> dict[int, int]: ...
    def fileno(self) -> int: ...
    def close(self) -> Returned: ...
    def __len__(self) -> int: ...

"""Host names resolved off an actor's loop: netlog's collectors, magicsock's relays.

getaddrinfo blocks for as long as the system's resolver likes (seconds per
server and attempt, or for ever with a hostile or broken one), so it never
runs in the loop: a literal address is answered at once, a name by a daemon
thread whose answer is cached. `lookup` never waits: until the first answer
for a name is in, it returns None and the connection attempt polls again at
the loop's next tick. An expired answer is still used while a fresh one is
looked up, so a slow resolver delays no connection that once resolved.

Threads rather than literal-only addresses: host names are what users write
(TLS checks the certificate against them), and at most one lookup per name
runs at a time, so even a resolver that never answers costs one parked
thread per name, not one per attempt.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from typing import Any

Address = tuple[int, Any]  # (family, sockaddr) as connect() takes it
GetAddrInfo = Callable[..., list[tuple[Any, ...]]]
_Key = tuple[str, int, int]

ANSWER_TTL = 60.0  # getaddrinfo tells no DNS TTL: a name is looked up again after this
FAILURE_TTL = 5.0  # a failed lookup is the answer for this long, so retries do not start a thread each


class Resolver:
    def __init__(
        self,
        getaddrinfo: GetAddrInfo = socket.getaddrinfo,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._getaddrinfo = getaddrinfo
        self._clock = clock
        self._lock = threading.Lock()
        self._answers: dict[_Key, tuple[float, list[Address] | OSError]] = {}  # key -> (expiry, answer)
        self._running: set[_Key] = set()
        self.lookups = 0  # threads started

    def lookup(self, host: str, port: int, socktype: int) -> list[Address] | None:
        """The addresses, or None while the first lookup is running; raises the OSError a lookup ended with."""
        try:  # a literal: AI_NUMERICHOST never asks a resolver
            return _addresses(socket.getaddrinfo(host, port, type=socktype, flags=socket.AI_NUMERICHOST))
        except socket.gaierror:
            pass
        key = (host, port, socktype)
        with self._lock:
            answer = self._answers.get(key)
            if (answer is None or self._clock() >= answer[0]) and key not in self._running:
                self._running.add(key)
                self.lookups += 1
                threading.Thread(target=self._resolve, args=(key,), name=f"resolve {host}", daemon=True).start()
        if answer is None:
            return None
        if isinstance(answer[1], OSError):
            raise answer[1]
        return list(answer[1])

    def _resolve(self, key: _Key) -> None:
        host, port, socktype = key
        result: list[Address] | OSError
        try:
            result = _addresses(self._getaddrinfo(host, port, type=socktype)) or OSError(f"{host}: no address")
        except OSError as e:  # socket.gaierror included
            result = e
        except Exception as e:  # whatever a resolver raises, the key must not stay "running" for ever
            result = OSError(f"{host}: {e!r}")
        ttl = FAILURE_TTL if isinstance(result, OSError) else ANSWER_TTL
        with self._lock:
            self._answers[key] = (self._clock() + ttl, result)
            self._running.discard(key)


def _addresses(infos: list[tuple[Any, ...]]) -> list[Address]:
    return [(int(info[0]), info[4]) for info in infos]

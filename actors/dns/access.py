"""Who the DNS controller answers, and how much: sans-IO.

The listeners hold the mesh address with IP_FREEBIND, and Linux takes a
packet for any local address on any interface, so an underlay neighbour
reaches them as well as a peer does. Only these are answered (`Sources`):
loopback (the node itself), the mesh's ranges (the node's own networks and
every peer's allowed IPs) and the prefixes configured in `[dns] allow`.

A client is accounted by its prefix, /24 for IPv4 and /56 for IPv6, as
BIND's response rate limiting does: the addresses one site holds count as
one. Loopback is the node itself: never rate limited, nor held to a share
of the in-flight forwards or TCP connections.
"""

from __future__ import annotations

import enum
import functools
import ipaddress
from collections.abc import Hashable, Iterable
from typing import NamedTuple

from meshsup.actors.routing.prefixes import IPNetwork, Prefixes

V4_PREFIX, V6_PREFIX = 24, 56
SOURCES_KEPT = 4096  # client addresses whose verdict is remembered
SHARE = 8  # one prefix may hold at most 1/SHARE of the in-flight forwards and of the TCP connections
MAX_ACCOUNTS = 65536  # rate-limited prefixes tracked at once


def share(cap: int) -> int:
    """What one prefix may hold of cap."""
    return max(1, cap // SHARE)


@functools.lru_cache(maxsize=SOURCES_KEPT)
def prefix_of(host: str) -> Hashable | None:
    """The prefix the client at host is accounted under, as text (a key looked up per
    query: a string keeps its hash, an ip_network works it out in Python each time);
    None for loopback (exempt)."""
    address = ipaddress.ip_address(host)
    if address.is_loopback:
        return None
    return str(ipaddress.ip_network((address, V4_PREFIX if address.version == 4 else V6_PREFIX), strict=False))


class Client(NamedTuple):
    allowed: bool
    prefix: Hashable | None  # None: loopback


class Sources:
    """The verdict on a client address: answered or not, and its prefix."""

    def __init__(self, networks: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> None:
        self.networks = Prefixes(networks)
        self._known: dict[str, Client] = {}

    def change(self, gone: Iterable[IPNetwork], added: Iterable[IPNetwork]) -> None:
        """The `gone` networks out (once each) and the `added` in: a change of a few peers' ranges."""
        for network in gone:
            self.networks.remove(network)
        for network in added:
            self.networks.add(network)
        self._known.clear()

    def client(self, host: str) -> Client:
        """The verdict on host (also what calling the Sources gives, at the cost of a slower call)."""
        known = self._known.get(host)
        if known is None:
            if len(self._known) >= SOURCES_KEPT:
                self._known.clear()
            known = self._known[host] = self._judge(host)
        return known

    __call__ = client

    def _judge(self, host: str) -> Client:
        prefix = prefix_of(host)
        if prefix is None:
            return Client(True, None)
        return Client(ipaddress.ip_address(host) in self.networks, prefix)


class Verdict(enum.Enum):
    SEND = "send"
    DROP = "drop"
    SLIP = "slip"  # send a truncated reply instead: a real client retries over TCP


class _Account:
    __slots__ = ("balance", "last", "limited")

    def __init__(self, balance: float, last: float) -> None:
        self.balance = balance
        self.last = last
        self.limited = 0


class RateLimit:
    """Response rate limiting per client prefix, as BIND's RRL: a prefix earns
    `rate` responses a second and may save up one second's worth; each
    response costs one. A prefix in debt is limited: its responses are
    dropped, but every `slip`-th one goes out truncated (0: none does), so a
    real client behind a spoofed flood still gets an answer over TCP. The
    debt runs to at most `window` seconds' worth: a flood keeps its prefix
    limited until it has slowed below the rate for up to that long."""

    def __init__(self, rate: int, window: float, slip: int) -> None:
        self.rate = rate
        self.window = window
        self.slip = slip
        self._accounts: dict[Hashable, _Account] = {}

    def __call__(self, prefix: Hashable, now: float) -> Verdict:
        account = self._accounts.get(prefix)
        if account is None:
            if len(self._accounts) >= MAX_ACCOUNTS:
                self._forget(now)
            account = self._accounts[prefix] = _Account(self.rate, now)
        else:
            account.balance = min(self.rate, account.balance + (now - account.last) * self.rate)
            account.last = now
        account.balance -= 1
        if account.balance >= 0:
            return Verdict.SEND
        account.balance = max(account.balance, -self.rate * self.window)
        account.limited += 1
        if self.slip and account.limited % self.slip == 0:
            return Verdict.SLIP
        return Verdict.DROP

    def _forget(self, now: float) -> None:
        """Room for a new prefix: forget those whose balance is whole again by
        now; all, if that frees too little (a flood from very many prefixes)."""
        whole = self.window + 1.0  # seconds from the deepest debt to a full balance
        stale = [prefix for prefix, account in self._accounts.items() if now - account.last > whole]
        if len(stale) < MAX_ACCOUNTS // 4:
            self._accounts.clear()
            return
        for prefix in stale:
            del self._accounts[prefix]

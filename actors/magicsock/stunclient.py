"""magicsock's own public address, as STUN servers see it: rounds of Binding requests, sans-IO.

A round asks every server at once, one transaction each (wire/stun.py's
BindingClient): sent at 0, 0.1, 0.3, 0.7 and 1.5 s (RFC 8489's doubling RTO
from Tailscale's first retransmit of 100 ms) and given up at 3.1 s, about
netcheck's 3 s STUN timeout. The round ends when every server has answered
or given up. Rounds start 20 to 26 s apart, at random (Tailscale's periodic
re-STUN), so that an answer is under 27 s old when the next one lands: NAT
mappings commonly expire after 30 s of silence, and Tailscale trusts its
endpoints for 27 s (endpointsFreshEnoughDuration). A link change starts a
round at once (`refresh`).

An answer counts only if it carries the transaction ID of a request in the
current round and comes from the address that request went to: someone who
has not seen our request cannot plant a reflexive address. Anything else is
counted and ignored.

What a round found is kept until the next round ends: `reflexive` reports the
last finished round's mapped addresses and the running round's so far, so a
new mapping is known at once and an old one goes when a round without it
ends. `mapping_varies` judges the last finished round alone: two servers of
one family that saw us at different addresses mean the NAT maps per
destination (endpoint-dependent), and a peer cannot reach us at any address
a STUN server saw.

The servers are given as literal addresses; `stun_servers` turns [[relays]]
STUN entries, which may name a host, into those through the resolver.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import Final

from meshsup.actors.kernel.resolve import Address
from meshsup.actors.kernel.types import Buffer, Endpoint
from meshsup.actors.wire import stun

FIRST_RTO: Final = 0.1  # Tailscale's defaultInitialRetransmitTime
TRIES: Final = 5  # sends at 0, .1, .3, .7, 1.5 s; given up at 3.1 s
ROUND_EVERY: Final = (20.0, 26.0)  # Tailscale's periodic re-STUN interval, drawn at random each time
FRESH_FOR: Final = 27.0  # Tailscale's endpointsFreshEnoughDuration

Lookup = Callable[[str, int, int], list[Address] | None]  # kernel.resolve.Resolver.lookup


def canonical(endpoint: Endpoint) -> Endpoint:
    """One spelling per address: compressed IPv6, IPv4 for an IPv4-mapped IPv6 address."""
    addr = ipaddress.ip_address(endpoint[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
        addr = addr.ipv4_mapped
    return str(addr), endpoint[1]


def stun_servers(stuns: Iterable[tuple[str, int]], lookup: Lookup) -> list[Endpoint]:
    """Literal endpoints of STUN servers given as (IP or host name, port): a name gives its first
    address of each family. A name whose lookup is running, or failed, is left out for now: ask again
    at the next tick (set_servers changes nothing when the list is the same). The relay link dialling
    the same name counts its failures."""
    found: dict[Endpoint, None] = {}
    for host, port in stuns:
        try:
            addresses = lookup(host, port, socket.SOCK_DGRAM)
        except OSError:
            continue
        families: set[int] = set()
        for family, sockaddr in addresses or ():
            if family not in families:
                families.add(family)
                found[canonical((sockaddr[0], port))] = None
    return list(found)


class StunProber:
    """Rounds of Binding requests to literal server endpoints; the caller sends what
    datagrams_to_send gives from the node's port and hands every STUN answer to receive."""

    def __init__(self, servers: Sequence[Endpoint], *, rng: Callable[[int], bytes] = os.urandom) -> None:
        self.counters: Counter[str] = Counter()
        self._rng = rng
        self._servers: tuple[Endpoint, ...] = ()
        self._probes: dict[bytes, tuple[Endpoint, stun.BindingClient]] = {}  # the running round's, by TxID
        self._answers: dict[Endpoint, Endpoint] = {}  # server -> mapped address, in the running round
        self._finished: dict[Endpoint, Endpoint] = {}  # ... in the last finished round
        self._next_round: float | None = None
        self._outbox: list[tuple[Endpoint, bytes]] = []
        self.last_answer: float | None = None  # when the latest answer came
        self._set(servers)
        if self._servers:
            self._next_round = 0.0  # at the first timer

    # --- servers and rounds ----------------------------------------------------------
    def set_servers(self, servers: Sequence[Endpoint], now: float) -> None:
        """Other servers start a round at once; the same ones again (in any order) change nothing."""
        if self._set(servers):
            self._finished = {s: m for s, m in self._finished.items() if s in self._servers}
            self.refresh(now)

    def _set(self, servers: Sequence[Endpoint]) -> bool:
        new = tuple(dict.fromkeys(canonical(s) for s in servers))
        changed, self._servers = set(new) != set(self._servers), new
        return changed

    def refresh(self, now: float) -> None:
        """Start a round now (the link changed): the running one is dropped, with what it found so far,
        since that may predate the change; the last finished round's addresses stay until this one ends."""
        self._probes.clear()
        self._answers.clear()
        self._outbox.clear()
        if not self._servers:
            self._finished.clear()
            self._next_round = None
            return
        self.counters["rounds"] += 1
        for server in self._servers:
            client = stun.BindingClient(FIRST_RTO, TRIES, self._rng(stun.TXID_LEN))
            self._probes[client.txid] = (server, client)
        self._send(now)
        low, high = ROUND_EVERY
        self._next_round = now + low + (high - low) * int.from_bytes(self._rng(4), "big") / 2**32

    def _send(self, now: float) -> None:
        for server, client in self._probes.values():
            if (packet := client.due(now)) is not None:
                self.counters["retransmits" if client.sent > 1 else "requests"] += 1
                self._outbox.append((server, packet))

    def _pending(self, now: float) -> list[stun.BindingClient]:
        return [c for _, c in self._probes.values() if c.result is None and not c.failed(now)]

    def _end_round(self, now: float) -> None:
        self.counters["timeouts"] += sum(1 for _, c in self._probes.values() if c.failed(now))
        self._finished, self._answers = self._answers, {}
        self._probes.clear()

    # --- the actor's loop ------------------------------------------------------------
    def get_timer(self) -> float | None:
        """When handle_timer wants calling next (monotonic seconds); None with no servers."""
        if self._next_round is None:
            return None
        waiting = [c.next_send for _, c in self._probes.values() if c.result is None]
        return min([self._next_round, *waiting])

    def handle_timer(self, now: float) -> None:
        """Retransmits and give-ups that are due, and the next round when its time has come."""
        if self._probes:
            self._send(now)
            if not self._pending(now):
                self._end_round(now)
        if self._next_round is not None and now >= self._next_round:
            self.refresh(now)

    def datagrams_to_send(self) -> list[tuple[Endpoint, bytes]]:
        out, self._outbox = self._outbox, []
        return out

    def receive(self, datagram: Buffer, source: Endpoint, now: float) -> bool:
        """Take an answer to one of our requests; False for anything else (counted, and to be dropped)."""
        try:
            txid, mapped = stun.parse_response(datagram)
        except stun.StunError as err:
            self.counters[f"stun_{err.reason}"] += 1
            return False
        probe = self._probes.get(txid)
        if probe is None:
            self.counters["unknown_txid"] += 1  # someone else's, or a round that ended
            return False
        server, client = probe
        if canonical(source) != server:
            self.counters["wrong_source"] += 1
            return False
        if client.result is not None:
            self.counters["duplicate_answers"] += 1  # a retransmit answered too
            return False
        client.receive(datagram)
        self._answers[server] = mapped
        self.counters["answers"] += 1
        self.last_answer = now
        if not self._pending(now):
            self._end_round(now)
        return True

    # --- what was found --------------------------------------------------------------
    def reflexive(self) -> list[Endpoint]:
        """Our distinct addresses as the servers saw them: the running round's first, then the last
        finished round's."""
        return list(dict.fromkeys([*self._answers.values(), *self._finished.values()]))

    def mapping_varies(self) -> bool | None:
        """Whether two servers of one family saw different addresses in the last finished round: the NAT
        maps per destination. None when no family had two answers."""
        seen: dict[int, list[Endpoint]] = {}
        for server, mapped in self._finished.items():
            seen.setdefault(6 if ":" in server[0] else 4, []).append(mapped)
        judged = [len(set(mapped)) > 1 for mapped in seen.values() if len(mapped) >= 2]
        return any(judged) if judged else None

    def fresh(self, now: float) -> bool:
        """An answer came within FRESH_FOR seconds: our reflexive address is worth telling a peer."""
        return self.last_answer is not None and now - self.last_answer < FRESH_FOR

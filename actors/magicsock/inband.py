"""What magicsock says to peers inside the tunnel, with TSMP (sans-IO).

A peer's disco key is learnt only from its TSMP disco-key advertisement,
which arrives inside its WireGuard session (crypto workers hand magicsock the
TSMP packets a peer sent, checked against its allowed IPs): the binding of
disco key to WireGuard key is exactly as strong as the WireGuard keys, and
needs no configuration (Tailscale's sendTSMPDiscoAdvertisement /
tsmpLearnedDisco). We advertise ours to a peer when a session with it comes
up through a relay (a DERP client is a disco speaker; a plain WireGuard peer
never hears a TSMP packet it would not understand), when it advertised a key
we did not know (so one exchange teaches both sides), and before a user's
disco ping.

TSMP pings (`meshsup ping --type tsmp`) are answered here too.
"""

from __future__ import annotations

import ipaddress
import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from meshsup.actors.kernel.types import Buffer
from meshsup.actors.wire import tsmp

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class TsmpPong:
    request: int
    peer: bytes
    latency: float


@dataclass
class _Pending:
    request: int
    peer: bytes
    sent: float


class InBand:
    """TSMP with the node's peers: advertisements in and out, pings and pongs."""

    def __init__(self, disco_public: bytes, *, rng: Callable[[int], bytes] = os.urandom) -> None:
        self.disco_public = disco_public
        self._rng = rng
        self._ours: list[Address] = []  # the node's own mesh addresses, to send from
        self._theirs: dict[bytes, list[Address]] = {}  # peer -> addresses in its allowed IPs, to send to
        self._pending: dict[bytes, _Pending] = {}  # ping data -> the user's request
        self._out: list[tuple[bytes, bytes]] = []
        self._pongs: list[TsmpPong] = []
        self.learned: list[tuple[bytes, bytes]] = []  # (peer, disco key) advertised to us, drained by the caller
        self.counters: Counter[str] = Counter()

    def configure(self, ours: Sequence[Address], theirs: dict[bytes, list[Address]]) -> None:
        self._ours = list(ours)
        self._theirs = theirs

    def change_peers(self, theirs: dict[bytes, list[Address]], removed: Sequence[bytes]) -> None:
        """Some peers' addresses changed (or are new), some peers gone."""
        for key in removed:
            self._theirs.pop(key, None)
        self._theirs.update(theirs)

    def _addresses(self, peer: bytes) -> tuple[str, str] | None:
        """(our source, the peer's destination) of one IP version, or None when we share none."""
        for dst in self._theirs.get(peer, ()):
            src = next((a for a in self._ours if a.version == dst.version), None)
            if src is not None:
                return str(src), str(dst)
        return None

    def _send(self, peer: bytes, build: Callable[[str, str], bytes]) -> bool:
        pair = self._addresses(peer)
        if pair is None:
            self.counters["tsmp_no_address"] += 1
            return False
        self._out.append((peer, build(*pair)))
        return True

    def advertise(self, peer: bytes) -> None:
        if self._send(peer, lambda src, dst: tsmp.disco_advertisement(src, dst, self.disco_public)):
            self.counters["tsmp_adverts_sent"] += 1

    def ping(self, peer: bytes, request: int, now: float) -> bool:
        """A user's TSMP ping; False if the peer has no address to ping."""
        data = self._rng(tsmp.DATA_LEN)
        if not self._send(peer, lambda src, dst: tsmp.ping(src, dst, data)):
            return False
        self._pending[data] = _Pending(request, peer, now)
        return True

    def expire(self, before: float) -> None:
        """Forget pings sent before `before` (their requests time out with the caller)."""
        for data in [d for d, p in self._pending.items() if p.sent < before]:
            del self._pending[data]

    def receive(self, peer: bytes, packet: Buffer, now: float) -> None:
        """A TSMP packet the peer sent in its session."""
        try:
            msg = tsmp.parse(packet)
        except tsmp.TsmpError as err:
            self.counters[f"tsmp_{err.reason}"] += 1
            return
        if isinstance(msg, tsmp.DiscoAdvertisement):
            self.counters["tsmp_adverts_received"] += 1
            self.learned.append((peer, msg.key))
        elif isinstance(msg, tsmp.Ping):
            self.counters["tsmp_pings_received"] += 1
            self._out.append((peer, tsmp.pong(msg)))
        else:
            pending = self._pending.get(msg.data)
            if pending is None or pending.peer != peer:
                self.counters["tsmp_unknown_pong"] += 1
                return
            del self._pending[msg.data]
            self._pongs.append(TsmpPong(pending.request, peer, now - pending.sent))

    def packets_to_send(self) -> list[tuple[bytes, bytes]]:
        """(peer, TSMP packet) to seal to each peer; drained."""
        out, self._out = self._out, []
        return out

    def pongs(self) -> list[TsmpPong]:
        out, self._pongs = self._pongs, []
        return out

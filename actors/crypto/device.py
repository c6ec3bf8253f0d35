"""A sans-IO WireGuard device: batches of packets and datagrams in, actions out.

Behaviour follows wireguard-go's device package (send.go, receive.go,
timers.go, peer.go). Two clocks, both injected: ``now``, passed to every
call, is monotonic seconds (``time.monotonic()``) and drives every protocol
timer (session age, rekeying, retransmission, rate limits, dropping keys), so
a step of the wall clock neither keeps keys past Reject-After-Time nor
refuses a peer's initiations. ``wall`` (unix seconds) is read only for the
TAI64N timestamp of an initiation, which must keep growing across restarts
(and keeps growing here when the wall clock steps back), and for the
last-handshake time that status shows.

Sharding: the device can be one of N workers sharing a private key. Every
local index it allocates satisfies ``index % workers == worker``, so a front
end routes types 2, 3 and 4 by ``receiver_index % workers``. An initiation may
reach any worker: given ``owner_of``, the device checks it as a responder
(mac1, and the cookie when under load, before any Diffie-Hellman), then hands
it to the worker owning its initiator in ``Output.forwards``.

Lazy peers: a configured peer is a record (``configs``, its allowed IPs in the
routing table) until it has traffic, a handshake or a path (``peer`` makes its
state then), so thousands of idle peers cost no keys, timers or sockets; one
left with nothing to do (no keys, handshake, packets or timers: 9 minutes after
its last session) goes back to its record every ``TRIM_EVERY``, keeping its
figures and its initiations' replay protection (``trimmed``), as Tailscale's
engine keeps idle peers out of wireguard-go.

Relays: with ``relaying`` on (the node has [[relays]]), a peer needs no endpoint.
As Tailscale's magicsock, its datagrams go to its endpoint alone while an
authenticated datagram came from there within ``trust_direct`` (6.5 s); else
through the relay, as a Burst to the peer's relayed endpoint (kernel.types), and
to the endpoint as well while it worked within ``mirror_direct``, or once per
``probe_direct``: a peer that hears us there answers there, and the path is
trusted again. A datagram through the relay never moves the peer's endpoint.

Disco peers (actors.crypto.discopath): from magicsock's first ``set_path``
for a peer, its endpoint moves only by ``set_path``, never by roaming, and
its datagrams (handshakes too) go to that endpoint alone while magicsock
trusts it and it is not demoted, else to the relay; nothing is mirrored or
probed (disco probes). A direct path we keep sending on that stays silent for
``Timing.data_timeout`` is demoted to the relay. ``path_report`` gives
magicsock the news at most once a second: peers with traffic, completed
handshakes, demotions. Peers that speak no disco (wireguard-go) keep
roaming and the choice above.

Filter (actors.filter): with ``filter`` set, decrypted packets that passed the
allowed-IPs check are judged before the TUN (replies to rejects are sealed
to their senders), and what ``send`` is given opens or renews its flow (and
is judged with outbound filtering) before it is routed.

TSMP: decrypted packets of IP protocol 99 that passed the allowed-IPs check
go to ``Output.tsmp`` by sender (``tsmp_received``), not to the TUN;
``send_to`` seals packets to a named peer (``tsmp_sent``; ``no_peer`` for a
key that is no peer of ours).

Capture: while ``keylog`` is a list (a capture with a key log runs,
actors.crypto.capture), every handshake message we make adds the peer's key,
our ephemeral private key and the preshared key to it; ``rekey`` starts a
handshake at once, so that a capture sees one whole.
"""

from __future__ import annotations

import math
import os
import random
import struct
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import NamedTuple

from cryptography.exceptions import InvalidTag

from meshsup.actors.bus.messages import PathReport
from meshsup.actors.filter.packetfilter import Filter
from meshsup.actors.kernel.types import RELAYED, Burst, Endpoint
from meshsup.actors.routing.allowedips import AllowedIPs
from meshsup.actors.wire.ip import (
    IPV4_DST,
    IPV4_HEADER_MIN,
    IPV4_PROTOCOL,
    IPV4_SRC,
    IPV4_TOTAL_LENGTH,
    IPV6_DST,
    IPV6_HEADER,
    IPV6_NEXT_HEADER,
    IPV6_PAYLOAD_LENGTH,
    IPV6_SRC,
)
from meshsup.actors.wire.tsmp import IPPROTO_TSMP

from . import handshake as hs_
from .cookie import CookieChecker, SourceRateLimiter, endpoint_bytes
from .discopath import DiscoPath, PathNews
from .keypair import Keypair
from .messages import (
    INITIATION_SIZE,
    MESSAGE_COOKIE_REPLY,
    MESSAGE_INITIATION,
    MESSAGE_RESPONSE,
    MESSAGE_TRANSPORT,
    RESPONSE_SIZE,
    TRANSPORT_HEADER,
    TRANSPORT_MIN_SIZE,
    message_type,
    parse_cookie_reply,
    parse_response,
)
from .noise import StaticKey, hmac_
from .peer import DIRECT, RELAY, Peer, PeerConfig, Trimmed
from .tai64n import TAI64N_SIZE, successor, tai64n
from .timers import NEW_HANDSHAKE, PERSISTENT_KEEPALIVE, RETRANSMIT_HANDSHAKE, SEND_KEEPALIVE, ZERO_KEY_MATERIAL, Timing

HANDSHAKE_COMPLETED = "handshake_completed"
ENDPOINT_CHANGED = "endpoint_changed"

DEFAULT_MTU = 1420
TRIM_EVERY = 10.0  # seconds between looks for idle peers to trim
_SENDER = struct.Struct("<4xI")  # sender index of an initiation or response
_RECEIVER = struct.Struct("<8xI")  # receiver index of a response
_NONCE = struct.Struct("<4xQ")
_U16 = struct.Struct(">H")
_ZEROS = bytes(16)


def _padding_near_mtu(n: int, mtu: int) -> int:
    """wireguard-go's calculatePaddingSize when rounding up to 16 would pass the MTU."""
    unit = n % mtu if n > mtu else n
    return min(-(-unit // 16) * 16, mtu) - unit


class Event(NamedTuple):
    kind: str  # HANDSHAKE_COMPLETED or ENDPOINT_CHANGED
    public_key: bytes
    endpoint: Endpoint | None = None


class Forward(NamedTuple):
    """A received datagram for another worker, with the endpoint it came from."""

    worker: int
    endpoint: Endpoint
    data: bytes


@dataclass
class Output:
    datagrams: list[Burst] = field(default_factory=list)  # to the network
    packets: list[bytes] = field(default_factory=list)  # decrypted IP packets for the TUN
    events: list[Event] = field(default_factory=list)
    forwards: list[Forward] = field(default_factory=list)  # initiations from peers another worker owns
    # Received datagrams of another worker's session (by receiver index), to hand on.
    foreign: list[Forward] = field(default_factory=list)
    tsmp: dict[bytes, list[bytes]] = field(default_factory=dict)  # sender's key -> its TSMP packets, for magicsock


class Device:
    def __init__(
        self,
        private_key: bytes,
        *,
        worker: int = 0,
        workers: int = 1,
        timing: Timing = Timing(),
        under_load_threshold: int = 256,
        rng: Callable[[int], bytes] = os.urandom,
        mtu: int = DEFAULT_MTU,
        owner_of: Callable[[bytes], int] | None = None,
        wall: Callable[[], float] = time.time,
    ) -> None:
        if not 0 <= worker < workers:
            raise ValueError(f"worker {worker} is not in range(0, {workers})")
        self.static = StaticKey(private_key)
        self.public_key = self.static.public
        self.worker, self.workers = worker, workers
        self._owner_of = owner_of  # worker owning a peer key; None: this device owns every peer it knows
        self.timing = timing
        self.mtu = mtu
        self.configs: dict[bytes, PeerConfig] = {}  # every configured peer
        self.peers: dict[bytes, Peer] = {}  # those with state: traffic, a handshake or a path since configured
        self.fresh: list[bytes] = []  # peers given or relieved of state since the caller last took them
        self.trimmed: dict[bytes, Trimmed] = {}  # peers whose state went back to a record: what stays of it
        self._next_trim = -math.inf
        self.allowed_ips = AllowedIPs()  # values are public keys
        self.counters: Counter[str] = Counter()  # drops and refusals, by reason
        self.handshakes = 0  # completed handshakes (key rotations), for status
        self.initiations = 0  # peers' initiations answered, for status
        self.relaying = False  # a relay may carry what a peer's endpoint does not
        # Set by a capture with a key log only (actors.crypto.capture): each handshake we take part in
        # adds (peer key, our ephemeral private key, preshared key) for tshark to decrypt the session.
        self.keylog: list[tuple[bytes, bytes, bytes]] | None = None
        self.filter: Filter | None = None  # the packet filter ([filter]); None: everything passes
        self._news = PathNews()
        self._rng = rng
        self._wall = wall
        self._last_timestamp = bytes(TAI64N_SIZE)  # TAI64N of our last initiation
        self._indices: dict[int, tuple[Peer, Keypair | None]] = {}  # local index -> owner
        # Workers sharing the private key derive the same cookie secrets: a cookie from one passes at another.
        self._checker = CookieChecker(
            self.public_key, rng, timing.cookie_refresh_time, seed=hmac_(private_key, b"cookie secret")
        )
        self._limiter = SourceRateLimiter()
        # Arrival times of the last threshold+1 handshake messages: under load when all are < 1 s old.
        self._handshake_arrivals: deque[float] = deque(maxlen=under_load_threshold + 1)

    # --- configuration

    def set_peer(self, config: PeerConfig) -> None:
        """Add a peer or update it; a new preshared key flushes its session. A peer is a config
        record alone until it has traffic (``peer``); one with persistent keepalive has at once."""
        key = config.public_key
        self.configs[key] = config
        self.allowed_ips.remove_peer(key)
        for network in config.allowed_ips:
            self.allowed_ips.insert(network, key)
        peer = self.peers.get(key)
        if peer is None:
            trimmed = self.trimmed.get(key)
            if trimmed is not None and config.endpoint is not None:
                self.trimmed[key] = replace(trimmed, endpoint=config.endpoint)
            if config.persistent_keepalive:
                self.peer(key)
            return
        if (config.preshared_key or hs_.NO_PRESHARED_KEY) != peer.handshake.preshared_key:
            self._drop_keys(peer)
            peer.handshake.preshared_key = config.preshared_key or hs_.NO_PRESHARED_KEY
        if config.endpoint is not None and peer.disco is None:  # a disco peer's endpoint is magicsock's
            peer.endpoint = config.endpoint
        self._keepalive(peer, config.persistent_keepalive or 0)

    def peer(self, public_key: bytes) -> Peer | None:
        """The peer's state, made on its first use (traffic, a handshake, a path): a configured
        peer costs a record until then, as Tailscale's engine keeps idle peers out of
        wireguard-go. None for a key that is no peer of ours."""
        peer = self.peers.get(public_key)
        if peer is None:
            config = self.configs.get(public_key)
            if config is None:
                return None
            peer = self.peers[public_key] = Peer(config, self.static, self.timing, self._jitter)
            self.fresh.append(public_key)
            trimmed = self.trimmed.pop(public_key, None)
            if trimmed is not None:
                trimmed.restore(peer)
            self._keepalive(peer, config.persistent_keepalive or 0)
        return peer

    @staticmethod
    def _keepalive(peer: Peer, interval: int) -> None:
        if interval > 0 and peer.timers.persistent_keepalive_interval == 0:
            # As wireguard-go: turning persistent keepalive on sends one at once (next tick).
            peer.timers.deadlines[PERSISTENT_KEEPALIVE] = float("-inf")
        peer.timers.persistent_keepalive_interval = interval

    def remove_peer(self, public_key: bytes) -> None:
        self.configs.pop(public_key, None)
        self.trimmed.pop(public_key, None)
        self.allowed_ips.remove_peer(public_key)
        peer = self.peers.pop(public_key, None)
        if peer is not None:
            self._drop_keys(peer)
            peer.timers.stop()

    def set_path(self, public_key: bytes, endpoint: Endpoint | None, trusted_for: float, now: float) -> Output:
        """magicsock's direct path for a peer (None: the relay), trusted for `trusted_for` seconds from
        `now`; the peer is a disco peer from now on. ENDPOINT_CHANGED when its endpoint moves."""
        out = Output()
        peer = self.peer(public_key)
        if peer is None:
            self.counters["no_peer"] += 1
            return out
        if peer.disco is None:
            peer.disco = DiscoPath()
        peer.disco.set(peer.endpoint, endpoint, trusted_for, now)
        if endpoint != peer.endpoint:
            peer.endpoint = endpoint
            out.events.append(Event(ENDPOINT_CHANGED, public_key, endpoint))
        return out

    def path_report(self, now: float) -> PathReport | None:
        """What magicsock learns of this worker's peers: at most once a second, only when there is news."""
        return self._news.report(now)

    def status(self, now: float) -> list[dict[str, object]]:
        """Per-peer status for `meshsup status` and `wg show`, of the peers with state: the others
        have no figures yet but their config's (the supervisor's too)."""
        result = []
        for key, peer in self.peers.items():
            entry = peer.status(now, self.relaying)
            entry["allowed_ips"] = [str(n) for n in self.allowed_ips.networks(key)]
            result.append(entry)
        for key, trimmed in self.trimmed.items():
            result.append({**trimmed.status(key), "allowed_ips": [str(n) for n in self.allowed_ips.networks(key)]})
        return result

    def next_deadline(self) -> float | None:
        """When ``tick`` next has work to do (None: no timer pending)."""
        deadlines = [d for peer in self.peers.values() if (d := peer.timers.next_deadline()) is not None]
        return min(deadlines) if deadlines else None

    # --- data path: TUN -> network

    def send(self, packets: Iterable[bytes], now: float) -> Output:
        """Encrypt IP packets to the peers their destinations route to (through the filter first:
        each opens or renews its flow; a reject's reply goes back to the TUN)."""
        out = Output()
        if self.filter is not None:
            packets, out.packets = self.filter.outbound(list(packets), now)
        self._route(packets, now, out)
        return out

    def _route(self, packets: Iterable[bytes], now: float, out: Output) -> None:
        counters = self.counters
        lookup = self.allowed_ips.lookup
        peers = self.peers
        by_peer: dict[Peer, list[bytes]] = {}
        last_dst: bytes | None = None
        queue: list[bytes] | None = None
        for packet in packets:
            n = len(packet)
            version = packet[0] >> 4 if n else 0
            if version == 4 and n >= IPV4_HEADER_MIN:
                dst = packet[IPV4_DST]
            elif version == 6 and n >= IPV6_HEADER:
                dst = packet[IPV6_DST]
            else:
                counters["bad_packet"] += 1
                continue
            if dst != last_dst:  # bulk traffic repeats destinations: route once per run
                last_dst = dst
                key = lookup(dst)
                peer = None if key is None else peers.get(key) or self.peer(key)
                queue = None if peer is None else by_peer.setdefault(peer, [])
            if queue is None:
                counters["no_route"] += 1
                continue
            queue.append(packet)
        for peer, queued in by_peer.items():
            self._send_peer(peer, queued, now, out)

    def send_to(self, public_key: bytes, packets: list[bytes], now: float) -> Output:
        """Encrypt packets to a named peer, with no route lookup (magicsock's TSMP packets)."""
        out = Output()
        peer = self.peer(public_key)
        if peer is None:
            self.counters["no_peer"] += len(packets)
            return out
        self.counters["tsmp_sent"] += len(packets)
        self._send_peer(peer, packets, now, out)
        return out

    def _send_peer(self, peer: Peer, packets: list[bytes], now: float, out: Output) -> None:
        """A peer's packets, sealed now or staged while it handshakes."""
        kp = peer.sendable_keypair(now)
        if kp is not None and not peer.staged and (peer.endpoint is not None or self.relaying):
            self._transmit(peer, kp, packets, now, out)
            return
        for packet in packets:
            if not peer.stage(packet):
                self.counters["staged_overflow"] += 1
        self._send_staged(peer, now, out)

    def _transmit(self, peer: Peer, kp: Keypair, packets: list[bytes], now: float, out: Output) -> None:
        """Seal ``packets`` in order with ``kp`` (counter nonces) and send them to the peer."""
        room = self.timing.reject_after_messages - kp.send_counter
        if len(packets) > room:  # the keypair runs out of nonces: the rest waits for a new session
            for packet in packets[room:]:
                peer.stage(packet)
            packets = packets[:room]
        mtu = self.mtu
        encrypt = kp.send.encrypt
        header = TRANSPORT_HEADER.pack
        nonce = _NONCE.pack
        remote = kp.remote_index
        sealed: list[bytes] = []
        append = sealed.append
        counter = kp.send_counter
        nbytes = 0
        for packet in packets:
            n = len(packet)
            # Pad to a multiple of 16 to blur lengths, but never beyond the MTU.
            pad = -n & 15
            if n + pad > mtu:
                pad = mtu - n if n <= mtu else _padding_near_mtu(n, mtu)
            datagram = header(MESSAGE_TRANSPORT, remote, counter) + encrypt(
                nonce(counter), packet + _ZEROS[:pad] if pad else packet, None
            )
            counter += 1
            nbytes += len(datagram)
            append(datagram)
        kp.send_counter = counter
        data = any(packets)
        if sealed:
            self._to_peer(peer, sealed, data, now, out)
        self._after_data_sent(peer, nbytes, data, now, out)

    def _to_peer(self, peer: Peer, datagrams: list[bytes], answer_expected: bool, now: float, out: Output) -> None:
        """A peer's datagrams, in order, by its endpoint, the relay or both (see the module's docstring).
        The caller checked there is a way: an endpoint, or relaying. `answer_expected`: the peer
        answers them (data, handshake messages), as it does not a keepalive."""
        endpoint = peer.endpoint
        if peer.disco is not None:
            if self._disco_direct(peer, peer.disco, answer_expected, now) or not self.relaying:
                assert endpoint is not None
                out.datagrams.append(Burst(endpoint, datagrams))
                peer.path = DIRECT
            else:
                out.datagrams.append(Burst(peer.relay_endpoint, datagrams))
                peer.path = RELAY
            return
        since = now - peer.direct_seen
        if not self.relaying or (endpoint is not None and since < self.timing.trust_direct):
            assert endpoint is not None
            out.datagrams.append(Burst(endpoint, datagrams))
            peer.path = DIRECT
            return
        peer.path = RELAY
        if endpoint is not None and (since < self.timing.mirror_direct or now >= peer.next_probe):
            peer.next_probe = now + self.timing.probe_direct
            out.datagrams.append(Burst(endpoint, datagrams))
        out.datagrams.append(Burst(peer.relay_endpoint, datagrams))

    def _disco_direct(self, peer: Peer, disco: DiscoPath, answer_expected: bool, now: float) -> bool:
        """Whether a disco peer's datagrams go to its endpoint now: trusted by magicsock, not
        demoted, and not silent for data_timeout while we kept sending there (then demoted)."""
        endpoint = peer.endpoint
        if not disco.usable(endpoint, now):
            disco.settle()
            return False
        assert endpoint is not None
        timeout = self.timing.data_timeout
        if not disco.sent(answer_expected, now, timeout):
            return True
        reason = f"no WireGuard data from it for {timeout:g} s while sending"
        disco.demote(endpoint, reason, now, self.timing.demoted_for)
        disco.settle()
        self._news.demoted.append([peer.public_key, endpoint[0], endpoint[1], reason])
        return False

    def _send_staged(self, peer: Peer, now: float, out: Output) -> None:
        if not peer.staged:
            return
        kp = peer.sendable_keypair(now)
        if kp is None:
            self._initiate(peer, now, out, is_retry=False)
        elif peer.endpoint is None and not self.relaying:
            self.counters["no_endpoint"] += 1
        else:
            packets = list(peer.staged)
            peer.staged.clear()
            self._transmit(peer, kp, packets, now, out)

    def _after_data_sent(self, peer: Peer, nbytes: int, data: bool, now: float, out: Output) -> None:
        peer.tx_bytes += nbytes
        timers = peer.timers
        timers.any_authenticated_packet_traversal(now)
        timers.any_authenticated_packet_sent()
        if data:
            timers.data_sent(now)
            self._news.active.add(peer.public_key)
        # Keep the key fresh: the initiator rekeys after REKEY_AFTER_TIME, anyone after too many messages.
        kp = peer.keypairs.current
        if kp is not None and (
            kp.send_counter > self.timing.rekey_after_messages
            or (kp.is_initiator and now - kp.created > self.timing.rekey_after_time)
        ):
            self._initiate(peer, now, out, is_retry=False)

    def _send_keepalive(self, peer: Peer, now: float, out: Output) -> None:
        if not peer.staged:
            peer.stage(b"")
        self._send_staged(peer, now, out)

    # --- network -> TUN

    def receive(self, bursts: Iterable[Burst], now: float) -> Output:
        """Handle datagrams from the network: handshakes, cookie replies and transport data."""
        out = Output()
        counters = self.counters
        indices = self._indices
        lookup = self.allowed_ips.lookup
        unpack_header = TRANSPORT_HEADER.unpack_from
        nonce = _NONCE.pack
        unpack_u16 = _U16.unpack_from
        reject_after_time = self.timing.reject_after_time
        reject_after_messages = self.timing.reject_after_messages
        packets = out.packets
        authenticated: dict[Peer, bool] = {}  # peer -> data (not just keepalives) arrived
        last_src: bytes | None = None
        last_peer: Peer | None = None
        allowed = False
        # Bulk traffic comes in runs of one session: what depends only on the
        # session is looked up once per run (``session`` is the run's receiver index).
        session = -1
        for endpoint, datagrams in bursts:
            for data in datagrams:
                if len(data) < TRANSPORT_MIN_SIZE or data[0] != MESSAGE_TRANSPORT:
                    self._receive_control(data, endpoint, now, out)
                    session = -1  # a handshake may have changed the sessions
                    continue
                mtype, receiver, counter = unpack_header(data)
                if mtype != MESSAGE_TRANSPORT:  # non-zero reserved bytes
                    counters["unknown_type"] += 1
                    continue
                if receiver != session:
                    entry = indices.get(receiver)
                    if entry is None or entry[1] is None:
                        if not self._foreign(receiver, endpoint, data, out):
                            counters["no_session"] += 1
                        continue
                    peer, kp = entry
                    if now - kp.created >= reject_after_time:
                        counters["expired_session"] += 1
                        continue
                    session, decrypt, validate = receiver, kp.receive.decrypt, kp.replay.validate
                    at_endpoint = None  # the datagram endpoint known to be the peer's
                try:
                    plain = decrypt(nonce(counter), memoryview(data)[16:], None)
                except InvalidTag:
                    counters["decrypt_failed"] += 1
                    continue
                if not validate(counter, reject_after_messages):
                    counters["replay"] += 1
                    continue
                if endpoint is not at_endpoint:
                    self._heard(peer, endpoint, now, out)
                    at_endpoint = endpoint
                if kp is peer.keypairs.next:
                    self._confirm(peer, kp, now, out)
                n = len(plain)
                peer.rx_bytes += n + TRANSPORT_MIN_SIZE
                if not n:  # keepalive
                    authenticated.setdefault(peer, False)
                    continue
                authenticated[peer] = True
                version = plain[0] >> 4
                # Trim the padding by the IP header's length and check the inner source (cryptokey routing).
                if version == 4 and n >= IPV4_HEADER_MIN:
                    length = unpack_u16(plain, IPV4_TOTAL_LENGTH)[0]
                    if length > n or length < IPV4_HEADER_MIN:
                        counters["bad_packet"] += 1
                        continue
                    src = plain[IPV4_SRC]
                    protocol = plain[IPV4_PROTOCOL]
                elif version == 6 and n >= IPV6_HEADER:
                    length = unpack_u16(plain, IPV6_PAYLOAD_LENGTH)[0] + IPV6_HEADER
                    if length > n:
                        counters["bad_packet"] += 1
                        continue
                    src = plain[IPV6_SRC]
                    protocol = plain[IPV6_NEXT_HEADER]  # TSMP follows the fixed header: no extensions walked
                else:
                    counters["bad_packet"] += 1
                    continue
                if src != last_src or peer is not last_peer:  # bulk flows repeat sources: route once per run
                    last_src, last_peer = src, peer
                    allowed = lookup(src) == peer.public_key
                if not allowed:
                    counters["allowed_ips"] += 1
                    continue
                if protocol == IPPROTO_TSMP:  # for magicsock, never the TUN
                    counters["tsmp_received"] += 1
                    out.tsmp.setdefault(peer.public_key, []).append(plain[:length])
                    continue
                packets.append(plain if length == n else plain[:length])
        if self.filter is not None and packets:
            out.packets, replies = self.filter.inbound(packets, now)
            if replies:  # to the senders, sealed as any packet to them
                self._route(replies, now, out)
        for peer, data_received in authenticated.items():
            self._after_data_received(peer, data_received, now, out)
        return out

    def _after_data_received(self, peer: Peer, data_received: bool, now: float, out: Output) -> None:
        timers = peer.timers
        kp = peer.keypairs.current
        # The initiator rehandshakes shortly before REJECT_AFTER_TIME if the peer is still talking.
        if (
            not timers.sent_last_minute_handshake
            and kp is not None
            and kp.is_initiator
            and now - kp.created
            > self.timing.reject_after_time - self.timing.keepalive_timeout - self.timing.rekey_timeout
        ):
            timers.sent_last_minute_handshake = True
            self._initiate(peer, now, out, is_retry=False)
        timers.any_authenticated_packet_traversal(now)
        timers.any_authenticated_packet_received()
        if data_received:
            timers.data_received(now)
            self._news.active.add(peer.public_key)

    def _confirm(self, peer: Peer, kp: Keypair, now: float, out: Output) -> None:
        """The peer used our responder keypair: it is confirmed and becomes current."""
        self._free_keypairs(peer.keypairs.confirm(kp) or [])
        self._handshake_complete(peer, now, out)
        self._send_staged(peer, now, out)

    def _heard(self, peer: Peer, endpoint: Endpoint, now: float, out: Output) -> None:
        """An authenticated datagram came from `endpoint`. Roaming: the peer is wherever its last one
        came from, and that path is trusted anew; unless it came through a relay. A disco peer does not
        roam: one from its endpoint shows the path carries WireGuard."""
        if endpoint[0].startswith(RELAYED):
            return
        endpoint = tuple(endpoint)  # callers decoding msgpack may hand over lists
        if peer.disco is not None:
            if endpoint == peer.endpoint:
                peer.disco.settle()
            return
        peer.direct_seen = now
        if endpoint != peer.endpoint:
            peer.endpoint = endpoint
            out.events.append(Event(ENDPOINT_CHANGED, peer.public_key, endpoint))

    # --- handshake messages

    def _receive_control(self, data: bytes, endpoint: Endpoint, now: float, out: Output) -> None:
        counters = self.counters
        mtype = message_type(data)
        if mtype is None or (mtype == MESSAGE_TRANSPORT and len(data) < TRANSPORT_MIN_SIZE):
            counters["bad_length"] += 1
            return
        if mtype == MESSAGE_COOKIE_REPLY:
            self._receive_cookie_reply(data, endpoint, out, now)
            return
        if mtype not in (MESSAGE_INITIATION, MESSAGE_RESPONSE):
            counters["unknown_type"] += 1
            return
        if len(data) != (INITIATION_SIZE if mtype == MESSAGE_INITIATION else RESPONSE_SIZE):
            counters["bad_length"] += 1
            return
        if mtype == MESSAGE_RESPONSE and self._foreign(_RECEIVER.unpack_from(data)[0], endpoint, data, out):
            return
        self._handshake_arrivals.append(now)
        if not self._checker.check_mac1(data):
            counters["bad_mac1"] += 1
            return
        if self._under_load(now):
            source = endpoint_bytes(endpoint)
            if not self._checker.check_mac2(data, source, now):
                sender = _SENDER.unpack_from(data)[0]
                out.datagrams.append(Burst(endpoint, [self._checker.create_reply(data, sender, source, now)]))
                counters["cookie_sent"] += 1
                return
            if not self._limiter.allow(endpoint[0], now):
                counters["rate_limited"] += 1
                return
        if mtype == MESSAGE_INITIATION:
            self._receive_initiation(data, endpoint, now, out)
        else:
            self._receive_response(data, endpoint, now, out)

    def _under_load(self, now: float) -> bool:
        arrivals = self._handshake_arrivals
        return len(arrivals) == arrivals.maxlen and now - arrivals[0] < 1.0

    def _receive_cookie_reply(self, data: bytes, endpoint: Endpoint, out: Output, now: float) -> None:
        reply = parse_cookie_reply(data)
        if reply is None:
            self.counters["bad_length"] += 1
            return
        if self._foreign(reply.receiver, endpoint, data, out):
            return
        entry = self._indices.get(reply.receiver)
        if entry is None:
            self.counters["no_session"] += 1
        elif not entry[0].cookies.consume_reply(reply, now):
            self.counters["bad_cookie_reply"] += 1
        else:
            self.counters["cookie_received"] += 1

    def _receive_initiation(self, data: bytes, endpoint: Endpoint, now: float, out: Output) -> None:
        opened = hs_.open_initiation(self.static, data)
        if opened is None:
            self.counters["bad_initiation"] += 1
            return
        owner = self.worker if self._owner_of is None else self._owner_of(opened.initiator_static)
        if owner != self.worker:
            # The owner checks it again, with the same cookie secret.
            out.forwards.append(Forward(owner, endpoint, data))
            return
        peer = self.peer(opened.initiator_static)
        if peer is None:
            self.counters["unknown_peer"] += 1
            return
        hs = peer.handshake
        error = hs_.consume_initiation(opened, hs, now, self.timing.handshake_initiation_rate)
        if error is not None:
            self.counters[error] += 1
            return
        peer.timers.any_authenticated_packet_traversal(now)
        peer.timers.any_authenticated_packet_received()
        self._heard(peer, endpoint, now, out)
        peer.rx_bytes += len(data)

        hs.last_sent_handshake = now
        self._free_index(hs.local_index)
        response = hs_.create_response(hs, self._new_index(peer), self._rng)
        if response is not None:
            self._log_keys(peer)  # before derive_session drops the ephemeral key
        keys = hs_.derive_session(hs) if response is not None else None
        if keys is None:
            self.counters["bad_initiation"] += 1
            return
        self._begin_session(peer, keys, now)
        self.initiations += 1
        peer.timers.session_derived(now)
        peer.timers.any_authenticated_packet_traversal(now)
        peer.timers.any_authenticated_packet_sent()
        self._emit(peer, peer.cookies.add_macs(response, now), now, out)

    def _receive_response(self, data: bytes, endpoint: Endpoint, now: float, out: Output) -> None:
        msg = parse_response(data)
        assert msg is not None  # length and type were checked by the caller
        entry = self._indices.get(msg.receiver)
        if entry is None or entry[1] is not None:
            self.counters["no_session"] += 1
            return
        peer = entry[0]
        hs = peer.handshake
        if hs.local_index != msg.receiver or not hs_.consume_response(self.static, hs, msg):
            self.counters["bad_response"] += 1
            return
        self._heard(peer, endpoint, now, out)
        peer.rx_bytes += len(data)
        peer.timers.any_authenticated_packet_traversal(now)
        peer.timers.any_authenticated_packet_received()
        keys = hs_.derive_session(hs)
        assert keys is not None  # consume_response moved the state to RESPONSE_CONSUMED
        self._begin_session(peer, keys, now)
        peer.timers.session_derived(now)
        self._handshake_complete(peer, now, out)
        # Confirm the new key to the responder right away (with staged data or a keepalive).
        self._send_keepalive(peer, now, out)

    def _initiate(self, peer: Peer, now: float, out: Output, is_retry: bool) -> None:
        if not is_retry:
            peer.timers.handshake_attempts = 0
        hs = peer.handshake
        if now - hs.last_sent_handshake < self.timing.rekey_timeout:
            return
        hs.last_sent_handshake = now
        self._free_index(hs.local_index)
        index = self._new_index(peer)
        message = hs_.create_initiation(self.static, hs, index, self._timestamp(), self._rng)
        if message is None:
            self._free_index(index)
            self.counters["bad_peer_key"] += 1
            return
        self._log_keys(peer)
        peer.timers.any_authenticated_packet_traversal(now)
        peer.timers.any_authenticated_packet_sent()
        self._emit(peer, peer.cookies.add_macs(message, now), now, out)
        peer.timers.handshake_initiated(now)

    def _log_keys(self, peer: Peer) -> None:
        hs = peer.handshake
        if self.keylog is not None and hs.local_ephemeral is not None:
            self.keylog.append((peer.public_key, hs.local_ephemeral.private, hs.preshared_key))

    def rekey(self, public_keys: Iterable[bytes], now: float) -> Output:
        """A new handshake now with each of these peers that has a session (a capture's key log
        holds only the ephemeral keys of handshakes made while it runs)."""
        out = Output()
        for key in public_keys:
            peer = self.peers.get(key)
            if peer is not None and peer.keypairs.current is not None:
                peer.handshake.last_sent_handshake = -math.inf  # a user's request, once: not a retry to space out
                self._initiate(peer, now, out, is_retry=False)
        return out

    def _timestamp(self) -> bytes:
        """TAI64N for a new initiation: the wall clock, but always later than the last one
        (a clock stepped back would have every peer refuse our initiations as replays)."""
        stamp = tai64n(self._wall())
        if stamp <= self._last_timestamp:
            stamp = successor(self._last_timestamp)
        self._last_timestamp = stamp
        return stamp

    def _handshake_complete(self, peer: Peer, now: float, out: Output) -> None:
        peer.timers.handshake_complete()
        peer.last_handshake = self._wall()
        self.handshakes += 1
        self._news.handshakes.add(peer.public_key)
        out.events.append(Event(HANDSHAKE_COMPLETED, peer.public_key))

    def _emit(self, peer: Peer, message: bytes, now: float, out: Output) -> None:
        if peer.endpoint is None and not self.relaying:
            self.counters["no_endpoint"] += 1
            return
        self._to_peer(peer, [message], True, now, out)  # a response answers an initiation, a keepalive a response
        peer.tx_bytes += len(message)

    # --- sessions and indices

    def _begin_session(self, peer: Peer, keys: hs_.SessionKeys, now: float) -> None:
        kp = Keypair(keys, now)
        self._indices[kp.local_index] = (peer, kp)
        self._free_keypairs(peer.keypairs.install(kp))

    def _new_index(self, peer: Peer) -> int:
        while True:
            value = int.from_bytes(self._rng(4), "little")
            index = value - value % self.workers + self.worker
            if index <= 0xFFFFFFFF and index not in self._indices:
                self._indices[index] = (peer, None)
                return index

    def _free_index(self, index: int | None) -> None:
        if index is not None:
            self._indices.pop(index, None)

    def _free_keypairs(self, keypairs: list[Keypair]) -> None:
        for kp in keypairs:
            self._indices.pop(kp.local_index, None)

    def _drop_keys(self, peer: Peer) -> None:
        """Forget the peer's sessions and handshake (wireguard-go zeroes them; here the
        references go, see actors.crypto.keypair) and the packets waiting for a session."""
        self._free_keypairs(peer.keypairs.clear())
        self._free_index(peer.handshake.local_index)
        peer.handshake.clear()
        peer.staged.clear()

    def _jitter(self) -> float:
        # Not key material: a fast generator, as wireguard-go's fastrandn (no syscall per batch).
        return random.random() * self.timing.rekey_timeout_jitter

    # --- timers

    def tick(self, now: float) -> Output:
        """Run expired timers: retransmissions, keepalives, rekeying, dropping old keys."""
        out = Output()
        for peer in list(self.peers.values()):
            timers = peer.timers
            for name in timers.due(now):
                if name == RETRANSMIT_HANDSHAKE:
                    if timers.handshake_attempts > self.timing.max_timer_handshakes:
                        timers.handshake_gave_up(now)
                        self.counters["handshake_timeout"] += len(peer.staged)
                        peer.staged.clear()
                    else:
                        timers.handshake_attempts += 1
                        self._initiate(peer, now, out, is_retry=True)
                elif name == SEND_KEEPALIVE:
                    self._send_keepalive(peer, now, out)
                    timers.after_keepalive_sent(now)
                elif name == NEW_HANDSHAKE:
                    self._initiate(peer, now, out, is_retry=False)
                elif name == ZERO_KEY_MATERIAL:
                    self._drop_keys(peer)
                elif name == PERSISTENT_KEEPALIVE and timers.persistent_keepalive_interval > 0:
                    self._send_keepalive(peer, now, out)
        self._limiter.collect(now)
        if now >= self._next_trim:
            self._next_trim = now + TRIM_EVERY
            self._trim_idle()
        return out

    def _trim_idle(self) -> None:
        """Peers left with nothing to do go back to their record, as Tailscale's engine takes idle
        peers out of wireguard-go: no session, no handshake under way or packets waiting, no timer
        (keys are dropped 9 minutes after the last session), no keepalive, no disco path. What
        status shows of them and the replay protection of their initiations are kept."""
        for key, peer in list(self.peers.items()):
            if peer.idle():
                del self.peers[key]
                self.trimmed[key] = Trimmed.of(peer)
                self.fresh.append(key)  # its socket goes

    # --- sharding

    def _foreign(self, receiver: int, endpoint: Endpoint, data: bytes, out: Output) -> bool:
        """Hand a datagram on if its receiver index was allocated by another worker (that worker's)."""
        owner = receiver % self.workers
        if owner == self.worker:
            return False
        out.foreign.append(Forward(owner, endpoint, data))
        return True

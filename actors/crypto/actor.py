"""The crypto actor: WireGuard handshakes and transport encryption for its shard of peers.

Peers are sharded by public key (actors.routing.shard): this worker owns the
sessions of its peers only. An initiation can reach any worker (magicsock
cannot tell whose it is without a DH); the device checks it (cookies first,
under load) and names the owner, and this worker hands the datagram on.

The worker moves its peers' traffic itself where it can (actors.crypto.direct):
it reads its peers' outgoing packets from its own queue of the TUN (where
tun-io's steering program puts them) and writes what it decrypts there,
and it sends and receives its peers' datagrams on sockets connected to
them. A packet on its queue that another worker owns goes to that worker
over the bus. What goes by those direct paths is counted here for flow
logs, as tun-io and magicsock count what goes through them, with the
filter rule that accepted each connection ([filter]; FlowCounts.rules).

The map: which process touches a packet, in which order, where it is
batched and where it may be dropped, with the counter that says so (as
``meshsup status --json`` names it: crypto-N's unless another actor is
named; ``bus_full`` counts batches, the rest packets or datagrams). "Bus"
is the data path between actors: a unix SOCK_SEQPACKET message per batch of
at most 60 kB (actors.bus.datapath, batch), dropped when the receiver's
socket is full or gone. A receiver drops a malformed or oversized batch, one its
handler raised on, or (a crypto worker) one that arrives before its first
configuration, as ``bus_dropped`` (by reason).

Outgoing, TUN -> network
 1. kernel: queues the packet on one TUN queue, picked by tun-io's eBPF
    program (bpf.steering): the queue of the worker owning the peer the
    destination routes to, queue 0 (crypto-0's) if no prefix holds it. The
    supervisor holds queue k for worker k, so packets wait in it while the
    worker restarts. A full queue is the link's TX drop (ip -s link).
    Without steering the kernel spreads packets over every queue; without
    worker queues all reach tun-io's, which reads it (256 at a time),
    drops what no worker owns (tun-io's no_route) and hands the rest to
    the owners as PacketBatch (tun-io's rx_packets, bus_full).
 2. crypto-N (direct.DirectPaths): reads its queue, 256 at a time
    (tun_read); send_read splits them by owner again: unrouted ones are
    dropped (no_route), other workers' go to them as PacketBatch (bus_full).
 3. Device.send: with [filter], each packet first opens or renews its flow
    in the worker's connection table (actors.filter); with outbound = true
    the first packet of a flow is judged by the rules, and what they refuse
    is dropped (``filter.drops`` by reason), a reject answered into the TUN.
    Then it routes by allowed IPs (bad_packet; no_route, added into
    the same counter) and seals each peer's packets, in order, into one
    Burst. A peer with no usable session stages up to 1024 packets while
    it handshakes (staged_overflow drops the oldest, handshake_timeout the
    staged ones when it gives up; no_endpoint). TSMP packets magicsock
    sends a peer (TsmpBatch) join here, by Device.send_to: not routed,
    sealed to the peer named (tsmp_sent; no_peer for a key not ours).
 4. emit: each Burst goes out on the UDP socket connected to that peer, in
    GSO sends of up to 64 datagrams (udp_tx_gso_sends; udp_tx_dropped). A
    peer with no such socket: a DatagramBatch to magicsock (bus_full), which
    sends it from the shared socket (magicsock's tx_datagrams, tx_dropped).
    A relayed Burst (step 3 chose the relay: no endpoint, or none trusted;
    for a disco peer, none magicsock trusts, or its path demoted; its
    endpoint is the peer's key, kernel.types.relayed) always goes to
    magicsock, which queues it on the relay that reaches the peer as DERP
    SendPacket frames and writes them at the end of its loop's turn, many
    frames a syscall (magicsock's relay_tx_datagrams; relay_unreachable when
    no relay is up, relay_tx_dropped past the connection's send queue).

Incoming, network -> TUN
 1. kernel: hands the datagram to the socket connected to its source (its
    owner's, see direct), else to magicsock's unconnected one on the same
    port. A full socket buffer is the kernel's UdpRcvbufErrors.
 2. crypto-N: recv_batch on its peer socket, 512 at a time, GRO buffers cut
    apart (udp_rx_coalesced; udp_rx_dropped for truncated or failed reads),
    one Burst per run of a sender; receive_direct. What is disco or STUN
    (a peer's magicsock pings from the port our socket is connected to)
    goes to magicsock as UnderlayIn (underlay_in; bus_full).
    magicsock instead: recv_batch likewise; drops what is not WireGuard
    (not_wireguard); types 2-4 go to worker receiver_index % workers, an
    initiation to a worker picked by a hash of its source, as a DatagramBatch
    per worker and endpoint (rx_datagrams; a full bus is counted only in
    magicsock's send_dropped, which ``meshsup status`` does not show).
    Through a relay: magicsock reads the relay's TCP stream (up to 8 reads of
    256 kB a wake-up), and each source key's RecvPacket datagrams go to the
    worker owning that key as one DatagramBatch from its relayed endpoint
    (relay_rx_datagrams; relay_unknown_peer for a key that is no peer).
 3. Device.receive, burst by burst, runs of one session looked up once:
    data is decrypted and checked (unknown_type, no_session,
    expired_session, decrypt_failed, replay; inside: bad_packet, and
    allowed_ips for a source the peer may not use); handshake messages
    (bad_length, bad_mac1, cookie_sent: answered with a cookie under load,
    rate_limited, bad_initiation, unknown_peer, handshake_replay,
    bad_response, bad_cookie_reply). Datagrams of another worker's sessions
    (Output.foreign) and initiations from its peers (Output.forwards) go to
    it as DatagramBatch (forwarded, forwarded_initiations; bus_full).
    TSMP packets (IP protocol 99) that passed the allowed-IPs check go to
    magicsock as TsmpBatch of their sender, never to the TUN
    (tsmp_received; bus_full). With [filter], the burst's other packets
    then pass the filter as one batch: a known flow's packet in one dict
    lookup (a run of one flow in one), a new flow's first by the rules
    (``filter.rules[i].hits``); refused ones are dropped, counted in
    ``filter.drops`` (deny, reject: by a rule; default_deny,
    default_reject; malformed), a reject's RST or ICMP unreachable sealed
    back to the sender (step 3 of the outgoing path, after the filter).
    The table's ``flows``, ``evictions`` (past 65,536 flows) and ``cut``
    (by a rule change) are in crypto-N's ``filter``.
 4. emit: the decrypted packets are written to crypto-N's TUN queue,
    consecutive segments of a TCP flow coalesced into one virtio-net
    super-packet per write (tun_writes, tun_coalesced, tun_dropped). A
    worker with no writable queue sends them to tun-io as PacketBatch
    (bus_full), which writes them (tun-io's tx_packets, tx_dropped).

Capture (actors.crypto.capture; `meshsup capture`, supervisor/capture.py)
 - emit tests CryptoActor.tap once per batch; None (no capture) costs nothing
   more. While a capture runs, the packets of outgoing step 3 (inner, as read
   from the TUN) and incoming step 4 (inner, as decrypted), or the datagrams of
   outgoing step 4 and incoming step 3 (outer), go to the capture's socket as
   CaptureBatch, never waiting: a full socket drops them (the CLI reports the
   count when it stops).

Paths, magicsock <-> crypto-N (actors.crypto.discopath)
 - PathSet: the direct path magicsock chose for a peer by disco, and for
   how long it trusts it (bus_dropped bad_path for no IP address and
   port, no_peer for a key not ours). The peer is a disco peer from then
   on: only PathSet moves its endpoint (and its peer socket); WireGuard
   roaming stays for the others.
 - PathReport, from tick, at most once a second and only with news: peers
   with traffic, completed handshakes, and direct paths demoted because
   WireGuard stayed silent on them for data_timeout while we sent (each
   peer's status shows `path`, `endpoint` and `demoted`).
"""

from __future__ import annotations

import ipaddress
import os
import time
from collections import defaultdict
from functools import partial
from typing import Any

from meshsup.actors.base import Actor, ConfigError
from meshsup.actors.bus import batch
from meshsup.actors.bus.codec import Message
from meshsup.actors.bus.datapath import Outbox
from meshsup.actors.bus.endpoints import Runtime
from meshsup.actors.bus.messages import (
    CaptureBatch,
    CaptureKeys,
    DatagramBatch,
    FlowCountsAck,
    LinkChanged,
    PacketBatch,
    PathSet,
    TsmpBatch,
    UnderlayIn,
)
from meshsup.actors.crypto.capture import CaptureSpec, Tap
from meshsup.actors.crypto.device import ENDPOINT_CHANGED, Device, Forward, Output
from meshsup.actors.crypto.direct import DirectPaths
from meshsup.actors.crypto.peer import PeerConfig
from meshsup.actors.crypto.timers import Timing
from meshsup.actors.filter.packetfilter import Filter
from meshsup.actors.flowcount.feed import FlowFeed
from meshsup.actors.flowcount.tally import INNER, UNDERLAY
from meshsup.actors.kernel.addrs import source_address
from meshsup.actors.kernel.tun import Tun
from meshsup.actors.kernel.types import Burst, Endpoint
from meshsup.actors.routing.shard import WorkerRoutes, by_owner, owner
from meshsup.actors.settings import PeerSettings, Settings
from meshsup.actors.settings.filter import FilterSettings
from meshsup.actors.settings.keys import parse_key

TICK_INTERVAL = 0.05
KEY_LINES_PER_MESSAGE = 256  # about 20 kB: far below what a capture's reader takes in one message
TIMING_ENV = "MESHSUP_TEST_TIMING"  # e.g. "rekey_after_time=4,reject_after_time=8" (tests only)


def test_timing() -> Timing:
    spec = os.environ.get(TIMING_ENV, "")
    if not spec or os.environ.get("MESHSUP_TEST_FAULTS") != "1":
        return Timing()
    default = Timing()
    # Each value takes the type of its default: message counts stay integers (they slice batches).
    return Timing(**{k: type(getattr(default, k))(float(v)) for k, v in (kv.split("=") for kv in spec.split(","))})


def path_endpoint(msg: PathSet) -> Endpoint | None:
    """The endpoint a PathSet names (None: the relay), as the kernel writes source addresses, which
    the device compares it with; ValueError for one that is no IP address and port."""
    if not msg.host:
        return None
    addr = ipaddress.ip_address(msg.host)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
        addr = addr.ipv4_mapped
    if not 0 < msg.port < 65536:
        raise ValueError(f"port {msg.port}")
    return str(addr), msg.port


def peer_config(p: PeerSettings) -> PeerConfig:
    return PeerConfig(
        public_key=p.public_key,
        preshared_key=p.preshared_key,
        allowed_ips=p.allowed_ips,
        endpoint=p.endpoints[0] if p.endpoints else None,
        persistent_keepalive=p.persistent_keepalive or None,
    )


class CryptoActor(Actor):
    kind = "crypto"

    def __init__(self, name: str, runtime: Any, tun_queue: int | None = None) -> None:
        super().__init__(name, runtime)
        self.index = int(name.rsplit("-", 1)[1])
        self.table = WorkerRoutes()  # destination -> owning worker, for what our TUN queue gives us
        self.no_route = 0
        self.device: Device | None = None
        self.device_key: tuple[bytes, int, int] | None = None
        self.peers: dict[bytes, PeerSettings] = {}
        self.next_tick = 0.0
        self.forwarded = 0  # datagrams handed on to other workers
        self.forwarded_initiations = 0
        self.underlay_in = 0  # disco and STUN datagrams our peer sockets read, handed to magicsock
        self.interface = ""
        self.direct = DirectPaths(
            self.log,
            self.add_reader,
            self.remove_reader,
            self.receive_direct,
            self.send_read,
            self.underlay,
            self._adopt(tun_queue),
        )
        # Flow counts of the direct paths: packets written to the TUN, datagrams on peer sockets.
        self.inner = FlowFeed(self, INNER)
        self.underlay = FlowFeed(self, UNDERLAY)
        self.feeds = (self.inner, self.underlay)
        # `meshsup capture` (actors.crypto.capture): None unless one runs, the hot path's only test.
        self.tap: Tap | None = None
        self.capture_out = Outbox(lambda _: "")
        self.capture_until = 0.0  # the capture's lease: it ends unless renewed by then
        self.captured = self.capture_dropped = 0
        self.capture_keys: list[str] = []  # key log lines not yet sent

    def configure(self, settings: Settings) -> None:
        for feed in self.feeds:
            feed.configure(settings)
        node = settings.node
        workers = settings.actors.crypto
        if self.index >= workers:
            raise ConfigError(f"{self.name} is beyond {workers} crypto workers")
        key = (node.private_key, workers, node.mtu)
        if key != self.device_key:
            # A new key or shard map invalidates every session: start clean.
            self.device = Device(
                node.private_key,
                worker=self.index,
                workers=workers,
                timing=test_timing(),
                mtu=node.mtu,
                owner_of=partial(owner, workers=workers),
            )
            self.device_key, self.peers = key, {}
            self._stop_capture()  # its renewal starts it again on the new device
        assert self.device is not None
        self.device.relaying = bool(settings.relays)
        self._configure_filter(settings.filter)
        self.outbox.connect(["tun-io", "magicsock", *(f"crypto-{w}" for w in range(workers))])
        wanted = {p.public_key: p for p in settings.peers if owner(p.public_key, workers) == self.index}
        for gone in set(self.peers) - set(wanted):
            self.device.remove_peer(gone)
            del self.peers[gone]
        for p in wanted.values():
            self._set_peer(p)
        self.table = WorkerRoutes(settings.peers, workers)
        self.direct.configure(node.interface, node.listen_port, node.fwmark)
        self.direct.set_endpoints({k: peer.endpoint for k, peer in self.device.peers.items()})
        self.device.fresh.clear()
        self.interface = node.interface
        self.subscribe(LinkChanged.TAG)

    def _set_peer(self, p: PeerSettings) -> None:
        """One owned peer added or changed: an unchanged one keeps its session and roamed endpoint."""
        assert self.device is not None
        old = self.peers.get(p.public_key)
        if old == p:
            return
        if old is not None and old.preshared_key != p.preshared_key:
            self.device.remove_peer(p.public_key)  # key material changed: flush the session
        self.device.set_peer(peer_config(p))
        self.peers[p.public_key] = p

    def change_peers(self, settings: Settings, changed: list[PeerSettings], removed: list[bytes]) -> None:
        """The peers' own changes alone: a one-peer `wg set` costs one peer's work, not every peer's."""
        assert self.device is not None
        workers = settings.actors.crypto
        self.table.change(changed, removed)
        for key in removed:
            if self.peers.pop(key, None) is not None:
                self.device.remove_peer(key)
        for p in changed:
            if owner(p.public_key, workers) == self.index:
                self._set_peer(p)
        self._follow_endpoints([*removed, *(p.public_key for p in changed)])

    def _follow_endpoints(self, keys: list[bytes]) -> None:
        """These peers' sockets (and those of peers given state since) follow their endpoints."""
        assert self.device is not None
        keys += self.device.fresh
        self.device.fresh.clear()
        peers = self.device.peers
        self.direct.update_endpoints({k: p.endpoint if (p := peers.get(k)) else None for k in keys})

    def _configure_filter(self, settings: FilterSettings) -> None:
        """A new filter, new rules for the one there (its live flows re-judged), or none."""
        assert self.device is not None
        if not settings.enabled:
            self.device.filter = None
        else:
            if self.device.filter is None:
                self.device.filter = Filter(settings)
            else:
                self.device.filter.configure(settings, time.monotonic())
            self.device.filter.recording = self.inner.tx.enabled  # flow logs are on

    def on_message(self, msg: Message) -> None:
        if isinstance(msg, FlowCountsAck):  # each feed takes its own (by epoch)
            for feed in self.feeds:
                feed.take(msg)
            return
        if self.device is None:
            self.count_drop("not_configured", msg.TAG)
            return
        if isinstance(msg, LinkChanged):
            if msg.interface != self.interface:  # the underlay moved, not our tunnel
                self.direct.reconnect()
            return
        now = time.monotonic()  # every protocol timer; the device reads the wall clock itself
        if isinstance(msg, PathSet):
            try:
                endpoint = path_endpoint(msg)
            except ValueError as err:
                self.count_drop("bad_path", str(err))
                return
            self.emit(self.device.set_path(msg.peer, endpoint, msg.trusted_for, now))
            return
        if not isinstance(msg, (PacketBatch, DatagramBatch, TsmpBatch)):
            return super().on_message(msg)
        packets = self.unpack(msg.packets)
        if packets is None:
            return
        if isinstance(msg, PacketBatch):
            self.emit(self.device.send(packets, now), sent=packets)
        elif isinstance(msg, TsmpBatch):
            self.emit(self.device.send_to(msg.peer, packets, now))
        else:
            self.receive([Burst((msg.host, msg.port), packets)])

    def _adopt(self, fd: int | None) -> Tun | None:
        if fd is None:
            return None
        try:
            return Tun.from_fd(fd)
        except (OSError, ValueError) as err:
            self.log.warning("the TUN queue handed over is unusable; tun-io reads for us", reason=str(err))
            return None

    def send_read(self, packets: list[bytes]) -> None:
        """Outgoing packets from our TUN queue: ours are sent, the rest go to their owners
        (steering sends us only ours, but a reload or a kernel without it may not)."""
        if self.device is None or not packets:
            return
        self.inner.tx.add_packets(packets)
        others, unrouted = by_owner(packets, self.table.routes)
        self.no_route += unrouted
        mine = others.pop(self.index, None)
        if mine:
            self.emit(self.device.send(mine, time.monotonic()), sent=mine)
        for w, ps in others.items():
            for blob in batch.pack_split(ps):
                self.outbox.send(f"crypto-{w}", PacketBatch(packets=blob))

    def receive_direct(self, bursts: list[Burst]) -> None:
        """Datagrams from a peer socket of our own (magicsock counts the ones it passes on)."""
        rx = self.underlay.rx
        if rx.enabled:
            for endpoint, datagrams in bursts:
                rx.add(endpoint, len(datagrams), sum(map(len, datagrams)))
        self.receive(bursts)

    def underlay(self, burst: Burst) -> None:
        """Disco and STUN datagrams a peer socket of ours read: magicsock's."""
        (host, port), datagrams = burst
        self.underlay_in += len(datagrams)
        for blob in batch.pack_split(datagrams):
            self.outbox.send("magicsock", UnderlayIn(host=host, port=port, packets=blob))

    def receive(self, bursts: list[Burst]) -> None:
        """Datagrams from the network, through magicsock or a peer socket of our own."""
        assert self.device is not None
        self.emit(self.device.receive(bursts, time.monotonic()), received=bursts)

    def _hand_on(self, forwards: list[Forward]) -> None:
        """Datagrams that belong to other workers' peers, to their owners."""
        groups: dict[tuple[int, str, int], list[bytes]] = defaultdict(list)
        for w, (host, port), d in forwards:
            groups[(w, host, port)].append(d)
        for (w, host, port), ds in groups.items():
            self.forwarded += len(ds)
            for blob in batch.pack_split(ds):
                self.outbox.send(f"crypto-{w}", DatagramBatch(host=host, port=port, packets=blob))

    def emit(self, out: Output, sent: list[bytes] | None = None, received: list[Burst] | None = None) -> None:
        """What the device made of a batch (`sent` to Device.send, `received` to Device.receive)."""
        if self.tap is not None:  # nothing else on the hot path when no capture runs
            self._capture(self.tap.take(sent, received, out))
        # Sockets follow their peers before anything is sent: an answer to a peer's first initiation
        # leaves from its new socket, and what the peer sends next comes in there, not to magicsock.
        moved = [event.public_key for event in out.events if event.kind == ENDPOINT_CHANGED]
        if self.device is not None and (moved or self.device.fresh):
            self._follow_endpoints(moved)
        if out.packets:
            if self.direct.write(out.packets):
                self.inner.rx.add_packets(out.packets)
            else:  # tun-io writes them, and counts them
                for blob in batch.pack_split(out.packets):
                    self.outbox.send("tun-io", PacketBatch(packets=blob))
        tx = self.underlay.tx
        for burst in out.datagrams:  # a peer's burst stays one, in order
            endpoint, datagrams = burst
            if self.direct.send(burst):
                if tx.enabled:
                    tx.add(endpoint, len(datagrams), sum(map(len, datagrams)))
            else:  # magicsock sends them, and counts them
                for blob in batch.pack_split(datagrams):
                    self.outbox.send("magicsock", DatagramBatch(host=endpoint[0], port=endpoint[1], packets=blob))
        for key, packets in out.tsmp.items():
            for blob in batch.pack_split(packets):
                self.outbox.send("magicsock", TsmpBatch(peer=key, packets=blob))
        if out.forwards or out.foreign:
            # Initiations whose peer another worker owns; datagrams of another worker's sessions.
            self.forwarded_initiations += len(out.forwards)
            self._hand_on(out.forwards + out.foreign)

    def tick(self, now: float) -> None:
        if self.device is not None and now >= self.next_tick:
            self.next_tick = now + TICK_INTERVAL
            self.emit(self.device.tick(now))
            if self.device.filter is not None:
                self.device.filter.tick(now)
                self.inner.rules.update(self.device.filter.take_decided())
            report = self.device.path_report(now)
            if report is not None:
                self.outbox.send("magicsock", report)
        for feed in self.feeds:
            feed.tick(now)
        if self.tap is not None:
            if now > self.capture_until:
                self.log.info("capture lease expired: its reader went away", captured=self.captured)
                self._stop_capture()
            elif self.tap.spec.keylog:
                self._send_keys()

    def _send_keys(self) -> None:
        """The key log lines of new handshakes, a bounded message at a time; what does not go now
        is kept for the next tick: a dropped key would leave its session sealed in the capture."""
        self.capture_keys += self.tap.key_lines() if self.tap is not None else []
        while self.capture_keys:
            lines = self.capture_keys[:KEY_LINES_PER_MESSAGE]
            if not self._to_capture(CaptureKeys(source=self.name, lines=lines)):
                return
            del self.capture_keys[: len(lines)]

    # --- `meshsup capture` (supervisor/capture.py asks every worker, and renews its lease)

    def command(self, op: str, args: dict[str, Any]) -> dict[str, Any]:
        if op != "capture":
            return super().command(op, args)
        spec = self._capture_spec(args)
        if args.get("stop"):
            counts = {"packets": self.captured, "dropped": self.capture_dropped}
            if self.tap is not None and self.tap.spec == spec:
                self._stop_capture()
            return counts
        if self.tap is not None and self.tap.spec != spec:
            raise ConfigError(f"another capture is running (to {self.tap.spec.socket})")
        if self.device is None:
            raise ConfigError("not configured yet")
        now = time.monotonic()
        self.capture_until = now + float(args.get("lease", 0))
        if self.tap is None:
            self.tap = Tap(spec, self.device, self.direct.port, source_address)
            self.capture_out = Outbox(lambda _: spec.socket)
            self.captured = self.capture_dropped = 0
            self.log.info("capture started", outer=spec.outer, keylog=spec.keylog, peer=args.get("peer") or "all")
            if spec.keylog:
                self.device.keylog = []
                # Only handshakes from now on are in the log: start one with every peer that has a session.
                self.emit(self.device.rekey([spec.peer] if spec.peer else list(self.device.peers), now))
        return {"packets": self.captured, "dropped": self.capture_dropped}

    def _capture_spec(self, args: dict[str, Any]) -> CaptureSpec:
        path = str(args.get("socket", ""))
        run = os.path.realpath(self.runtime.dir)
        if os.path.dirname(path) != run or Runtime.capture_pid(path) is None:
            raise ConfigError(f"a capture socket must be a capture CLI's socket in {run}")
        try:
            peer = parse_key(args["peer"]) if args.get("peer") else None
        except ValueError as err:
            raise ConfigError(f"peer: {err}") from None
        return CaptureSpec(path, peer, bool(args.get("outer")), bool(args.get("keylog")))

    def _capture(self, packets: list[bytes]) -> None:
        if not packets:
            return
        ts = time.time_ns()
        for run in batch.split(packets):
            if self._to_capture(CaptureBatch(source=self.name, ts=ts, packets=batch.pack(run))):
                self.captured += len(run)
            else:  # the reader is slow or gone: drop and count, never wait
                self.capture_dropped += len(run)

    def _to_capture(self, msg: Message) -> bool:
        return self.capture_out.send("capture", msg)

    def _stop_capture(self) -> None:
        if self.tap is not None:
            self.log.info("capture stopped", captured=self.captured, dropped=self.capture_dropped)
        self.tap = None
        self.capture_keys = []
        if self.device is not None:
            self.device.keylog = None
        self.capture_out.close()

    def status(self) -> dict[str, Any]:
        if self.device is None:
            return {}
        return {
            "peers": self.device.status(time.monotonic()),
            "filter": self.device.filter.status() if self.device.filter is not None else {},
            "counters": {
                **self.device.counters,
                **self.direct.counters(),
                "handshakes": self.device.handshakes,
                "initiations": self.device.initiations,
                "forwarded": self.forwarded,
                "no_route": self.no_route + self.device.counters["no_route"],
                "forwarded_initiations": self.forwarded_initiations,
                "underlay_in": self.underlay_in,
                "bus_full": sum(self.outbox.dropped.values()),
            },
        }

    def close(self) -> None:
        self.capture_out.close()
        for feed in self.feeds:
            feed.close()
        self.direct.close()

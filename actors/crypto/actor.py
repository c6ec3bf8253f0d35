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
logs, as tun-io and magicsock count what goes through them.
"""
from __future__ import annotations

import os
import time
from collections import defaultdict
from functools import partial
from itertools import groupby
from operator import itemgetter
from typing import Any

from meshsup.actors.base import Actor, ConfigError
from meshsup.actors.bus import batch
from meshsup.actors.bus.codec import Message
from meshsup.actors.bus.messages import DatagramBatch, FlowCountsAck, PacketBatch
from meshsup.actors.crypto.device import ENDPOINT_CHANGED, Device, Output
from meshsup.actors.crypto.direct import DirectPaths
from meshsup.actors.crypto.peer import PeerConfig
from meshsup.actors.routing.shard import by_owner, owner, worker_prefixes, worker_routes
from meshsup.actors.crypto.timers import Timing
from meshsup.actors.wire.wireguard import receiver_index
from meshsup.actors.kernel.types import Endpoint
from meshsup.actors.flowcount.tally import INNER, UNDERLAY
from meshsup.actors.flowcount.feed import FlowFeed
from meshsup.actors.kernel.tun import Tun
from meshsup.actors.settings import PeerSettings, Settings

TICK_INTERVAL = 0.05
TIMING_ENV = "MESHSUP_TEST_TIMING"  # e.g. "rekey_after_time=4,reject_after_time=8" (tests only)


def test_timing() -> Timing:
    spec = os.environ.get(TIMING_ENV, "")
    if not spec or os.environ.get("MESHSUP_TEST_FAULTS") != "1":
        return Timing()
    default = Timing()
    # Each value takes the type of its default: message counts stay integers (they slice batches).
    return Timing(**{k: type(getattr(default, k))(float(v)) for k, v in (kv.split("=") for kv in spec.split(","))})


def peer_config(p: PeerSettings) -> PeerConfig:
    return PeerConfig(
        public_key=p.public_key,
        preshared_key=p.preshared_key,
        allowed_ips=list(p.allowed_ips),
        endpoint=p.endpoints[0] if p.endpoints else None,
        persistent_keepalive=p.persistent_keepalive or None,
    )


class CryptoActor(Actor):
    kind = "crypto"

    def __init__(self, name: str, runtime: Any, tun_queue: int | None = None) -> None:
        super().__init__(name, runtime)
        self.index = int(name.rsplit("-", 1)[1])
        self.routes = worker_routes([])  # destination -> owning worker, for what our TUN queue gives us
        self.no_route = 0
        self.device: Device | None = None
        self.device_key: tuple[bytes, int, int] | None = None
        self.peers: dict[bytes, PeerSettings] = {}
        self.next_tick = 0.0
        self.forwarded = 0  # datagrams handed on to other workers
        self.forwarded_initiations = 0
        self.direct = DirectPaths(self.log, self.add_reader, self.remove_reader, self.receive_direct,
                                  self.send_read, self._adopt(tun_queue))
        # Flow counts of the direct paths: packets written to the TUN, datagrams on peer sockets.
        self.inner = FlowFeed(self, INNER)
        self.underlay = FlowFeed(self, UNDERLAY)
        self.feeds = (self.inner, self.underlay)

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
            self.device = Device(node.private_key, worker=self.index,
                                 workers=workers, timing=test_timing(), mtu=node.mtu,
                                 owner_of=partial(owner, workers=workers))
            self.device_key, self.peers = key, {}
        assert self.device is not None
        self.outbox.connect(["tun-io", "magicsock", *(f"crypto-{w}" for w in range(workers))])
        wanted = {p.public_key: p for p in settings.peers}
        wanted = {k: p for k, p in wanted.items() if owner(k, workers) == self.index}
        for gone in set(self.peers) - set(wanted):
            self.device.remove_peer(gone)
        for k, p in wanted.items():
            old = self.peers.get(k)
            if old == p:
                continue  # unchanged: keep its session and roamed endpoint
            if old is not None and old.preshared_key != p.preshared_key:
                self.device.remove_peer(k)  # key material changed: flush the session
            self.device.set_peer(peer_config(p))
        self.peers = wanted
        self.routes = worker_routes(worker_prefixes(settings.peers, workers))
        self.direct.configure(node.interface, node.listen_port)
        self.direct.set_endpoints({k: peer.endpoint for k, peer in self.device.peers.items()})

    def on_message(self, msg: Message) -> None:
        if isinstance(msg, FlowCountsAck):  # each feed takes its own (by epoch)
            for feed in self.feeds:
                feed.take(msg)
            return
        if self.device is None:
            self.count_drop("not_configured", msg.TAG)
            return
        now = time.time()
        if not isinstance(msg, (PacketBatch, DatagramBatch)):
            return super().on_message(msg)
        packets = self.unpack(msg.packets)
        if packets is None:
            return
        if isinstance(msg, PacketBatch):
            self.emit(self.device.send(packets, now))
        else:
            endpoint = (msg.host, msg.port)
            self.receive([(d, endpoint) for d in packets])

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
        others, unrouted = by_owner(packets, self.routes)
        self.no_route += unrouted
        mine = others.pop(self.index, None)
        if mine:
            self.emit(self.device.send(mine, time.time()))
        for w, ps in others.items():
            for blob in batch.pack_split(ps):
                self.outbox.send(f"crypto-{w}", PacketBatch(packets=blob))

    def receive_direct(self, datagrams: list[tuple[bytes, Endpoint]]) -> None:
        """Datagrams from a peer socket of our own (magicsock counts the ones it passes on)."""
        rx = self.underlay.rx
        if rx.enabled:
            for endpoint, run in groupby(datagrams, key=itemgetter(1)):
                sizes = [len(d) for d, _ in run]
                rx.add(endpoint, len(sizes), sum(sizes))
        self.receive(datagrams)

    def receive(self, datagrams: list[tuple[bytes, Endpoint]]) -> None:
        """Datagrams from the network, through magicsock or a peer socket of our own."""
        assert self.device is not None
        self.emit(self.device.receive(datagrams, time.time()))

    def _hand_on(self, datagrams: list[tuple[int, bytes, Endpoint]]) -> None:
        """Datagrams that belong to other workers' peers, to their owners."""
        groups: dict[tuple[int, str, int], list[bytes]] = defaultdict(list)
        for w, d, (host, port) in datagrams:
            groups[(w, host, port)].append(d)
        for (w, host, port), ds in groups.items():
            self.forwarded += len(ds)
            for blob in batch.pack_split(ds):
                self.outbox.send(f"crypto-{w}", DatagramBatch(host=host, port=port, packets=blob))

    def emit(self, out: Output) -> None:
        if out.packets:
            if self.direct.write(out.packets):
                self.inner.rx.add_packets(out.packets)
            else:  # tun-io writes them, and counts them
                for blob in batch.pack_split(out.packets):
                    self.outbox.send("tun-io", PacketBatch(packets=blob))
        tx = self.underlay.tx
        # Runs of datagrams to one endpoint (a peer's burst stays one run, in order).
        for endpoint, run in groupby(out.datagrams, key=itemgetter(0)):
            pairs = list(run)
            if self.direct.send(endpoint, pairs):
                if tx.enabled:
                    tx.add(endpoint, len(pairs), sum(len(d) for _, d in pairs))
            else:  # magicsock sends them, and counts them
                for blob in batch.pack_split([d for _, d in pairs]):
                    self.outbox.send("magicsock", DatagramBatch(host=endpoint[0], port=endpoint[1], packets=blob))
        if out.forwards or out.foreign:
            # Initiations whose peer another worker owns; datagrams of another worker's sessions.
            workers = self.device_key[1] if self.device_key else 1
            self.forwarded_initiations += len(out.forwards)
            self._hand_on([(w, d, e) for w, e, d in out.forwards]
                          + [((receiver_index(d) or 0) % workers, d, e) for d, e in out.foreign])
        for event in out.events:
            if event.kind == ENDPOINT_CHANGED and self.device is not None:
                self.direct.set_endpoints({k: p.endpoint for k, p in self.device.peers.items()})

    def tick(self, now: float) -> None:
        if self.device is not None and now >= self.next_tick:
            self.next_tick = now + TICK_INTERVAL
            self.emit(self.device.tick(time.time()))
        for feed in self.feeds:
            feed.tick(now)

    def status(self) -> dict[str, Any]:
        if self.device is None:
            return {}
        return {"peers": self.device.status(),
                "counters": {**self.device.counters, **self.direct.counters(),
                             "handshakes": self.device.handshakes, "forwarded": self.forwarded,
                             "no_route": self.no_route,
                             "forwarded_initiations": self.forwarded_initiations,
                             "bus_full": sum(self.outbox.dropped.values())}}

    def close(self) -> None:
        for feed in self.feeds:
            feed.close()
        self.direct.close()

"""The magicsock actor: the listen port's unconnected socket, and the split of datagrams to crypto workers.

Types 2, 3 and 4 go to the worker that allocated their receiver index
(index % workers); an initiation goes to a worker chosen by its source, which
hands it on to the peer's owner. Anything that is not WireGuard is counted
and dropped here, before it costs a crypto worker anything.

Crypto workers share the port (SO_REUSEPORT) with a socket per peer they own,
connected to its endpoint, which the kernel prefers for that peer's
datagrams: magicsock gets initiations from new endpoints and the traffic of
peers whose worker has no socket (yet), and sends what workers hand it.

With [[relays]], magicsock also holds a DERP connection to each relay
(relays.py): a worker's Burst to a peer's relayed endpoint (kernel.types) goes
to the peer through the relay that reaches it, and what a relay delivers from
a peer's key goes to the worker owning that key, from that relayed endpoint.
Flow records name a relay by RELAY_HOST:its number in [[relays]], from 1, as the endpoint of the
peer whose datagrams it carried (tallied by (RELAY_HOST, number, peer key)).
"""

from __future__ import annotations

import hashlib
import time
from collections import Counter, defaultdict
from typing import Any

from meshsup.actors.base import Actor, ConfigError
from meshsup.actors.bus import batch
from meshsup.actors.bus.codec import Message
from meshsup.actors.bus.messages import DatagramBatch
from meshsup.actors.flowcount.feed import FlowFeed
from meshsup.actors.flowcount.tally import UNDERLAY
from meshsup.actors.kernel.resolve import Resolver
from meshsup.actors.kernel.types import RELAYED, Buffer, Burst, relayed, relayed_key
from meshsup.actors.kernel.udp import UdpSocket
from meshsup.actors.magicsock.relays import RelayLink, Relays
from meshsup.actors.routing.shard import owner
from meshsup.actors.settings import Settings, keys
from meshsup.actors.settings.relay import RelayEntry
from meshsup.actors.wire.wireguard import MessageType, classify, receiver_index

RECV_BATCH = 512


class MagicsockActor(Actor):
    kind = "magicsock"

    def __init__(self, name: str, runtime: Any) -> None:
        super().__init__(name, runtime)
        self.sock: UdpSocket | None = None
        self.workers = 1
        self.counters: Counter[str] = Counter()
        self.flows = FlowFeed(self, UNDERLAY)
        self.relays = Relays([])
        self.resolver = Resolver()  # relay host names, looked up off the loop; kept across reloads
        self.relays_for: tuple[bytes, tuple[RelayEntry, ...]] | None = None  # (our key, [[relays]]) served
        self.peer_keys: frozenset[bytes] = frozenset()

    def configure(self, settings: Settings) -> None:
        self.flows.configure(settings)
        port = settings.node.listen_port
        self.workers = settings.actors.crypto
        self.outbox.connect([f"crypto-{w}" for w in range(self.workers)])
        if self.sock is None or self.sock.port != port:
            try:
                new = UdpSocket(port, reuse_port=True)
            except OSError as err:
                raise ConfigError(f"cannot listen on UDP port {port}: {err.strerror}") from None
            if self.sock is not None:
                self.remove_reader(self.sock.fileno())
                self.sock.close()
            self.sock = new
            self.add_reader(new.fileno(), self.on_readable)
            self.log.info("listening", port=new.port, gso=new.gso, gro=new.gro)
        self.peer_keys = frozenset(p.public_key for p in settings.peers)
        node = settings.node
        if settings.relays and not node.private_key:
            raise ConfigError("relays need the node's private key to log in (actors.registry: login_key)")
        if self.relays_for != (node.private_key, settings.relays):  # a new key logs in anew
            self.relays.close()
            ours = (node.private_key, node.public_key)
            links = [
                RelayLink(i, r, ours, self.watch, self.unwatch, self.relayed_in, self.log, self.resolver)
                for i, r in enumerate(settings.relays, 1)
            ]
            self.relays, self.relays_for = Relays(links), (node.private_key, settings.relays)

    def on_readable(self) -> None:
        assert self.sock is not None
        groups: dict[tuple[int, str, int], list[bytes]] = defaultdict(list)
        for (host, port), datagrams in self.sock.recv_batch(RECV_BATCH):
            for data in datagrams:
                kind = classify(data)
                if kind is None:
                    self.counters["not_wireguard"] += 1
                    continue
                self.counters["rx_datagrams"] += 1
                if kind == MessageType.INITIATION:
                    src = f"{host}:{port}".encode()
                    worker = int.from_bytes(hashlib.blake2s(src, digest_size=4).digest(), "big") % self.workers
                else:
                    worker = (receiver_index(data) or 0) % self.workers
                groups[(worker, host, port)].append(data)
        for (worker, host, port), ds in groups.items():
            self.flows.rx.add((host, port), len(ds), sum(map(len, ds)))
            for blob in batch.pack_split(ds):
                self.outbox.send(f"crypto-{worker}", DatagramBatch(host=host, port=port, packets=blob))

    def on_message(self, msg: Message) -> None:
        if self.flows.take(msg):
            return
        if not isinstance(msg, DatagramBatch):
            return super().on_message(msg)
        if self.sock is None:
            self.counters["not_listening"] += 1
            return
        packets = self.unpack(msg.packets)
        if packets is None:
            return
        endpoint = (msg.host, msg.port)
        if msg.host.startswith(RELAYED):
            self.relay_out(endpoint, packets)
            return
        self.counters["tx_datagrams"] += len(packets)
        self.flows.tx.add(endpoint, len(packets), sum(map(len, packets)))
        self.counters["tx_dropped"] += self.sock.send_batch(Burst(endpoint, packets))

    def relay_out(self, endpoint: tuple[str, int], datagrams: list[bytes]) -> None:
        """A worker's datagrams for a peer, through the relay that reaches it (written at the turn's end)."""
        key = relayed_key(endpoint)
        link = None if key is None else self.relays.route(key)
        if key is None or link is None:
            self.counters["relay_unreachable" if key else "bad_relayed_endpoint"] += len(datagrams)
            return
        refused = link.send(key, datagrams, time.monotonic())
        sent = len(datagrams) - refused
        self.counters["relay_tx_datagrams"] += sent
        self.counters["relay_tx_dropped"] += refused
        if sent:
            self.flows.tx.add((*link.address, key), sent, sum(map(len, datagrams)))

    def relayed_in(self, link: RelayLink, packets: dict[bytes, list[Buffer]]) -> None:
        """What a relay delivered, by source key: each key's WireGuard datagrams to the worker owning it."""
        for key, datagrams in packets.items():
            if key not in self.peer_keys:
                self.counters["relay_unknown_peer"] += len(datagrams)
                continue
            wg = [d for d in datagrams if classify(d) is not None]
            if len(wg) < len(datagrams):
                self.counters["not_wireguard"] += len(datagrams) - len(wg)
                if not wg:
                    continue
            self.relays.heard(key, link)
            self.counters["relay_rx_datagrams"] += len(wg)
            self.flows.rx.add((*link.address, key), len(wg), sum(map(len, wg)))
            host, port = relayed(key)
            worker = f"crypto-{owner(key, self.workers)}"
            for blob in batch.pack_split(wg):
                self.outbox.send(worker, DatagramBatch(host=host, port=port, packets=blob))

    def status(self) -> dict[str, Any]:
        info: dict[str, Any] = {"counters": dict(self.counters)}
        if self.sock is not None:
            info.update(port=self.sock.port, gso=self.sock.gso, gro=self.sock.gro)
        if self.relays.links:
            info["relays"] = self.relays.status()
            info["relay_routes"] = {keys.b64(k): link.relay.name for k, link in self.relays.heard_via.items()}
        return info

    def tick(self, now: float) -> None:
        self.relays.tick(now)
        self.relays.flush(now)
        self.flows.tick(now)

    def close(self) -> None:
        self.relays.close()
        self.flows.close()
        if self.sock is not None:
            self.sock.close()

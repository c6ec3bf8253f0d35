"""The magicsock actor: the listen port's unconnected socket, and the split of datagrams to crypto workers.

Types 2, 3 and 4 go to the worker that allocated their receiver index
(index % workers); an initiation goes to a worker chosen by its source, which
hands it on to the peer's owner. Anything that is not WireGuard is counted
and dropped here, before it costs a crypto worker anything.

Crypto workers share the port (SO_REUSEPORT) with a socket per peer they own,
connected to its endpoint, which the kernel prefers for that peer's
datagrams: magicsock gets initiations from new endpoints and the traffic of
peers whose worker has no socket (yet), and sends what workers hand it.
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from typing import Any

from meshsup.actors.base import Actor, ConfigError
from meshsup.actors.bus import batch
from meshsup.actors.bus.codec import Message
from meshsup.actors.bus.messages import DatagramBatch
from meshsup.actors.flowcount.feed import FlowFeed
from meshsup.actors.flowcount.tally import UNDERLAY
from meshsup.actors.kernel.types import Burst
from meshsup.actors.kernel.udp import UdpSocket
from meshsup.actors.settings import Settings
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
        self.counters["tx_datagrams"] += len(packets)
        self.flows.tx.add(endpoint, len(packets), sum(map(len, packets)))
        self.counters["tx_dropped"] += self.sock.send_batch(Burst(endpoint, packets))

    def status(self) -> dict[str, Any]:
        info: dict[str, Any] = {"counters": dict(self.counters)}
        if self.sock is not None:
            info.update(port=self.sock.port, gso=self.sock.gso, gro=self.sock.gro)
        return info

    def tick(self, now: float) -> None:
        self.flows.tick(now)

    def close(self) -> None:
        self.flows.close()
        if self.sock is not None:
            self.sock.close()

"""The tun-io actor: the TUN device's queue steering, and the way in and out for workers without a queue.

Each crypto worker reads and writes a TUN queue of its own (the supervisor
holds queue k for worker k; actors.crypto.direct). tun-io attaches an eBPF
program (bpf.steering, once per TUN) that queues every outgoing packet on the
queue of the worker owning its destination: a peer's packets reach their
owner with no hop, in the kernel's order. The program looks the destination
up in two BPF LPM-trie maps (queues.QueueSteering) that tun-io keeps equal to
its own routes, prefix by prefix: a whole configuration writes what differs
from what the maps hold, a change of peers the changed peers' prefixes alone,
at once. What lands on tun-io's own queue (no steering on this kernel, a
worker without a queue) is read here in batches, split by owner and handed
on; tun-io writes only for a worker that has no queue.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Iterable
from typing import Any, cast

from meshsup.actors.base import Actor, ConfigError
from meshsup.actors.bus import batch
from meshsup.actors.bus.codec import Message
from meshsup.actors.bus.messages import PacketBatch
from meshsup.actors.flowcount.feed import FlowFeed
from meshsup.actors.flowcount.tally import INNER
from meshsup.actors.kernel.tun import Tun
from meshsup.actors.routing.allowedips import Network
from meshsup.actors.routing.shard import WorkerRoutes, by_owner
from meshsup.actors.settings import PeerSettings, Settings
from meshsup.actors.tunio.queues import QueueSteering

READ_BATCH = 256
UNMATCHED_WORKER = 0  # where the steering program queues a packet no prefix holds


class TunIoActor(Actor):
    kind = "tun-io"

    def __init__(self, name: str, runtime: Any) -> None:
        super().__init__(name, runtime)
        self.tun: Tun | None = None
        self.table = WorkerRoutes()  # destination prefix -> crypto worker index
        self.route_key: Any = None
        self.counters: Counter[str] = Counter()
        self.flows = FlowFeed(self, INNER)
        self.steering: QueueSteering | None = None  # None: the kernel's choice of queue (or a single queue)
        self._steering_refused = False  # said once in the log
        self._write_refused = False  # likewise

    def configure(self, settings: Settings) -> None:
        self.flows.configure(settings)
        iface = settings.node.interface
        if self.tun is None or self.tun.name != iface:
            try:
                new = Tun.open(iface)
            except (OSError, ValueError) as err:
                raise ConfigError(f"cannot open TUN {iface}: {err}") from None
            if self.tun is not None:
                self.remove_reader(self.tun.fileno())
                self.tun.close()
            self.tun = new
            self.add_reader(new.fileno(), self.on_readable)
            self._report_offloads(new)
            self._attach_steering(new)
            self.route_key = None  # the new maps are empty: write every route
        workers = settings.actors.crypto
        self.outbox.connect([f"crypto-{w}" for w in range(workers)])
        key = (workers, [(p.public_key, p.allowed_ips) for p in settings.peers])
        if key != self.route_key:
            self.table, self.route_key = WorkerRoutes(settings.peers, workers), key
            held = list(self.steering.held) if self.steering is not None else []
            self._steer([*held, *(network for p in settings.peers for network in p.allowed_ips)])

    def change_peers(self, settings: Settings, changed: list[PeerSettings], removed: list[bytes]) -> None:
        """The changed peers' routes, and their prefixes in the steering maps, at once."""
        touched = self.table.change(changed, removed)
        self.route_key = None  # a whole configuration compares anew
        self._steer(touched)

    def _attach_steering(self, tun: Tun) -> None:
        """Have the kernel queue each outgoing packet on its owner's queue (the supervisor
        holds queue k for crypto worker k): the previous TUN's maps closed, new ones made
        (empty) and the program attached. Without it tun-io reads and hands packets on."""
        if self.steering is not None:
            self.steering.close()
            self.steering = None
        if not tun.multi_queue:
            return
        try:
            self.steering = QueueSteering(tun.fileno(), UNMATCHED_WORKER)
        except (OSError, ValueError) as err:
            if not self._steering_refused:
                self._steering_refused = True
                self.log.warning("no eBPF queue steering: outgoing packets go through tun-io", reason=str(err))
            return
        self.log.info("steering outgoing packets to their owners' TUN queues")

    def _steer(self, networks: Iterable[Network]) -> None:
        """Each prefix in the steering maps as the routes have it: the same worker, or gone.
        Following ``routes`` (not the peers) keeps steering and tun-io's own routing in step
        where two peers list one prefix (the last one inserted owns it, as wireguard-go has it)."""
        if self.steering is None:
            return
        for network in networks:
            worker = cast("int | None", self.table.routes.get(network))
            try:
                self.counters["steering_writes"] += self.steering.set(network, worker)
            except (OSError, ValueError) as err:
                # A packet steered by a stale entry reaches a worker that hands it on to its owner.
                self.counters["steering_refused"] += 1
                if not self._write_refused:
                    self._write_refused = True
                    self.log.warning("a steering map refused a write", prefix=str(network), reason=str(err))

    def _report_offloads(self, tun: Tun) -> None:
        self.log.info("TUN attached", interface=tun.name, coalesced_writes=tun.vnet_hdr, worker_queues=tun.multi_queue)
        if not tun.vnet_hdr:
            self.log.warning("TUN without a virtio-net header: packets are written one by one")
        if not tun.multi_queue:
            self.log.warning("single-queue TUN: decrypted packets come through tun-io")

    def on_readable(self) -> None:
        assert self.tun is not None
        by_worker, unrouted = by_owner(self.tun.read_batch(READ_BATCH), self.table.routes)
        self.counters["no_route"] += unrouted
        self.counters["rx_batches"] += 1
        for w, ps in by_worker.items():
            self.counters["rx_packets"] += len(ps)
            self.flows.tx.add_packets(ps)
            for blob in batch.pack_split(ps):
                self.outbox.send(f"crypto-{w}", PacketBatch(packets=blob))

    def on_message(self, msg: Message) -> None:
        if self.flows.take(msg):
            return
        if not isinstance(msg, PacketBatch):
            return super().on_message(msg)
        if self.tun is None:
            self.counters["no_tun"] += 1
            return
        packets = self.unpack(msg.packets)
        if packets is None:
            return
        self.counters["tx_packets"] += len(packets)
        self.flows.rx.add_packets(packets)
        self.counters["tx_dropped"] += self.tun.write_batch(packets)

    def status(self) -> dict[str, Any]:
        tun = {} if self.tun is None else dataclasses.asdict(self.tun.stats)
        return {
            "counters": {
                **self.counters,
                **tun,
                "steering": int(self.steering is not None),
                "bus_full": sum(self.outbox.dropped.values()),
            }
        }

    def tick(self, now: float) -> None:
        self.flows.tick(now)

    def close(self) -> None:
        self.flows.close()
        if self.steering is not None:
            self.steering.close()
        if self.tun is not None:
            self.tun.close()

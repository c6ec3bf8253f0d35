"""The tun-io actor: the TUN file descriptor, read in batches, split by owning crypto worker.

tun-io reads the TUN's one enabled queue, so every outgoing packet passes
here in the kernel's order. Crypto workers write what they decrypt through
write-only queues of their own (actors.crypto.direct); tun-io writes only
for a worker that has none.
"""
from __future__ import annotations

import base64
import dataclasses
import ipaddress
from collections import Counter, defaultdict
from typing import Any

from actors.base import Actor, ConfigError
from actors.bus import batch
from actors.bus.codec import Message
from actors.bus.messages import PacketBatch
from actors.crypto.allowedips import AllowedIPs
from actors.crypto.shard import owner
from actors.netlog.counting import INNER
from actors.netlog.feed import FlowFeed
from actors.tunio import packet
from actors.tunio.tun import Tun

READ_BATCH = 256


class TunIoActor(Actor):
    kind = "tun-io"

    def __init__(self, name: str, runtime: Any) -> None:
        super().__init__(name, runtime)
        self.tun: Tun | None = None
        self.routes = AllowedIPs()  # destination prefix -> crypto worker index
        self.route_key: Any = None
        self.counters: Counter[str] = Counter()
        self.seq = 0
        self.flows = FlowFeed(self, INNER)

    def configure(self, config: dict[str, Any]) -> None:
        super().configure(config)
        self.flows.configure(config)
        iface = config["node"]["interface"]
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
        workers = config["actors"]["crypto"]
        self.outbox.connect([f"crypto-{w}" for w in range(workers)])
        key = (workers, [(p["public_key"], p["allowed_ips"]) for p in config["peers"]])
        if key != self.route_key:
            routes = AllowedIPs()
            for p in config["peers"]:
                w = owner(base64.b64decode(p["public_key"]), workers)
                for prefix in p["allowed_ips"]:
                    routes.insert(ipaddress.ip_network(prefix), w)
            self.routes, self.route_key = routes, key

    def _report_offloads(self, tun: Tun) -> None:
        self.log.info("TUN attached", interface=tun.name, coalesced_writes=tun.vnet_hdr,
                      worker_queues=tun.multi_queue)
        if not tun.vnet_hdr:
            self.log.warning("TUN without a virtio-net header: packets are written one by one")
        if not tun.multi_queue:
            self.log.warning("single-queue TUN: decrypted packets come through tun-io")

    def on_readable(self) -> None:
        assert self.tun is not None
        by_worker: dict[int, list[bytes]] = defaultdict(list)
        lookup = self.routes.lookup
        last_dst: bytes | None = b""
        w: int | None = None
        for p in self.tun.read_batch(READ_BATCH):
            dst = packet.dst_addr(p)
            if dst != last_dst:  # bulk traffic repeats destinations: route once per run
                last_dst = dst
                w = lookup(dst) if dst is not None else None
            if w is None:
                self.counters["no_route"] += 1
                continue
            by_worker[w].append(p)
        self.counters["rx_batches"] += 1
        for w, ps in by_worker.items():
            self.counters["rx_packets"] += len(ps)
            self.flows.tx.add_packets(ps)
            for blob in batch.pack_split(ps):
                self.seq += 1
                self.outbox.send(f"crypto-{w}", PacketBatch(seq=self.seq, packets=blob))

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
        return {"counters": {**self.counters, **tun, "bus_full": sum(self.outbox.dropped.values())}}

    def tick(self, now: float) -> None:
        self.flows.tick(now)

    def close(self) -> None:
        self.flows.close()
        if self.tun is not None:
            self.tun.close()

"""The tun-io actor: the TUN device's queue steering, and the way in and out for workers without a queue.

Each crypto worker reads and writes a TUN queue of its own (the supervisor
holds queue k for worker k; actors.crypto.direct). tun-io attaches an eBPF
program (bpf.steering) that queues every outgoing packet on the queue of
the worker owning its destination: a peer's packets reach their owner with
no hop, in the kernel's order. What lands on tun-io's own queue (no
steering on this kernel, a worker without a queue) is read here in
batches, split by owner and handed on; tun-io writes only for a worker
that has no queue.
"""

from __future__ import annotations

import dataclasses
import os
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from typing import Any

from meshsup.actors.base import Actor, ConfigError
from meshsup.actors.bus import batch
from meshsup.actors.bus.codec import Message
from meshsup.actors.bus.messages import PacketBatch
from meshsup.actors.flowcount.feed import FlowFeed
from meshsup.actors.flowcount.tally import INNER
from meshsup.actors.kernel.tun import Tun
from meshsup.actors.routing.allowedips import AllowedIPs, Network
from meshsup.actors.routing.shard import by_owner, owner, worker_prefixes, worker_routes
from meshsup.actors.settings import PeerSettings, Settings
from meshsup.bpf import steering
from meshsup.bpf.syscall import attach_steering, load_socket_filter

READ_BATCH = 256
STEER_AT_ONCE = 256  # routes whose program is attached before configure returns (a few ms to verify)


class TunIoActor(Actor):
    kind = "tun-io"

    def __init__(self, name: str, runtime: Any) -> None:
        super().__init__(name, runtime)
        self.tun: Tun | None = None
        self.routes = AllowedIPs()  # destination prefix -> crypto worker index
        self.route_key: Any = None
        self.prefixes: dict[bytes, tuple[Network, ...]] = {}  # each peer's allowed IPs, as routed
        self.steer_due = False  # the routes changed since the steering program was made
        self.counters: Counter[str] = Counter()
        self.flows = FlowFeed(self, INNER)
        self.steering = False
        self._steering_refused = False  # said once in the log
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="steering")
        self._loading: Future[int] | None = None  # a steering program being made (its fd)
        self._routes_loading = 0

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
            self.route_key = None  # steer the new descriptor's device too
        workers = settings.actors.crypto
        self.outbox.connect([f"crypto-{w}" for w in range(workers)])
        key = (workers, [(p.public_key, p.allowed_ips) for p in settings.peers])
        if key != self.route_key:
            prefixes = worker_prefixes(settings.peers, workers)
            self.routes, self.route_key = worker_routes(prefixes), key
            self.prefixes = {p.public_key: p.allowed_ips for p in settings.peers}
            self.steer_due = False
            self._steer(lambda: prefixes, len(prefixes))

    def change_peers(self, settings: Settings, changed: list[PeerSettings], removed: list[bytes]) -> None:
        """The changed peers' routes at once; the steering program, which holds every route, on the
        next tick (one for many changes): until then a packet steered by the old one reaches a worker
        that hands it on to its owner by the routes, as without steering."""
        workers = settings.actors.crypto
        for key in [*removed, *(p.public_key for p in changed)]:
            for network in self.prefixes.pop(key, ()):
                self.routes.remove(network, owner(key, workers))
        for p in changed:
            self.prefixes[p.public_key] = p.allowed_ips
            for network in p.allowed_ips:
                self.routes.insert(network, owner(p.public_key, workers))
        self.route_key = None  # a whole configuration compares anew
        self.steer_due = True

    def _steer(self, prefixes: Callable[[], list[tuple[Network, int]]], routes: int) -> None:
        """Have the kernel queue each outgoing packet on its owner's queue (the supervisor
        holds queue k for crypto worker k). Without it tun-io reads and hands packets on.
        The program is made, and checked by the kernel's verifier, on a thread of its own:
        for thousands of routes making it takes 0.1 s and verifying it a second, while the
        loop goes on (heartbeats, packets, a one-peer change's step); a few routes' program
        is waited for, and attached at once."""
        assert self.tun is not None
        if not self.tun.multi_queue:
            return
        if self._loading is not None:
            self.steer_due = True  # one is being made: this one after it
            return
        self._loading = self._loader.submit(_steering_filter, prefixes)
        self._routes_loading = routes
        if self._routes_loading <= STEER_AT_ONCE:
            self._attach_steering(wait=True)

    def _attach_steering(self, wait: bool = False) -> None:
        """The program made on the loader's thread, attached once it is done."""
        loading = self._loading
        if loading is None or not (wait or loading.done()) or self.tun is None:
            return
        self._loading = None
        try:
            prog = loading.result()
            try:
                attach_steering(self.tun.fileno(), prog)
            finally:
                os.close(prog)
        except (OSError, ValueError) as err:
            self._no_steering(err)
            return
        if not self.steering:
            self.log.info("steering outgoing packets to their owners' TUN queues", routes=self._routes_loading)
        self.steering = True

    def _no_steering(self, err: Exception) -> None:
        self.steering = False
        if not self._steering_refused:
            self._steering_refused = True
            self.log.warning("no eBPF queue steering: outgoing packets go through tun-io", reason=str(err))

    def _report_offloads(self, tun: Tun) -> None:
        self.log.info("TUN attached", interface=tun.name, coalesced_writes=tun.vnet_hdr, worker_queues=tun.multi_queue)
        if not tun.vnet_hdr:
            self.log.warning("TUN without a virtio-net header: packets are written one by one")
        if not tun.multi_queue:
            self.log.warning("single-queue TUN: decrypted packets come through tun-io")

    def on_readable(self) -> None:
        assert self.tun is not None
        by_worker, unrouted = by_owner(self.tun.read_batch(READ_BATCH), self.routes)
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
                "steering": int(self.steering),
                "bus_full": sum(self.outbox.dropped.values()),
            }
        }

    def tick(self, now: float) -> None:
        self.flows.tick(now)
        self._attach_steering()
        if self.steer_due and self._loading is None and self.running is not None and self.tun is not None:
            self.steer_due = False
            peers, workers = self.running.peers, self.running.actors.crypto
            self._steer(partial(worker_prefixes, peers, workers), sum(len(p.allowed_ips) for p in peers))

    def close(self) -> None:
        self.flows.close()
        self._loader.shutdown(wait=False, cancel_futures=True)
        if self.tun is not None:
            self.tun.close()


def _steering_filter(prefixes: Callable[[], list[tuple[Network, int]]]) -> int:
    """The steering program of these routes (worked out here, on the loader's thread, when a tick
    asks: thousands take a while), made and loaded (its fd); ValueError if they do not fit one program."""
    return load_socket_filter(steering.program(prefixes(), default=0), "meshsup_steer")

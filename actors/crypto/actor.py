"""The crypto actor: WireGuard handshakes and transport encryption for its shard of peers.

Peers are sharded by public key (actors.crypto.shard): this worker owns the
sessions of its peers only. An initiation can reach any worker (magicsock
cannot tell whose it is without a DH); the device checks it (cookies first,
under load) and names the owner, and this worker hands the datagram on.
"""
from __future__ import annotations

import base64
import ipaddress
import os
import time
from collections import defaultdict
from functools import partial
from typing import Any

from actors.base import Actor, ConfigError
from actors.bus import batch
from actors.bus.codec import Message
from actors.bus.messages import DatagramBatch, PacketBatch
from actors.crypto.device import Device, Output
from actors.crypto.peer import PeerConfig
from actors.crypto.shard import owner
from actors.crypto.timers import Timing

TICK_INTERVAL = 0.05
TIMING_ENV = "MESHSUP_TEST_TIMING"  # e.g. "rekey_after_time=4,reject_after_time=8" (tests only)


def test_timing() -> Timing:
    spec = os.environ.get(TIMING_ENV, "")
    if not spec or os.environ.get("MESHSUP_TEST_FAULTS") != "1":
        return Timing()
    default = Timing()
    # Each value takes the type of its default: message counts stay integers (they slice batches).
    return Timing(**{k: type(getattr(default, k))(float(v)) for k, v in (kv.split("=") for kv in spec.split(","))})


def peer_config(p: dict[str, Any]) -> PeerConfig:
    endpoint = None
    if p["endpoints"]:
        host, _, port = p["endpoints"][0].rpartition(":")
        endpoint = (host.strip("[]"), int(port))
    return PeerConfig(
        public_key=base64.b64decode(p["public_key"]),
        preshared_key=base64.b64decode(p["preshared_key"]) if p["preshared_key"] else None,
        allowed_ips=[ipaddress.ip_network(a) for a in p["allowed_ips"]],
        endpoint=endpoint,
        persistent_keepalive=p["persistent_keepalive"] or None,
    )


class CryptoActor(Actor):
    kind = "crypto"

    def __init__(self, name: str, runtime: Any) -> None:
        super().__init__(name, runtime)
        self.index = int(name.rsplit("-", 1)[1])
        self.device: Device | None = None
        self.device_key: tuple[str, int, int] | None = None
        self.peers: dict[bytes, dict[str, Any]] = {}
        self.next_tick = 0.0
        self.forwarded = 0

    def configure(self, config: dict[str, Any]) -> None:
        super().configure(config)
        node = config["node"]
        workers = config["actors"]["crypto"]
        if self.index >= workers:
            raise ConfigError(f"{self.name} is beyond {workers} crypto workers")
        key = (node["private_key"], workers, node["mtu"])
        if key != self.device_key:
            # A new key or shard map invalidates every session: start clean.
            self.device = Device(base64.b64decode(node["private_key"]), worker=self.index,
                                 workers=workers, timing=test_timing(), mtu=node["mtu"],
                                 owner_of=partial(owner, workers=workers))
            self.device_key, self.peers = key, {}
        assert self.device is not None
        self.outbox.connect(["tun-io", "magicsock", *(f"crypto-{w}" for w in range(workers))])
        wanted = {base64.b64decode(p["public_key"]): p for p in config["peers"]}
        wanted = {k: p for k, p in wanted.items() if owner(k, workers) == self.index}
        for gone in set(self.peers) - set(wanted):
            self.device.remove_peer(gone)
        for k, p in wanted.items():
            old = self.peers.get(k)
            if old == p:
                continue  # unchanged: keep its session and roamed endpoint
            if old is not None and old["preshared_key"] != p["preshared_key"]:
                self.device.remove_peer(k)  # key material changed: flush the session
            self.device.set_peer(peer_config(p))
        self.peers = wanted

    def on_message(self, msg: Message) -> None:
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
            self.emit(self.device.receive([(d, endpoint) for d in packets], now))

    def emit(self, out: Output) -> None:
        if out.packets:
            self.outbox.send("tun-io", PacketBatch(seq=0, packets=batch.pack(out.packets)))
        groups: dict[tuple[str, str, int], list[bytes]] = defaultdict(list)
        for endpoint, d in out.datagrams:
            groups[("magicsock", endpoint[0], endpoint[1])].append(d)
        for worker, endpoint, d in out.forwards:  # initiations whose peer another worker owns
            groups[(f"crypto-{worker}", endpoint[0], endpoint[1])].append(d)
        self.forwarded += len(out.forwards)
        for (to, host, port), ds in groups.items():
            self.outbox.send(to, DatagramBatch(host=host, port=port, packets=batch.pack(ds)))

    def tick(self, now: float) -> None:
        if self.device is not None and now >= self.next_tick:
            self.next_tick = now + TICK_INTERVAL
            self.emit(self.device.tick(time.time()))

    def status(self) -> dict[str, Any]:
        if self.device is None:
            return {}
        return {"peers": self.device.status(),
                "counters": {**self.device.counters, "handshakes": self.device.handshakes,
                             "forwarded_initiations": self.forwarded}}

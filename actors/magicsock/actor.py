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

Direct paths (README: Paths through NAT): the port carries WireGuard, disco and
STUN (wire.demux tells them apart), whichever process reads them; workers hand
magicsock the disco and STUN their peer sockets read (UnderlayIn). Disco
(paths.py) finds and keeps a direct path per peer and tells the owning worker
(PathSet); it learns a peer's disco key only inside the peer's WireGuard
session, by TSMP (inband.py). Our own candidates are the host's addresses and
what STUN (stunclient.py: the relays' STUN servers) reports, refreshed every
27 s and on a LinkChanged, which also rebinds the socket and tells the peers
our endpoints again (CallMeMaybe).
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import time
from collections import Counter, defaultdict
from typing import Any

from meshsup.actors.base import Actor, ConfigError
from meshsup.actors.bus import batch
from meshsup.actors.bus.codec import Message
from meshsup.actors.bus.messages import DatagramBatch, LinkChanged, PathReport, PathSet, TsmpBatch, UnderlayIn
from meshsup.actors.flowcount.feed import FlowFeed
from meshsup.actors.flowcount.tally import UNDERLAY
from meshsup.actors.kernel.addrs import local_endpoints
from meshsup.actors.kernel.resolve import Resolver
from meshsup.actors.kernel.types import RELAYED, Buffer, Burst, Endpoint, relayed, relayed_key
from meshsup.actors.kernel.udp import UdpSocket
from meshsup.actors.magicsock.inband import Address, InBand
from meshsup.actors.magicsock.paths import Paths
from meshsup.actors.magicsock.relays import RelayLink, Relays
from meshsup.actors.magicsock.stunclient import StunProber, stun_servers
from meshsup.actors.routing.shard import owner
from meshsup.actors.settings import PeerSettings, Settings, keys
from meshsup.actors.settings.relay import RelayEntry
from meshsup.actors.wire.demux import Protocol, protocol
from meshsup.actors.wire.wireguard import MessageType, classify, receiver_index

RECV_BATCH = 512
PING_TYPES = ("disco", "tsmp")
PING_TIMEOUT = 5.0  # as disco's: a user's ping with no answer by then is lost


class MagicsockActor(Actor):
    kind = "magicsock"

    def __init__(self, name: str, runtime: Any) -> None:
        super().__init__(name, runtime)
        self.sock: UdpSocket | None = None
        self.workers = 1
        self.counters: Counter[str] = Counter()
        self.flows = FlowFeed(self, UNDERLAY)
        self.relays = Relays([])
        # With [coordination], what peers' records say (supervisor: MeshPeers.hints): the home relay's
        # name, a first hint where to reach a peer; the disco key, to cross-check what TSMP says
        self.relay_homes: dict[bytes, str] = {}
        self.record_discos: dict[bytes, bytes] = {}
        self.resolver = Resolver()  # relay host names, looked up off the loop; kept across reloads
        self.relays_for: tuple[bytes, tuple[RelayEntry, ...]] | None = None  # (our key, [[relays]]) served
        self.peer_keys: frozenset[bytes] = frozenset()
        self.paths: Paths | None = None
        self.disco_for = b""  # the disco key `paths` was made with
        self.inband: InBand | None = None
        self.stun = StunProber([])
        self.stuns: list[tuple[str, int]] = []  # the relays' STUN servers, as configured (names resolve)
        self.next_lookup = 0.0
        self.interface = ""  # the node's tunnel: its addresses are no endpoints
        self.mark = 0  # the firewall mark on self.sock
        self.host_endpoints: list[Endpoint] = []
        self.requests = itertools.count(1)
        self.pings: dict[int, dict[str, Any]] = {}  # a user's ping -> its state, then its answer

    def configure(self, settings: Settings) -> None:
        self.flows.configure(settings)
        port = settings.node.listen_port
        self.workers = settings.actors.crypto
        self.outbox.connect([f"crypto-{w}" for w in range(self.workers)])
        if self.sock is None or self.sock.port != port:
            self.bind(port, settings.node.fwmark)
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
            self.relays.hint(self.relay_homes)
        self._mark(node.fwmark)
        now = time.monotonic()
        if not node.disco_key:
            raise ConfigError("magicsock needs the node's disco key (actors.registry: disco_key)")
        if self.paths is None or self.disco_for != node.disco_key:
            self.paths, self.disco_for = Paths(node.disco_key, node_key=node.public_key), node.disco_key
            self.inband = InBand(self.paths.public_key)
        assert self.inband is not None
        self.paths.set_peers({p.public_key: p.endpoints for p in settings.peers}, now)
        self.inband.configure([a.ip for a in node.addresses], {p.public_key: _addresses(p) for p in settings.peers})
        self.stuns = [r.stun for r in settings.relays]
        self.stun.set_servers(stun_servers(self.stuns, self.resolver.lookup), now)
        self.interface = node.interface
        self.refresh_endpoints(now)
        self.subscribe(LinkChanged.TAG)

    def change_peers(self, settings: Settings, changed: list[PeerSettings], removed: list[bytes]) -> None:
        """The peers' own changes alone (a one-peer `wg set` costs one peer's work)."""
        assert self.paths is not None and self.inband is not None
        self.peer_keys = frozenset(p.public_key for p in settings.peers)
        self.paths.change_peers({p.public_key: p.endpoints for p in changed}, removed, time.monotonic())
        self.inband.change_peers({p.public_key: _addresses(p) for p in changed}, removed)

    def _mark(self, mark: int) -> None:
        """The firewall mark on our UDP socket and relay connections (an exit node in use, or not)."""
        assert self.sock is not None
        try:
            if mark != self.mark:
                self.sock.set_mark(mark)
                self.mark = mark
            for link in self.relays.links:
                link.set_mark(mark)
        except OSError as err:
            raise ConfigError(f"cannot mark the underlay sockets: {err.strerror}") from None

    def bind(self, port: int, mark: int) -> None:
        try:
            new = UdpSocket(port, reuse_port=True, mark=mark)
        except OSError as err:
            raise ConfigError(f"cannot listen on UDP port {port}: {err.strerror}") from None
        if self.sock is not None:
            self.remove_reader(self.sock.fileno())
            self.sock.close()
        rebound = self.sock is not None
        self.sock, self.mark = new, mark
        self.add_reader(new.fileno(), self.on_readable)
        self.log.info("rebound" if rebound else "listening", port=new.port, gso=new.gso, gro=new.gro)

    # --- our endpoints

    def refresh_endpoints(self, now: float) -> None:
        """The host's addresses (on every interface but the tunnel) at our port, and STUN's."""
        assert self.sock is not None
        try:
            self.host_endpoints = local_endpoints(self.sock.port, exclude=[self.interface])
        except OSError as err:
            self.log.warning("cannot list the host's addresses", error=str(err))
            self.host_endpoints = []
        self.tell_endpoints(now)

    def tell_endpoints(self, now: float) -> None:
        if self.paths is not None:
            ours = list(dict.fromkeys([*self.host_endpoints, *self.stun.reflexive()]))
            self.paths.set_local_endpoints(ours, now)
            self.paths.set_nat(self.stun.mapping_varies())

    def link_changed(self, now: float) -> None:
        """An address or route changed: ask STUN again, tell peers where we are, and with the host's
        addresses changed, bind anew (as Tailscale rebinds), so nothing of the old ones lingers."""
        before = self.host_endpoints
        self.stun.refresh(now)
        self.refresh_endpoints(now)
        if self.sock is not None and self.host_endpoints != before:
            self.bind(self.sock.port, self.mark)

    # --- datagrams in

    def on_readable(self) -> None:
        assert self.sock is not None
        groups: dict[tuple[int, str, int], list[bytes]] = defaultdict(list)
        now = time.monotonic()
        for (host, port), datagrams in self.sock.recv_batch(RECV_BATCH):
            for data in datagrams:
                kind = classify(data)
                if kind is None:
                    self.underlay_in((host, port), data, now)
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
        self.flush_paths(now)

    def underlay_in(self, source: Endpoint, data: Buffer, now: float) -> None:
        """A datagram that is not WireGuard, read by us or a worker: disco, STUN, or nothing we speak."""
        kind = protocol(data)
        if kind is Protocol.DISCO and self.paths is not None:
            self.counters["disco_rx"] += 1
            self.paths.receive(data, source, now)
        elif kind is Protocol.STUN:
            self.counters["stun_rx"] += 1
            before = self.stun.reflexive()
            if self.stun.receive(data, source, now) and self.stun.reflexive() != before:
                self.tell_endpoints(now)
        else:
            self.counters["not_wireguard"] += 1

    def on_message(self, msg: Message) -> None:
        if self.flows.take(msg):
            return
        now = time.monotonic()
        if isinstance(msg, DatagramBatch):
            self.datagrams_out(msg)
        elif isinstance(msg, PathReport):
            self.path_report(msg, now)
        elif isinstance(msg, TsmpBatch):
            packets = self.unpack(msg.packets)
            if packets is not None and self.inband is not None:
                for packet in packets:
                    self.inband.receive(msg.peer, packet, now)
        elif isinstance(msg, UnderlayIn):
            packets = self.unpack(msg.packets)
            for data in packets or ():
                self.underlay_in((msg.host, msg.port), data, now)
        elif isinstance(msg, LinkChanged):
            if msg.interface != self.interface:  # our tunnel's own addresses are no endpoints
                self.link_changed(now)
        else:
            return super().on_message(msg)
        self.flush_paths(now)

    def path_report(self, msg: PathReport, now: float) -> None:
        paths, inband = self.paths, self.inband
        if paths is None or inband is None:
            return
        for peer in msg.active:
            paths.activity(peer, now)
        for peer in msg.handshakes:
            # A session through a relay is with a DERP client, which speaks disco: tell it our key.
            if peer in self.relays.heard_via:
                inband.advertise(peer)
        for entry in msg.demoted:
            try:
                peer, host, port, reason = entry
                paths.demote(peer, (str(host), int(port)), str(reason), now)
            except (TypeError, ValueError):
                self.count_drop("bad_path_report", repr(entry)[:80])

    # --- datagrams out

    def datagrams_out(self, msg: DatagramBatch) -> None:
        """A worker's datagrams: to an address from our socket, or through a relay."""
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
        """What a relay delivered, by source key: disco to the path finder, each key's WireGuard
        datagrams to the worker owning it."""
        now = time.monotonic()
        for key, datagrams in packets.items():
            if key not in self.peer_keys:
                self.counters["relay_unknown_peer"] += len(datagrams)
                continue
            wg = []
            for d in datagrams:
                if classify(d) is not None:
                    wg.append(d)
                elif protocol(d) is Protocol.DISCO and self.paths is not None:
                    self.counters["relay_disco_rx"] += 1
                    self.paths.receive(d, key, now)
                else:
                    self.counters["not_wireguard"] += 1
            if not wg:
                continue
            self.relays.heard(key, link)
            self.counters["relay_rx_datagrams"] += len(wg)
            self.flows.rx.add((*link.address, key), len(wg), sum(map(len, wg)))
            host, port = relayed(key)
            worker = f"crypto-{owner(key, self.workers)}"
            for blob in batch.pack_split(wg):
                self.outbox.send(worker, DatagramBatch(host=host, port=port, packets=blob))
        self.flush_paths(now)

    def flush_paths(self, now: float) -> None:
        """Send what disco, STUN and TSMP have to say; hand path choices to the workers."""
        paths, inband = self.paths, self.inband
        if paths is None or inband is None:
            return
        for peer, key in inband.learned:
            published = self.record_discos.get(peer)
            if published is not None and published != key:  # TSMP's is the one used (README: Coordination)
                self.counters["disco_key_not_the_records"] += 1
                if self._ratelimit.should_log(f"disco:{peer.hex()}", now) is not None:
                    self.log.warning("disco key differs from the mesh record's", peer=keys.b64(peer))
            if paths.set_disco_key(peer, key, now):
                inband.advertise(peer)  # it did not know ours either, most likely
                self.disco_key_learned(peer, now)
        inband.learned.clear()
        sends: list[tuple[Any, bytes]] = paths.datagrams_to_send()
        sends += self.stun.datagrams_to_send()
        for dest, data in sends:
            if isinstance(dest, bytes):
                link = self.relays.route(dest)
                if link is None or link.send(dest, [data], now):
                    self.counters["disco_relay_unreachable"] += 1
            elif self.sock is not None and self.sock.send_batch(Burst(dest, [data])):
                self.counters["disco_tx_dropped"] += 1
        for update in paths.path_updates():
            host, port = update.endpoint or ("", 0)
            worker = f"crypto-{owner(update.peer, self.workers)}"
            self.outbox.send(worker, PathSet(peer=update.peer, host=host, port=port, trusted_for=update.trusted_for))
        for peer, packet in inband.packets_to_send():
            self.outbox.send(f"crypto-{owner(peer, self.workers)}", TsmpBatch(peer=peer, packets=batch.pack([packet])))
        for result in paths.ping_results():
            if result.endpoint is not None:
                self.answer(result.request, f"direct {_path(result.endpoint)}", result.latency)
            else:
                link = self.relays.route(result.peer)
                self.answer(result.request, f"via relay {link.relay.name if link else '?'}", result.latency)
        for pong in inband.pongs():
            self.answer(pong.request, "in the tunnel", pong.latency)

    # --- a user's ping (meshsup ping --type disco|tsmp)

    def command(self, op: str, args: dict[str, Any]) -> dict[str, Any]:
        if op == "ping":
            return self.start_ping(args)
        if op == "ping_result":
            ping = self.pings.get(int(args.get("request", 0)))
            if ping is None:
                raise ValueError("no such ping")
            if "latency" in ping or ping["deadline"] <= time.monotonic():
                self.pings.pop(int(args["request"]))
                return {"done": True, "path": ping.get("path"), "latency": ping.get("latency")}
            return {"done": False}
        if op == "mesh_hints":  # all the hints, or with "removed" a change of the last ones
            hints = {keys.parse_key(k): v for k, v in dict(args.get("hints", {})).items() if isinstance(v, dict)}
            if "removed" not in args:
                self.relay_homes, self.record_discos = {}, {}
            for k in [*(keys.parse_key(str(k)) for k in args.get("removed", [])), *hints]:
                self.relay_homes.pop(k, None)
                self.record_discos.pop(k, None)
            for k, v in hints.items():
                if v.get("relay"):
                    self.relay_homes[k] = str(v["relay"])
                if v.get("disco"):
                    self.record_discos[k] = keys.parse_key(str(v["disco"]))
            self.relays.hint(self.relay_homes)
            return {}
        return super().command(op, args)

    def start_ping(self, args: dict[str, Any]) -> dict[str, Any]:
        kind, peer = args.get("type"), base64.b64decode(str(args.get("peer", "")))
        if kind not in PING_TYPES:
            raise ValueError(f"--type {kind} is not one magicsock answers")
        if peer not in self.peer_keys or self.paths is None or self.inband is None:
            raise ValueError("no such peer")
        now = time.monotonic()
        request = next(self.requests)
        self.pings[request] = {"deadline": now + PING_TIMEOUT, "peer": peer, "type": kind}
        if kind == "tsmp":
            if not self.inband.ping(peer, request, now):
                raise ValueError("the node and the peer share no IP version to ping over")
        elif self.paths.disco_key(peer) is None:
            self.inband.advertise(peer)  # its answering advertisement lets the ping go (disco_key_learned)
        else:
            self.paths.ping(peer, request, now)
        self.flush_paths(now)
        return {"request": request}

    def disco_key_learned(self, peer: bytes, now: float) -> None:
        assert self.paths is not None
        for request, ping in self.pings.items():
            if ping["peer"] == peer and ping["type"] == "disco" and "latency" not in ping:
                self.paths.ping(peer, request, now)

    def answer(self, request: int, path: str, latency: float | None) -> None:
        ping = self.pings.get(request)
        if ping is not None:
            ping.update(path=path, latency=latency)

    # --- the loop's turn

    def status(self) -> dict[str, Any]:
        info: dict[str, Any] = {"counters": dict(self.counters)}
        if self.sock is not None:
            info.update(port=self.sock.port, gso=self.sock.gso, gro=self.sock.gro)
        if self.relays.links:
            info["relays"] = self.relays.status()
            info["relay_routes"] = {keys.b64(k): link.relay.name for k, link in self.relays.heard_via.items()}
        if self.paths is not None and self.inband is not None:
            now = time.monotonic()
            info["paths"] = {
                keys.b64(p): self.paths.status(p, now) for p in self.peer_keys if self.paths.disco_key(p) is not None
            }
            info["disco"] = {
                "public_key": keys.b64(self.paths.public_key),
                "endpoints": [_path(e) for e in [*self.host_endpoints, *self.stun.reflexive()]],
                "mapping_varies": self.stun.mapping_varies(),
                "counters": dict(self.paths.counters + self.inband.counters + self.stun.counters),
            }
        return info

    def tick(self, now: float) -> None:
        self.relays.tick(now)
        if self.paths is not None:
            due = self.paths.get_timer()
            if due is not None and due <= now:
                self.paths.handle_timer(now)
            if now >= self.next_lookup:  # a relay's name may have resolved since
                self.next_lookup = now + 1.0
                self.stun.set_servers(stun_servers(self.stuns, self.resolver.lookup), now)
            due = self.stun.get_timer()
            if due is not None and due <= now:
                before = self.stun.reflexive()
                self.stun.handle_timer(now)
                if self.stun.reflexive() != before:
                    self.tell_endpoints(now)
            if self.inband is not None:
                self.inband.expire(now - PING_TIMEOUT)
            for request in [r for r, p in self.pings.items() if p["deadline"] < now - 30]:
                del self.pings[request]  # answered or not, nobody asked for it
            self.flush_paths(now)
        self.relays.flush(now)
        self.flows.tick(now)

    def close(self) -> None:
        self.relays.close()
        self.flows.close()
        if self.sock is not None:
            self.sock.close()


def _path(endpoint: Endpoint) -> str:
    host, port = endpoint
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _addresses(peer: PeerSettings) -> list[Address]:
    """Where in-band (TSMP) messages to a peer go: its own addresses, else its networks'."""
    return [n.network_address for n in (peer.hosts or peer.allowed_ips)]

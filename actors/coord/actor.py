"""The coord actor: publishes the node's record in the mesh's bucket and hands the supervisor
everyone else's, as peers, whenever they change.

    supervisor --Configure--> settings: name, keys, addresses, routes (the record's static part)
    supervisor --Command local--> disco key, endpoints, home relay (from magicsock's status)
    NATS (link.py, a thread) --Entry/Up/Down/Written--> MeshView (mesh.py) -> MeshPeers -> supervisor

The peers go to the supervisor whole once (after the first catch-up, a reconnection elsewhere,
or when it asks: it missed one), then as changes: the view decides again only around the
records that changed, and a MeshPeers carries only the peers that changed and the keys gone.

The record is written when it changes and every third of its lifetime; a node without
configured addresses first takes them from the pools (alloc.py). Stopping deletes the record,
so the node is gone from its peers at once rather than after a lifetime.
"""

from __future__ import annotations

import ipaddress
import time
from math import inf
from typing import Any

from meshsup.actors.base import Actor, ConfigError, give_back_memory
from meshsup.actors.bus.endpoints import Runtime
from meshsup.actors.bus.messages import MeshPeers
from meshsup.actors.coord import alloc
from meshsup.actors.coord.link import Down, Entry, Link, Problem, Up, Written
from meshsup.actors.coord.mesh import MeshView, owner_text
from meshsup.actors.coord.record import NodeRecord, addr_key, node_key
from meshsup.actors.settings import Settings
from meshsup.actors.settings.coordination import CoordinationSettings
from meshsup.actors.settings.keys import parse_key
from meshsup.actors.settings.node import IPNetwork, parse_endpoint
from meshsup.actors.settings.wire import encode

PUSH_INTERVAL = 0.1  # at most this often a new peer set to the supervisor: a flood is coalesced
ECHO_GRACE = 1.0  # our own write not seen on the watch in this long: nothing expires until it is
WATCH_GRACE = 3.0  # ... and in this long: the watch is started again
# The first record waits this long at most for the supervisor to say what magicsock found, which it
# does once the node is ready and has the mesh's peers: a record out before then draws handshakes
# the node drops (each lost first one costs 5 s), and one without endpoints is rewritten at once.
LOCAL_WAIT = 30.0


class CoordActor(Actor):
    kind = "coord"

    def __init__(self, name: str, runtime: Runtime) -> None:
        super().__init__(name, runtime)
        self.settings: Settings | None = None
        self.link: Link | None = None
        self.view: MeshView | None = None
        self.local: dict[str, Any] = {"disco": "", "endpoints": [], "relay": ""}
        self.local_told = False  # the supervisor has said what self.local holds
        self.addresses: dict[int, IPNetwork] = {}  # taken from the pools, by IP version
        self.taking: dict[int, IPNetwork] = {}  # compare-and-set in flight
        self.refused: set[IPNetwork] = set()  # lost a compare-and-set: not tried again
        self.exhausted: set[IPNetwork] = set()  # pools with no candidate left
        self.written: bytes = b""  # the record as last written
        self.written_revision = 0  # its revision, once the write is acknowledged
        self.echo_since: float | None = None  # since when a write of ours waits to be seen on the watch
        self.rewatched = 0.0
        self.next_refresh = 0.0
        self.pushed: tuple[list[str], dict[str, Any]] | None = None  # addresses, policy; None: whole due
        self.seq = 0  # of the MeshPeers sent: a change names the one it follows
        self.next_push = 0.0
        self.up = False
        self.down_since: float | None = None  # monotonic: since when the bucket is out of reach
        self.last_error = ""
        self.started = time.monotonic()
        self.counters: dict[str, int] = {}

    # --- configuration and the supervisor's news -----------------------------------
    def configure(self, settings: Settings) -> None:
        coordination = settings.coordination
        if coordination is None:
            raise ConfigError("no [coordination] in the settings")
        previous = self.settings.coordination if self.settings is not None else None
        self.settings = settings
        if coordination != previous:
            self._connect(coordination, previous)
        self.next_refresh = 0.0  # the record may have changed: written at the next tick

    def _connect(self, coordination: CoordinationSettings, previous: CoordinationSettings | None) -> None:
        """A link and a view for `coordination`; on a reload that changed it, in place of the old
        ones. The record leaves a mesh the node leaves; in the same bucket it stays (others see no
        change), as do the peers until the new watch has caught up."""
        assert self.settings is not None
        if self.link is not None:
            if previous is not None and previous.bucket != coordination.bucket and self.written:
                self.link.delete(node_key(self.settings.node.name), 1.0)
            self.remove_reader(self.link.wake)
            self.link.close()
            self.log.info("coordination changed, connecting again", servers=list(coordination.servers))
        self.view = MeshView(coordination)
        self.link = Link(coordination, f"meshsup-{self.settings.node.name}")
        self.addresses, self.taking, self.refused, self.exhausted = {}, {}, set(), set()
        self.written, self.written_revision, self.echo_since = b"", 0, None
        self.pushed, self.up, self.down_since = None, False, None  # nothing pushed before the catch-up
        self.started = time.monotonic()
        self.add_reader(self.link.wake, self._on_link)
        self.link.start()

    def command(self, op: str, args: dict[str, Any]) -> dict[str, Any]:
        if op == "whole":
            self.pushed = None  # the supervisor missed a change: the whole set at the next push
            return {}
        if op != "local":
            raise ConfigError(f"unknown command {op!r}")
        try:
            disco = str(args.get("disco") or "")
            if disco:
                parse_key(disco)
            endpoints = [str(e) for e in args.get("endpoints", [])]
            for e in endpoints:
                parse_endpoint(e)
        except ValueError as err:
            raise ConfigError(f"local: {err}") from None
        local = {"disco": disco, "endpoints": endpoints, "relay": str(args.get("relay") or "")}
        self.local_told = True
        if local != self.local:
            self.log.info("record's endpoints changed", endpoints=endpoints, relay=local["relay"])
            self.local = local
            self.next_refresh = 0.0
        return {}

    # --- the bucket ---------------------------------------------------------------
    def _on_link(self) -> None:
        assert self.link is not None and self.view is not None
        now = time.monotonic()
        for event in self.link.take():
            if isinstance(event, Entry):
                refused = self.view.apply(event.key, event.value, event.revision, event.age, now)
                if refused and refused != "replayed":
                    self._ratelimited_warning("record refused", event.key, refused)
            elif isinstance(event, Up):
                self.up, self.down_since = True, None
                self.view.resume(now)
                self.log.info("coordination up", revision=self.view.revision, records=len(self.view.records))
            elif isinstance(event, Down):
                if self.up:
                    self.log.warning("coordination down, keeping the mesh as it is", reason=event.reason)
                else:
                    self._ratelimited_warning("coordination unreachable", "", event.reason)
                self.up, self.last_error = False, event.reason
                self.down_since = self.down_since or now
                self.view.pause(now)
                self._count("down")
            elif isinstance(event, Problem):
                self.last_error = event.reason
                self._count("client_error")
                self._ratelimited_warning("coordination client error", "", event.reason)
            elif isinstance(event, Written):
                self._on_written(event, now)
        for key, what in self.view.notes:
            self._ratelimited_warning("address claim mismatch", key, what)
        self.view.notes.clear()

    def _on_written(self, event: Written, now: float) -> None:
        assert self.settings is not None
        version = next((v for v, a in self.taking.items() if addr_key(a) == event.key), None)
        if version is not None:
            address = self.taking.pop(version)
            if event.ok:
                self.addresses[version] = address
                self.log.info("address taken", address=str(address))
                self.next_refresh = 0.0
            else:
                self.refused.add(address)
                self._count("address_race_lost" if event.error == "wrong_revision" else "write_failed")
        elif event.key == node_key(self.settings.node.name):
            if event.ok:
                self.written_revision = event.revision
            else:
                self.written = b""  # written again at the next tick
                self.next_refresh = now + 1.0
                self._count("write_failed")
                self._ratelimited_warning("record not written", event.key, event.error)

    def _allocate(self, now: float) -> None:
        """Take an address from each pool the node has none of yet, one compare-and-set at a time."""
        assert self.settings is not None and self.settings.coordination is not None and self.view is not None
        assert self.link is not None
        me = self.settings.node.public_key
        for pool in (self.settings.coordination.pool4, self.settings.coordination.pool6):
            if pool.version in self.addresses or pool.version in self.taking:
                continue
            held = alloc.held(self.view, pool, me)
            if held is not None:
                self.addresses[pool.version] = held
                continue
            take = alloc.next_take(self.view, pool, me, self.refused, now)
            if take is None:
                if pool not in self.exhausted:
                    self.exhausted.add(pool)  # counted once; tried again each tick, as addresses come free
                    self._count("pool_exhausted")
                    self.log.error("no free address in the pool", pool=str(pool))
                continue
            self.exhausted.discard(pool)
            self.taking[pool.version] = take.address
            self.link.take_over(addr_key(take.address), owner_text(me), take.revision)

    def _record(self) -> NodeRecord | None:
        assert self.settings is not None and self.settings.coordination is not None
        node = self.settings.node
        if self.settings.coordination.allocate:
            if len(self.addresses) < 2:
                return None
            addresses = tuple(self.addresses[v] for v in sorted(self.addresses))
        else:
            addresses = tuple(ipaddress.ip_network(a.ip) for a in node.addresses)
        return NodeRecord(
            name=node.name,
            public_key=node.public_key,
            disco_key=parse_key(self.local["disco"]) if self.local["disco"] else b"",
            addresses=addresses,
            endpoints=tuple(parse_endpoint(e) for e in self.local["endpoints"]),
            relay=self.local["relay"],
            routes=node.advertise_routes,
            exit=node.advertise_exit_node,
        )

    def tick(self, now: float) -> None:
        if self.link is None or self.view is None or self.settings is None:
            return
        assert self.settings.coordination is not None
        if self.view.expire(now, inf if self.echo_since is None else self.echo_since):
            self._count("expired")
        if self.up:
            if self.settings.coordination.allocate:
                self._allocate(now)
            record = self._record()
            if not self.local_told and now < self.started + LOCAL_WAIT:
                record = None
            if record is not None and (record.encode() != self.written or now >= self.next_refresh):
                self.written = record.encode()
                self.next_refresh = now + self.settings.coordination.lifetime / 3
                self.written_revision = 0
                self.echo_since = now if self.echo_since is None else self.echo_since
                self.link.put(node_key(record.name), self.written)
            self._check_echo(now)
        if now >= self.next_push:
            self._push(now)

    def _check_echo(self, now: float) -> None:
        """Our own write not seen back on the watch: the watch may be stuck (its server gone, a
        new one not yet noticed) or writes failing. Until it comes back nothing expires, since what
        we do not hear may be alive; if it takes long, the watch is started again."""
        assert self.view is not None and self.link is not None
        if self.echo_since is None:
            return
        if self.written_revision and self.view.revision >= self.written_revision:
            self.echo_since = None
            self.view.resume(now)
        elif now - self.echo_since > ECHO_GRACE:
            self.view.pause(self.echo_since)
            if now - max(self.echo_since, self.rewatched) > WATCH_GRACE:
                self._count("watch_stalled")
                self.rewatched = now
                self.link.rewatch()

    def _push(self, now: float) -> None:
        assert self.view is not None and self.settings is not None
        if self.pushed is None and not self.up:
            return  # nothing to say before the first catch-up
        node = self.settings.node
        change = self.view.update(node.public_key, node.exit_node)
        addresses = [str(self.addresses[v]) for v in sorted(self.addresses)] if len(self.addresses) == 2 else []
        if self.pushed is None:
            peers, removed, hints = self.view.peers(node.public_key, node.exit_node), [], self.view.hints()
        elif change or (addresses, self.view.policy) != self.pushed:
            peers, removed, hints = change.peers, change.removed, change.hints
        else:
            return
        self.seq += 1
        whole = self.pushed is None
        encoded = [encode(p) for p in peers]
        self._send(MeshPeers(self.view.revision, encoded, addresses, self.view.policy, hints, self.seq, whole, removed))
        self.pushed = addresses, self.view.policy
        self.next_push = now + PUSH_INTERVAL
        if whole:
            give_back_memory()  # what the catch-up's decoding and the encoding left free

    # --- the rest -------------------------------------------------------------------
    def _count(self, what: str) -> None:
        self.counters[what] = self.counters.get(what, 0) + 1

    def _ratelimited_warning(self, event: str, key: str, reason: str) -> None:
        if self._ratelimit.should_log(f"{event}:{key}", time.monotonic()) is not None:
            self.log.warning(event, key=key[:80], reason=reason[:200])

    def status(self) -> dict[str, Any]:
        # Out of reach: since a Down, or since the start while it never came up (health.py warns)
        since = self.down_since if self.down_since is not None else None if self.up else self.started
        info: dict[str, Any] = {
            "counters": dict(self.counters),
            "up": self.up,
            "local": self.local,
            "down_for": 0.0 if since is None else time.monotonic() - since,
            "last_error": self.last_error,
        }
        if self.view is not None:
            info["mesh"] = self.view.status()
        info["addresses"] = [str(a) for _, a in sorted(self.addresses.items())]
        info["record_revision"] = self.written_revision
        return info

    def close(self) -> None:
        if self.link is None:
            return
        if self.settings is not None and self.written:
            self.link.delete(node_key(self.settings.node.name), 1.0)
        self.link.close()

"""The dns actor: the DNS controller, serving on its own asyncio loop.

The server is asyncio (many upstream connections at once); the actor loop is
ZeroMQ. The server runs on a thread of this process, and the two meet only
through `run_coroutine_threadsafe` and `call_soon_threadsafe`: no state is
shared between the bus side and the DNS side beyond those hand-offs.
Several workers share the listen ports with SO_REUSEPORT.

Learned names go onto the bus from the DNS thread itself, through a socket
of its own (a ZeroMQ socket belongs to one thread): handing each to the
actor thread would cost two GIL hand-offs per forwarded answer.
"""

from __future__ import annotations

import asyncio
import gc
import resource
import threading
from collections.abc import Callable
from typing import Any

import zmq

from meshsup.actors.base import Actor, ConfigError
from meshsup.actors.bus.codec import Message, encode
from meshsup.actors.bus.messages import LinkChanged, NameLearned
from meshsup.actors.dns.interception import open_intercept_sockets
from meshsup.actors.dns.server import DnsServer
from meshsup.actors.routing.prefixes import IPNetwork
from meshsup.actors.settings import DnsSettings, PeerSettings, Settings
from meshsup.actors.settings.dns import host_label
from meshsup.actors.settings.node import format_endpoint

START_TIMEOUT = 5.0
GC_YOUNG_THRESHOLD = 50_000  # allocations between young collections (Python's default: 700)
LEARNED_HWM = 10_000  # learned names queued for the bus; beyond it ZeroMQ drops them, as PUB does
_SUBSCRIBE, _UNSUBSCRIBE = b"\x01", b"\x00"  # the first byte of what an XPUB is told


class LearnedEvents:
    """Publishes learned names, on the DNS thread. An XPUB rather than a PUB:
    the subscriptions it is sent say whether anyone listens for learned names,
    and while no one does the server is told not to learn any (reading the
    addresses out of every forwarded answer, and building and encoding a
    message PUB would then drop, is a tenth of the cost of forwarding).
    Subscriptions are read every SUBSCRIPTION_CHECK seconds: a new subscriber
    hears of names learned from then on, as with any PUB socket (its
    subscription takes a moment to arrive anyway)."""

    TOPIC = NameLearned.TAG.encode()
    SUBSCRIPTION_CHECK = 0.1

    def __init__(self, ctx: zmq.Context, address: str) -> None:
        self.sock = ctx.socket(zmq.XPUB)
        self.sock.setsockopt(zmq.SNDHWM, LEARNED_HWM)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(address)
        self._topics: set[bytes] = set()
        self._listened = False
        self._on_listening: Callable[[bool], None] = lambda listening: None
        self._timer: asyncio.TimerHandle | None = None
        self.learned = 0
        self.published = 0

    def follow(self, on_listening: Callable[[bool], None]) -> None:
        """From now on (on the running loop), every SUBSCRIPTION_CHECK seconds:
        read the subscriptions, and tell on_listening whether anyone listens."""
        self._on_listening = on_listening
        self._check()

    def _check(self) -> None:
        self._read_subscriptions()
        self._on_listening(self._listened)
        self._timer = asyncio.get_running_loop().call_later(self.SUBSCRIPTION_CHECK, self._check)

    def publish(self, name: str, addresses: tuple[str, ...]) -> None:
        self.learned += 1
        if self._listened:
            message = NameLearned(name=name, addresses=list(addresses))
            self.sock.send_multipart([self.TOPIC, encode(message)])  # never blocks: beyond the HWM it drops
            self.published += 1

    def _read_subscriptions(self) -> None:
        while self.sock.poll(0):
            frame = self.sock.recv()
            if frame[:1] == _SUBSCRIBE:
                self._topics.add(frame[1:])
            elif frame[:1] == _UNSUBSCRIBE:
                self._topics.discard(frame[1:])
        self._listened = any(self.TOPIC.startswith(topic) for topic in self._topics)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self.sock.close(0)


def mesh_change(
    node_settings: Settings, old: DnsSettings, gone: list[PeerSettings], changed: list[PeerSettings]
) -> tuple[DnsSettings, dict[str, tuple[str, ...]], tuple[list[IPNetwork], list[IPNetwork]]]:
    """What a change of peers (`gone` as they were, `changed` as they are now) makes of the DNS
    settings `old`: the new settings, the names whose addresses changed (none: the name is gone),
    and the mesh's ranges gone and added. Only these peers' are looked at. ValueError if a name is
    not one."""
    settings = node_settings.dns_peers_changed(old, gone, changed)
    labels = {host_label(p.name) for p in (*gone, *changed)}
    names = {h: settings.names.get(h, ()) for h in labels}
    names = {h: a for h, a in names.items() if a != old.names.get(h, ())}
    ranges = [n for p in gone for n in p.allowed_ips], [n for p in changed for n in p.allowed_ips]
    return settings, names, ranges


class DnsActor(Actor):
    kind = "dns"

    def __init__(self, name: str, runtime: Any) -> None:
        super().__init__(name, runtime)
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 8192)), hard))
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="dns", daemon=True)
        self.thread.start()
        self.server: DnsServer | None = None
        self.settings: DnsSettings | None = None
        self.learned_events = self._call(self._open_learned_events())
        self.subscribe(LinkChanged.TAG)
        if self.intercept_problems:
            self.log.warning("some interception sockets did not open", problems=self.intercept_problems)

    def bind_runtime(self) -> None:
        # Still root: the only moment this worker may make sockets transparent (interception.py).
        self.intercept_socks, self.intercept_problems = open_intercept_sockets()

    async def _open_learned_events(self) -> LearnedEvents:
        return LearnedEvents(self.ctx, self.runtime.publish_to)

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(START_TIMEOUT)

    def configure(self, node_settings: Settings) -> None:
        settings = node_settings.dns_for_mesh()
        if settings == self.settings:
            return
        try:
            if self.server is None:
                server = DnsServer(settings, on_learned=self.learned_events.publish, intercept=self.intercept_socks)
                self._call(server.start())
                self.server = server
                self.loop.call_soon_threadsafe(self.learned_events.follow, server.set_learning)
                # What the process holds now (much of it inherited from the fork
                # server) lives as long as it does: the collector need not walk
                # it again on every full collection, each a pause of the DNS
                # thread that grows with the heap (nor dirty its shared pages).
                gc.freeze()
                # Each forwarded query makes a few short-lived containers: with
                # the default 700, young collections run every few hundred
                # queries and walk every flight under way each time.
                gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])
            else:
                self._call(self.server.reconfigure(settings))
        except OSError as err:
            listen = ", ".join(format_endpoint(host, port) for host, port in settings.listen)
            raise ConfigError(f"cannot listen on {listen}: {err}") from None
        self.settings = settings

    def change_peers(self, node_settings: Settings, changed: list[PeerSettings], removed: list[bytes]) -> None:
        """The changed peers' names alone (a one-peer `wg set` among thousands changes one name)."""
        old = self.settings
        if self.server is None or old is None or self.running is None:
            self.configure(node_settings)
            return
        keys = {*removed, *(p.public_key for p in changed)}
        gone = [p for p in self.running.peers if p.public_key in keys]
        try:
            settings, names, ranges = mesh_change(node_settings, old, gone, changed)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        self._call(self.server.change_names(settings, names, ranges))
        self.settings = settings

    def on_message(self, msg: Message) -> None:
        if isinstance(msg, LinkChanged) and self.server is not None:
            self.loop.call_soon_threadsafe(self.server.flush_cache)
        else:
            super().on_message(msg)

    def status(self) -> dict[str, Any]:
        server = self.server
        if server is None:
            return {}

        async def read() -> tuple[dict[str, int], dict[str, Any]]:  # read on the DNS thread, where they change
            return server.counters(), server.upstream_latency(), server.upstreams()

        events = self.learned_events
        learned = {"learned_names": events.learned, "learned_published": events.published}
        counters, latency, upstreams = self._call(read())
        return {"counters": {**counters, **learned}, "upstream_latency": latency, "upstreams": upstreams}

    def close(self) -> None:
        if self.server is not None:
            try:
                self._call(self.server.close())
            except Exception:  # shutting down: a slow close must not block exit
                pass

        async def close_learned_events() -> None:
            self.learned_events.close()

        try:
            self._call(close_learned_events())
        except Exception:
            pass
        self.loop.call_soon_threadsafe(self.loop.stop)

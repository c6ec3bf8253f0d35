"""The dns actor: the DNS controller, serving on its own asyncio loop.

The server is asyncio (many upstream connections at once); the actor loop is
ZeroMQ. The server runs on a thread of this process, and the two meet only
through `run_coroutine_threadsafe` and `call_soon_threadsafe`: no state is
shared between the bus side and the DNS side beyond those hand-offs.
Several workers share the listen ports with SO_REUSEPORT.

Learned names go onto the bus from the DNS thread itself, through a PUB
socket of its own (a ZeroMQ socket belongs to one thread): handing each to
the actor thread would cost two GIL hand-offs per forwarded answer.
"""
from __future__ import annotations

import asyncio
import ipaddress
import resource
import threading
from typing import Any

import zmq

from actors.base import Actor, ConfigError
from actors.bus.codec import Message, encode
from actors.bus.messages import LinkChanged, NameLearned
from actors.dns.server import DnsServer
from actors.dns.settings import DnsSettings

START_TIMEOUT = 5.0
LEARNED_HWM = 10_000  # learned names queued for the bus; beyond it ZeroMQ drops them, as PUB does


def mesh_names(config: dict[str, Any]) -> dict[str, list[str]]:
    """host label -> addresses, for the node and every peer (peers' single-host allowed IPs)."""
    node = config["node"]
    names = {node["name"]: [a.split("/")[0] for a in node["addresses"]]}
    for p in config["peers"]:
        hosts = [str(n.network_address) for n in map(ipaddress.ip_network, p["allowed_ips"])
                 if n.prefixlen == n.max_prefixlen]
        names[p["name"]] = hosts
    return names


def dns_settings(config: dict[str, Any]) -> DnsSettings:
    return DnsSettings.from_config(config["dns"], mesh_names(config))


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
        self.learned_published = 0
        self.learned_events = self._call(self._open_learned_events())
        self.subscribe(LinkChanged.TAG)

    async def _open_learned_events(self) -> zmq.Socket:
        sock = self.ctx.socket(zmq.PUB)
        sock.setsockopt(zmq.SNDHWM, LEARNED_HWM)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.runtime.events_in)
        return sock

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(START_TIMEOUT)

    def configure(self, config: dict[str, Any]) -> None:
        super().configure(config)
        try:
            settings = dns_settings(config)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        if settings == self.settings:
            return
        try:
            if self.server is None:
                server = DnsServer(settings, on_learned=self._learned)
                self._call(server.start())
                self.server = server
            else:
                self._call(self.server.reconfigure(settings))
        except OSError as err:
            raise ConfigError(f"cannot listen on {', '.join(config['dns'].get('listen', []))}: {err}") from None
        self.settings = settings

    def _learned(self, name: str, addresses: tuple[str, ...]) -> None:
        """On the DNS thread, with the DNS thread's own socket."""
        message = NameLearned(name=name, addresses=list(addresses))
        self.learned_events.send_multipart([message.TAG.encode(), encode(message)])  # PUB never blocks
        self.learned_published += 1

    def on_message(self, msg: Message) -> None:
        if isinstance(msg, LinkChanged) and self.server is not None:
            self.loop.call_soon_threadsafe(self.server.flush_cache)
        else:
            super().on_message(msg)

    def status(self) -> dict[str, Any]:
        server = self.server
        if server is None:
            return {}

        async def read() -> dict[str, int]:  # read on the DNS thread, where they change
            return server.counters()

        return {"counters": {**self._call(read()), "learned_published": self.learned_published}}

    def close(self) -> None:
        if self.server is not None:
            try:
                self._call(self.server.close())
            except Exception:  # shutting down: a slow close must not block exit
                pass

        async def close_learned_events() -> None:
            self.learned_events.close(0)

        try:
            self._call(close_learned_events())
        except Exception:
            pass
        self.loop.call_soon_threadsafe(self.loop.stop)


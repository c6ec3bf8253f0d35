"""Actor kinds, the order they start in, and how a process becomes one."""

from __future__ import annotations

import importlib
from multiprocessing.reduction import DupFd
from typing import Any

from meshsup.actors.bus.endpoints import Runtime
from meshsup.actors.settings import Settings
from meshsup.actors.settings.relay import RelayConfig

# Start order follows the seed engine's dependencies: flow logging before
# the router (first packets counted), the router before the dataplane
# (the TUN exists), magicsock before crypto (keys before peers), DNS last
# (it may listen on the tunnel address).
START_ORDER = ("netlog", "router", "magicsock", "crypto", "tun-io", "dns")
# A relay (`meshsup relay`) runs only its workers.
RELAY_ORDER = ("relay",)
SCALABLE = frozenset({"crypto", "dns", "relay"})

_CLASSES = {
    "netlog": "meshsup.actors.netlog.actor:NetlogActor",
    "router": "meshsup.actors.router.actor:RouterActor",
    "magicsock": "meshsup.actors.magicsock.actor:MagicsockActor",
    "crypto": "meshsup.actors.crypto.actor:CryptoActor",
    "tun-io": "meshsup.actors.tunio.actor:TunIoActor",
    "dns": "meshsup.actors.dns.actor:DnsActor",
    "relay": "meshsup.actors.relay.actor:RelayActor",
}

# Imported by the fork server once, so a restart only forks.
PRELOAD = ["zmq", "msgpack", "structlog", "setproctitle", "meshsup.actors.base"] + [
    path.split(":")[0] for path in _CLASSES.values()
]


def start_order(config: Settings | RelayConfig) -> tuple[str, ...]:
    """The kinds a config runs, in start order: a relay's, or a node's."""
    return RELAY_ORDER if isinstance(config, RelayConfig) else START_ORDER


def actor_name(kind: str, index: int) -> str:
    return f"{kind}-{index}" if kind in SCALABLE else kind


class InheritedFd:
    """A descriptor the supervisor hands an actor at spawn. Pickled into the
    process's arguments, multiprocessing passes a duplicate along with them
    (to the fork server and on to the child); the child sees a plain int."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return _inherit, (DupFd(self.fd),)


def _inherit(dup: Any) -> int:
    return int(dup.detach())


def run_actor(kind: str, name: str, state_dir: str, tun_queue: int | None = None) -> None:
    """The body of an actor process (target of the supervisor's spawn). A crypto
    worker may get its queue of the TUN (see supervisor/resources.py, TunQueues)."""
    from setproctitle import setproctitle

    from meshsup.actors.base import crash_on_start_requested, exit_now

    setproctitle(f"meshsup: {name}")
    if crash_on_start_requested(kind):
        exit_now(3)
    module, cls = _CLASSES[kind].split(":")
    extra = {} if tun_queue is None else {"tun_queue": tun_queue}
    actor = getattr(importlib.import_module(module), cls)(name, Runtime(state_dir), **extra)
    exit_now(actor.run())

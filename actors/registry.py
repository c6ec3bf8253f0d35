"""Actor kinds, the order they start in, and how a process becomes one."""

from __future__ import annotations

import importlib
import multiprocessing
import os
from dataclasses import dataclass, replace
from multiprocessing import forkserver, resource_tracker
from multiprocessing.reduction import DupFd
from typing import Any

from meshsup.actors.bus.endpoints import Runtime
from meshsup.actors.kernel.privileges import CAP_NET_BIND_SERVICE, Account, Drop, unprivileged_account
from meshsup.actors.settings import PeerSettings, Settings
from meshsup.actors.settings import wire as settings_wire
from meshsup.actors.settings.relay import RelaySettings

AnySettings = Settings | RelaySettings

# Start order follows the seed engine's dependencies: flow logging before
# the router (first packets counted), the router before the dataplane
# (the TUN exists), magicsock before crypto (the port before peers), DNS last
# (it may listen on the tunnel address).
START_ORDER = ("netlog", "router", "magicsock", "crypto", "tun-io", "dns")
# With [coordination], coord comes last in the order (it stops first: its record goes before the
# node does), but it starts at once: it needs no other actor, and its connection to NATS and catch-up
# overlap the rest of the start (a newcomer is reached sooner). Peers it hands over while others
# still start reach them in their first Configure.
COORD_ORDER = (*START_ORDER, "coord")
# A relay (`meshsup relay`) runs only its workers.
RELAY_ORDER = ("relay",)
# What a kind waits for before it starts (every actor of these kinds running): START_ORDER's reasons
# and no more, so the rest start side by side: the crypto workers together, DNS (which builds a zone
# of every peer's name) beside the dataplane, as it needs only the router's tunnel address.
STARTS_AFTER: dict[str, tuple[str, ...]] = {
    "netlog": (),
    "router": ("netlog",),
    "magicsock": ("router",),
    "crypto": ("magicsock",),
    "tun-io": ("crypto",),
    "dns": ("router",),
    "coord": (),
    "relay": (),
}
SCALABLE = frozenset({"crypto", "dns", "relay"})
EXIT_NO_DROP = 77  # EX_NOPERM: the exit of an actor that would have stayed root


@dataclass(frozen=True, slots=True)
class Kind:
    """What a kind of actor is given: the one place that decides who holds keys and who runs as root."""

    cls: str  # module:class
    keys: bool = False  # its settings carry the private key and the preshared keys
    # With [[relays]], its settings carry the private key (no preshared keys): it logs in to the relays as the node.
    login_key: bool = False
    disco_key: bool = False  # its settings carry the node's disco key (it runs disco)
    # None: it stays root with every capability; else it runs as the unprivileged
    # user (actors.kernel.privileges) with only these capabilities.
    caps: frozenset[int] | None = None
    state_dirs: tuple[str, ...] = ()  # in the state dir, the kind's user's (made before it starts)
    # Its own user when unprivileged (deploy/setup.sh makes it, in the group meshsup), so that no other
    # kind may signal it or touch its files; without it, the shared user (actors.kernel.privileges).
    user: str = ""


# Why each stays root or not (README: Privileges): the router changes links,
# addresses and routes (netlink) and rewrites /etc/resolv.conf; tun-io opens
# the TUN and loads the eBPF steering program; magicsock and the crypto
# workers share the listen port with SO_REUSEPORT, which the kernel allows
# only within one uid, and the workers hold the keys: not the uid of DNS and
# netlog. Only the crypto workers use the keys; magicsock routes datagrams by
# their receiver index, but with [[relays]] it logs in to them with the
# node's private key (a DERP relay knows a node by its WireGuard key, and the
# login proves it holds it), so then it gets that key too. It always gets the
# disco key, which seals disco's boxes and is not the WireGuard key. DNS and netlog read what
# strangers send (queries, upstream answers, collector replies): they run
# unprivileged, DNS keeping only the right to bind port 53.
KINDS = {
    # state_dirs: its window log and its spool (actors/netlog/actor.py)
    "netlog": Kind(
        "meshsup.actors.netlog.actor:NetlogActor",
        caps=frozenset(),
        state_dirs=("netlog", "spool"),
        user="meshsup-netlog",
    ),
    "router": Kind("meshsup.actors.router.actor:RouterActor"),
    "magicsock": Kind("meshsup.actors.magicsock.actor:MagicsockActor", login_key=True, disco_key=True),
    "crypto": Kind("meshsup.actors.crypto.actor:CryptoActor", keys=True),
    "tun-io": Kind("meshsup.actors.tunio.actor:TunIoActor"),
    "dns": Kind("meshsup.actors.dns.actor:DnsActor", caps=frozenset({CAP_NET_BIND_SERVICE}), user="meshsup-dns"),
    # coord reads what anyone who can write to the mesh's bucket wrote: it runs unprivileged, and
    # needs no key (a record holds public keys only).
    "coord": Kind("meshsup.actors.coord.actor:CoordActor", caps=frozenset(), user="meshsup-coord"),
    # A relay worker uses the relay's key, and stays root: it reads the TLS key (root's file) on
    # every configuration, so that a reload takes a renewed certificate.
    "relay": Kind("meshsup.actors.relay.actor:RelayActor", keys=True),
}

# Imported by the fork server once, so a restart only forks.
PRELOAD = [
    *("zmq", "msgpack", "structlog", "setproctitle", "meshsup.actors.base"),
    *(k.cls.split(":")[0] for k in KINDS.values()),
    "meshsup.actors.preloaded",  # last: it freezes what the others loaded
]


def fork_context() -> Any:
    """The multiprocessing context actors are forked from: a fork server that preloads every kind."""
    _no_resource_tracker()
    mp = multiprocessing.get_context("forkserver")
    mp.set_forkserver_preload(PRELOAD)
    return mp


def _no_resource_tracker() -> None:
    """Spare the node multiprocessing's resource tracker, a process of its own (13 MiB resident)
    that would unlink named semaphores and shared memory left when the node dies: the node makes
    none. The tracker counts as running while its pipe takes writes, and /dev/null takes them all,
    so none is started, and a process that registered something anyway writes to nowhere."""
    tracker = resource_tracker._resource_tracker
    if tracker._fd is None:
        tracker._fd = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)


def start_fork_server() -> None:
    """The fork server started now (else the first actor's spawn starts it): it imports every kind
    (PRELOAD, about a second) while the supervisor goes on with its own start."""
    fork_context()
    forkserver.ensure_running()


def kind_of(name: str) -> str:
    """The kind of an actor by its name (actor_name)."""
    return name if name in KINDS else name.rpartition("-")[0]


def unprivileged(kind: str) -> bool:
    return KINDS[kind].caps is not None


def account_of(kind: str) -> Account:
    """The user an unprivileged kind runs as (PrivilegeError if there is none)."""
    return unprivileged_account(KINDS[kind].user)


def accounts() -> dict[str, Account]:
    """Every unprivileged kind's user."""
    return {kind: account_of(kind) for kind in KINDS if unprivileged(kind)}


def settings_for(kind: str, settings: AnySettings) -> AnySettings:
    """The settings as an actor of `kind` gets them: without keys unless it uses them."""
    spec = KINDS[kind]
    if spec.keys:
        return settings
    if not isinstance(settings, Settings):
        return settings.without_secrets()
    given = settings.without_preshared_keys() if spec.login_key and settings.relays else settings.without_secrets()
    if spec.disco_key:
        given = replace(given, node=replace(given.node, disco_key=settings.node.disco_key))
    return given


def settings_class(kind: str) -> tuple[bool, bool, bool]:
    """All of a kind's Kind that settings_for reads: the kinds with the same are given the same settings."""
    spec = KINDS[kind]
    return spec.keys, spec.login_key, spec.disco_key


def wire_for(kind: str, settings: AnySettings, made: dict[Any, Any]) -> dict[str, Any]:
    """settings_for(kind, settings).to_wire(), kept in `made` (a dict for these settings alone) for
    the kinds given the same (by their settings_class). The peers' part, thousands of entries and
    most of the time, is made once (kept by ("peers", withheld)) for all the kinds given the same
    peers: every kind, unless a peer has a preshared key (only the kinds that use keys get it)."""
    given = settings_class(kind)
    if given in made:
        return made[given]
    if not isinstance(settings, Settings):
        made[given] = settings_for(kind, settings).to_wire()
        return made[given]
    withheld = not KINDS[kind].keys and any(p.preshared_key for p in settings.peers)
    if ("peers", withheld) not in made:
        given_peers = peers_for(kind, list(settings.peers)) if withheld else settings.peers
        made["peers", withheld] = [settings_wire.encode(p) for p in given_peers]
    shell = settings_for(kind, replace(settings, peers=())).to_wire()
    made[given] = {**shell, "peers": made["peers", withheld]}
    return made[given]


def peers_for(kind: str, peers: list[PeerSettings]) -> list[PeerSettings]:
    """Changed peers as an actor of `kind` gets them (as settings_for gives its settings):
    without preshared keys unless it uses keys."""
    return peers if KINDS[kind].keys else [replace(p, preshared_key=None) for p in peers]


def start_order(settings: AnySettings) -> tuple[str, ...]:
    """The kinds the settings run, in start order: a relay's, or a node's."""
    if isinstance(settings, RelaySettings):
        return RELAY_ORDER
    return COORD_ORDER if settings.coordination is not None else START_ORDER


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


def run_actor(
    kind: str,
    name: str,
    state_dir: str,
    tun_queue: int | None,
    account: Account | None,
    supervisor: int | None = None,
    identity: bytes | None = None,
) -> None:
    """The body of an actor process (target of the supervisor's spawn). A crypto
    worker may get its queue of the TUN (see supervisor/resources.py, TunQueues);
    an unprivileged kind becomes `account` (its own: accounts) once it has joined the bus (actors.base).
    The actor stops when process `supervisor` ends (Actor.stop_with). `identity` is
    this launch's on the control socket (supervisor.hub.Hub.admit): it comes with the
    arguments through the fork server's socket, root's alone, so no other process sees it."""
    from setproctitle import setproctitle

    from meshsup.actors.base import crash_on_start_requested, exit_now
    from meshsup.actors.kernel.privileges import PrivilegeError
    from meshsup.actors.log import setup

    setproctitle(f"meshsup: {name}")
    if crash_on_start_requested(kind):
        exit_now(3)
    spec = KINDS[kind]
    module, cls = spec.cls.split(":")
    extra = {} if tun_queue is None else {"tun_queue": tun_queue}
    try:
        if spec.caps is None:
            runtime = Runtime(state_dir, identity=identity)
        elif account is None:
            raise PrivilegeError("no user to become")
        else:
            drop = Drop(account, spec.caps)
            runtime = Runtime(drop.prepare(state_dir), drop, identity)
        actor = getattr(importlib.import_module(module), cls)(name, runtime, **extra)
    except PrivilegeError as err:
        user = account.name if account else None
        setup(name).error("refusing to run: cannot drop privileges", kind=kind, user=user, error=str(err))
        exit_now(EXIT_NO_DROP)
    if supervisor is not None:
        actor.stop_with(supervisor)
    exit_now(actor.run())

"""The supervision tree: spawn actors in order, watch them, restart them.

One thread, one poll loop (see node.py). Everything that happens — an
actor's hello, heartbeat or ack, a process exit, a CLI request, a signal —
is an event handled there in turn, so the supervisor needs no locks either.
The tree holds the running config and its generation: it says which actors
run and how often they may fail, and an actor gets it on every (re)start.
"""

from __future__ import annotations

import os
import signal
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from meshsup.actors.base import give_back_memory
from meshsup.actors.bus.codec import Message
from meshsup.actors.bus.endpoints import Runtime
from meshsup.actors.bus.messages import Ack, Configure, Heartbeat, Hello, MeshPeers, PeersChanged, Stop
from meshsup.actors.kernel.privileges import Account
from meshsup.actors.registry import (
    SCALABLE,
    STARTS_AFTER,
    AnySettings,
    actor_name,
    fork_context,
    peers_for,
    run_actor,
    start_order,
    wire_for,
)
from meshsup.actors.settings import PeerSettings, wire
from meshsup.actors.settings.keys import b64
from meshsup.supervisor import sdnotify
from meshsup.supervisor.hub import Hub
from meshsup.supervisor.resources import TunQueues

HANG_TIMEOUT = 2.0  # no heartbeat for this long: the actor is hung
START_TIMEOUT = 10.0  # hello + configured within this, or the start failed
STOP_TIMEOUT = 6.0  # whole ordered shutdown, then SIGKILL
BACKOFF_BASE, BACKOFF_MAX = 0.1, 2.0
STABLE_AFTER = 1.0  # an actor that ran this long restarts at once, with no backoff


class NodeFailed(Exception):
    """Restart intensity exceeded: the node gives up."""


@dataclass
class ActorProc:
    name: str
    kind: str
    process: Any = None
    pid: int = 0
    state: str = "stopped"  # starting | running | backoff | stopping | stopped
    restarts: int = 0
    started: float = 0.0
    last_beat: float = 0.0
    status: dict[str, Any] = field(default_factory=dict)
    exit_reason: str = ""
    hung: bool = False
    quick_fails: int = 0  # consecutive deaths within STABLE_AFTER of starting


class Tree:
    def __init__(
        self,
        config: AnySettings,
        runtime: Runtime,
        hub: Hub,
        tun_queues: TunQueues,
        accounts: Mapping[str, Account],
        log: Any,
    ) -> None:
        self.config = config
        self.generation = 1
        self._wired: tuple[AnySettings | None, dict[Any, dict[str, Any]]] = (None, {})  # config -> wire forms
        self.reconfiguring = 0  # sequences under way (sequencer.py), whose steps share the wire forms
        self.runtime = runtime
        self.hub = hub
        self.tun_queues = tun_queues
        self.accounts = accounts  # each unprivileged kind's user (registry.accounts)
        self.log = log
        self.actors: dict[str, ActorProc] = {}
        self.start_queue: deque[str] = deque()
        self.restart_times: deque[float] = deque()
        self.ready = False
        self.stopping = False
        self.on_mesh: Any = None  # Callable[[MeshPeers], None]: the coord actor's peer set (node.py)
        self._mp = fork_context()

    # --- the actor set ---------------------------------------------------
    def wanted(self) -> list[tuple[str, str]]:
        """(name, kind) of every actor the config asks for, in start order."""
        out = []
        for kind in start_order(self.config):
            n = getattr(self.config.actors, kind) if kind in SCALABLE else 1
            out += [(actor_name(kind, i), kind) for i in range(n)]
        return out

    def wanted_names(self) -> set[str]:
        return {name for name, _ in self.wanted()}

    def start(self) -> None:
        """Queue every actor the config asks for; `start_next` starts each once it may."""
        for name, kind in self.wanted():
            self.actors[name] = ActorProc(name, kind)
            self.start_queue.append(name)

    def sentinels(self) -> dict[int, ActorProc]:
        """What the poll loop watches for process exits."""
        return {a.process.sentinel: a for a in self.actors.values() if a.process is not None}

    def live_peers(self) -> dict[str, dict[str, Any]]:
        """Public key -> the live figures its owning crypto worker last reported."""
        return {
            p["public_key"]: p for a in self.actors.values() if a.kind == "crypto" for p in a.status.get("peers", [])
        }

    # --- starting and restarting -------------------------------------------
    def start_next(self) -> None:
        """Start every queued actor whose backoff is over and whose kind's predecessors
        (registry.STARTS_AFTER) all run."""
        if self.stopping:
            return
        now = time.monotonic()
        for name in list(self.start_queue):
            a = self.actors.get(name)
            if a is None or a.state in ("running", "starting"):
                self.start_queue.remove(name)
            elif (a.state != "backoff" or now >= a.started) and self._may_start(a.kind):
                self.start_queue.remove(name)  # `started` holds the earliest restart time while backing off
                self._spawn(a)
        if self.start_queue or any(a.state == "starting" for a in self.actors.values()):
            return
        if not self.reconfiguring and self._wired[0] is not None:  # nothing starts, no sequence runs:
            self._wired = (None, {})  # the wire forms are not needed, nor the memory they took
            give_back_memory()
        if not self.ready and all(a.state == "running" for a in self.actors.values()):
            self.ready = True
            self.log.info("node ready", actors=len(self.actors), public_key=b64(self.config.public_key))
            sdnotify.notify("READY=1\nSTATUS=all actors running")

    def _may_start(self, kind: str) -> bool:
        after = STARTS_AFTER[kind]
        return all(a.state == "running" for a in self.actors.values() if a.kind in after)

    def _spawn(self, a: ActorProc) -> None:
        queue = self.tun_queues.for_actor(a.name, a.kind)
        p = self._mp.Process(
            target=run_actor,
            args=(
                a.kind,
                a.name,
                str(self.runtime.state_dir),
                queue,
                self.accounts.get(a.kind),
                os.getpid(),
                self.hub.admit(a.name),
            ),
            name=a.name,
            daemon=True,
        )
        p.start()
        a.process, a.pid, a.state = p, p.pid or 0, "starting"
        a.started = a.last_beat = time.monotonic()
        a.hung = False
        self.log.info("actor started", name=a.name, child_pid=a.pid)

    def on_exit(self, a: ActorProc) -> None:
        a.process.join(0)
        code = a.process.exitcode
        a.process.close()
        a.process = None
        if a.hung:
            how = f"hung (no heartbeat for {HANG_TIMEOUT:.1f} s), killed"
        elif code is not None and code < 0:
            how = f"killed by signal {signal.Signals(-code).name}"
        else:
            how = f"exited with status {code}"
        self.hub.fail_pending(a.name)
        if self.stopping:
            a.state = "stopped"
        elif a.name not in self.wanted_names():  # scaled down
            del self.actors[a.name]
        else:
            a.exit_reason = how
            self.log.warning("actor died", name=a.name, child_pid=a.pid, how=how)
            self._restart(a, how)

    def _restart(self, a: ActorProc, how: str) -> None:
        now = time.monotonic()
        period = self.config.supervisor.period
        while self.restart_times and now - self.restart_times[0] > period:
            self.restart_times.popleft()
        if len(self.restart_times) >= self.config.supervisor.intensity:
            raise NodeFailed(
                f"actor {a.name} {how}; more than {self.config.supervisor.intensity} "
                f"restarts in {period:g} s, giving up"
            )
        self.restart_times.append(now)
        a.quick_fails = a.quick_fails + 1 if now - a.started < STABLE_AFTER else 0
        a.restarts += 1
        a.state = "backoff"
        a.started = now + (min(BACKOFF_BASE * 2 ** (a.quick_fails - 1), BACKOFF_MAX) if a.quick_fails else 0.0)
        self.start_queue.appendleft(a.name)

    def _kill(self, a: ActorProc) -> None:
        if a.process is not None and a.pid:
            try:
                os.kill(a.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def check_deadlines(self, now: float) -> None:
        for a in list(self.actors.values()):
            if a.process is None:
                continue
            if a.state == "running" and now - a.last_beat > HANG_TIMEOUT and not a.hung:
                a.hung = True
                self.log.warning("actor hung", name=a.name, child_pid=a.pid)
                self._kill(a)
            elif a.state == "starting" and now - a.started > START_TIMEOUT and not a.hung:
                a.hung = True
                self.log.warning("actor did not become ready", name=a.name, child_pid=a.pid)
                self._kill(a)

    # --- messages from actors --------------------------------------------
    def on_actor_message(self, a: ActorProc, msg: Message) -> None:
        if isinstance(msg, Hello):
            if a.state != "starting":
                return
            a.pid = msg.pid
            self._configure_starting(a)
        elif isinstance(msg, Heartbeat):
            a.last_beat = time.monotonic()
            a.status = msg.status
        elif isinstance(msg, Ack):
            self.hub.acked(msg)
        elif isinstance(msg, MeshPeers) and a.kind == "coord" and a.state == "running" and self.on_mesh:
            self.on_mesh(msg)
        else:
            self.hub.count_drop("unexpected_type", msg.TAG)

    def configure_message(self, kind: str, req: int, generation: int) -> Configure:
        """The running config as an actor of `kind` gets it: with the keys only if it uses them."""
        return Configure(req=req, generation=generation, config=self._wire(kind))

    def _wire(self, kind: str) -> dict[str, Any]:
        """The running config's wire form for `kind`, made once for all the kinds given the same
        (registry.wire_for: with thousands of peers each costs a tenth of a second)."""
        if self._wired[0] is not self.config:
            self._wired = (self.config, {})
        return wire_for(kind, self.config, self._wired[1])

    def peers_message(
        self, kind: str, req: int, generation: int, changed: list[PeerSettings], removed: list[bytes]
    ) -> PeersChanged:
        """The change of peers that made `generation`, as an actor of `kind` gets it."""
        peers = [wire.encode(p) for p in peers_for(kind, changed)]
        return PeersChanged(req=req, base=generation - 1, generation=generation, peers=peers, removed=removed)

    def _configure_starting(self, a: ActorProc) -> None:
        generation = self.generation
        self.hub.request(
            a.name,
            lambda req: self.configure_message(a.kind, req, generation),
            lambda ack: self._on_configured(a, ack, generation),
            START_TIMEOUT,
        )

    def _on_configured(self, a: ActorProc, ack: Ack | None, generation: int) -> None:
        if ack is None or a.state != "starting":
            return  # timed out or died: the exit path restarts it
        if not ack.ok:
            self.log.error("actor refused configuration", name=a.name, error=ack.error)
            a.hung = False
            self._kill(a)
            return
        if generation != self.generation:  # a change the sequencer skipped it for (it was starting)
            self._configure_starting(a)
            return
        a.state = "running"
        a.last_beat = time.monotonic()
        self.log.info("actor running", name=a.name, child_pid=a.pid, restarts=a.restarts)

    # --- scaling -----------------------------------------------------------
    def follow_counts(self) -> None:
        """Start and stop workers to match the running config's counts (after a scale)."""
        wanted = self.wanted_names()
        for name, k in self.wanted():
            if name not in self.actors:
                self.actors[name] = ActorProc(name, k)
                self.start_queue.append(name)
        for a in list(self.actors.values()):
            if a.name not in wanted:
                self._stop_actor(a)

    def _stop_actor(self, a: ActorProc) -> None:
        if a.process is None:
            del self.actors[a.name]
            return
        a.state = "stopping"
        self.hub.request(a.name, lambda req: Stop(req=req), lambda ack: None, 1.0)

    # --- shutdown ----------------------------------------------------------
    def shutdown(self) -> None:
        """Reverse start order, each actor asked to stop, then SIGKILL at the deadline."""
        self.stopping = True
        deadline = time.monotonic() + STOP_TIMEOUT
        kinds = start_order(self.config)
        order = sorted(self.actors.values(), key=lambda a: -kinds.index(a.kind))
        for a in order:
            if a.process is None:
                continue
            a.state = "stopping"
            self.hub.tell(a.name, Stop(req=0))
            per_actor = min(1.5, max(0.0, deadline - time.monotonic()))
            a.process.join(per_actor)
            if a.process.exitcode is None:
                a.process.terminate()
                a.process.join(0.3)
        for a in order:
            if a.process is not None and a.process.exitcode is None:
                self._kill(a)
                a.process.join(1.0)

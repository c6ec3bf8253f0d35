"""The supervisor of one node: its parts wired together around one poll loop.

The parts, each owning one concern:
- hub.py: the bus's supervisor end (actors' control socket, requests and acks, the event proxy);
- supervision.py: the actor tree (spawn, restart, deadlines, intensity, heartbeats) and the running config;
- sequencer.py: a new config to the running actors in ordered, acked steps;
- cli_server.py: the CLI's requests; uapi_front.py: `wg show` and `wg set`;
- metrics_front.py: Prometheus's /metrics, rendered from the same state as `status`;
- resources.py: the listen port's probe and the TUN queues held for the crypto workers.

One thread, one poll loop: an actor's message, a process exit, a CLI or `wg`
request and a signal are each handled in turn, so nothing needs a lock.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

import zmq

from meshsup.actors.base import give_back_memory
from meshsup.actors.bus.endpoints import Runtime
from meshsup.actors.bus.messages import Command, MeshPeers
from meshsup.actors.kernel.privileges import Account
from meshsup.actors.registry import AnySettings
from meshsup.actors.settings import Settings
from meshsup.actors.settings.keys import b64
from meshsup.actors.settings.relay import RelaySettings
from meshsup.supervisor import relay, sdnotify
from meshsup.supervisor.cli_server import CliServer, Reply
from meshsup.supervisor.coordinated import Coordinated, hints_change, local_info
from meshsup.supervisor.health import UPDATE_INTERVAL, Health, no_handshake_after
from meshsup.supervisor.hub import Hub
from meshsup.supervisor.metrics_front import MetricsFront
from meshsup.supervisor.resources import TunQueues, probe_port
from meshsup.supervisor.sequencer import Sequencer
from meshsup.supervisor.supervision import NodeFailed, Tree
from meshsup.supervisor.uapi_front import UapiFront
from meshsup.supervisor.wgapi import peer_status


class Supervisor:
    def __init__(
        self,
        config: Settings,
        runtime: Runtime,
        accounts: Mapping[str, Account],
        reload: Callable[[], Settings],
        log: Any,
    ) -> None:
        """`accounts`: each unprivileged kind's user, let into the runtime dir (resources.open_state_dir)."""
        self.runtime = runtime
        self.reload_source = reload
        self.log = log
        self.failure: str | None = None
        self.ctx = zmq.Context()
        self.hub = Hub(self.ctx, runtime, log)
        self.tun_queues = TunQueues(log)
        self.tree = Tree(config, runtime, self.hub, self.tun_queues, accounts, log)
        self.sequencer = Sequencer(self.tree, self.hub)
        # With [coordination]: the config as read (the file), the mesh's peers merged into it, and
        # whether a change of them is being applied (the next waits for it: a flood is coalesced).
        self.static = config
        self.mesh = Coordinated()
        self.mesh_applying = self.mesh_dirty = False
        # The first peer set from the mesh is applied: the node answers its peers' handshakes, so
        # its record may go out (a first handshake lost to a node not ready costs 5 s: REKEY_TIMEOUT)
        self.mesh_joined = False
        # Commands to actors (_tell): those on their way, and what each took (with its pid)
        self.asked: set[tuple[str, str]] = set()
        self.told: dict[tuple[str, str], tuple[int, dict[str, Any]] | None] = {}
        self.tree.on_mesh = self.on_mesh
        self.health = Health(no_handshake_after(os.environ))
        self.cli = CliServer(self.ctx, runtime, self.tree, self.hub, self.reload, self.reconfigure, self.health)
        self.cli.mesh_status = lambda: {**self.mesh.status(), "applying": self.mesh_applying}
        self.wg = UapiFront(self.tree, self.reconfigure, log)
        self.metrics = MetricsFront(self.tree, self.cli.status, log)
        self.signal_r, self.signal_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def run(self) -> int:
        self.runtime.pidfile.write_text(str(os.getpid()))
        error = self._prepare(self.tree.config)
        if error:
            return self._fail_start(error)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, lambda *_: None)
        signal.set_wakeup_fd(self.signal_w, warn_on_full_buffer=False)
        self.tree.start()
        watchdog = sdnotify.watchdog_interval()
        next_watchdog = next_health = time.monotonic()
        try:
            while not self.tree.stopping:
                self.tree.start_next()
                self._poll(0.1)
                now = time.monotonic()
                self.tree.check_deadlines(now)
                self.hub.check_deadlines(now)
                self._tell_coord_local()  # at magicsock's first heartbeat with them: the record waits for them
                self._tell_mesh_hints()
                if now >= next_health:
                    self._check_health()
                    next_health = now + UPDATE_INTERVAL
                if watchdog and now >= next_watchdog:
                    sdnotify.notify("WATCHDOG=1")
                    next_watchdog = now + watchdog
        except NodeFailed as err:
            self.failure = str(err)
            self.log.error("node failed", reason=self.failure)
        self.tree.shutdown()
        self.close()
        return 1 if self.failure else 0

    def _prepare(self, config: AnySettings) -> str | None:
        """What the actors need before they start, or why they cannot have it: a node's UDP
        port, `wg`'s socket and the TUN's queues; a relay's ports."""
        if isinstance(config, RelaySettings):
            return relay.probe(config)
        error = probe_port(config) or self.wg.serve(config.node.interface) or self.metrics.serve(config)
        if error is None:
            self.tun_queues.open(config)
        return error

    def _check_health(self) -> None:
        config, actors = self.tree.config, self.tree.actors.values()
        if isinstance(config, RelaySettings):
            self.health.update(time.time(), actors, config.supervisor.period)
        else:
            # The peers a worker reports: the others have had no traffic (their state is made on the
            # first packet), so none can wait for a handshake; the thousands of them cost nothing here.
            live = self.tree.live_peers()
            peers = peer_status(
                replace(config, peers=tuple(p for p in config.peers if b64(p.public_key) in live)), live
            )
            self.health.update(time.time(), actors, config.supervisor.period, peers, config.node.listen_port)

    def _fail_start(self, reason: str) -> int:
        self.failure = reason
        self.log.error("node failed", reason=reason)
        self.close()
        return 1

    def _poll(self, timeout: float) -> None:
        poller = zmq.Poller()
        for s in (*self.hub.controls, self.cli.socket, *self.hub.event_sockets):
            poller.register(s, zmq.POLLIN)
        poller.register(self.signal_r, zmq.POLLIN)
        sentinels = self.tree.sentinels()
        for fd in sentinels:
            poller.register(fd, zmq.POLLIN)
        uapi_fds = self.wg.register(poller)
        metrics_fds = self.metrics.register(poller)
        for sock, _ in poller.poll(timeout * 1000):
            if sock in self.hub.controls:
                self.hub.drain_control(sock, self.tree.actors, self.tree.on_actor_message)
            elif sock is self.cli.socket:
                self.cli.drain()
            elif sock in self.hub.event_sockets:
                self.hub.pump(sock)
            elif sock == self.signal_r:
                self._on_signals()
            elif sock in sentinels:
                self.tree.on_exit(sentinels[sock])
            elif sock in uapi_fds:
                self.wg.on_ready(sock)
            elif sock in metrics_fds:
                self.metrics.on_ready(sock)

    def _on_signals(self) -> None:
        try:
            data = os.read(self.signal_r, 64)
        except BlockingIOError:
            return
        for signum in data:
            if signum in (signal.SIGTERM, signal.SIGINT):
                self.log.info("stopping on signal", signal=signal.Signals(signum).name)
                self.tree.stopping = True
            elif signum == signal.SIGHUP:
                self.reload(lambda ok, error="", result=None: None)

    # --- config changes ------------------------------------------------------
    def reconfigure(self, new: Settings, finished: Callable[[list[str]], None]) -> None:
        """Every config change (reload, `wg set`, scale) comes through here."""
        self.wg.follow(new)
        self.metrics.follow(new)
        self.sequencer.reconfigure(new, finished)

    def reload(self, reply: Reply) -> None:
        try:
            static = self.reload_source()
        except Exception as err:  # any refusal keeps the running config
            self.log.error("reload refused, keeping the running configuration", error=str(err))
            reply(False, f"reload refused, running configuration kept: {err}")
            return
        static = replace(static, actors=self.tree.config.actors)  # the worker counts stay as scaled
        if (static.coordination is None) != (self.static.coordination is None):
            # the coord actor is part of the tree or not from the start: no reload adds or removes it
            error = "[coordination] added or removed: that takes a restart"
            self.log.error("reload refused, keeping the running configuration", error=error)
            reply(False, f"reload refused, running configuration kept: {error}")
            return
        self.static = static
        new = self.mesh.merge(static)
        if same_config(new, self.tree.config):
            reply(True, result={"changed": False})
            return
        self.log.info("reloading configuration")
        self.reconfigure(
            new,
            lambda errors: reply(not errors, "; ".join(errors), {"changed": True, "generation": self.tree.generation}),
        )

    # --- the mesh's peers (actors/coord) ----------------------------------------------
    def on_mesh(self, msg: MeshPeers) -> None:
        """The coord actor's peer set: merged with the config's and applied like a reload, one
        change at a time (a newer set arriving meanwhile is applied when that one is done)."""
        refused = self.mesh.take(msg)
        if refused == "gap":  # a change after one not taken: the whole set, to start again from
            self.log.warning("mesh peers refused: a change missed, asking for all", seq=msg.seq)
            self._tell("coord", "whole", {"seq": msg.seq})
            return
        if refused:
            self.log.warning("mesh peers refused: they do not decode", revision=msg.revision)
            return
        if msg.whole:
            give_back_memory()  # what decoding the whole set left free (thousands of peers)
        self._apply_mesh()
        if self.mesh.policy_error:
            self.log.warning("mesh policy refused, the last good one kept", error=self.mesh.policy_error)

    def _apply_mesh(self) -> None:
        if self.mesh_applying:
            self.mesh_dirty = True
            return
        new = self.mesh.merge(self.static)
        new = replace(new, actors=self.tree.config.actors)
        if same_config(new, self.tree.config):
            self.mesh_joined = True
            return
        self.mesh_applying, self.mesh_dirty = True, False
        revision = self.mesh.revision
        self.log.info("applying the mesh's peers", revision=revision, peers=len(self.mesh.mesh))

        def done(errors: list[str]) -> None:
            self.mesh_applying, self.mesh_joined = False, True
            if errors:
                self.log.warning("mesh peers applied with errors", errors="; ".join(errors))
            else:
                self.log.info("mesh peers applied", revision=revision)  # by every actor
            if self.mesh_dirty:
                self._apply_mesh()

        self.reconfigure(new, done)

    def _tell_coord_local(self) -> None:
        """magicsock's endpoints, disco key and home relay to the coord actor, for the node's
        record, when they differ from what it has (its heartbeat says so); the first time once the
        node is ready and has the mesh's peers (mesh_joined)."""
        coord, magicsock = self.tree.actors.get("coord"), self.tree.actors.get("magicsock")
        if coord is None or magicsock is None or not (self.tree.ready and self.mesh_joined):
            return
        local = local_info(magicsock.status)
        if local is not None and coord.status.get("local") != local:
            self._tell("coord", "local", local)

    def _tell_mesh_hints(self) -> None:
        """What the mesh's records say of their peers' home relays and disco keys, to magicsock:
        all of them at first, then what changed since what it took (thousands of peers, one changed)."""
        magicsock, told = self.tree.actors.get("magicsock"), self.told.get(("magicsock", "mesh_hints"))
        if "coord" not in self.tree.actors or magicsock is None or ("magicsock", "mesh_hints") in self.asked:
            return
        args = {"hints": self.mesh.hints}
        if told is not None and told[0] == magicsock.pid and magicsock.state == "running" and told[1] != args:
            self._tell("magicsock", "mesh_hints", args, hints_change(told[1]["hints"], self.mesh.hints))
        else:
            self._tell("magicsock", "mesh_hints", args)

    def _tell(self, name: str, op: str, args: dict[str, Any], sent: dict[str, Any] | None = None) -> None:
        """Command `op` to a running actor unless it took these `args` since it started, or one is on
        its way; `sent`, if given, is what goes (a change that brings it from what it took to `args`)."""
        a = self.tree.actors.get(name)
        if a is None or a.state != "running" or (name, op) in self.asked or self.told.get((name, op)) == (a.pid, args):
            return
        self.asked.add((name, op))

        def answered(ack: Any) -> None:
            self.asked.discard((name, op))
            self.told[(name, op)] = (a.pid, args) if ack is not None and ack.ok else None

        self.hub.request(name, lambda req: Command(req=req, op=op, args=args if sent is None else sent), answered)

    def close(self) -> None:
        self.wg.close()
        self.metrics.close()
        self.tun_queues.close()
        self.ctx.destroy(linger=0)
        os.close(self.signal_r)
        os.close(self.signal_w)
        for path in self.runtime.dir.iterdir():
            if path.name.endswith(".sock") or path.name == "supervisor.pid":
                path.unlink(missing_ok=True)
        try:
            self.runtime.dir.rmdir()
        except OSError:
            pass


def same_config(new: Settings, running: Any) -> bool:
    """`new` is the running config, its peers perhaps in another order (the mesh's come whole in
    one order, then changed in place or added last)."""
    return new == running or (isinstance(running, Settings) and running.peer_changes(new) == ([], []))

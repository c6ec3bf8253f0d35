"""The supervision tree: spawn actors in order, watch them, restart them.

One thread, one poll loop. Everything that happens — an actor's hello,
heartbeat or ack, a process exit, a CLI request, a signal — is an event
handled here in turn, so the supervisor needs no locks either.
"""
from __future__ import annotations

import errno
import multiprocessing
import os
import signal
import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import zmq

from meshsup.actors.base import FAULTS_ENV
from meshsup.actors.bus.codec import DecodeError, Message, decode, encode
from meshsup.actors.bus.endpoints import Runtime
from meshsup.actors.bus.messages import Ack, CliReply, CliRequest, Command, Configure, Heartbeat, Hello, Stop
from meshsup.actors.log import RateLimited
from meshsup.actors.kernel.udp import UdpSocket
from meshsup.actors.registry import PRELOAD, SCALABLE, START_ORDER, InheritedFd, actor_name, run_actor
from meshsup.actors.kernel.tun import Tun, make_persistent
from meshsup.actors.settings import Settings
from meshsup.actors.settings.keys import b64
from meshsup.supervisor import sdnotify
from meshsup.supervisor.uapi import GetRequest, SetRequest, UapiError, serialize_errno, serialize_get
from meshsup.supervisor.uapi_server import InUse, UapiServer
from meshsup.supervisor.wgapi import apply_set, device_state, peer_status

HANG_TIMEOUT = 2.0        # no heartbeat for this long: the actor is hung
START_TIMEOUT = 10.0      # hello + configured within this, or the start failed
REQUEST_TIMEOUT = 5.0     # deadline for an actor's ack
STOP_TIMEOUT = 6.0        # whole ordered shutdown, then SIGKILL
BACKOFF_BASE, BACKOFF_MAX = 0.1, 2.0
STABLE_AFTER = 1.0        # an actor that ran this long restarts at once, with no backoff


class NodeFailed(Exception):
    """Restart intensity exceeded: the node gives up."""


@dataclass
class ActorProc:
    name: str
    kind: str
    process: Any = None
    pid: int = 0
    state: str = "stopped"    # starting | running | backoff | stopping | stopped
    restarts: int = 0
    started: float = 0.0
    last_beat: float = 0.0
    status: dict[str, Any] = field(default_factory=dict)
    exit_reason: str = ""
    hung: bool = False
    quick_fails: int = 0      # consecutive deaths within STABLE_AFTER of starting


@dataclass
class Pending:
    actor: str
    deadline: float
    done: Callable[[Ack | None], None]


class Supervisor:
    def __init__(self, config: Settings, runtime: Runtime, reload: Callable[[], Settings],
                 log: Any) -> None:
        self.config = config
        self.generation = 1
        self.runtime = runtime
        self.reload_source = reload
        self.log = log
        self.actors: dict[str, ActorProc] = {}
        self.start_queue: deque[str] = deque()
        self.restart_times: deque[float] = deque()
        self.pending: dict[int, Pending] = {}
        self.steps: deque[tuple[str, Message, Callable[[Ack | None], None]]] = deque()
        self.step_busy = False
        self.next_req = 1
        self.ready = False
        self.stopping = False
        self.failure: str | None = None
        self.bus_dropped: dict[str, int] = {}
        self._ratelimit = RateLimited()
        self._mp = multiprocessing.get_context("forkserver")
        self._mp.set_forkserver_preload(PRELOAD)

        self.ctx = zmq.Context()
        self.control = self._bind(zmq.ROUTER, runtime.control)
        self.control.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a restarted actor reuses its identity
        self.cli = self._bind(zmq.ROUTER, runtime.cli)
        self.xsub = self._bind(zmq.XSUB, runtime.events_in)
        self.xpub = self._bind(zmq.XPUB, runtime.events_out)
        self.signal_r, self.signal_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.uapi: UapiServer | None = None
        self.tun_queues: list[Tun] = []

    def _bind(self, kind: int, endpoint: str) -> zmq.Socket:
        s = self.ctx.socket(kind)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.MAXMSGSIZE, 64 * 1024 * 1024)
        s.bind(endpoint)
        return s

    # --- the actor set ---------------------------------------------------
    def wanted(self) -> list[tuple[str, str]]:
        """(name, kind) of every actor the config asks for, in start order."""
        out = []
        for kind in START_ORDER:
            n = getattr(self.config.actors, kind) if kind in SCALABLE else 1
            out += [(actor_name(kind, i), kind) for i in range(n)]
        return out

    def run(self) -> int:
        self.runtime.pidfile.write_text(str(os.getpid()))
        port = self.config.node.listen_port
        try:
            if port:
                # The node's own sockets share the port (SO_REUSEPORT), so an exclusive
                # probe bind is what tells us another program already has it.
                UdpSocket(port, gso=False, gro=False).close()
        except OSError as err:
            return self._fail_start(f"UDP port {port} is in use: {err.strerror}")
        error = self._serve_api(self.config.node.interface)
        if error:
            return self._fail_start(error)
        self.tun_queues = self._open_tun_queues()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, lambda *_: None)
        signal.set_wakeup_fd(self.signal_w, warn_on_full_buffer=False)
        for name, kind in self.wanted():
            self.actors[name] = ActorProc(name, kind)
            self.start_queue.append(name)
        watchdog = sdnotify.watchdog_interval()
        next_watchdog = time.monotonic()
        try:
            while not self.stopping:
                self._start_next()
                self._poll(0.1)
                now = time.monotonic()
                self._check_deadlines(now)
                if watchdog and now >= next_watchdog:
                    sdnotify.notify("WATCHDOG=1")
                    next_watchdog = now + watchdog
        except NodeFailed as err:
            self.failure = str(err)
            self.log.error("node failed", reason=self.failure)
        self.shutdown()
        return 1 if self.failure else 0

    def _fail_start(self, reason: str) -> int:
        self.failure = reason
        self.log.error("node failed", reason=reason)
        self.close()
        return 1

    def _poll(self, timeout: float) -> None:
        poller = zmq.Poller()
        for s in (self.control, self.cli, self.xsub, self.xpub):
            poller.register(s, zmq.POLLIN)
        poller.register(self.signal_r, zmq.POLLIN)
        sentinels = {a.process.sentinel: a for a in self.actors.values()
                     if a.process is not None}
        for fd in sentinels:
            poller.register(fd, zmq.POLLIN)
        uapi_fds: set[int] = set()
        if self.uapi is not None:
            readers, writers = set(self.uapi.fds()), set(self.uapi.want_write())
            uapi_fds = readers | writers
            for fd in uapi_fds:
                poller.register(fd, (zmq.POLLIN if fd in readers else 0) | (zmq.POLLOUT if fd in writers else 0))
        for sock, _ in poller.poll(timeout * 1000):
            if sock is self.control:
                self._drain_control()
            elif sock is self.cli:
                self._drain_cli()
            elif sock is self.xsub:
                self._forward(self.xsub, self.xpub)
            elif sock is self.xpub:
                self._forward(self.xpub, self.xsub)
            elif sock == self.signal_r:
                self._on_signals()
            elif sock in sentinels:
                self._on_exit(sentinels[sock])
            elif sock in uapi_fds and self.uapi is not None:
                self.uapi.on_ready(sock)

    @staticmethod
    def _forward(src: zmq.Socket, dst: zmq.Socket) -> None:
        """The event proxy (XSUB/XPUB), pumped from this loop."""
        for _ in range(1024):
            try:
                dst.send_multipart(src.recv_multipart(zmq.NOBLOCK), zmq.NOBLOCK)
            except zmq.Again:
                return

    # --- starting and restarting -------------------------------------------
    def _start_next(self) -> None:
        if self.stopping or any(a.state == "starting" for a in self.actors.values()):
            return
        now = time.monotonic()
        while self.start_queue:
            a = self.actors.get(self.start_queue[0])
            if a is None or a.state == "running":
                self.start_queue.popleft()
                continue
            if a.state == "backoff" and now < a.started:
                return  # `started` holds the earliest restart time while backing off
            self.start_queue.popleft()
            self._spawn(a)
            return
        if not self.ready and all(a.state == "running" for a in self.actors.values()):
            self.ready = True
            self.log.info("node ready", actors=len(self.actors),
                          public_key=b64(self.config.node.public_key))
            sdnotify.notify("READY=1\nSTATUS=all actors running")

    def _open_tun_queues(self) -> list[Tun]:
        """One queue of the TUN per crypto worker, opened first and held for the node's life.

        The kernel numbers a multi-queue TUN's queues in the order they attach
        and renumbers them when one detaches. Held here, worker k's queue stays
        number k across worker restarts, which is what tun-io's eBPF steering
        program relies on to send each packet to its peer's owner. A restarted
        worker gets the same queue again, with what the kernel queued meanwhile.
        """
        iface, queues = self.config.node.interface, []
        try:
            make_persistent(iface)  # as the router would: the link's mode and queue length come first
            for _ in range(self.config.actors.crypto):
                queues.append(Tun.open(iface))
                if not queues[-1].multi_queue:
                    raise OSError(errno.EOPNOTSUPP, "the kernel has no multi-queue TUN")
        except (OSError, ValueError) as err:
            for tun in queues:
                tun.close()
            self.log.warning("crypto workers get no TUN queue of their own; tun-io reads for them",
                             interface=iface, reason=str(err))
            return []
        return queues

    def _spawn(self, a: ActorProc) -> None:
        index = int(a.name.rsplit("-", 1)[1]) if a.kind == "crypto" else -1
        queue = InheritedFd(self.tun_queues[index].fileno()) if 0 <= index < len(self.tun_queues) else None
        p = self._mp.Process(target=run_actor, args=(a.kind, a.name, str(self.runtime.state_dir), queue),
                             name=a.name, daemon=True)
        p.start()
        a.process, a.pid, a.state = p, p.pid or 0, "starting"
        a.started = a.last_beat = time.monotonic()
        a.hung = False
        self.log.info("actor started", name=a.name, child_pid=a.pid)

    def _on_exit(self, a: ActorProc) -> None:
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
        self._fail_pending(a.name)
        if self.stopping:
            a.state = "stopped"
        elif a.name not in self.wanted_names():  # scaled down
            del self.actors[a.name]
        else:
            a.exit_reason = how
            self.log.warning("actor died", name=a.name, child_pid=a.pid, how=how)
            self._restart(a, how)

    def wanted_names(self) -> set[str]:
        return {name for name, _ in self.wanted()}

    def _restart(self, a: ActorProc, how: str) -> None:
        now = time.monotonic()
        period = self.config.supervisor.period
        while self.restart_times and now - self.restart_times[0] > period:
            self.restart_times.popleft()
        if len(self.restart_times) >= self.config.supervisor.intensity:
            raise NodeFailed(
                f"actor {a.name} {how}; more than {self.config.supervisor.intensity} "
                f"restarts in {period:g} s, giving up")
        self.restart_times.append(now)
        a.quick_fails = a.quick_fails + 1 if now - a.started < STABLE_AFTER else 0
        a.restarts += 1
        a.state = "backoff"
        a.started = now + (min(BACKOFF_BASE * 2 ** (a.quick_fails - 1), BACKOFF_MAX)
                           if a.quick_fails else 0.0)
        self.start_queue.appendleft(a.name)

    def _kill(self, a: ActorProc) -> None:
        if a.process is not None and a.pid:
            try:
                os.kill(a.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def _check_deadlines(self, now: float) -> None:
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
        for req, p in list(self.pending.items()):
            if now > p.deadline:
                del self.pending[req]
                p.done(None)

    def _fail_pending(self, actor: str) -> None:
        for req, p in list(self.pending.items()):
            if p.actor == actor:
                del self.pending[req]
                p.done(None)

    # --- messages from actors --------------------------------------------
    def _count_drop(self, reason: str, detail: str) -> None:
        self.bus_dropped[reason] = self.bus_dropped.get(reason, 0) + 1
        if self._ratelimit.should_log(reason, time.monotonic()) is not None:
            self.log.warning("bus frame dropped", reason=reason, detail=detail[:120])

    def _drain_control(self) -> None:
        for _ in range(1024):
            try:
                frames = self.control.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(frames) != 2:
                self._count_drop("malformed", "frame count")
                continue
            ident, frame = frames
            try:
                msg = decode(frame)
            except DecodeError as err:
                self._count_drop(err.reason, str(err))
                continue
            a = self.actors.get(ident.decode(errors="replace"))
            if a is None:
                self._count_drop("unknown_sender", ident[:32].hex())
                continue
            self._on_actor_message(a, msg)

    def _on_actor_message(self, a: ActorProc, msg: Message) -> None:
        if isinstance(msg, Hello):
            if a.state != "starting":
                return
            a.pid = msg.pid
            self.request(a.name, lambda req: Configure(req=req, generation=self.generation,
                                                       config=self.config.to_wire()),
                         lambda ack: self._on_configured(a, ack), START_TIMEOUT)
        elif isinstance(msg, Heartbeat):
            a.last_beat = time.monotonic()
            a.status = msg.status
        elif isinstance(msg, Ack):
            p = self.pending.pop(msg.req, None)
            if p is not None:
                p.done(msg)
        else:
            self._count_drop("unexpected_type", msg.TAG)

    def _on_configured(self, a: ActorProc, ack: Ack | None) -> None:
        if ack is None or a.state != "starting":
            return  # timed out or died: the exit path restarts it
        if not ack.ok:
            self.log.error("actor refused configuration", name=a.name, error=ack.error)
            a.hung = False
            self._kill(a)
            return
        a.state = "running"
        a.last_beat = time.monotonic()
        self.log.info("actor running", name=a.name, child_pid=a.pid, restarts=a.restarts)

    def request(self, actor: str, make: Callable[[int], Message], done: Callable[[Ack | None], None],
                timeout: float = REQUEST_TIMEOUT) -> None:
        req = self.next_req
        self.next_req += 1
        self.pending[req] = Pending(actor, time.monotonic() + timeout, done)
        self.control.send_multipart([actor.encode(), encode(make(req))])

    # --- ordered steps (reconfiguration, scaling) ----------------------------
    def run_steps(self, steps: list[tuple[str, Callable[[int], Message]]],
                  finished: Callable[[list[str]], None]) -> None:
        """Send each request only after the previous one was acked (or failed)."""
        errors: list[str] = []
        queue = deque(steps)

        def next_step(ack: Ack | None = None, name: str = "") -> None:
            if name and (ack is None or not ack.ok):
                errors.append(f"{name}: {'no answer' if ack is None else ack.error}")
            while queue:
                actor, make = queue.popleft()
                a = self.actors.get(actor)
                if a is None or a.state != "running":
                    continue  # a starting actor gets the new config on its own hello
                self.request(actor, make, lambda ack, actor=actor: next_step(ack, actor))
                return
            finished(errors)

        next_step()

    def reconfigure(self, new: Settings, finished: Callable[[list[str]], None]) -> None:
        if self.uapi is not None and new.node.interface != self.config.node.interface:
            self.uapi.close()
            if error := self._serve_api(new.node.interface):
                self.log.error(error)
        self.config = new
        self.generation += 1
        gen = self.generation
        wire = self.config.to_wire()
        steps = [(name, lambda req: Configure(req=req, generation=gen, config=wire))
                 for name in self.reconfigure_order()]
        self.run_steps(steps, finished)

    def reconfigure_order(self) -> list[str]:
        """The seed's order: keys to magicsock before peers to crypto; netlog before router before DNS."""
        order = ("magicsock", "crypto", "tun-io", "netlog", "router", "dns")
        by_kind = {k: [a.name for a in self.actors.values() if a.kind == k] for k in order}
        return [n for k in order for n in sorted(by_kind[k])]

    def scale(self, kind: str, count: int) -> None:
        self.config = replace(self.config, actors=replace(self.config.actors, **{kind: count}))
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
        self.request(a.name, lambda req: Stop(req=req), lambda ack: None, 1.0)

    # --- the CLI -----------------------------------------------------------
    def _drain_cli(self) -> None:
        for _ in range(64):
            try:
                frames = self.cli.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(frames) != 3 or frames[1] != b"":
                self._count_drop("malformed", "cli envelope")
                continue
            ident = frames[0]
            reply = lambda ok, error="", result=None, ident=ident: self.cli.send_multipart(  # noqa: E731
                [ident, b"", encode(CliReply(ok=ok, error=error, result=result or {}))])
            try:
                msg = decode(frames[2])
            except DecodeError as err:
                self._count_drop(err.reason, str(err))
                reply(False, f"bad request: {err}")
                continue
            if not isinstance(msg, CliRequest):
                reply(False, f"unexpected message {msg.TAG}")
                continue
            self.on_cli(msg, reply)

    def on_cli(self, msg: CliRequest, reply: Callable[..., None]) -> None:
        cmd, args = msg.command, msg.args
        if cmd == "status":
            reply(True, result=self.status())
        elif cmd == "stop":
            reply(True, result={"stopping": True})
            self.stopping = True
        elif cmd == "reload":
            self.reload(reply)
        elif cmd == "scale":
            kind, count = args.get("kind"), args.get("count")
            if kind not in SCALABLE:
                reply(False, f"{kind!r} cannot be scaled; scalable kinds: {', '.join(sorted(SCALABLE))}")
            elif not isinstance(count, int) or not 1 <= count <= 64:
                reply(False, "worker count must be 1..64")
            else:
                self.scale(kind, count)
                self.reconfigure(self.config, lambda errors: None)
                reply(True, result={"kind": kind, "count": count})
        elif cmd == "fault" and os.environ.get(FAULTS_ENV) == "1":
            name = str(args.get("actor"))
            if name not in self.actors:
                reply(False, f"no actor {name!r}")
                return
            self.request(name, lambda req: Command(req=req, op="fault", args={"mode": args.get("mode")}),
                         lambda ack: reply(ack is not None and ack.ok,
                                           "" if ack and ack.ok else (ack.error if ack else "no answer")))
        else:
            reply(False, f"unknown command {cmd!r}")

    def reload(self, reply: Callable[..., None]) -> None:
        try:
            new = self.reload_source()
        except Exception as err:  # any refusal keeps the running config
            self.log.error("reload refused, keeping the running configuration", error=str(err))
            reply(False, f"reload refused, running configuration kept: {err}")
            return
        new = replace(new, actors=self.config.actors)  # the worker counts as scaled
        if new == self.config:
            reply(True, result={"changed": False})
            return
        self.log.info("reloading configuration")
        self.reconfigure(new, lambda errors: reply(not errors, "; ".join(errors),
                                                   {"changed": True, "generation": self.generation}))

    def _serve_api(self, interface: str) -> str | None:
        """Open `wg`'s socket for `interface`; the reason if it cannot be served."""
        try:
            self.uapi = UapiServer(interface, self.on_uapi)
        except (InUse, OSError) as err:
            self.uapi = None
            return f"cannot serve the WireGuard API socket: {err}"
        return None

    def on_uapi(self, request: GetRequest | SetRequest, respond: Callable[[bytes], None]) -> None:
        """`wg show` and `wg set`: a set is a config change applied like a reload."""
        if isinstance(request, GetRequest):
            respond(serialize_get(device_state(self.config, self.live_peers())))
            return
        new = apply_set(self.config, request)
        if isinstance(new, UapiError):
            self.log.warning("wg set refused", error=new.message)
            respond(serialize_errno(new))
        elif new == self.config:
            respond(serialize_errno(None))
        else:
            self.log.info("applying wg set")
            self.reconfigure(new, lambda errors: respond(serialize_errno(
                UapiError(errno.EIO, "; ".join(errors)) if errors else None)))

    def _on_signals(self) -> None:
        try:
            data = os.read(self.signal_r, 64)
        except BlockingIOError:
            return
        for signum in data:
            if signum in (signal.SIGTERM, signal.SIGINT):
                self.log.info("stopping on signal", signal=signal.Signals(signum).name)
                self.stopping = True
            elif signum == signal.SIGHUP:
                self.reload(lambda ok, error="", result=None: None)

    def status(self) -> dict[str, Any]:
        node = self.config.node
        return {
            "node": {"name": node.name, "public_key": b64(node.public_key),
                     "interface": node.interface, "listen_port": node.listen_port,
                     "addresses": [str(a) for a in node.addresses], "ready": self.ready,
                     "pid": os.getpid(), "generation": self.generation},
            "actors": [{"name": a.name, "kind": a.kind, "pid": a.pid, "state": a.state,
                        "restarts": a.restarts, "last_exit": a.exit_reason,
                        "bus_dropped": a.status.get("bus_dropped", {}),
                        "counters": a.status.get("counters", {})}
                       for a in self.actors.values()],
            "peers": peer_status(self.config, self.live_peers()),
            "supervisor": {"bus_dropped": self.bus_dropped},
        }

    def live_peers(self) -> dict[str, dict[str, Any]]:
        """Public key -> the live figures its owning crypto worker last reported."""
        return {p["public_key"]: p for a in self.actors.values() if a.kind == "crypto"
                for p in a.status.get("peers", [])}

    # --- shutdown ----------------------------------------------------------
    def shutdown(self) -> None:
        """Reverse start order, each actor asked to stop, then SIGKILL at the deadline."""
        self.stopping = True
        deadline = time.monotonic() + STOP_TIMEOUT
        order = sorted(self.actors.values(), key=lambda a: -START_ORDER.index(a.kind))
        for a in order:
            if a.process is None:
                continue
            a.state = "stopping"
            try:
                self.control.send_multipart([a.name.encode(), encode(Stop(req=0))], zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
            per_actor = min(1.5, max(0.0, deadline - time.monotonic()))
            a.process.join(per_actor)
            if a.process.exitcode is None:
                a.process.terminate()
                a.process.join(0.3)
        for a in order:
            if a.process is not None and a.process.exitcode is None:
                self._kill(a)
                a.process.join(1.0)
        self.close()

    def close(self) -> None:
        if self.uapi is not None:
            self.uapi.close()
        for tun in self.tun_queues:
            tun.close()
        self.tun_queues = []
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

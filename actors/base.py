"""The loop every actor runs: join the bus, heartbeat, take configuration.

An actor subclass supplies the domain work through a few hooks; this module
owns everything the supervisor relies on: the hello, heartbeats carrying
status, request/ack handling, counting (never raising on) bad frames, and
the test-only fault switches.
"""

from __future__ import annotations

import ctypes
import errno
import os
import select
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import zmq

from meshsup.actors.bus import batch
from meshsup.actors.bus.codec import DecodeError, Message, decode, encode
from meshsup.actors.bus.datapath import Inbox, Outbox
from meshsup.actors.bus.endpoints import Runtime
from meshsup.actors.bus.messages import Ack, Command, Configure, Heartbeat, Hello, PeersChanged, Stop
from meshsup.actors.log import RateLimited, setup
from meshsup.actors.registry import account_of
from meshsup.actors.settings import PeerSettings, Settings
from meshsup.actors.settings import wire as settings_wire
from meshsup.actors.settings.wire import WireError

HEARTBEAT_INTERVAL = 0.2
MANY_PEERS = 100  # a change of peers this large gives the memory its decoding left back
_LIBC = ctypes.CDLL(None)
FAULTS_ENV = "MESHSUP_TEST_FAULTS"


class ConfigError(ValueError):
    """Raised by `configure` to refuse a configuration (the ack carries it)."""


def _settings(cls: Any, wire: dict[str, Any]) -> Any:
    """The settings a Configure carries, decoded as the message's own (consumed: see wire.decode)."""
    try:
        return settings_wire.decode(cls, wire, consume=True)
    except WireError as err:
        raise ConfigError(f"settings from the supervisor do not decode: {err}") from None


class Actor:
    kind = "actor"
    settings_class: Any = Settings  # what its Configure carries (a relay's workers: RelaySettings)

    def __init__(self, name: str, runtime: Runtime) -> None:
        self.name = name
        self.runtime = runtime
        self.log = setup(name, runtime)
        self.ctx = zmq.Context()
        self.bus_dropped: Counter[str] = Counter()
        self._ratelimit = RateLimited()
        self._readers: dict[zmq.Socket, Callable[[], None]] = {}
        self._fds: dict[int, tuple[Callable[[], None], int]] = {}  # plain descriptors: handler, epoll events
        self._epoll: select.epoll | None = None  # the loop's, once running: watch() changes it in place
        self._by_fd: dict[int, Any] = {}  # what each of its descriptors stands for
        self._stopping = False
        self._hang = False
        self._poller_stale = True
        self._zmq_due: set[zmq.Socket] = set()  # sockets to ask for messages before sleeping
        self.outbox = Outbox(runtime.inbox)

        self.control = self.ctx.socket(zmq.DEALER)
        if runtime.identity is not None:
            self.control.setsockopt(zmq.IDENTITY, runtime.identity)
        self.control.setsockopt(zmq.LINGER, 1000)
        self.control.connect(runtime.unprivileged_control if runtime.drop else runtime.control)
        self.inbox = Inbox(
            runtime.inbox(name),
            self.add_reader,
            self.remove_reader,
            self._on_data,
            lambda: self.count_drop("oversized", "data message"),
        )
        self.events = self.ctx.socket(zmq.PUB)
        self.events.connect(runtime.publish_to)
        self.subscriptions = self.ctx.socket(zmq.SUB)
        self.subscriptions.connect(runtime.events_out)
        self.bind_runtime()
        if runtime.drop is not None:
            runtime.drop.finish()  # PrivilegeError: the actor does not run (actors.registry)
        self.holds_keys = False  # whether the last settings it was given carry key material
        self.running: Any = None  # the settings last applied (a PeersChanged changes them)
        self.generation = 0  # theirs

    # --- hooks for subclasses -------------------------------------------
    def bind_runtime(self) -> None:
        """Bind the actor's own sockets in the runtime dir: called while it is still root
        (only root creates files there), before an unprivileged kind drops privileges."""

    def configure(self, settings: Settings) -> None:
        """Apply the node's settings; raise ConfigError to refuse them."""

    def change_peers(self, settings: Settings, changed: list[PeerSettings], removed: list[bytes]) -> None:
        """Apply a change of peers alone: `settings` as they are now, `changed` the peers added or
        changed, `removed` the keys of those gone. Raise ConfigError to refuse it. An actor whose
        work grows with the peers does only theirs; by default it configures anew."""
        self.configure(settings)

    def command(self, op: str, args: dict[str, Any]) -> dict[str, Any]:
        raise ConfigError(f"unknown command {op!r}")

    def on_message(self, msg: Message) -> None:
        """A typed message from the inbox or a subscribed event."""
        self.count_drop("unexpected_type", msg.TAG)

    def status(self) -> dict[str, Any]:
        return {}

    def tick(self, now: float) -> None:
        """Called at least every heartbeat interval."""

    def close(self) -> None:
        """Release what the actor holds (fds, sockets) before exit."""

    # --- helpers for subclasses -----------------------------------------
    def add_reader(self, sock_or_fd: Any, handler: Callable[[], None]) -> None:
        """A ZeroMQ socket, an fd, or anything with fileno() (kept as its fd: the poller reports fds)."""
        thing = _pollable(sock_or_fd)
        if isinstance(thing, zmq.Socket):
            self._readers[thing] = handler
            self._poller_stale = True
        else:
            self.watch(thing, handler, read=True)

    def remove_reader(self, sock_or_fd: Any) -> None:
        thing = _pollable(sock_or_fd)
        if isinstance(thing, zmq.Socket):
            if self._readers.pop(thing, None) is not None:
                self._poller_stale = True
        else:
            self.unwatch(thing)

    def watch(self, fd: int, handler: Callable[[], None], *, read: bool = False, write: bool = False) -> None:
        """Call `handler` (once per wake-up) while `fd` is readable (`read`) or writable (`write`).

        Watching an fd again replaces its handler and events. The loop's epoll is changed in place, not
        rebuilt: a collector's socket changes between read and write with every request. Unwatch an fd
        before its number can be reused (closing it first is fine: the kernel forgets it then).
        """
        if not (read or write):
            self.unwatch(fd)
            return
        events = (select.EPOLLIN if read else 0) | (select.EPOLLOUT if write else 0)
        known = fd in self._fds
        self._fds[fd] = (handler, events)
        if self._epoll is None or self._poller_stale:
            return  # the next poller is built from _fds
        self._by_fd[fd] = handler
        try:
            if known:
                self._epoll.modify(fd, events)
            else:
                self._epoll.register(fd, events)
        except FileNotFoundError:  # closed and reused since it was watched: the kernel forgot it
            self._epoll.register(fd, events)
        except FileExistsError:
            self._epoll.modify(fd, events)

    def unwatch(self, fd: int) -> None:
        """Stop watching `fd`; nothing if it is not watched."""
        if self._fds.pop(fd, None) is None or self._epoll is None or self._poller_stale:
            return
        del self._by_fd[fd]
        try:
            self._epoll.unregister(fd)
        except OSError as err:
            if err.errno not in (errno.ENOENT, errno.EBADF, errno.EPERM):  # closed (and maybe reused) already
                raise

    def accept_from_unprivileged(self, kind: str, *types: type[Message]) -> None:
        """Let the actors of the unprivileged `kind` (known by its user's uid) send these messages
        to this actor's inbox; anything else from a process not running as root is counted and dropped."""

        def take(msg: Message) -> None:
            if isinstance(msg, types):
                self.on_message(msg)
            else:
                self.count_drop("unprivileged_sender", msg.TAG)

        self.inbox.share(
            account_of(kind).uid,
            lambda frame: self._dispatch(frame, take),
            lambda frame: self.count_drop("unprivileged_sender", f"not {kind}"),
        )

    def subscribe(self, *tags: str) -> None:
        for tag in tags:
            self.subscriptions.setsockopt(zmq.SUBSCRIBE, tag.encode())

    def publish(self, msg: Message) -> None:
        self.events.send_multipart([msg.TAG.encode(), encode(msg)])

    def unpack(self, blob: bytes) -> list[bytes] | None:
        """The packets of a batch frame, or None (counted) if the frame is malformed."""
        try:
            return batch.unpack(blob)
        except DecodeError as err:
            self.count_drop(err.reason, str(err))
            return None

    def stop_with(self, pid: int) -> None:
        """Stop, as on SIGTERM, once process `pid` (the supervisor) has ended, however it ended.
        Nothing else would tell: the actor's parent is the fork server, which outlives a supervisor
        killed outright as long as any actor runs."""
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            self.log.warning("supervisor gone, stopping", supervisor_pid=pid)
            self._request_stop()
            return

        def gone() -> None:
            self.unwatch(fd)
            os.close(fd)
            self.log.warning("supervisor gone, stopping", supervisor_pid=pid)
            self._request_stop()

        self.watch(fd, gone, read=True)

    def count_drop(self, reason: str, detail: str = "") -> None:
        self.bus_dropped[reason] += 1
        suppressed = self._ratelimit.should_log(reason, time.monotonic())
        if suppressed is not None:
            self.log.warning("bus frame dropped", reason=reason, detail=detail[:120], suppressed=suppressed)

    # --- the loop -------------------------------------------------------
    # One epoll over every descriptor. A ZeroMQ socket is watched through its
    # ZMQ_FD and asked for messages only when that fires, after we sent on it,
    # or at a heartbeat: asking costs syscalls (getpid, poll) per socket, which
    # on the hot path cost more than a small batch's work.
    def run(self) -> int:
        signal.signal(signal.SIGTERM, lambda *_: self._request_stop())
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides
        self._send(Hello(name=self.name, kind=self.kind, pid=os.getpid()))
        poller = select.epoll()
        by_fd: dict[int, Any] = {}
        seq = 0
        next_beat = 0.0
        try:
            while not self._stopping:
                now = time.monotonic()
                if now >= next_beat and not self._hang:
                    seq += 1
                    self._send(Heartbeat(name=self.name, seq=seq, status=self._status()))
                    next_beat = now + HEARTBEAT_INTERVAL
                    self._zmq_due.update((self.subscriptions, *self._zmq_readers()))
                if self._hang:
                    time.sleep(3600)
                    continue
                if self._poller_stale:
                    poller.close()
                    poller, by_fd = self._new_poller()
                timeout = 0.0 if self._zmq_due else max(0.0, next_beat - time.monotonic())
                for fd, _ in poller.poll(timeout):
                    target = by_fd.get(fd)
                    if isinstance(target, zmq.Socket):
                        self._zmq_due.add(target)
                    elif target is not None:
                        target()
                self._drain_due()
                self.tick(time.monotonic())
        finally:
            poller.close()
            self._epoll = None
            self.close()
            self.inbox.close()
            self.outbox.close()
            self.ctx.destroy(linger=500)
        return 0

    def _new_poller(self) -> tuple[select.epoll, dict[int, Any]]:
        poller = select.epoll()
        by_fd: dict[int, Any] = {}
        for sock in (self.control, self.subscriptions):
            by_fd[sock.getsockopt(zmq.FD)] = sock
        for sock in self._readers:
            by_fd[sock.getsockopt(zmq.FD)] = sock  # read in _drain_due, as control is
        for fd in by_fd:
            poller.register(fd, select.EPOLLIN)
        for fd, (handler, events) in self._fds.items():
            by_fd[fd] = handler
            poller.register(fd, events)
        self._poller_stale = False
        self._zmq_due.update(s for s in by_fd.values() if isinstance(s, zmq.Socket))  # may have queued already
        self._epoll, self._by_fd = poller, by_fd
        return poller, by_fd

    def _zmq_readers(self) -> list[zmq.Socket]:
        return list(self._readers)

    def _drain_due(self) -> None:
        """Read the ZeroMQ sockets that may have messages; one left unfinished stays due."""
        due, self._zmq_due = self._zmq_due, set()
        for sock in due:
            if sock is self.control:
                done = self._drain(sock, self._on_control)
            elif sock is self.subscriptions:
                done = self._drain(sock, self.on_message, topic=True)
            elif sock in self._readers:
                self._readers[sock]()
                done = not sock.getsockopt(zmq.EVENTS) & zmq.POLLIN  # its handler may stop at a budget
            else:
                continue  # removed meanwhile
            if not done:
                self._zmq_due.add(sock)

    def _request_stop(self) -> None:
        self._stopping = True

    def _status(self) -> dict[str, Any]:
        return {
            "bus_dropped": dict(self.bus_dropped),
            "send_dropped": dict(self.outbox.dropped),
            "holds_keys": self.holds_keys,
            **self.status(),
        }

    def _send(self, msg: Message) -> None:
        self.control.send(encode(msg))
        self._zmq_due.add(self.control)  # a send may take the signal meant for an incoming message

    def _drain(
        self, sock: zmq.Socket, handle: Callable[[Message], None], topic: bool = False, budget: int = 256
    ) -> bool:
        """Read what is ready (bounded, so control never starves); False if more may be left."""
        for _ in range(budget):
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=True)
            except zmq.Again:
                return True
            if len(frames) != (2 if topic else 1):
                self.count_drop("malformed", "frame count")
                continue
            self._dispatch(frames[-1], handle)
        return False

    def _on_data(self, frame: memoryview) -> None:
        """A message on the data path (actors.bus.datapath)."""
        self._dispatch(frame, self.on_message)

    def _dispatch(self, frame: bytes | memoryview, handle: Callable[[Message], None]) -> None:
        try:
            msg = decode(frame)
        except DecodeError as err:
            self.count_drop(err.reason, str(err))
            return
        try:
            handle(msg)
        except Exception as exc:  # a handler bug must not kill the actor on one message
            self.count_drop("handler_error", repr(exc))
            self.log.exception("message handler failed", tag=msg.TAG)

    def _on_control(self, msg: Message) -> None:
        if isinstance(msg, Configure):
            self._ack(msg.req, lambda: self._configure(_settings(self.settings_class, msg.config), msg.generation))
        elif isinstance(msg, PeersChanged):
            self._ack(msg.req, lambda: self._change_peers(msg))
        elif isinstance(msg, Command):
            if msg.op == "fault":
                self._ack(msg.req, lambda: self._fault(str(msg.args.get("mode"))))
            else:
                self._ack(msg.req, lambda: self.command(msg.op, msg.args))
        elif isinstance(msg, Stop):
            self._send(Ack(req=msg.req, ok=True, error="", result={}))
            self._stopping = True
        else:
            self.count_drop("unexpected_type", msg.TAG)

    def _configure(self, settings: Settings, generation: int) -> dict[str, Any]:
        self.holds_keys = settings.holds_secrets
        self.configure(settings)
        self.running, self.generation = settings, generation
        give_back_memory()
        return {}

    def _change_peers(self, msg: PeersChanged) -> dict[str, Any]:
        if msg.generation <= self.generation:
            return {"applied": True}  # a whole Configure brought it already
        if self.running is None or msg.base != self.generation:
            return {"applied": False}  # a change missed: the supervisor sends the whole config
        try:
            changed = [settings_wire.decode(PeerSettings, p, "peers") for p in msg.peers]
        except WireError as err:
            raise ConfigError(f"peers from the supervisor do not decode: {err}") from None
        settings = self.running.with_peers(changed, [bytes(k) for k in msg.removed])
        self.change_peers(settings, changed, msg.removed)
        self.holds_keys = settings.holds_secrets
        self.running, self.generation = settings, msg.generation
        if len(changed) + len(msg.removed) >= MANY_PEERS:
            give_back_memory()  # as after a whole config (a mesh's first peers come this way)
        return {"applied": True}

    def _ack(self, req: int, work: Callable[[], dict[str, Any]]) -> None:
        try:
            result = work()
        except ConfigError as err:
            self._send(Ack(req=req, ok=False, error=str(err), result={}))
            return
        except Exception as exc:  # a bug answers with an error instead of a silent timeout
            self.log.exception("request failed")
            self._send(Ack(req=req, ok=False, error=f"internal error: {exc!r}", result={}))
            return
        self._send(Ack(req=req, ok=True, error="", result=result))

    def _fault(self, mode: str) -> dict[str, Any]:
        """Test-only switches, honoured only when the node was started for tests."""
        if os.environ.get(FAULTS_ENV) != "1":
            raise ConfigError("fault switches are disabled")
        if mode == "hang":
            self._hang = True
        elif mode == "crash":
            os._exit(70)
        else:
            raise ConfigError(f"unknown fault {mode!r}")
        return {}


def give_back_memory() -> None:
    """What decoding and applying a whole config left free goes back to the kernel: with thousands
    of peers the wire form alone is megabytes, and every actor of a node decodes one (the
    supervisor encodes them). (No garbage collection first: it would walk every object the
    actor made for no gain, as decoding makes no cycles.)"""
    try:
        _LIBC.malloc_trim(0)
    except AttributeError:  # not glibc
        pass


def crash_on_start_requested(kind: str) -> bool:
    """MESHSUP_TEST_CRASH=KIND makes every start of that kind fail (crash loop test)."""
    return os.environ.get(FAULTS_ENV) == "1" and os.environ.get("MESHSUP_TEST_CRASH") == kind


def exit_now(code: int) -> None:
    sys.stderr.flush()
    os._exit(code)


def _pollable(thing: Any) -> Any:
    return thing if isinstance(thing, (zmq.Socket, int)) else thing.fileno()

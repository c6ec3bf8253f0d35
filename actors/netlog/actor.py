"""The netlog actor: flow records per window, and the node's own logs, shipped to collectors.

tun-io, magicsock and the crypto workers send counter deltas (FlowCounts) about once a second.
Each is written to the open window's log (wal.py) and acknowledged as it
arrives, so a netlog killed mid-window picks the window up again; it is
counted later, in slices of at most WORK_SLICE, so that a burst of many
connections never stalls the loop (heartbeats, control, shipping). A window
closes every `[netlog] interval` seconds, or early when it holds about a
record's worth of connections; its records go to every collector's spool,
and only then is the window log reset to the deltas not yet counted. Every
process of the node pushes its log events here too (actors.log); they go to
the [logging] collectors the same way.

Collector sockets are watched for what each sender waits for (a reply,
TLS data, a connect or send to finish), and the sender is pumped as soon as
that is ready; the loop's tick pumps every sender too, for what goes by the
clock (deadlines, backoff, syslog confirmations, a resolved name).

Starting first and stopping last (actors.registry), netlog counts the
node's first packets and, on stop, closes the last window and flushes it,
with a deadline: what is not delivered by then stays spooled for the next
start.
"""

from __future__ import annotations

import os
import time
from collections import Counter, deque
from collections.abc import Callable
from functools import partial
from typing import Any

import zmq

from meshsup.actors.base import Actor
from meshsup.actors.bus.codec import DecodeError, Message, decode, encode
from meshsup.actors.bus.endpoints import Runtime, grant
from meshsup.actors.bus.messages import FlowCounts, FlowCountsAck, LogLine
from meshsup.actors.kernel.resolve import Resolver
from meshsup.actors.log import log_endpoint
from meshsup.actors.netlog.counting import CountsReader, Deliveries
from meshsup.actors.netlog.daemonlog import LogIntake
from meshsup.actors.netlog.flows import FlowTable, Record
from meshsup.actors.netlog.formats import FLOWS, LOGS, RecordFormat
from meshsup.actors.netlog.mesh import Endpoints, classifier, key_peers
from meshsup.actors.netlog.mesh import change_peers as change_mesh_peers
from meshsup.actors.netlog.shipper import Sender, Shipper, Wait
from meshsup.actors.netlog.wal import WindowLog
from meshsup.actors.registry import KINDS, kind_of, unprivileged
from meshsup.actors.settings import PeerSettings, Settings
from meshsup.actors.settings.collectors import CollectorConfig
from meshsup.actors.settings.keys import b64
from meshsup.actors.settings.netlog import LEVELS, NetlogSettings

# Collector I/O runs in this loop without ever waiting; a request (resolving, connecting,
# TLS, sending, the answer) that is not done this long after it started counts as failed.
REQUEST_TIMEOUT = 5.0
BACKOFF_CAP = 10.0  # a collector that comes back gets records within this
FLUSH_TIMEOUT = 1.0  # at stop, inside the supervisor's per-actor grace
LOG_BUDGET = 256  # log lines read per wake-up, so flow counts are never starved
WORK_SLICE = 0.05  # seconds of counting per turn of the loop


class NetlogActor(Actor):
    kind = "netlog"

    def __init__(self, name: str, runtime: Runtime) -> None:
        super().__init__(name, runtime)
        self.settings: NetlogSettings | None = None
        self.reader = CountsReader()
        self.endpoints = Endpoints()  # the reader's endpoint names, kept peer by peer
        self.deliveries = Deliveries()
        self.table: FlowTable | None = None
        self.window_end = 0.0
        self.flow_shipper: Shipper | None = None
        self.log_shipper: Shipper | None = None
        self.resolver = Resolver()  # one cache of collector names for both shippers
        self.watching: dict[Sender, tuple[int, Wait]] = {}  # each watched collector socket's fd and wait
        self.intake = LogIntake()
        self.log_records: list[Record] = []
        self.counters: Counter[str] = Counter()
        self.spool_root = runtime.state_dir / "spool"
        self.wal = WindowLog(runtime.state_dir / "netlog" / "window.wal")
        self.wal_start, frames = self.wal.recover(time.time())
        self.pending: deque[tuple[FlowCounts, bytes]] = deque()  # logged, not yet counted
        for frame in frames:
            self._queue(frame)
        # A byte in this pipe wakes the loop while deltas wait to be counted.
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.woken = False
        self.add_reader(self.wake_r, self.count_pending)

    def bind_runtime(self) -> None:
        self.log_inboxes: dict[zmq.Socket, Callable[[str], bool]] = {}  # each, and whom its lines may name
        for apart, may_name in ((False, _anyone), (True, _unprivileged_actor)):
            inbox = self.ctx.socket(zmq.PULL)
            inbox.setsockopt(zmq.RCVHWM, 4096)
            inbox.bind(log_endpoint(self.runtime, apart))  # read once configured; lines wait till then
            grant(log_endpoint(self.runtime, apart), apart)
            self.log_inboxes[inbox] = may_name

    # --- configuration ------------------------------------------------------
    def configure(self, node_settings: Settings) -> None:
        settings, node = node_settings.netlog, node_settings.node
        self.endpoints = Endpoints(node_settings.peers)
        self.reader.peers = self.endpoints.by_endpoint
        self.reader.key_peers = key_peers(node_settings)
        rules = classifier(node_settings, settings.anonymize_exit)
        now = time.time()
        old = self.settings
        if old is None or old.collectors != settings.collectors:
            if self.table is not None and self.flow_shipper is not None:
                self._close_window(now)  # counted under the old collectors: theirs
                self.flow_shipper.close()
            self.flow_shipper = self._shipper(settings.collectors, "flows", FLOWS, node.name)
        if old is None or old.log_collectors != settings.log_collectors:
            if self.log_shipper is not None:
                self.log_shipper.close()
            self.log_shipper = self._shipper(settings.log_collectors, "logs", LOGS, node.name)
        self.intake.min_level = LEVELS[settings.log_level]
        if old is None:
            for inbox in self.log_inboxes:
                self.add_reader(inbox, partial(self.on_log_lines, inbox))
        self.settings = settings
        if self.table is None:
            self.table = FlowTable(b64(node.public_key), rules, self.wal_start, settings.max_record_bytes)
            self._wake()  # the deltas found in the window log, or received before now
        else:
            self.table.set_classifier(rules)
            self.table.node_id, self.table.max_record_bytes = b64(node.public_key), settings.max_record_bytes
        # A window found in the log spans the time netlog was away: it stays open long enough
        # for the counts tun-io and magicsock kept meanwhile to arrive in it.
        self.window_end = min(self.window_end or float("inf"), max(self.wal_start, now) + settings.interval)

    def change_peers(self, settings: Settings, changed: list[PeerSettings], removed: list[bytes]) -> None:
        """The changed peers' endpoints, addresses and networks alone (a one-peer `wg set` among
        thousands touches one peer's)."""
        if self.table is None or self.running is None:
            self.configure(settings)
            return
        keys = {*removed, *(p.public_key for p in changed)}
        gone = [p for p in self.running.peers if p.public_key in keys]
        change_mesh_peers(self.reader, self.endpoints, self.table.classifier, gone, changed)
        self.table.set_classifier(self.table.classifier)  # what it routed before is not kept

    def _shipper(
        self, collectors: tuple[CollectorConfig, ...], what: str, form: RecordFormat, hostname: str
    ) -> Shipper | None:
        if not collectors:
            return None
        return Shipper(
            list(collectors),
            self.spool_root / what,
            hostname,
            form=form,
            request_timeout=REQUEST_TIMEOUT,
            backoff_cap=BACKOFF_CAP,
            resolver=self.resolver,
        )

    # --- flow counts ----------------------------------------------------------
    def on_message(self, msg: Message) -> None:
        if not isinstance(msg, FlowCounts):
            return super().on_message(msg)
        if self.deliveries.fresh(msg):
            frame = encode(msg)
            self.wal.append(frame)
            self.pending.append((msg, frame))
            self._wake()
        self.outbox.send(msg.source, FlowCountsAck(epoch=msg.epoch, seq=msg.seq))  # logged: safe with us

    def _queue(self, frame: bytes) -> None:
        try:
            msg = decode(frame)
        except DecodeError as err:
            self.count_drop(err.reason, "window log")
            return
        if isinstance(msg, FlowCounts) and self.deliveries.fresh(msg):
            self.pending.append((msg, frame))

    def _wake(self) -> None:
        if not self.woken and self.pending and self.table is not None:
            os.write(self.wake_w, b"!")
            self.woken = True

    def count_pending(self, budget: float = WORK_SLICE) -> None:
        """Count waiting deltas for up to `budget` seconds; wake the loop again if some are left."""
        try:
            os.read(self.wake_r, 64)
        except BlockingIOError:
            pass
        self.woken = False
        if self.table is None:
            return
        deadline = time.monotonic() + budget
        while self.pending and time.monotonic() < deadline:
            msg, _ = self.pending.popleft()
            if not self.reader.apply(msg, self.table):
                self.count_drop("bad_layer", msg.layer)
            if self.table.full():
                self._close_window(time.time())
        self._wake()

    def _close_window(self, now: float) -> None:
        assert self.table is not None and self.settings is not None
        records = self.table.close_window(now)
        if records and self.flow_shipper is not None:
            self._submit(self.flow_shipper, records, now)
        self.wal.reset(now)
        for _, frame in self.pending:  # not counted yet: they belong to the new window
            self.wal.append(frame)
        self.wal_start = now
        while self.window_end <= now:  # on a grid, so the loop's lag does not stretch windows
            self.window_end += self.settings.interval

    def _submit(self, shipper: Shipper, records: list[Record], now: float) -> None:
        try:
            shipper.submit(records, now)
        except OSError as err:  # the spool's disk: these records are lost, and the next one says so
            self.counters["spool_errors"] += 1
            self.log.error("cannot spool records", error=str(err), records=len(records))
            if shipper is self.flow_shipper and self.table is not None:
                self.table.note_dropped(len(records))

    # --- the node's logs ------------------------------------------------------
    def on_log_lines(self, inbox: zmq.Socket) -> None:
        now, may_name = time.time(), self.log_inboxes[inbox]
        for _ in range(LOG_BUDGET):
            try:
                frame = inbox.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                msg = decode(frame)
            except DecodeError as err:
                self.count_drop(err.reason, "log line")
                continue
            if not isinstance(msg, LogLine):
                self.count_drop("unexpected_type", msg.TAG)
            elif self.log_shipper is not None:
                record = self.intake.feed(msg.seq, msg.line, now, may_name)
                if record is not None:
                    self.log_records.append(record)

    # --- the loop -------------------------------------------------------------
    def tick(self, now: float) -> None:
        wall = time.time()
        if self.table is not None and wall >= self.window_end:
            self._close_window(wall)
        self._submit_logs(wall)
        for shipper in (self.flow_shipper, self.log_shipper):
            if shipper is not None:
                shipper.pump(wall)
        self._watch_collectors()

    def _on_collector(self, shipper: Shipper, sender: Sender) -> None:
        """A collector's socket is ready for what its sender waits for."""
        shipper.pump_one(sender, time.time())
        self._watch_collectors()

    def _watch_collectors(self) -> None:
        """Watch each sender's socket for what it waits for now; stop watching those that wait for nothing."""
        waits = {
            sender: (shipper, sender.waiting_on())
            for shipper in (self.flow_shipper, self.log_shipper)
            if shipper is not None
            for sender in shipper.senders
        }
        # Stale watches go first: the number of a socket closed meanwhile may be another sender's now.
        for sender, (fd, old) in list(self.watching.items()):
            wait = waits.get(sender, (None, None))[1]
            if wait is None or wait.sock is not old.sock:
                self.unwatch(fd)
                del self.watching[sender]
        for sender, (shipper, wait) in waits.items():
            if wait is not None and (sender not in self.watching or self.watching[sender][1] != wait):
                fd = wait.sock.fileno()
                self.watch(fd, partial(self._on_collector, shipper, sender), read=wait.read, write=wait.write)
                self.watching[sender] = (fd, wait)

    def _submit_logs(self, now: float) -> None:
        if self.log_records and self.log_shipper is not None:
            records, self.log_records = self.log_records, []
            self._submit(self.log_shipper, records, now)

    def status(self) -> dict[str, Any]:
        counters = Counter(self.counters)
        if self.table is not None:
            flows = self.table.counters
            counters.update(
                records=flows.records,
                split_records=flows.split_records,
                bad_flows=flows.bad_input,
                skipped_flows=flows.skipped,
            )
        counters.update(
            bad_counts=self.reader.bad_entries,
            unreadable_packets=self.reader.unreadable_packets,
            log_lines=self.intake.counters.received,
            log_lines_lost=self.intake.counters.lost,
            log_lines_rate_limited=self.intake.counters.rate_limited,
            log_lines_impersonating=self.intake.counters.impersonating,
        )
        collectors = []
        for what, shipper in (("flows", self.flow_shipper), ("logs", self.log_shipper)):
            for name, stats in (shipper.stats() if shipper else {}).items():
                for key in ("sent", "delivered", "errors", "dropped"):
                    counters[f"{what}.{name}.{key}"] = getattr(stats, key)
            for name, depth in (shipper.depths() if shipper else {}).items():
                counters[f"{what}.{name}.spooled"] = depth
            collectors += [{"what": what, **c} for c in (shipper.collectors() if shipper else [])]
        return {"counters": dict(counters), "collectors": collectors}

    def close(self) -> None:
        """Count what is still queued, close the last window and flush, within FLUSH_TIMEOUT."""
        self.inbox.drain()
        self.count_pending(budget=float("inf"))
        if self.settings is not None:
            for inbox in self.log_inboxes:
                self.on_log_lines(inbox)
        now = time.time()
        if self.table is not None:
            self._close_window(now)
            self.wal.remove()  # a clean stop: the next start opens a new window
        self._submit_logs(now)
        deadline = now + FLUSH_TIMEOUT
        for shipper in (self.flow_shipper, self.log_shipper):
            if shipper is not None:
                shipper.flush(deadline)
                shipper.close()
        self.wal.close()
        os.close(self.wake_r)
        os.close(self.wake_w)


def _anyone(actor: str) -> bool:
    return True


def _unprivileged_actor(actor: str) -> bool:
    """Whether `actor` names an actor that runs unprivileged (what the unprivileged log socket's
    senders may speak for)."""
    kind = kind_of(actor)
    return kind in KINDS and unprivileged(kind)

"""One relay worker's DERP server, sans-IO: connections' bytes, bus events and time in;
bytes for connections, frames for other workers, events and closes out (`take()`).

Who may do what, as DERP has it: a client is known by the key it proved at
login (session.py); packets go only to a logged-in key, each in a RecvPacket
naming its sender; a second login of a key replaces the first (the newest
login wins, across workers too). A client that leaves is announced with
PeerGone to those it sent packets to; a sender to an unknown key is told
PeerGone(not here), at most 3 times a second. Holders of the relay's mesh key
may watch every login (PeerPresent/PeerGone), close a peer or forward packets.

Workers share who is where through bus events (RelayClientUp/Down, a
roster on request and every ROSTER_INTERVAL): a packet for a key on another
worker joins that worker's batch, one data-path message per batch.
Clocks are time.monotonic(), the same for every process of the host, so
logins compare across workers.
"""

from __future__ import annotations

import hmac
import random
import struct
from collections import Counter, defaultdict
from collections.abc import Callable, Set
from dataclasses import dataclass, field
from typing import Any

from meshsup.actors.bus.codec import Message
from meshsup.actors.bus.messages import RelayClientDown, RelayClientUp, RelayFrames, RelayRoster, RelayWorkerUp
from meshsup.actors.kernel.types import Buffer, Endpoint
from meshsup.actors.relay.session import Handshake
from meshsup.actors.wire import derp
from meshsup.actors.wire.derp import KEY_LEN, FrameError, FrameReader, FrameType, PeerGoneReason, PeerPresentFlags

MIN_BURST = derp.MAX_PACKET_SIZE + KEY_LEN  # a bucket holds at least one largest frame, as Tailscale's
KEEPALIVE_JITTER = 5.0
ROSTER_INTERVAL = 10.0
BATCH_BYTES = 60_000  # a batch to another worker, as the bus's data path likes them
_LEN = struct.Struct(">I")


@dataclass
class Settings:
    worker: str
    private: bytes
    public: bytes
    rate: int = 0  # per-client bytes/s read from it, 0 for no limit
    burst: int = 0
    mesh_key: str = ""


class TokenBucket:
    """Bytes a client may send; in debt, its connection is not read until the debt is paid."""

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate, self.burst, self.tokens, self.stamp = rate, burst, burst, now

    def charge(self, n: int, now: float) -> float:
        """Take n bytes' worth; seconds to wait before reading again (0 to go on)."""
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        self.tokens -= min(n, self.burst)
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate

    def allow(self, now: float) -> bool:
        """One more event, if the bucket has a token for it (never in debt)."""
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


@dataclass(eq=False)
class Client:
    conn: int
    remote: Endpoint
    key: bytes
    since: float
    reader: FrameReader
    flags: PeerPresentFlags
    can_mesh: bool
    bucket: TokenBucket | None
    next_keepalive: float
    gone_budget: TokenBucket
    preferred: bool = False
    watcher: bool = False
    seen: set[bytes] = field(default_factory=set)  # senders of what it got: told when they leave


@dataclass
class Remote:
    worker: str
    host: str
    port: int
    flags: int
    since: float


class Output:
    """What the worker does after a turn: writes, closes, reads paused or resumed, batches, events."""

    def __init__(self) -> None:
        self.send: defaultdict[int, list[Buffer]] = defaultdict(list)
        self.close: dict[int, str] = {}  # conn -> bad input's reason, "" for none
        self.pause: dict[int, float] = {}  # conn -> when to read it again
        self.resume: set[int] = set()
        self.remote: defaultdict[str, list[bytes]] = defaultdict(list)
        self.events: list[Message] = []

    def batches(self) -> list[tuple[str, RelayFrames]]:
        out = []
        for worker, entries in self.remote.items():
            start = size = 0
            for i, e in enumerate(entries):
                if size + len(e) > BATCH_BYTES and i > start:
                    out.append((worker, RelayFrames(frames=b"".join(entries[start:i]))))
                    start, size = i, 0
                size += len(e)
            out.append((worker, RelayFrames(frames=b"".join(entries[start:]))))
        return out


class Core:
    def __init__(self, settings: Settings, now: float) -> None:
        self.s = settings
        self.started = now
        self.pending: dict[int, tuple[Handshake, Endpoint]] = {}
        self.clients: dict[int, Client] = {}
        self.by_key: dict[bytes, Client] = {}
        self.table: dict[bytes, Remote] = {}  # keys logged in on other workers
        self.paused: dict[int, float] = {}
        self.counters: Counter[str] = Counter()
        self.bad: Counter[str] = Counter()
        self.dropped: Counter[str] = Counter()
        self.out = Output()
        self._next_scan = now
        self._next_roster = now + ROSTER_INTERVAL
        self.out.events.append(RelayWorkerUp(worker=settings.worker, started=now))

    def take(self) -> Output:
        out, self.out = self.out, Output()
        return out

    # --- connections ---------------------------------------------------------
    def accept(self, conn: int, remote: Endpoint, now: float) -> None:
        self.pending[conn] = (Handshake(self.s.private, self.s.public, now), remote)

    def receive(self, conn: int, data: Buffer, now: float) -> None:
        c = self.clients.get(conn)
        if c is not None:
            c.reader.feed(data)
            if conn not in self.paused:
                self._frames(c, now)
            return
        hs, remote = self.pending.get(conn, (None, None))
        if hs is None or remote is None:
            return
        step = hs.receive(data)
        if step.send:
            self.out.send[conn].append(step.send)
        if step.close is not None:
            self.counters["probes" if step.close == "" else "refused"] += 1
            self._drop_conn(conn, step.close)
        elif step.login is not None:
            del self.pending[conn]
            self._login(conn, remote, hs.reader, step.login.key, step.login.info, now)

    def ended(self, conn: int, now: float, error: bool = False) -> None:
        """The connection closed (or failed): a frame cut short counts as truncated input."""
        c = self.clients.get(conn)
        pending = self.pending.pop(conn, None)
        reader = c.reader if c is not None else pending[0].reader if pending is not None else None
        if reader is not None and not error and (reason := reader.unfinished()):
            self.bad[reason] += 1
        if c is not None:
            self._leave(c)
        self.paused.pop(conn, None)

    def _drop_conn(self, conn: int, reason: str) -> None:
        if reason:
            self.bad[reason] += 1
        self.out.close[conn] = reason
        self.pending.pop(conn, None)
        self.paused.pop(conn, None)
        c = self.clients.get(conn)
        if c is not None:
            self._leave(c)

    def _login(
        self, conn: int, remote: Endpoint, reader: FrameReader, key: bytes, info: dict[str, Any], now: float
    ) -> None:
        mesh = bool(self.s.mesh_key) and hmac.compare_digest(
            str(info.get("meshkey", "")).encode(), self.s.mesh_key.encode()
        )
        flags = PeerPresentFlags.MESH_PEER if mesh else PeerPresentFlags.REGULAR
        if info.get("isprober"):
            flags |= PeerPresentFlags.PROBER
        old = self.by_key.pop(key, None)
        if old is not None:  # replaced: no PeerGone, no ClientDown (the new login's ClientUp says it)
            self.counters["replaced"] += 1
            self._drop_conn(old.conn, "")
        rate, burst = self.s.rate, max(self.s.burst, MIN_BURST)
        c = Client(
            conn,
            remote,
            key,
            now,
            reader,
            flags,
            mesh,
            TokenBucket(rate, burst, now) if rate and not mesh else None,
            now + derp.KEEPALIVE_INTERVAL + random.uniform(0, KEEPALIVE_JITTER),
            TokenBucket(3, 3, now),
        )
        self.clients[conn], self.by_key[key] = c, c
        self.counters["logins"] += 1
        self.out.send[conn].append(derp.server_info(self.s.private, key, rate, burst if rate else 0))
        self.out.events.append(
            RelayClientUp(worker=self.s.worker, key=key, host=remote[0], port=remote[1], flags=int(flags), since=now)
        )
        self._tell_watchers(key, remote[0], remote[1], flags)
        self._frames(c, now)

    def _leave(self, c: Client) -> None:
        del self.clients[c.conn]
        if self.by_key.get(c.key) is not c:
            return
        del self.by_key[c.key]
        self.out.events.append(RelayClientDown(worker=self.s.worker, key=c.key, since=c.since))
        if c.key not in self.table:
            self._gone(c.key)

    def _gone(self, key: bytes) -> None:
        """`key` left the relay: tell those it sent to, and the watchers."""
        for other in self.clients.values():
            if key in other.seen or other.watcher:
                other.seen.discard(key)
                self.out.send[other.conn].append(derp.peer_gone(key, PeerGoneReason.DISCONNECTED))
                self.counters["peer_gone_sent"] += 1

    def _tell_watchers(self, key: bytes, host: str, port: int, flags: int) -> None:
        for w in self.clients.values():
            if w.watcher:
                self.out.send[w.conn].append(derp.peer_present(key, host, port, PeerPresentFlags(flags)))

    # --- frames from a logged-in client ------------------------------------------
    def _frames(self, c: Client, now: float) -> None:
        while c.conn in self.clients:
            try:
                frame = c.reader.next()
            except FrameError as err:
                self._drop_conn(c.conn, err.reason)
                return
            if frame is None:
                return
            ftype, payload = frame
            if ftype == FrameType.SEND_PACKET:
                self._forward(c.key, payload[:KEY_LEN], payload[KEY_LEN:], c, now)
            else:
                self._other_frame(c, ftype, payload, now)
            if c.bucket is not None and (wait := c.bucket.charge(len(payload), now)):
                self.counters["rate_limited"] += 1
                self.paused[c.conn] = self.out.pause[c.conn] = now + wait
                return

    def _forward(self, src: bytes, dst: bytes, packet: bytes, sender: Client | None, now: float) -> None:
        self.counters["packets_in"] += 1
        self.counters["bytes_in"] += len(packet)
        frame = derp.header(FrameType.RECV_PACKET, KEY_LEN + len(packet)) + src + packet
        to = self.by_key.get(dst)
        if to is not None:
            to.seen.add(src)
            self.out.send[to.conn].append(frame)
            self.counters["packets_out"] += 1
        elif (r := self.table.get(dst)) is not None:
            self.out.remote[r.worker].append(dst + frame)
            self.counters["packets_to_workers"] += 1
        else:
            self.dropped["unknown_dest"] += 1
            if sender is not None and sender.gone_budget.allow(now):
                self.out.send[sender.conn].append(derp.peer_gone(dst, PeerGoneReason.NOT_HERE))

    def _other_frame(self, c: Client, ftype: int, payload: bytes, now: float) -> None:
        if ftype == FrameType.PING:
            self.out.send[c.conn].append(derp.pong(payload[: derp.PING_LEN]))
            self.counters["pongs"] += 1
        elif ftype == FrameType.NOTE_PREFERRED:
            c.preferred = payload[0] != 0
        elif ftype in (FrameType.KEEP_ALIVE, FrameType.PONG):
            pass
        elif ftype in (FrameType.WATCH_CONNS, FrameType.CLOSE_PEER, FrameType.FORWARD_PACKET):
            if not c.can_mesh:
                self._drop_conn(c.conn, f"{derp.type_name(ftype)}_denied")
            elif ftype == FrameType.WATCH_CONNS:
                c.watcher = True
                for k, o in self.by_key.items():
                    self.out.send[c.conn].append(derp.peer_present(k, o.remote[0], o.remote[1], o.flags))
                for k, r in self.table.items():
                    if k not in self.by_key:
                        self.out.send[c.conn].append(derp.peer_present(k, r.host, r.port, PeerPresentFlags(r.flags)))
            elif ftype == FrameType.CLOSE_PEER and (victim := self.by_key.get(payload)) is not None:
                self._drop_conn(victim.conn, "")
            elif ftype == FrameType.FORWARD_PACKET:
                self._forward(payload[:KEY_LEN], payload[KEY_LEN : 2 * KEY_LEN], payload[2 * KEY_LEN :], None, now)
        else:
            self.bad[f"unexpected_{derp.type_name(ftype)}"] += 1  # skipped, as Tailscale's server does

    # --- other workers -------------------------------------------------------------
    def on_frames(self, blob: bytes) -> None:
        """A batch from another worker: deliver each frame whose destination is still here."""
        pos, end, view = 0, len(blob), memoryview(blob)  # frames go out as views of the batch, uncopied
        while pos + KEY_LEN + derp.FRAME_HEADER_LEN <= end:
            dst = blob[pos : pos + KEY_LEN]
            size = derp.FRAME_HEADER_LEN + _LEN.unpack_from(blob, pos + KEY_LEN + 1)[0]
            start, pos = pos + KEY_LEN, pos + KEY_LEN + size
            to = self.by_key.get(dst)
            if to is None:
                self.dropped["gone_disconnected"] += 1
                continue
            frame = view[start:pos]
            to.seen.add(blob[start + derp.FRAME_HEADER_LEN : start + derp.FRAME_HEADER_LEN + KEY_LEN])
            self.out.send[to.conn].append(frame)
            self.counters["packets_out"] += 1

    def on_event(self, msg: Message, now: float) -> None:
        if getattr(msg, "worker", None) == self.s.worker:
            return  # our own, back through the proxy
        if isinstance(msg, RelayClientUp):
            self._remote_up(msg.key, Remote(msg.worker, msg.host, msg.port, msg.flags, msg.since))
        elif isinstance(msg, RelayClientDown):
            r = self.table.get(msg.key)
            if r is not None and r.worker == msg.worker and r.since == msg.since:
                del self.table[msg.key]
                if msg.key not in self.by_key:
                    self._gone(msg.key)
        elif isinstance(msg, RelayWorkerUp):
            self._forget(msg.worker, lambda r: r.since < msg.started, frozenset())
            self.out.events.append(self.roster())
        elif isinstance(msg, RelayRoster):
            listed = {bytes(k) for k, *_ in msg.clients}
            self._forget(msg.worker, lambda r: True, listed)
            for key, host, port, flags, since in msg.clients:
                self._remote_up(bytes(key), Remote(msg.worker, host, port, flags, since))

    def _remote_up(self, key: bytes, r: Remote) -> None:
        local = self.by_key.get(key)
        if local is not None and (r.since, r.worker) > (local.since, self.s.worker):
            del self.by_key[key]  # replaced by a newer login elsewhere: no PeerGone
            self.counters["replaced"] += 1
            self._drop_conn(local.conn, "")
        known = self.table.get(key)
        if known is None or (r.since, r.worker) >= (known.since, known.worker):
            if known is None or known.worker != r.worker or known.since != r.since:
                self._tell_watchers(key, r.host, r.port, r.flags)
            self.table[key] = r

    def _forget(self, worker: str, which: Callable[[Remote], bool], keep: Set[bytes]) -> None:
        """Drop `worker`'s entries that `which` picks, except those in `keep`; they left."""
        for key, r in list(self.table.items()):
            if r.worker == worker and key not in keep and which(r):
                del self.table[key]
                if key not in self.by_key:
                    self._gone(key)

    def keep_workers(self, workers: Set[str]) -> None:
        """The relay was scaled: clients of workers no longer there are gone."""
        for worker in {r.worker for r in self.table.values()} - set(workers):
            self._forget(worker, lambda r: True, frozenset())

    def roster(self) -> RelayRoster:
        return RelayRoster(
            worker=self.s.worker,
            clients=[[c.key, c.remote[0], c.remote[1], int(c.flags), c.since] for c in self.by_key.values()],
        )

    # --- time ------------------------------------------------------------------
    def tick(self, now: float) -> None:
        for conn, until in list(self.paused.items()):
            if now >= until:
                del self.paused[conn]
                self.out.resume.add(conn)
                if (c := self.clients.get(conn)) is not None:
                    self._frames(c, now)
        if now < self._next_scan:
            return
        self._next_scan = now + 1.0
        for conn, (hs, _) in list(self.pending.items()):
            if hs.expired(now):
                self._drop_conn(conn, "login_timeout")
        for c in self.clients.values():
            if now >= c.next_keepalive:
                self.out.send[c.conn].append(derp.keep_alive())
                c.next_keepalive = now + derp.KEEPALIVE_INTERVAL + random.uniform(0, KEEPALIVE_JITTER)
        if now >= self._next_roster:
            self._next_roster = now + ROSTER_INTERVAL
            self.out.events.append(self.roster())

    def restarting(self, reconnect_in_ms: int, try_for_ms: int) -> None:
        """The worker is stopping: tell every client when to come back."""
        for c in self.clients.values():
            self.out.send[c.conn].append(derp.restarting(reconnect_in_ms, try_for_ms))

    def status(self) -> dict[str, Any]:
        counters = dict(
            self.counters,
            connections=len(self.pending) + len(self.clients),
            clients=len(self.clients),
            home_clients=sum(c.preferred for c in self.clients.values()),
            watchers=sum(c.watcher for c in self.clients.values()),
            remote_clients=len(self.table),
        )
        return {"counters": counters, "bad_input": dict(self.bad), "dropped": dict(self.dropped)}

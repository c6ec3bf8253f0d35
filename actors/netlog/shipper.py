"""Shipping records to collectors: the IO around the sans-IO cores.

One sender per collector, each with its own spool or queue and its own
retry state, so a dead collector never holds up the others. `Shipper.pump`
is called from the netlog actor's loop and never waits: host names are
resolved in threads (kernel/resolve.py), sockets are non-blocking, and each pump
takes a connection or request as far as it can go without waiting. Each
sender says what it waits for (`waiting_on`: its socket readable, writable
or both), so the loop pumps it as soon as that is ready instead of at its
next tick. A collector cannot stall the loop: a request (resolving, connecting, the TLS
handshake, sending, reading the answer) has one deadline for all of it, and
what is read from a collector is capped in bytes. A sender that fails in a
way nobody foresaw is reset and backs off like any failing collector; it
never raises out of the loop. All `now` values are wall-clock seconds
(time.time()), because an HTTP Retry-After may be a date.

Delivery:
- syslog (TCP, or TLS per RFC 5425), octet-counted, at least once. TCP
  has no application acknowledgement, so a record is removed from the spool
  only when (1) all its bytes were handed to the kernel, (2) the kernel's
  send queue has since drained (TIOCOUTQ is 0: the peer's TCP acknowledged
  every byte), (3) `confirm_delay` has passed since the write, and (4) the
  connection is still open then (no EOF or reset read from it). A collector
  that dies with our bytes unread in its socket resets the connection, and
  a closed one shows EOF: either way every unconfirmed record is sent again
  on the next connection. Duplicates are possible, loss is not (short of the
  collector losing what it had acknowledged and read). A batch not
  acknowledged `ack_timeout` after it was queued (a collector that stopped
  reading) fails the connection, and so does a collector that sends more
  than _PEER_BYTES_MAX on it: a syslog receiver has nothing to say.
- http: batched POST of a JSON array (optionally gzip), or of journal
  export entries for systemd-journal-remote. 2xx removes the
  batch; 429 and 5xx are retried, honouring Retry-After; connection errors,
  an answer longer than _REPLY_MAX or not complete by the deadline are
  retried with backoff; any other status refuses the batch for good, so
  it is dropped and the next record carries the count.
- ipfix over UDP: best effort, from a bounded queue.
"""

from __future__ import annotations

import errno
import fcntl
import gzip
import os
import random
import select
import socket
import ssl
import struct
import termios
import time
from collections import deque
from dataclasses import InitVar, dataclass, field
from pathlib import Path
from typing import Protocol

import structlog

from meshsup.actors.kernel.resolve import Address, Resolver
from meshsup.actors.netlog import journal_export
from meshsup.actors.netlog.flows import Record, encode_record
from meshsup.actors.netlog.formats import FLOWS, RecordFormat
from meshsup.actors.netlog.http11 import HttpError, ResponseReader, post_request
from meshsup.actors.netlog.ipfix import IpfixExporter
from meshsup.actors.netlog.retry import Backoff, parse_retry_after
from meshsup.actors.netlog.spool import Spool
from meshsup.actors.netlog.syslog import encode_message, frame
from meshsup.actors.settings.collectors import CollectorConfig

log = structlog.get_logger(__name__)

_SEND_CHUNK = 16384  # below a TLS record, so a retried ssl write repeats the same bytes
_IPFIX_QUEUE = 1024  # datagrams waiting to be sent; beyond that the oldest go
_PEER_BYTES_MAX = 64 * 1024  # a syslog collector has nothing to say: past this on a connection it is not one
_REPLY_MAX = 1 << 20  # an HTTP answer (head and body) longer than this fails the request
_RECV_CHUNK = 65536  # also what one pump reads of an HTTP answer, so parsing a long one takes turns
_ANSWERS_PER_PUMP = 4  # a collector answering at once (or unasked) gets no more requests than this per pump
_FLUSH_STEP = 0.02  # at stop, the longest wait between pumps: confirmations and backoff go by the clock


@dataclass
class SenderStats:
    sent: int = 0  # records (ipfix: datagrams) written to the collector
    delivered: int = 0  # records confirmed and removed from the spool
    errors: int = 0  # failed connects, writes, requests
    retries: int = 0  # HTTP 429/5xx answers
    rejected: int = 0  # records the collector refused for good
    dropped: int = 0  # records lost here: spool or queue full, or refused for good
    last_error: str = ""


@dataclass(frozen=True)
class Wait:
    """What a sender's next pump waits for: its socket readable (`read`), writable (`write`) or either."""

    sock: socket.socket
    read: bool
    write: bool


class Sender(Protocol):
    config: CollectorConfig
    stats: SenderStats

    def offer(self, records: list[Record], now: float) -> None: ...
    def pump(self, now: float) -> None: ...
    def waiting_on(self) -> Wait | None: ...
    def abort(self, now: float, error: str) -> None: ...
    def idle(self) -> bool: ...
    def depth(self) -> int: ...  # records (IPFIX: messages) waiting to go: the spool's or the queue's
    def close(self) -> None: ...


def _tls_context(config: CollectorConfig) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(config.ca_file) if config.ca_file else None)


def _polled(sock: socket.socket, events: int) -> bool:
    """Whether `sock` is ready for `events` (or failed) right now; never waits."""
    poller = select.poll()
    poller.register(sock, events)
    return bool(poller.poll(0))


class _Connector:
    """A TCP connection and its TLS handshake, made a step per pump, never waiting, before a deadline.

    The deadline covers name resolution, every address tried and the handshake together.
    """

    def __init__(self, config: CollectorConfig, resolver: Resolver, deadline: float) -> None:
        self.config, self.resolver, self.deadline = config, resolver, deadline
        self._addresses: list[Address] | None = None
        self._sock: socket.socket | None = None
        self._connected = False
        self._handshake_write = False  # the TLS handshake waits to write, not to read
        self._error: OSError = OSError("no address to connect to")

    def step(self, now: float) -> socket.socket | None:
        """The connected socket (non-blocking) once ready, else None; raises OSError on failure or past the deadline."""
        try:
            ready = self._advance()
            if not ready and now >= self.deadline:
                raise TimeoutError(f"{self._stage()} not done by the deadline")
        except BaseException:
            self.close()
            raise
        if not ready:
            return None
        sock, self._sock = self._sock, None
        return sock

    def waiting_on(self) -> Wait | None:
        """None while resolving: the resolver thread's answer is picked up at the loop's next tick."""
        if self._sock is None:
            return None
        if not self._connected:
            return Wait(self._sock, read=False, write=True)
        return Wait(self._sock, read=not self._handshake_write, write=self._handshake_write)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
        self._sock = None

    def _stage(self) -> str:
        if self._addresses is None:
            return f"resolving {self.config.host}"
        return "TLS handshake" if self._connected else "connect"

    def _advance(self) -> bool:
        if self._addresses is None:
            self._addresses = self.resolver.lookup(self.config.host, self.config.port, socket.SOCK_STREAM)
            if self._addresses is None:
                return False
        if not self._connected:
            if not self._tcp_connected():
                return False
            self._connected = True
            if self.config.tls:
                assert self._sock is not None
                self._sock = _tls_context(self.config).wrap_socket(
                    self._sock, server_hostname=self.config.host, do_handshake_on_connect=False
                )
        if self.config.tls:
            assert isinstance(self._sock, ssl.SSLSocket)
            try:
                self._sock.do_handshake()
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError) as e:
                self._handshake_write = isinstance(e, ssl.SSLWantWriteError)
                return False
        return True

    def _tcp_connected(self) -> bool:
        """Each address in turn, as socket.create_connection does, but without waiting for any."""
        assert self._addresses is not None
        while True:
            if self._sock is None:
                if not self._addresses:
                    raise self._error
                family, address = self._addresses.pop(0)
                self._sock = socket.socket(family, socket.SOCK_STREAM)
                self._sock.setblocking(False)
                # Sent in pieces (_SEND_CHUNK), a request's last one would wait for the collector's delayed ACK.
                self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                err = self._sock.connect_ex(address)
                if err not in (0, errno.EINPROGRESS):
                    self._fail(err)
                    continue
            if not _polled(self._sock, select.POLLOUT):
                return False
            err = self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if not err:
                return True
            self._fail(err)

    def _fail(self, err: int) -> None:
        self.close()
        self._error = OSError(err, os.strerror(err))


@dataclass(eq=False, repr=False)
class _SpooledSender:
    """What the syslog and http senders share: a spool, a backoff, stats, a connector."""

    config: CollectorConfig
    spool_root: InitVar[Path]
    backoff: Backoff
    request_timeout: float
    form: RecordFormat
    resolver: Resolver
    spool: Spool = field(init=False)
    stats: SenderStats = field(init=False, default_factory=SenderStats)
    _connector: _Connector | None = field(init=False, default=None)
    _sock: socket.socket | None = field(init=False, default=None)

    def __post_init__(self, spool_root: Path) -> None:
        self.spool = Spool(spool_root / self.config.name, self.config.spool_max_records, self.config.spool_max_bytes)

    def offer(self, records: list[Record], now: float) -> None:
        self.spool.extend(records)
        self.stats.dropped = self.spool.dropped

    def idle(self) -> bool:
        return len(self.spool) == 0

    def depth(self) -> int:
        return len(self.spool)

    def _connected(self, now: float, deadline: float) -> socket.socket | None:
        """Start connecting (to be done by `deadline`) or go on; the socket once connected.

        Raises OSError if connecting failed.
        """
        if self._connector is None:
            self._connector = _Connector(self.config, self.resolver, deadline)
        try:
            sock = self._connector.step(now)
        except OSError:
            self._connector = None
            raise
        if sock is not None:
            self._connector = None
        return sock

    def _connecting(self) -> Wait | None:
        return self._connector.waiting_on() if self._connector is not None else None

    def close(self) -> None:
        if self._connector is not None:
            self._connector.close()
        self._connector = None

    def _failed(self, now: float, error: str, retry_after: float | None = None) -> None:
        if not self.stats.last_error or self.backoff.failures == 0:
            log.warning("netlog collector failing", collector=self.config.name, error=error)
        self.stats.errors += 1
        self.stats.last_error = error
        self.backoff.failure(now, retry_after)


@dataclass
class _Batch:
    names: list[str]
    queued_at: float
    written_at: float | None = None  # when its last byte reached the kernel


@dataclass(eq=False, repr=False)
class SyslogSender(_SpooledSender):
    hostname: str
    confirm_delay: float = 0.3
    ack_timeout: float = 10.0
    write_budget: int = 256 * 1024
    _peer_bytes: int = field(init=False, default=0)  # what the collector sent on this connection
    _out: bytearray = field(init=False, default_factory=bytearray)
    _in_flight: list[_Batch] = field(init=False, default_factory=list)

    def idle(self) -> bool:
        return super().idle() and not self._in_flight

    def waiting_on(self) -> Wait | None:
        if self._sock is None:
            return self._connecting()
        # Readable: the collector closed, reset or talks. Writable: bytes not yet sent, or records not yet written.
        unsent = len(self.spool) > sum(len(batch.names) for batch in self._in_flight)
        return Wait(self._sock, read=True, write=bool(self._out) or unsent)

    def pump(self, now: float) -> None:
        if self._sock is not None:
            try:
                self._send_pending(now)
                self._confirm(now)
            except OSError as e:
                self.abort(now, f"connection lost: {e}")
        if self._sock is None and (self._connector is not None or (len(self.spool) and self.backoff.ready(now))):
            try:
                sock = self._connected(now, now + self.request_timeout)
            except OSError as e:  # ssl.SSLError and TimeoutError are OSErrors too
                self._failed(now, f"connect to {self.config.url} failed: {e}")
                return
            if sock is None:
                return
            self._sock, self._peer_bytes = sock, 0
        if self._sock is not None and not self._out:
            try:
                self._write_batch(now)
            except OSError as e:
                self.abort(now, f"write failed: {e}")

    def close(self) -> None:
        """Drop the connection; unconfirmed records stay spooled and go again on the next one."""
        super().close()
        if self._sock is not None:
            self._sock.close()
        self._sock = None
        self._out.clear()
        self._in_flight.clear()

    def _write_batch(self, now: float) -> None:
        busy = {name for batch in self._in_flight for name in batch.names}
        names: list[str] = []
        for name in self.spool.entries():
            if len(self._out) >= self.write_budget:
                break
            record = None if name in busy else self.spool.read(name)
            if record is not None:
                self._out += frame(encode_message(self.form.syslog(record, now, self.hostname)))
                names.append(name)
        if names:
            self._in_flight.append(_Batch(names, now))
            self.stats.sent += len(names)
            self._send_pending(now)

    def _send_pending(self, now: float) -> None:
        assert self._sock is not None
        while self._out:
            try:
                sent = self._sock.send(self._out[:_SEND_CHUNK])
            except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
                return  # the kernel buffer is full: go on at the next pump
            del self._out[:sent]
        if self._in_flight and self._in_flight[-1].written_at is None:
            self._in_flight[-1].written_at = now

    def _confirm(self, now: float) -> None:
        """Remove batches the peer has acknowledged while the connection stayed up."""
        assert self._sock is not None
        if not self._peer_open():
            if self._in_flight:
                raise ConnectionResetError("closed by the collector")
            self.close()  # an idle connection the collector let go: not a failure
            return
        if not self._in_flight:
            return
        oldest = self._in_flight[0]
        # Not all written yet, or not all acknowledged: a collector that stopped reading.
        if oldest.written_at is None or _unacked_bytes(self._sock) > 0:
            if now - oldest.queued_at > self.ack_timeout:
                raise TimeoutError(f"no TCP acknowledgement for {self.ack_timeout} s")
            return
        while self._in_flight:
            written_at = self._in_flight[0].written_at
            if written_at is None or now - written_at < self.confirm_delay:
                return
            batch = self._in_flight.pop(0)
            for name in batch.names:
                self.spool.remove(name)
            self.stats.delivered += len(batch.names)
            self.backoff.success()
            self.stats.last_error = ""

    def _peer_open(self) -> bool:
        """False once the collector closed or reset the connection. What it sends is read and dropped, up to
        _PEER_BYTES_MAX a connection: one that keeps talking is no syslog receiver, and is not read for ever."""
        assert self._sock is not None
        while True:
            try:
                data = self._sock.recv(_RECV_CHUNK)
            except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                return True
            except OSError:
                return False
            if not data:
                return False
            self._peer_bytes += len(data)
            if self._peer_bytes > _PEER_BYTES_MAX:
                raise ConnectionError(f"the collector sent more than {_PEER_BYTES_MAX} bytes")

    def abort(self, now: float, error: str) -> None:
        self.close()
        self._failed(now, error)


def _unacked_bytes(sock: socket.socket) -> int:
    """Bytes in the socket's send queue not yet acknowledged by the peer (Linux TIOCOUTQ)."""
    raw = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, struct.pack("i", 0))
    return int(struct.unpack("i", raw)[0])


@dataclass
class _Request:
    names: list[str]
    out: bytearray  # the request's bytes not yet sent
    deadline: float
    reply: ResponseReader


class HttpSender(_SpooledSender):
    """One POST at a time, kept alive between requests when the collector allows."""

    _request: _Request | None = None  # the POST in flight, set per instance

    def pump(self, now: float) -> None:
        # An answer read here lets the next request start at once: the loop waits for its answer, not a tick.
        for _ in range(_ANSWERS_PER_PUMP):
            if self._request is None:
                if not len(self.spool) or not self.backoff.ready(now) or not self._start(now):
                    return
            try:
                reply = self._exchange(now)
            except (OSError, HttpError) as e:
                self.abort(now, f"POST to {self.config.url} failed: {e}")
                return
            if reply is None:
                return
            now = time.time()  # a Retry-After counts from the answer, not from the request
            self._answered(reply, now)
        # The budget is spent on answers, and more may wait: the next request is begun, not read, so
        # that its socket (writable, or connecting) wakes the loop. Else nothing would until a tick.
        if self._request is None and len(self.spool) and self.backoff.ready(now) and self._start(now):
            assert self._request is not None
            if self._sock is None:
                try:
                    self._sock = self._connected(now, self._request.deadline)
                except OSError as e:
                    self.abort(now, f"POST to {self.config.url} failed: {e}")

    def waiting_on(self) -> Wait | None:
        if self._request is None:
            return None  # a kept-alive connection is not watched: _start checks it before reusing it
        if self._sock is None:
            return self._connecting()
        # An answer may come before the whole request is sent (a 413, say): always readable too.
        return Wait(self._sock, read=True, write=bool(self._request.out))

    def _answered(self, reply: ResponseReader, now: float) -> None:
        assert self._request is not None
        names, self._request = self._request.names, None
        if not reply.keep_alive or reply.extra:
            self.close()
        self.stats.sent += len(names)
        status = reply.status
        if 200 <= status < 300:
            for name in names:
                self.spool.remove(name)
            self.stats.delivered += len(names)
            self.stats.last_error = ""
            self.backoff.success()
        elif status == 429 or status >= 500:
            self.stats.retries += 1
            self._failed(now, f"HTTP {status}", parse_retry_after(reply.headers.get("retry-after"), now))
        else:
            log.warning("netlog collector refused records", collector=self.config.name, status=status)
            self.spool.discard(names)
            self.stats.rejected += len(names)
            self.stats.dropped = self.spool.dropped
            self.stats.last_error = f"HTTP {status}: records refused"

    def _start(self, now: float) -> bool:
        names, records = [], []
        for name in self.spool.entries()[: self.config.batch_records]:
            record = self.spool.read(name)
            if record is not None:
                names.append(name)
                records.append(record)
        if not records:
            return False
        if self._sock is not None and _polled(self._sock, select.POLLIN):
            self.close()  # a kept-alive connection the collector closed (or talks on): not reused
        request = self._encode(records)
        self._request = _Request(names, bytearray(request), now + self.request_timeout, ResponseReader(_REPLY_MAX))
        return True

    def _encode(self, records: list[Record]) -> bytes:
        journal = self.config.format == "journal"
        if journal:
            body = b"".join(journal_export.encode_entry(self.form.journal(r)) for r in records)
        else:
            body = b"[" + b",".join(map(encode_record, records)) + b"]"
        headers = {"Content-Type": journal_export.CONTENT_TYPE if journal else "application/json"}
        if self.config.gzip:
            body = gzip.compress(body)
            headers["Content-Encoding"] = "gzip"
        return post_request(self.config.host, self.config.port, self.config.tls, self.config.path, headers, body)

    def _exchange(self, now: float) -> ResponseReader | None:
        """Go on with the request as far as it goes without waiting; the answer once complete."""
        request = self._request
        assert request is not None
        if self._sock is None:
            self._sock = self._connected(now, request.deadline)
            if self._sock is None:
                return None
        try:
            while request.out:
                del request.out[: self._sock.send(request.out[:_SEND_CHUNK])]
        except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
            pass  # the kernel buffer is full: go on at the next pump
        # Read even while sending: a collector may answer (413, say) before taking the whole body.
        try:
            data = self._sock.recv(_RECV_CHUNK)
        except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            pass
        else:
            if data:
                request.reply.feed(data)  # raises past _REPLY_MAX
            else:
                request.reply.eof()
        if request.reply.done:
            return request.reply
        if now >= request.deadline:
            raise TimeoutError(f"no complete answer within {self.request_timeout:g} s")
        return None

    def abort(self, now: float, error: str) -> None:
        self.close()
        self._failed(now, error)

    def close(self) -> None:
        """Drop the request and the connection; the batch stays spooled and goes again."""
        super().close()
        if self._sock is not None:
            self._sock.close()
        self._sock = None
        self._request = None


class IpfixSender:
    """Best effort: encode at once, send what the socket takes, drop the oldest when the queue is full."""

    def __init__(self, config: CollectorConfig, resolver: Resolver) -> None:
        self.config = config
        self.resolver = resolver
        self.stats = SenderStats()
        self.exporter = IpfixExporter(
            max_message_size=config.max_message_size, template_interval=config.template_interval
        )
        self._queue: deque[bytes] = deque()
        self._sock: socket.socket | None = None

    def offer(self, records: list[Record], now: float) -> None:
        self._queue.extend(self.exporter.encode(records, now))
        while len(self._queue) > _IPFIX_QUEUE:
            self._queue.popleft()
            self.stats.dropped += 1

    def pump(self, now: float) -> None:
        try:
            if self._sock is None:
                addresses = self.resolver.lookup(self.config.host, self.config.port, socket.SOCK_DGRAM)
                if not addresses:
                    return  # still resolving: the queue waits (bounded)
                family, address = addresses[0]
                self._sock = socket.socket(family, socket.SOCK_DGRAM)
                self._sock.setblocking(False)
                self._sock.connect(address)
        except OSError as e:
            self.abort(now, f"socket for {self.config.url}: {e}")
            return
        while self._queue:
            try:
                self._sock.send(self._queue[0])
            except BlockingIOError:
                return
            except OSError as e:  # e.g. ECONNREFUSED from an earlier datagram: this one is lost
                self.stats.errors += 1
                self.stats.last_error = str(e)
            else:
                self.stats.sent += 1
            self._queue.popleft()

    def abort(self, now: float, error: str) -> None:
        self.close()
        self.stats.errors += 1
        self.stats.last_error = error

    def idle(self) -> bool:
        return not self._queue

    def depth(self) -> int:
        return len(self._queue)

    def waiting_on(self) -> Wait | None:
        # Once the socket is open, only a full send buffer leaves datagrams queued after a pump.
        return Wait(self._sock, read=False, write=True) if self._sock is not None and self._queue else None

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
        self._sock = None


class Shipper:
    """All collectors of a node. Call `submit` with each window's records and `pump` often; pump a
    sender (`pump_one`) as soon as its socket is ready for what it is `waiting_on`."""

    def __init__(
        self,
        collectors: list[CollectorConfig],
        spool_root: Path,
        hostname: str,
        *,
        form: RecordFormat = FLOWS,
        request_timeout: float = 1.0,
        confirm_delay: float = 0.3,
        backoff_base: float = 0.5,
        backoff_cap: float = 60.0,
        rng: random.Random | None = None,
        resolver: Resolver | None = None,
    ) -> None:
        rng = rng or random.Random()
        resolver = resolver or Resolver()
        self.senders: list[Sender] = []
        for config in collectors:
            backoff = Backoff(base=backoff_base, cap=backoff_cap, rng=rng)
            if config.kind == "syslog":
                self.senders.append(
                    SyslogSender(
                        config,
                        spool_root,
                        backoff,
                        request_timeout,
                        form,
                        resolver,
                        hostname,
                        confirm_delay=confirm_delay,
                    )
                )
            elif config.kind == "http":
                self.senders.append(HttpSender(config, spool_root, backoff, request_timeout, form, resolver))
            else:
                self.senders.append(IpfixSender(config, resolver))

    def submit(self, records: list[Record], now: float) -> None:
        for sender in self.senders:
            sender.offer(records, now)

    def pump(self, now: float) -> None:
        for sender in self.senders:
            self.pump_one(sender, now)

    def pump_one(self, sender: Sender, now: float) -> None:
        try:
            sender.pump(now)
        except Exception as e:  # unforeseen: this collector backs off, the others and the actor go on
            log.exception("netlog collector failed unexpectedly", collector=sender.config.name)
            sender.abort(now, f"unexpected error: {e!r}")

    def idle(self) -> bool:
        return all(sender.idle() for sender in self.senders)

    def flush(self, deadline: float) -> bool:
        """At shutdown: pump until everything is delivered or `deadline` (time.time()) passes.

        What is not delivered stays spooled for the next start.
        """
        while True:
            self.pump(time.time())
            if self.idle():
                return True
            now = time.time()
            if now >= deadline:
                return False
            self._wait(min(_FLUSH_STEP, deadline - now))

    def _wait(self, timeout: float) -> None:
        """Until a sender's socket is ready for what it waits for, or `timeout` seconds."""
        poller = select.poll()
        for sender in self.senders:
            wait = sender.waiting_on()
            if wait is not None:
                poller.register(wait.sock, (select.POLLIN if wait.read else 0) | (select.POLLOUT if wait.write else 0))
        poller.poll(timeout * 1000)

    def stats(self) -> dict[str, SenderStats]:
        return {sender.config.name: sender.stats for sender in self.senders}

    def depths(self) -> dict[str, int]:
        return {sender.config.name: sender.depth() for sender in self.senders}

    def collectors(self) -> list[dict[str, object]]:
        """The spooled collectors (syslog, http) as the node's health reads them: failures since
        the last delivery, the last error, what waits in the spool. IPFIX has none: best effort,
        over UDP, it cannot tell a collector that is not there."""
        return [
            {
                "name": sender.config.name,
                "address": sender.config.url,
                "failures": sender.backoff.failures,
                "error": sender.stats.last_error,
                "spooled": sender.depth(),
            }
            for sender in self.senders
            if isinstance(sender, _SpooledSender)
        ]

    def close(self) -> None:
        for sender in self.senders:
            sender.close()

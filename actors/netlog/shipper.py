"""Shipping records to collectors: the IO around the sans-IO cores.

One sender per collector, each with its own spool or queue and its own
retry state, so a dead collector never holds up the others. `Shipper.pump`
is called from the netlog actor's loop; every socket operation in it is
non-blocking or bounded by a small timeout. All `now` values are wall-clock
seconds (time.time()), because an HTTP Retry-After may be a date.

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
  collector losing what it had acknowledged and read).
- http: batched POST of a JSON array (optionally gzip), or of journal
  export entries for systemd-journal-remote. 2xx removes the
  batch; 429 and 5xx are retried, honouring Retry-After; connection errors
  are retried with backoff; any other status refuses the batch for good, so
  it is dropped and the next record carries the count.
- ipfix over UDP: best effort, from a bounded queue.
"""

from __future__ import annotations

import fcntl
import gzip
import http.client
import random
import socket
import ssl
import struct
import termios
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import structlog

from meshsup.actors.netlog import journal_export
from meshsup.actors.settings.collectors import CollectorConfig
from meshsup.actors.netlog.flows import Record, encode_record
from meshsup.actors.netlog.formats import FLOWS, RecordFormat
from meshsup.actors.netlog.ipfix import IpfixExporter
from meshsup.actors.netlog.retry import Backoff, parse_retry_after
from meshsup.actors.netlog.spool import Spool
from meshsup.actors.netlog.syslog import encode_message, frame

log = structlog.get_logger(__name__)

_SEND_CHUNK = 16384  # below a TLS record, so a retried ssl write repeats the same bytes
_IPFIX_QUEUE = 1024  # datagrams waiting to be sent; beyond that the oldest go


@dataclass
class SenderStats:
    sent: int = 0  # records (ipfix: datagrams) written to the collector
    delivered: int = 0  # records confirmed and removed from the spool
    errors: int = 0  # failed connects, writes, requests
    retries: int = 0  # HTTP 429/5xx answers
    rejected: int = 0  # records the collector refused for good
    dropped: int = 0  # records lost here: spool or queue full, or refused for good
    last_error: str = ""


class Sender(Protocol):
    config: CollectorConfig
    stats: SenderStats

    def offer(self, records: list[Record], now: float) -> None: ...
    def pump(self, now: float) -> None: ...
    def idle(self) -> bool: ...
    def close(self) -> None: ...


def _tls_context(config: CollectorConfig) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(config.ca_file) if config.ca_file else None)


class _SpooledSender:
    """What the syslog and http senders share: a spool, a backoff, stats."""

    def __init__(
        self, config: CollectorConfig, spool_root: Path, backoff: Backoff, io_timeout: float, form: RecordFormat
    ) -> None:
        self.config = config
        self.spool = Spool(spool_root / config.name, config.spool_max_records, config.spool_max_bytes)
        self.backoff = backoff
        self.io_timeout = io_timeout
        self.form = form
        self.stats = SenderStats()

    def offer(self, records: list[Record], now: float) -> None:
        self.spool.extend(records)
        self.stats.dropped = self.spool.dropped

    def idle(self) -> bool:
        return len(self.spool) == 0

    def _failed(self, now: float, error: str, retry_after: float | None = None) -> None:
        if not self.stats.last_error or self.backoff.failures == 0:
            log.warning("netlog collector failing", collector=self.config.name, error=error)
        self.stats.errors += 1
        self.stats.last_error = error
        self.backoff.failure(now, retry_after)


@dataclass
class _Batch:
    names: list[str]
    written_at: float | None = None  # when its last byte reached the kernel


class SyslogSender(_SpooledSender):
    def __init__(
        self,
        config: CollectorConfig,
        spool_root: Path,
        backoff: Backoff,
        io_timeout: float,
        form: RecordFormat,
        hostname: str,
        confirm_delay: float = 0.3,
        ack_timeout: float = 10.0,
        write_budget: int = 256 * 1024,
    ) -> None:
        super().__init__(config, spool_root, backoff, io_timeout, form)
        self.hostname = hostname
        self.confirm_delay, self.ack_timeout, self.write_budget = confirm_delay, ack_timeout, write_budget
        self._sock: socket.socket | None = None
        self._out = bytearray()
        self._in_flight: list[_Batch] = []

    def idle(self) -> bool:
        return super().idle() and not self._in_flight

    def pump(self, now: float) -> None:
        if self._sock is not None:
            try:
                self._send_pending(now)
                self._confirm(now)
            except OSError as e:
                self._reset(now, f"connection lost: {e}")
        if self._sock is None and len(self.spool) and self.backoff.ready(now):
            self._connect(now)
        if self._sock is not None and not self._out:
            try:
                self._write_batch(now)
            except OSError as e:
                self._reset(now, f"write failed: {e}")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
        self._sock = None

    def _connect(self, now: float) -> None:
        try:
            sock = socket.create_connection((self.config.host, self.config.port), timeout=self.io_timeout)
            if self.config.tls:
                try:
                    sock = _tls_context(self.config).wrap_socket(sock, server_hostname=self.config.host)
                except BaseException:
                    sock.close()
                    raise
        except OSError as e:  # ssl.SSLError and socket.timeout are OSErrors too
            self._failed(now, f"connect to {self.config.url} failed: {e}")
            return
        sock.setblocking(False)
        self._sock = sock

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
            self._in_flight.append(_Batch(names))
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
        if not _peer_open(self._sock):
            if self._in_flight:
                raise ConnectionResetError("closed by the collector")
            self.close()  # an idle connection the collector let go: not a failure
            return
        oldest = self._in_flight[0].written_at if self._in_flight else None
        if oldest is None:
            return
        if _unacked_bytes(self._sock) > 0:
            if now - oldest > self.ack_timeout:
                raise TimeoutError(f"no TCP acknowledgement for {self.ack_timeout} s")
            return
        while self._in_flight and self._in_flight[0].written_at is not None:
            if now - self._in_flight[0].written_at < self.confirm_delay:
                return
            batch = self._in_flight.pop(0)
            for name in batch.names:
                self.spool.remove(name)
            self.stats.delivered += len(batch.names)
            self.backoff.success()
            self.stats.last_error = ""

    def _reset(self, now: float, error: str) -> None:
        """Drop the connection; unconfirmed records stay spooled and go again."""
        self.close()
        self._out.clear()
        self._in_flight.clear()
        self._failed(now, error)


def _peer_open(sock: socket.socket) -> bool:
    """False once the collector closed or reset the connection; anything it sent is ignored."""
    try:
        while sock.recv(4096):
            pass
        return False
    except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
        return True
    except OSError:
        return False


def _unacked_bytes(sock: socket.socket) -> int:
    """Bytes in the socket's send queue not yet acknowledged by the peer (Linux TIOCOUTQ)."""
    raw = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, struct.pack("i", 0))
    return int(struct.unpack("i", raw)[0])


class HttpSender(_SpooledSender):
    def __init__(
        self, config: CollectorConfig, spool_root: Path, backoff: Backoff, io_timeout: float, form: RecordFormat
    ) -> None:
        super().__init__(config, spool_root, backoff, io_timeout, form)
        self._conn: http.client.HTTPConnection | None = None

    def pump(self, now: float) -> None:
        if not len(self.spool) or not self.backoff.ready(now):
            return
        names, records = [], []
        for name in self.spool.entries()[: self.config.batch_records]:
            record = self.spool.read(name)
            if record is not None:
                names.append(name)
                records.append(record)
        if not records:
            return
        try:
            status, retry_after = self._post(self._body(records))
        except (OSError, http.client.HTTPException) as e:
            self.close()
            self._failed(now, f"POST to {self.config.url} failed: {e}")
            return
        now = time.time()  # a Retry-After counts from the answer, not from the request
        self.stats.sent += len(names)
        if 200 <= status < 300:
            for name in names:
                self.spool.remove(name)
            self.stats.delivered += len(names)
            self.stats.last_error = ""
            self.backoff.success()
        elif status == 429 or status >= 500:
            self.stats.retries += 1
            self._failed(now, f"HTTP {status}", parse_retry_after(retry_after, now))
        else:
            log.warning("netlog collector refused records", collector=self.config.name, status=status)
            self.spool.discard(names)
            self.stats.rejected += len(names)
            self.stats.dropped = self.spool.dropped
            self.stats.last_error = f"HTTP {status}: records refused"

    def _body(self, records: list[Record]) -> bytes:
        if self.config.format == "journal":
            return b"".join(journal_export.encode_entry(self.form.journal(r)) for r in records)
        return b"[" + b",".join(map(encode_record, records)) + b"]"

    def _post(self, body: bytes) -> tuple[int, str | None]:
        journal = self.config.format == "journal"
        headers = {"Content-Type": journal_export.CONTENT_TYPE if journal else "application/json"}
        if self.config.gzip:
            body = gzip.compress(body)
            headers["Content-Encoding"] = "gzip"
        if self._conn is None:
            if self.config.tls:
                self._conn = http.client.HTTPSConnection(
                    self.config.host, self.config.port, timeout=self.io_timeout, context=_tls_context(self.config)
                )
            else:
                self._conn = http.client.HTTPConnection(self.config.host, self.config.port, timeout=self.io_timeout)
        self._conn.request("POST", self.config.path, body, headers)
        response = self._conn.getresponse()
        response.read()
        if response.will_close:
            self.close()
        return response.status, response.getheader("Retry-After")

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
        self._conn = None


class IpfixSender:
    """Best effort: encode at once, send what the socket takes, drop the oldest when the queue is full."""

    def __init__(self, config: CollectorConfig) -> None:
        self.config = config
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
                family = socket.AF_INET6 if ":" in self.config.host else socket.AF_INET
                self._sock = socket.socket(family, socket.SOCK_DGRAM)
                self._sock.setblocking(False)
                self._sock.connect((self.config.host, self.config.port))
        except OSError as e:
            self.close()
            self.stats.errors += 1
            self.stats.last_error = f"socket for {self.config.url}: {e}"
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

    def idle(self) -> bool:
        return not self._queue

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
        self._sock = None


class Shipper:
    """All collectors of a node. Call `submit` with each window's records and `pump` often."""

    def __init__(
        self,
        collectors: list[CollectorConfig],
        spool_root: Path,
        hostname: str,
        *,
        form: RecordFormat = FLOWS,
        io_timeout: float = 1.0,
        confirm_delay: float = 0.3,
        backoff_base: float = 0.5,
        backoff_cap: float = 60.0,
        rng: random.Random | None = None,
    ) -> None:
        rng = rng or random.Random()
        self.senders: list[Sender] = []
        for config in collectors:
            backoff = Backoff(base=backoff_base, cap=backoff_cap, rng=rng)
            if config.kind == "syslog":
                self.senders.append(
                    SyslogSender(config, spool_root, backoff, io_timeout, form, hostname, confirm_delay=confirm_delay)
                )
            elif config.kind == "http":
                self.senders.append(HttpSender(config, spool_root, backoff, io_timeout, form))
            else:
                self.senders.append(IpfixSender(config))

    def submit(self, records: list[Record], now: float) -> None:
        for sender in self.senders:
            sender.offer(records, now)

    def pump(self, now: float) -> None:
        for sender in self.senders:
            sender.pump(now)

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
            if time.time() >= deadline:
                return False
            time.sleep(0.02)

    def stats(self) -> dict[str, SenderStats]:
        return {sender.config.name: sender.stats for sender in self.senders}

    def close(self) -> None:
        for sender in self.senders:
            sender.close()

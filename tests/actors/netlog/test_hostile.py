"""Collectors that stall, flood, answer endlessly or cannot be resolved never stall netlog.

Each misbehaving collector is a real server on loopback (in the node test,
in the node's namespace). The shipper must return from every pump at once,
count the failure within its request deadline, back off, keep the spooled
records, and deliver them once the collector behaves.
"""

from __future__ import annotations

import json
import re
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from meshsup.actors.kernel.resolve import Resolver
from meshsup.actors.netlog.actor import REQUEST_TIMEOUT
from meshsup.actors.netlog.flows import Classifier, FlowTable, Record
from meshsup.actors.netlog.http11 import HttpError, ResponseReader
from meshsup.actors.netlog.shipper import Shipper
from meshsup.actors.netlog.syslog import OctetCountingDecoder
from meshsup.actors.settings.collectors import parse_collectors
from meshsup.supervisor.supervision import HANG_TIMEOUT
from tests.netlog_fixtures import LOOPBACK, Rsyslog, free_port, make_certificate, stop_process, wait_until
from tests.nodes import REPO, Netns, Node, is_root
from tests.topology import Identity, Underlay, WgGo, have, meshsup_config, ping

DEADLINE = 0.5  # the shipper's request deadline in these tests
SLOWEST_PUMP = 0.25  # a pump that waits would take the deadline; one that never waits is far below this
RECORDS = 5
CLASSIFIER = Classifier(["100.64.0.0/10"], [], [])
# Endless answers, sent until the collector is told to behave.
ENDLESS = {
    "flood": b"x" * 65536,  # http: one header line that never ends
    "chunked": b"10000\r\n" + b"x" * 0x10000 + b"\r\n",
    "length": b"x" * 65536,
}
HEADS = {
    "drip": b"HTTP/1.1 200 OK\r\n",
    "flood": b"HTTP/1.1 200 OK\r\nX-Flood: ",
    "chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
    "length": b"HTTP/1.1 200 OK\r\nContent-Length: 1000000000000\r\n\r\n",
}


class Collector:
    """A loopback collector (`kind` http or syslog) that misbehaves as `mode` says until set to "good".

    stall: accepts and never reads nor answers. drip: answers a status line, then a byte every 50 ms.
    flood: talks endlessly (syslog: at once; http: after the request). chunked / length: an HTTP 200
    whose body never ends. good: takes octet-counted syslog frames or HTTP POSTs of JSON records
    and keeps the records. A connection keeps the mode it was accepted in and ends when it changes.
    """

    def __init__(self, kind: str, mode: str, tls: tuple[Path, Path] | None = None, host: str = LOOPBACK) -> None:
        self.kind, self.mode = kind, mode
        self.context: ssl.SSLContext | None = None
        if tls is not None:
            self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self.context.load_cert_chain(*tls)
        self.records: list[Record] = []
        self.connections = 0
        self.listener = socket.create_server((host, 0))
        self.listener.settimeout(0.1)
        self.port = int(self.listener.getsockname()[1])
        self._closed = threading.Event()
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def close(self) -> None:
        self._closed.set()
        for thread in self._threads:
            thread.join(timeout=5)
        self.listener.close()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            self.connections += 1
            conn.settimeout(0.1)  # each wait short, so a connection notices a change of mode
            thread = threading.Thread(target=self._serve, args=(conn, self.mode), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _live(self, mode: str) -> bool:
        return self.mode == mode and not self._closed.is_set()

    def _serve(self, conn: socket.socket, mode: str) -> None:
        try:
            if mode == "good":
                self._good(conn)
            else:
                self._misbehave(conn, mode)
        except OSError:
            pass  # the shipper gave up on this connection
        finally:
            conn.close()

    def _recv(self, conn: socket.socket, mode: str) -> bytes:
        while self._live(mode):
            try:
                return conn.recv(65536)
            except TimeoutError:
                continue
        return b""

    def _misbehave(self, conn: socket.socket, mode: str) -> None:
        if self.kind == "http" and mode != "stall":
            self._recv(conn, mode)  # the request's first bytes
            conn.sendall(HEADS[mode])
        while self._live(mode):
            if mode == "stall":
                self._closed.wait(0.05)
            elif mode == "drip":
                conn.sendall(b"X")
                self._closed.wait(0.05)
            else:
                try:
                    conn.sendall(ENDLESS[mode])
                except TimeoutError:
                    pass  # the shipper is not reading just now

    def _good(self, conn: socket.socket) -> None:
        if self.context is not None:
            conn.settimeout(5)
            conn = self.context.wrap_socket(conn, server_side=True)
            conn.settimeout(0.1)
        if self.kind == "syslog":
            decoder = OctetCountingDecoder()
            while data := self._recv(conn, "good"):
                self.records += [json.loads(f.split(b"] ", 1)[1]) for f in decoder.feed(data)]
            return
        buffer = b""
        while True:
            while b"\r\n\r\n" not in buffer:
                if not (data := self._recv(conn, "good")):
                    return
                buffer += data
            head, _, buffer = buffer.partition(b"\r\n\r\n")
            match = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
            assert match is not None, head
            while len(buffer) < int(match[1]):
                if not (data := self._recv(conn, "good")):
                    return
                buffer += data
            body, buffer = buffer[: int(match[1])], buffer[int(match[1]) :]
            self.records += json.loads(body)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")


def serve(kind: str, mode: str) -> None:
    """Run a Collector until killed, printing its port first (the node test runs it in a namespace)."""
    collector = Collector(kind, mode)
    print(collector.port, flush=True)
    threading.Event().wait()


def make_records(count: int) -> list[Record]:
    table = FlowTable("node-alpha", CLASSIFIER, start=time.time())
    records = []
    for i in range(count):
        table.add((6, f"100.64.0.1:{10000 + i}", "100.64.0.2:80"), i + 1, 100 * (i + 1), 1, 60)
        records += table.close_window(time.time())
    return records


def same_records(got: list[Record], sent: list[Record]) -> bool:
    """Every record arrived (at least once: a record may come twice)."""

    def keys(records: list[Record]) -> set[str]:
        return {json.dumps(r, sort_keys=True) for r in records}

    return keys(got) == keys(sent)


def shipper_for(table: dict[str, Any], tmp_path: Path, resolver: Resolver | None = None) -> Shipper:
    return Shipper(
        parse_collectors([table]),
        tmp_path / "spool",
        "alpha",
        request_timeout=DEADLINE,
        confirm_delay=0.2,
        backoff_base=0.05,
        backoff_cap=0.3,
        resolver=resolver,
    )


def pump_until_failed(shipper: Shipper, failures: int = 1, limit: float = 10.0) -> tuple[float, float, float]:
    """Pump until the (only) collector counted `failures`; (seconds taken, slowest pump, `now` of the failing pump)."""
    stats = shipper.senders[0].stats
    start = time.monotonic()
    slowest = now = 0.0
    while stats.errors < failures and time.monotonic() - start < limit:
        now = time.time()
        before = time.monotonic()
        shipper.pump(now)
        slowest = max(slowest, time.monotonic() - before)
        time.sleep(0.01)  # the pace of the actor's loop, shortened
    assert stats.errors >= failures, stats
    return time.monotonic() - start, slowest, now


@pytest.fixture
def collectors() -> Iterator[list[Collector]]:
    made: list[Collector] = []
    yield made
    for collector in made:
        collector.close()


@pytest.mark.parametrize(
    "kind, mode, scheme, error",
    [
        ("http", "stall", "http", "no complete answer within 0.5 s"),
        ("http", "drip", "http", "no complete answer within 0.5 s"),
        ("http", "flood", "http", "response longer than 1048576 bytes"),
        ("http", "chunked", "http", "response longer than 1048576 bytes"),
        ("http", "length", "http", "response longer than 1048576 bytes"),
        ("syslog", "stall", "tls", "TLS handshake not done by the deadline"),
        ("syslog", "flood", "tcp", "the collector sent more than 65536 bytes"),
    ],
)
def test_a_hostile_collector_fails_within_the_deadline_and_gets_its_records_once_good(
    tmp_path: Path, collectors: list[Collector], kind: str, mode: str, scheme: str, error: str
) -> None:
    cert, key = make_certificate(tmp_path)
    collector = Collector(kind, mode, tls=(cert, key) if scheme == "tls" else None)
    collectors.append(collector)
    table = {"kind": kind, "address": f"{scheme}://127.0.0.1:{collector.port}{'/in' if kind == 'http' else ''}"}
    if scheme == "tls":
        table["ca_file"] = str(cert)
    shipper = shipper_for(table, tmp_path)
    sender = shipper.senders[0]
    records = make_records(RECORDS)
    shipper.submit(records, time.time())
    try:
        took, slowest, failed_at = pump_until_failed(shipper)
        assert slowest < SLOWEST_PUMP
        assert took < DEADLINE + 0.5
        assert error in sender.stats.last_error
        assert sender.backoff.failures >= 1 and sender.backoff.next_attempt > failed_at  # type: ignore[attr-defined]
        pump_until_failed(shipper, failures=3)  # it keeps failing, backing off, and never raises
        assert len(sender.spool) == RECORDS  # type: ignore[attr-defined]
        assert sender.stats.delivered == 0 and not collector.records
        collector.mode = "good"
        assert shipper.flush(time.time() + 10)
    finally:
        shipper.close()
    assert wait_until(lambda: same_records(collector.records, records), 5), collector.records
    assert sender.stats.delivered == RECORDS and sender.backoff.failures == 0  # type: ignore[attr-defined]


@pytest.mark.parametrize("kind, scheme", [("http", "http"), ("syslog", "tcp")])
def test_a_name_whose_resolution_blocks_costs_one_thread_not_the_loop(
    tmp_path: Path, collectors: list[Collector], kind: str, scheme: str
) -> None:
    collector = Collector(kind, "good")
    collectors.append(collector)
    answer = threading.Event()
    asked: list[str] = []

    def blocking_getaddrinfo(host: str, port: int, **kw: Any) -> list[tuple[Any, ...]]:
        asked.append(host)
        answer.wait(30)  # a resolver that does not answer until the test lets it
        return socket.getaddrinfo(LOOPBACK, port, **kw)

    resolver = Resolver(getaddrinfo=blocking_getaddrinfo)
    address = f"{scheme}://collector.test:{collector.port}{'/in' if kind == 'http' else ''}"
    shipper = shipper_for({"kind": kind, "address": address}, tmp_path, resolver)
    sender = shipper.senders[0]
    records = make_records(RECORDS)
    shipper.submit(records, time.time())
    try:
        took, slowest, _ = pump_until_failed(shipper)
        assert slowest < SLOWEST_PUMP and took < DEADLINE + 0.5
        assert "resolving collector.test not done by the deadline" in sender.stats.last_error
        pump_until_failed(shipper, failures=3)
        assert asked == ["collector.test"] and resolver.lookups == 1  # one lookup, still waiting
        assert len(sender.spool) == RECORDS  # type: ignore[attr-defined]
        answer.set()
        assert shipper.flush(time.time() + 10)
    finally:
        answer.set()
        shipper.close()
    assert wait_until(lambda: same_records(collector.records, records), 5), collector.records
    assert resolver.lookups == 1  # the answer is cached


def test_a_collector_failing_unexpectedly_backs_off_and_the_others_go_on(
    tmp_path: Path, collectors: list[Collector], monkeypatch: pytest.MonkeyPatch
) -> None:
    good, broken = Collector("http", "good"), Collector("http", "good")
    collectors += [good, broken]
    tables = [
        {"kind": "http", "address": f"http://127.0.0.1:{c.port}/", "name": n}
        for c, n in ((broken, "broken"), (good, "good"))
    ]
    shipper = Shipper(
        parse_collectors(tables),
        tmp_path / "spool",
        "alpha",
        request_timeout=DEADLINE,
        backoff_base=0.05,
        backoff_cap=0.3,
    )
    sender = shipper.senders[0]

    def bug(name: str) -> Record:
        raise RuntimeError("a bug in this sender")

    monkeypatch.setattr(sender.spool, "read", bug)  # type: ignore[attr-defined]
    records = make_records(RECORDS)
    shipper.submit(records, time.time())
    try:
        pump_until_failed(shipper, failures=3)  # each pump would raise out of the loop without the guard
        assert "unexpected error: RuntimeError('a bug in this sender')" in sender.stats.last_error
        assert sender.backoff.failures == 3  # type: ignore[attr-defined]
        assert wait_until(lambda: shipper.pump(time.time()) or shipper.senders[1].idle(), 5)
    finally:
        shipper.close()
    assert same_records(good.records, records) and not broken.records


# --- the HTTP answer, sans-IO -------------------------------------------------------------------


@pytest.mark.parametrize(
    "answer, status, keep_alive",
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n", 200, True),
        (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n", 204, True),
        (
            b"HTTP/1.1 503 Busy\r\nRetry-After: 7\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"2;x=y\r\nab\r\n1\r\nc\r\n0\r\nTrailer: 1\r\n\r\n",
            503,
            True,
        ),
        (b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n", 200, False),
        (b"HTTP/1.0 400 Bad\r\nContent-Length: 0\r\n\r\n", 400, False),
    ],
)
def test_a_complete_answer_is_read_fed_byte_by_byte(answer: bytes, status: int, keep_alive: bool) -> None:
    reader = ResponseReader(1024)
    for i in range(len(answer)):
        assert not reader.done
        reader.feed(answer[i : i + 1])
    assert reader.done and not reader.extra
    assert (reader.status, reader.keep_alive) == (status, keep_alive)
    assert reader.headers.get("retry-after") == ("7" if status == 503 else None)


def test_an_answer_without_length_ends_with_the_connection_and_bytes_after_one_are_noticed() -> None:
    reader = ResponseReader(1024)
    reader.feed(b"HTTP/1.1 200 OK\r\n\r\nsome body")
    assert not reader.done
    reader.eof()
    assert reader.done and not reader.keep_alive
    reader = ResponseReader(1024)
    reader.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\nHTTP/1.1 200 OK")
    assert reader.done and reader.extra


@pytest.mark.parametrize(
    "answer, error",
    [
        (b"SSH-2.0-OpenSSH\r\n", "not an HTTP/1.x status line"),
        (b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 101, "more than 100 header fields"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n" + b"x" * 1000, "response longer than 1024 bytes"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "bad chunk size"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nxx\r\n", "chunk longer than its size"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", "bad Content-Length"),
    ],
)
def test_a_broken_or_endless_answer_is_refused(answer: bytes, error: str) -> None:
    with pytest.raises(HttpError, match=error):
        ResponseReader(1024).feed(answer)


def test_a_connection_closed_mid_answer_fails_the_request() -> None:
    reader = ResponseReader(1024)
    reader.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    with pytest.raises(HttpError, match="closed before the response was complete"):
        reader.eof()


# --- a node: a stalling collector beside a healthy one ------------------------------------------

TOOLS = ("wireguard-go", "wg", "ping", "rsyslogd")


def start_in(ns: Netns, kind: str, mode: str) -> tuple[subprocess.Popen[str], int]:
    """A Collector in the namespace, as a process of its own; returns it and its port."""
    proc = ns.popen(
        sys.executable,
        "-c",
        f"from tests.actors.netlog.test_hostile import serve; serve({kind!r}, {mode!r})",
        stdout=subprocess.PIPE,
        cwd=REPO,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.strip().isdigit():
        stop_process(proc)  # type: ignore[arg-type]
        raise RuntimeError(f"collector did not start: {line!r}")
    return proc, int(line)


def pings_in(rsyslog: Rsyslog, src: str, dst: str) -> int:
    """Echo requests alpha sent to bravo, as alpha's flow records in rsyslog count them."""
    unique = {m["msg"] for m in rsyslog.messages() if m["msgid"] == "flowlog"}
    return sum(
        e.get("txPkts", 0)
        for r in map(json.loads, unique)
        for e in r.get("virtualTraffic", [])
        if (e["proto"], e["src"], e["dst"]) == (1, f"{src}:0", f"{dst}:0")
    )


@pytest.mark.netns
@pytest.mark.skipif(not is_root() or bool(have(*TOOLS)), reason=have(*TOOLS) or "needs root")
def test_a_node_keeps_netlog_running_past_the_hang_timeout_beside_stalling_collectors(
    underlay: Underlay, tmp_path: Path
) -> None:
    assert REQUEST_TIMEOUT > HANG_TIMEOUT  # each stalled request outlasts what would get a blocked netlog killed
    (ns_a, addr_a), (ns_b, addr_b) = underlay.host(), underlay.host()
    alpha, bravo = Identity("alpha", 1), Identity("bravo", 2)
    alpha.endpoint, bravo.endpoint = f"{addr_a}:51820", f"{addr_b}:51820"
    underlay.track(WgGo(ns_b, bravo, tmp_path)).add_peer(alpha)
    rsyslog = Rsyslog(tmp_path / "rsyslog", free_port(), ns_a)
    procs: list[subprocess.Popen[str]] = []
    try:
        rsyslog.start()
        dripping, drip_port = start_in(ns_a, "http", "drip")
        procs.append(dripping)
        flooding, flood_port = start_in(ns_a, "syslog", "flood")
        procs.append(flooding)
        collectors = [
            ("syslog", "healthy", f"tcp://127.0.0.1:{rsyslog.port}"),
            ("http", "dripping", f"http://127.0.0.1:{drip_port}/"),
            ("syslog", "flooding", f"tcp://127.0.0.1:{flood_port}"),
        ]
        extra = "[netlog]\ninterval = 1\n" + "".join(
            f'[[netlog.collectors]]\nkind = "{kind}"\nname = "{name}"\naddress = "{address}"\n'
            for kind, name, address in collectors
        )
        config = meshsup_config(tmp_path, alpha, [bravo], extra=extra)
        node = underlay.track(Node(tmp_path, "--config", str(config), netns=ns_a))
        node.wait_ready()
        pid = node.actors()["netlog"]["pid"]
        assert ping(ns_a, bravo.v4, count=3)
        node.wait(
            lambda: (c := node.counters()["netlog"])["flows.dripping.errors"] >= 2 and c["flows.flooding.errors"] >= 2,
            timeout=40,
            what="both hostile collectors failed twice",
        )
        assert ping(ns_a, bravo.v4, count=3)
        assert wait_until(lambda: pings_in(rsyslog, alpha.v4, bravo.v4) >= 6, 20)
        netlog = node.actors()["netlog"]
        assert (netlog["restarts"], netlog["pid"], netlog["state"]) == (0, pid, "running")
        counters = node.counters()["netlog"]
        assert counters["flows.dripping.delivered"] == counters["flows.flooding.delivered"] == 0
        for name in ("dripping", "flooding"):  # kept for when the collector behaves
            assert list((node.state_dir / "spool" / "flows" / name).iterdir())
    finally:
        for proc in procs:
            stop_process(proc)  # type: ignore[arg-type]
        rsyslog.stop()

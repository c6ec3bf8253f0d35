"""Helpers for DNS tests: real resolvers on loopback, a stub upstream, dig.

Every helper binds to a random 127.x.y.z address (so parallel tests never
meet), keeps its config, pid and log files in the test's tmp dir, runs in the
foreground and is stopped by its own PID. Nothing here reads the system's
resolver configuration or touches port 53 of a real address.

Given a network namespace (``ns=``), a helper runs its daemon there (through
``ip netns exec``) and makes its own sockets there, so a node running in that
namespace can use it and test traffic never leaves it.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import os
import random
import re
import select
import shutil
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dns.flags
import dns.message
import dns.rcode
import dns.rrset

from meshsup.actors.dns.server import DnsServer, serve
from meshsup.actors.settings.dns import DnsSettings
from tests.nodes import Netns
from tests.topology import Identity, meshsup_config

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def need_tool(*names: str) -> None:
    """Skip the calling test, saying which tool is missing."""
    import pytest

    for name in names:
        if shutil.which(name) is None:
            pytest.skip(f"needs {name} (not installed)")


def loopback_address() -> str:
    return f"127.{random.randint(1, 254)}.{random.randint(1, 254)}.{random.randint(2, 254)}"


def in_netns(ns: Netns | None, make: Callable[[], Any]) -> Any:
    """make() run inside ns: on a thread that joins the namespace (setns
    changes only the calling thread), so the sockets it makes live there."""
    if ns is None:
        return make()
    result: list[Any] = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            fd = os.open(f"/run/netns/{ns.name}", os.O_RDONLY)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"setns {ns.name}")
            finally:
                os.close(fd)
            result.append(make())
        except BaseException as exc:  # handed to the caller's thread
            failure.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return result[0]


def make_socket(kind: socket.SocketKind, ns: Netns | None = None, family: int = socket.AF_INET) -> socket.socket:
    return in_netns(ns, lambda: socket.socket(family, kind))


def free_port(host: str, ns: Netns | None = None) -> int:
    """A port free for both UDP and TCP on host."""
    for _ in range(100):
        with make_socket(socket.SOCK_STREAM, ns) as tcp:
            tcp.bind((host, 0))
            port = tcp.getsockname()[1]
            with make_socket(socket.SOCK_DGRAM, ns) as udp:
                try:
                    udp.bind((host, port))
                except OSError:
                    continue
        return port
    raise RuntimeError("no free port")


def endpoint(ns: Netns | None = None) -> tuple[str, int]:
    host = loopback_address()
    return host, free_port(host, ns)


def wait_until(check: Callable[[], bool], timeout: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.02)
    raise TimeoutError(f"timed out waiting for {what}")


def udp_exchange(host: str, port: int, wire: bytes, timeout: float = 2.0, ns: Netns | None = None) -> bytes | None:
    """Send one datagram, return the answer or None when nothing comes back."""
    with make_socket(socket.SOCK_DGRAM, ns) as sock:
        sock.settimeout(timeout)
        sock.sendto(wire, (host, port))
        try:
            return sock.recv(65535)
        except TimeoutError:
            return None


def answers_dns(host: str, port: int, ns: Netns | None = None) -> bool:
    wire = dns.message.make_query("probe.invalid", "A").to_wire()
    return udp_exchange(host, port, wire, timeout=0.2, ns=ns) is not None


class Process:
    """A foreground daemon (in ns, if given), stopped by its own PID."""

    def __init__(self, argv: Sequence[str], log: Path, ns: Netns | None = None) -> None:
        self.argv = list(argv)
        self._out = open(log.with_suffix(".out"), "wb")
        prefix = ["ip", "netns", "exec", ns.name] if ns else []
        # ip netns exec execs the daemon in place, so the PID is the daemon's own.
        self.popen = subprocess.Popen([*prefix, *self.argv], stdout=self._out, stderr=subprocess.STDOUT)

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self._out.close()

    def output(self) -> str:
        self._out.flush()
        return Path(self._out.name).read_text(errors="replace")

    def wait_ready(self, check: Callable[[], bool], what: str) -> None:
        """Wait for the daemon to serve; if it never does, stop it and say what it printed."""
        try:
            wait_until(check, what=what)
        except TimeoutError as err:
            self.stop()
            raise TimeoutError(f"{err}: {self.output()}") from None
        except BaseException:
            self.stop()
            raise


@dataclass
class Dnsmasq:
    host: str
    port: int
    log: Path
    process: Process

    def count(self, name: str, qtype: str = "A") -> int:
        """Queries for name/qtype that reached dnsmasq, from its query log."""
        if not self.log.exists():
            return 0
        pattern = re.compile(rf"query\[{re.escape(qtype)}\] {re.escape(name)} from ")
        return sum(1 for line in self.log.read_text().splitlines() if pattern.search(line))

    def stop(self) -> None:
        self.process.stop()


def start_dnsmasq(
    tmp: Path,
    records: Sequence[str],
    *,
    ttl: int = 60,
    name: str = "dnsmasq",
    ns: Netns | None = None,
    log_queries: bool = True,
    cache_size: int = 0,
    at: tuple[str, int] | None = None,
) -> Dnsmasq:
    """dnsmasq answering from its arguments (e.g. '--address=/x.test/203.0.113.7'
    or '--server=127.0.0.9'); names under .test never go further. On a free loopback
    address and port, or `at` one."""
    need_tool("dnsmasq")
    host, port = at or endpoint(ns)
    log = tmp / f"{name}.log"
    argv = [
        "dnsmasq", "--keep-in-foreground", "--no-daemon", "--conf-file=/dev/null",
        f"--port={port}", f"--listen-address={host}", "--bind-interfaces",
        "--no-resolv", "--no-hosts", "--no-poll", f"--pid-file={tmp / (name + '.pid')}",
        "--user=root", "--group=root", f"--log-facility={log}",
        f"--cache-size={cache_size}", f"--local-ttl={ttl}", "--local=/test/", *records,
    ]  # fmt: skip
    if log_queries:
        argv.append("--log-queries")
    process = Process(argv, log, ns)
    process.wait_ready(lambda: answers_dns(host, port, ns), what=f"dnsmasq on {host}:{port}")
    return Dnsmasq(host, port, log, process)


@dataclass
class Certificate:
    cert: Path  # self-signed, so also the CA file
    key: Path
    name: str


def make_certificate(tmp: Path, ip: str, name: str = "dns.test") -> Certificate:
    need_tool("openssl")
    cert, key = tmp / f"{name}.pem", tmp / f"{name}.key"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", f"/CN={name}",
            "-addext", f"subjectAltName=IP:{ip},DNS:{name}",
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return Certificate(cert, key, name)


@dataclass
class Unbound:
    host: str
    tls_port: int
    https_port: int  # DoH, HTTP/2 only (unbound speaks it through nghttp2)
    log: Path
    process: Process

    def count(self, name: str, qtype: str = "A") -> int:
        if not self.log.exists():
            return 0
        return sum(1 for line in self.log.read_text().splitlines() if f" {name}. {qtype} IN" in line)

    def stop(self) -> None:
        self.process.stop()


def start_unbound_tls(
    tmp: Path, certificate: Certificate, host: str, local_data: Sequence[str], ns: Netns | None = None
) -> Unbound:
    """unbound serving DNS over TLS and over HTTPS from local-data only; it
    refuses everything else, so it never recurses to the internet."""
    need_tool("unbound")
    port, https_port = free_port(host, ns), free_port(host, ns)
    log = tmp / "unbound.log"
    zones = sorted({record.split()[0].split(".", 1)[1] for record in local_data})
    config = tmp / "unbound.conf"
    lines = [
        "server:",
        f"  interface: {host}@{port}",
        f"  interface: {host}@{https_port}",
        f"  tls-port: {port}",
        f"  https-port: {https_port}",
        f'  tls-service-key: "{certificate.key}"',
        f'  tls-service-pem: "{certificate.cert}"',
        "  do-daemonize: no",
        '  chroot: ""',
        '  username: ""',
        '  pidfile: ""',
        f'  directory: "{tmp}"',
        f'  logfile: "{log}"',
        "  use-syslog: no",
        "  log-queries: yes",
        '  module-config: "iterator"',
        "  access-control: 127.0.0.0/8 allow",
        '  local-zone: "." refuse',
        *(f'  local-zone: "{zone}" static' for zone in zones),
        *(f'  local-data: "{record}"' for record in local_data),
        "remote-control:",
        "  control-enable: no",
    ]
    config.write_text("\n".join(lines) + "\n")
    process = Process(["unbound", "-d", "-c", str(config)], log, ns)
    process.wait_ready(lambda: _tcp_open(host, port, ns) and _tcp_open(host, https_port, ns), what="unbound")
    return Unbound(host, port, https_port, log, process)


@dataclass
class Dnsdist:
    host: str
    tls_port: int
    doh_port: int
    process: Process

    def stop(self) -> None:
        self.process.stop()


def start_dnsdist(
    tmp: Path, certificate: Certificate, host: str, backend: Dnsmasq, check_name: str, ns: Netns | None = None
) -> Dnsdist:
    """dnsdist offering DoT and DoH (HTTP/2 and HTTP/1.1, through h2o) in front of a dnsmasq."""
    need_tool("dnsdist")
    tls_port, doh_port = free_port(host, ns), free_port(host, ns)
    config = tmp / "dnsdist.conf"
    config.write_text(
        'setSecurityPollSuffix("")\n'  # no security polling: it would query the internet
        f'newServer({{address="{backend.host}:{backend.port}", checkName="{check_name}.", checkInterval=3600}})\n'
        f'addTLSLocal("{host}:{tls_port}", "{certificate.cert}", "{certificate.key}")\n'
        f'addDOHLocal("{host}:{doh_port}", "{certificate.cert}", "{certificate.key}", "/dns-query")\n'
    )
    process = Process(["dnsdist", "--supervised", "--disable-syslog", "-C", str(config)], tmp / "dnsdist.log", ns)
    process.wait_ready(lambda: _tcp_open(host, tls_port, ns) and _tcp_open(host, doh_port, ns), what="dnsdist")
    return Dnsdist(host, tls_port, doh_port, process)


def _tcp_open(host: str, port: int, ns: Netns | None = None) -> bool:
    with make_socket(socket.SOCK_STREAM, ns) as sock:
        sock.settimeout(0.2)
        try:
            sock.connect((host, port))
            return True
        except OSError:
            return False


@dataclass
class StubUpstream:
    """A tiny UDP+TCP upstream in a thread: a fixed rcode or address, an
    optional delay, and a record of every question it got. With ``hold``, its
    UDP answers wait until that event is set: late for as long as a test needs."""

    host: str
    port: int
    rcode: int = dns.rcode.NOERROR
    address: str = "203.0.113.50"
    delay: float = 0.0
    ttl: int = 60
    ns: Netns | None = None
    hold: threading.Event | None = None
    questions: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._udp = make_socket(socket.SOCK_DGRAM, self.ns)
        self._udp.bind((self.host, self.port))
        self._tcp = make_socket(socket.SOCK_STREAM, self.ns)
        self._tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._tcp.bind((self.host, self.port))
        self._tcp.listen(16)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _answer(self, wire: bytes) -> bytes:
        query = dns.message.from_wire(wire)
        self.questions.append(query.question[0].name.to_text())
        reply = dns.message.make_response(query)
        reply.set_rcode(dns.rcode.Rcode.make(self.rcode))
        if self.rcode == dns.rcode.NOERROR and query.question[0].rdtype == dns.rdatatype.A:
            reply.answer.append(dns.rrset.from_text(query.question[0].name, self.ttl, "IN", "A", self.address))
        return reply.to_wire()

    def _run(self) -> None:
        due: list[tuple[float, Callable[[], None]]] = []
        while not self._stop.is_set():
            timeout = max(0.0, min((t for t, _ in due), default=time.monotonic() + 0.05) - time.monotonic())
            readable, _, _ = select.select([self._udp, self._tcp], [], [], min(timeout, 0.05))
            if self._udp in readable:
                wire, source = self._udp.recvfrom(65535)
                answer = self._answer(wire)
                due.append((time.monotonic() + self.delay, lambda a=answer, s=source: self._udp.sendto(a, s)))
            if self._tcp in readable:
                connection, _ = self._tcp.accept()
                threading.Thread(target=self._serve_tcp, args=(connection,), daemon=True).start()
            now = time.monotonic()
            held = self.hold is not None and not self.hold.is_set()
            for item in [d for d in due if d[0] <= now and not held]:
                due.remove(item)
                item[1]()

    def _serve_tcp(self, connection: socket.socket) -> None:
        with connection:
            connection.settimeout(5)
            try:
                while not self._stop.is_set():
                    header = connection.recv(2, socket.MSG_WAITALL)
                    if len(header) < 2:
                        return
                    wire = connection.recv(int.from_bytes(header, "big"), socket.MSG_WAITALL)
                    answer = self._answer(wire)
                    time.sleep(self.delay)
                    connection.sendall(len(answer).to_bytes(2, "big") + answer)
            except OSError:
                return

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self._udp.close()
        self._tcp.close()


def start_stub(ns: Netns | None = None, **kwargs: Any) -> StubUpstream:
    host, port = endpoint(ns)
    return StubUpstream(host, port, ns=ns, **kwargs)


class ServerThread:
    """The controller's `serve` in a thread with its own event loop."""

    def __init__(self, settings: DnsSettings, on_learned: Callable[[str, tuple[str, ...]], None] | None = None) -> None:
        self.host, self.port = settings.listen[0]
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._failure: BaseException | None = None
        self.server: DnsServer | None = None
        self._thread = threading.Thread(target=self._run, args=(settings, on_learned), daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise TimeoutError("DNS server did not start")
        if self._failure is not None:
            raise self._failure

    def _run(self, settings: DnsSettings, on_learned: Any) -> None:
        asyncio.set_event_loop(self._loop)
        self._stop = asyncio.Event()

        def started(server: DnsServer) -> None:
            self.server = server
            self._ready.set()

        try:
            self._loop.run_until_complete(serve(settings, on_learned=on_learned, stop=self._stop, on_started=started))
        except BaseException as exc:  # reported to the test thread
            self._failure = exc
            self._ready.set()
        finally:
            self._loop.close()

    def call(self, function: Callable[[DnsServer], Any]) -> Any:
        """Run function(server) inside the server's loop; awaits coroutines."""

        async def run() -> Any:
            result = function(self.server)
            return await result if asyncio.iscoroutine(result) else result

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(timeout=10)

    def counters(self) -> dict[str, int]:
        return self.call(lambda server: server.counters())

    def stop(self) -> None:
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(timeout=10)


@dataclass
class DigResult:
    status: str
    flags: set[str]
    answer: list[list[str]]
    authority: list[list[str]]
    additional: list[list[str]]
    text: str
    server: str = ""  # the address that answered, as dig names it

    def rdata(self, rdtype: str, section: str = "answer") -> list[str]:
        return [" ".join(r[4:]) for r in getattr(self, section) if r[3] == rdtype]


def dig(host: str, port: int, name: str, qtype: str = "A", *options: str, ns: Netns | None = None) -> DigResult:
    """Ask with the real dig (inside ns, if given) and parse its answer."""
    need_tool("dig")
    argv = ["dig", f"@{host}", "-p", str(port), name, qtype, "+time=3", "+tries=1", "+nocookie", *options]
    prefix = ["ip", "netns", "exec", ns.name] if ns else []
    return parse_dig(subprocess.run([*prefix, *argv], capture_output=True, text=True, timeout=15).stdout)


def parse_dig(text: str) -> DigResult:
    """dig's output, as DigResult."""
    header = re.search(r"status: (\w+)", text)
    flags = re.search(r";; flags:([^;]*);", text)
    server = re.search(r";; SERVER: ([^#]+)#", text)
    sections: dict[str, list[list[str]]] = {"answer": [], "authority": [], "additional": []}
    current = None
    for line in text.splitlines():
        heading = re.match(r";; (ANSWER|AUTHORITY|ADDITIONAL) SECTION:", line)
        if heading:
            current = heading.group(1).lower()
        elif not line.strip() or line.startswith(";"):
            current = None if not line.strip() else current
        elif current is not None:
            sections[current].append(line.split())
    return DigResult(
        status=header.group(1) if header else "NO-ANSWER",
        flags=set(flags.group(1).split()) if flags else set(),
        text=text,
        server=server.group(1) if server else "",
        **sections,
    )


def url(upstream: Any, scheme: str = "udp") -> str:
    """Where a test's upstream (dnsmasq, a stub, a fake) listens, as a [dns] upstream names it."""
    return f"{scheme}://{upstream.host}:{upstream.port}"


def split_dns_table(default: Any, fast: Any, corp: Any, deep: Any) -> dict[str, Any]:
    """The [dns] settings the rules and split-DNS tests share: `default` answers all but corp.test
    (`corp`) and eu.corp.test (`deep`); rules reject by full name, suffix, keyword and type (NXDOMAIN),
    keep one name of a rejected suffix as is, and send cdnN. names to the group `fast`."""
    return {
        "upstreams": [url(default)],
        "reject_rcode": "nxdomain",
        "groups": {"fast": [url(fast)]},
        "routes": [
            {"suffix": "corp.test", "upstreams": [url(corp)]},
            {"suffix": "eu.corp.test", "upstreams": [url(deep)]},
        ],
        "rules": [
            {"match": "full:blocked.test", "action": "reject"},
            {"match": "full:ok.ads.test", "action": "asis"},
            {"match": "suffix:ads.test", "action": "reject"},
            {"match": "keyword:tracker", "action": "reject"},
            {"match": r"regex:^cdn[0-9]+\.", "action": "fast"},
            {"match": "qtype:MX", "action": "reject"},
        ],
    }


def toml_value(value: Any) -> str:
    """A TOML literal for the plain values a [dns] table holds."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float, str)):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"no TOML form for {value!r}")


def node_config(tmp: Path, me: Identity, peers: list[Identity], dns_table: dict[str, Any]) -> Path:
    """A node config (tests.topology's) whose [dns] table is dns_table."""
    path = meshsup_config(tmp, me, peers)
    text = path.read_text()
    default = '[dns]\nlisten = ["127.0.0.1:53"]\n'
    assert default in text, "meshsup_config changed its [dns] table"
    table = "[dns]\n" + "".join(f"{key} = {toml_value(value)}\n" for key, value in dns_table.items())
    path.write_text(text.replace(default, table))
    return path


def header(flags: int, qd: int = 1, ar: int = 0, query_id: int = 0x4242) -> bytes:
    return struct.pack("!HHHHHH", query_id, flags, qd, 0, 0, ar)


_QUESTION = b"\x05alpha\x04mesh\x00\x00\x01\x00\x01"
# (what is wrong, the packet, the rcode of the answer or None for no answer): every case of RFC 1035/6891/8906 hygiene.
BAD_PACKETS: list[tuple[str, bytes, int | None]] = [
    ("qr-set", header(0x8100) + _QUESTION, None),
    ("qdcount-2", header(0x0100, qd=2) + _QUESTION * 2, dns.rcode.FORMERR),
    ("qdcount-0", header(0x0100, qd=0), dns.rcode.FORMERR),
    ("opcode-5", header(0x0100 | 5 << 11) + _QUESTION, dns.rcode.NOTIMP),
    ("edns-version-1", dns.message.make_query("a.mesh", "A", use_edns=1, id=0x4242).to_wire(), dns.rcode.BADVERS),
    ("truncated", (header(0x0100) + _QUESTION)[:19], dns.rcode.FORMERR),
    ("pointer-loop", header(0x0100) + b"\xc0\x0c\x00\x01\x00\x01", dns.rcode.FORMERR),
    ("trailing-junk", header(0x0100) + _QUESTION + b"junk", dns.rcode.FORMERR),
    (
        "two-opts",
        header(0x0100, ar=2) + _QUESTION + b"\x00\x00\x29\x04\xd0\x00\x00\x00\x00\x00\x00" * 2,
        dns.rcode.FORMERR,
    ),
    ("too-short", b"\x42\x42\x01", None),
]


def assert_bad_packet_answer(answer: bytes | None, rcode: int | None) -> None:
    if rcode is None:
        assert answer is None
        return
    assert answer is not None
    message = dns.message.from_wire(answer)
    assert message.rcode() == rcode and message.id == 0x4242 and message.flags & dns.flags.QR

"""Real flow-log collectors for tests, all on loopback with free ports.

rsyslogd, nfcapd and systemd-journal-remote run with private configs and
directories under the test's tmp dir, on the test process's loopback or on
the loopback of a node's network namespace, and are started and stopped by
their own PID. The HTTP and TLS-syslog receivers are threads in the test
process.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import select
import shutil
import socket
import ssl
import struct
import subprocess
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Self

import pytest

from meshsup.actors.netlog.syslog import OctetCountingDecoder
from tests.nodes import Netns, udp_sockets

LOOPBACK = "127.0.0.1"
JOURNAL_REMOTE = "/lib/systemd/systemd-journal-remote"


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def wait_until(predicate: Callable[[], bool], timeout: float, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


def require_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (Debian package providing {name} needed)")
    return path


def in_netns(netns: Netns | None, cmd: list[str]) -> list[str]:
    """`ip netns exec` runs the command in place (exec), so the PID is the command's own."""
    return ["ip", "netns", "exec", netns.name, *cmd] if netns else cmd


def tcp_listening(port: int, netns: Netns | None = None) -> bool:
    if netns is not None:
        return bool(netns.run("ss", "-Hltn", f"sport = :{port}", check=False).stdout.strip())
    try:
        socket.create_connection((LOOPBACK, port), timeout=0.5).close()
        return True
    except OSError:
        return False


def stop_process(proc: subprocess.Popen[bytes] | None) -> None:
    """Terminate by PID, escalate to kill, always reap."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


def parse_syslog_line(line: str) -> dict[str, str]:
    hostname, app_name, procid, msgid, sd, msg = line.split("\t", 5)
    return {"hostname": hostname, "app_name": app_name, "procid": procid, "msgid": msgid, "sd": sd, "msg": msg}


def rsyslog_lacks_imtcp(binary: str, workdir: Path) -> str | None:
    """Whether this rsyslogd has what the tests need (imtcp with maxFrameSize), asked with the
    fewest lines rsyslogd accepts: a fault in the tests' own config must fail, not skip."""
    probe = workdir / "imtcp-probe.conf"
    probe.write_text(
        'module(load="imtcp" maxFrameSize="310000")\n'
        f'input(type="imtcp" address="{LOOPBACK}" port="1")\n'
        f'action(type="omfile" file="{workdir / "imtcp-probe.out"}")\n'
    )
    check = subprocess.run([binary, "-N1", "-f", str(probe)], check=False, capture_output=True, text=True, timeout=30)
    return None if check.returncode == 0 else f"this rsyslogd lacks imtcp with maxFrameSize: {check.stderr[-300:]}"


class _Daemon:
    """A collector daemon a test starts (in its namespace) and stops by PID."""

    def __init__(self, workdir: Path, port: int, netns: Netns | None) -> None:
        self.dir, self.port, self.netns = workdir, port, netns
        self.proc: subprocess.Popen[bytes] | None = None

    def _spawn(self, cmd: list[str], log: Path, ready: Callable[[], bool]) -> None:
        """Start ``cmd`` with its output to ``log``; stopped, and RuntimeError, unless ready within 10 s."""
        with open(log, "ab") as out:
            proc = subprocess.Popen(in_netns(self.netns, cmd), stdout=out, stderr=out)
        self.proc = proc

        def up() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"{Path(cmd[0]).name} exited: {log.read_text(errors='replace')}")
            return ready()

        if not wait_until(up, 10):
            self.stop()
            raise RuntimeError(f"{Path(cmd[0]).name} did not start: {log.read_text(errors='replace')}")

    def stop(self) -> None:
        stop_process(self.proc)
        self.proc = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Rsyslog(_Daemon):
    """rsyslogd -n with imtcp on a loopback port writing the parsed fields of each message to a file.

    Only the modules the config loads are active (no imuxsock, so /dev/log is
    untouched); the work directory, PID file and output are private.
    """

    def __init__(self, workdir: Path, port: int, netns: Netns | None = None) -> None:
        super().__init__(workdir, port, netns)
        self.binary = require_tool("rsyslogd")
        self.output = workdir / "flows.log"
        self.conf = workdir / "rsyslog.conf"
        self.pidfile = workdir / "rsyslogd.pid"
        (workdir / "work").mkdir(parents=True, exist_ok=True)
        # A flow record may be 256 KiB: rsyslog's defaults are 8 KiB a message and 200000 bytes an
        # octet-counted frame (beyond that imtcp falls back to octet stuffing and garbles it).
        self.conf.write_text(
            f'global(workDirectory="{workdir / "work"}" maxMessageSize="300k")\n'
            'module(load="imtcp" maxFrameSize="310000")\n'
            'template(name="fields" type="string"'
            ' string="%hostname%\\t%app-name%\\t%procid%\\t%msgid%\\t%structured-data%\\t%msg%\\n")\n'
            'ruleset(name="flows") {\n'
            f'  action(type="omfile" file="{self.output}" template="fields")\n'
            "}\n"
            f'input(type="imtcp" address="{LOOPBACK}" port="{port}" ruleset="flows")\n'
        )
        check = subprocess.run(
            [self.binary, "-N1", "-f", str(self.conf)], check=False, capture_output=True, text=True, timeout=30
        )
        if check.returncode != 0:
            if lacks := rsyslog_lacks_imtcp(self.binary, workdir):
                pytest.skip(lacks)
            raise AssertionError(f"rsyslogd refuses the test's own config: {check.stderr.strip()[:300]}")

    def start(self) -> None:
        self._spawn(
            [self.binary, "-n", "-f", str(self.conf), "-i", str(self.pidfile)],
            self.dir / "rsyslogd.stderr",
            lambda: tcp_listening(self.port, self.netns),
        )

    def messages(self) -> list[dict[str, str]]:
        if not self.output.exists():
            return []
        lines = self.output.read_text().splitlines()
        return [parse_syslog_line(line) for line in lines if line]


class Nfcapd(_Daemon):
    """nfcapd collecting IPFIX on a loopback UDP port into a private directory."""

    def __init__(self, workdir: Path, port: int, netns: Netns | None = None) -> None:
        self.binary = require_tool("nfcapd")
        self.nfdump = require_tool("nfdump")
        super().__init__(workdir, port, netns)
        self.flowdir = workdir / "flows"
        self.flowdir.mkdir(parents=True, exist_ok=True)
        self.log = workdir / "nfcapd.log"

    def start(self) -> None:
        self._spawn(
            [self.binary, "-w", str(self.flowdir), "-b", LOOPBACK, "-p", str(self.port), "-t", "3600"],
            self.log,
            lambda: "Startup" in self.log.read_text(errors="replace"),
        )

    def drained(self) -> bool:
        """Whether nfcapd took every datagram off its socket: the kernel's receive queue for its port is empty."""
        sockets = udp_sockets(self.port, self.netns)
        return bool(sockets) and all(queued == 0 for queued, _ in sockets)

    def last_file(self) -> Path:
        """The file nfcapd wrote last: stopping it closes its current one."""
        files = sorted(p for p in self.flowdir.iterdir() if p.name.startswith("nfcapd.2"))
        assert files, f"nfcapd wrote no file: {self.log.read_text()}"
        return files[-1]

    def flows(self, path: Path) -> list[dict[str, str]]:
        """nfdump's CSV rows (header line first, a summary after a 'Summary' line)."""
        out = subprocess.run(
            [self.nfdump, "-r", str(path), "-o", "csv"], capture_output=True, text=True, timeout=30, check=True
        ).stdout
        lines = out.splitlines()
        header = lines[0].split(",")
        rows = lines[1 : lines.index("Summary")] if "Summary" in lines else lines[1:]
        return [dict(zip(header, (v.strip() for v in row.split(",")))) for row in rows if row]

    def stats(self, path: Path) -> dict[str, str]:
        out = subprocess.run(
            [self.nfdump, "-I", "-r", str(path)], capture_output=True, text=True, timeout=30, check=True
        ).stdout
        return {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in out.splitlines()) if v}


class JournalRemote(_Daemon):
    """systemd-journal-remote taking journal export entries over HTTP into a private journal file."""

    def __init__(self, workdir: Path, port: int, netns: Netns | None = None) -> None:
        if not Path(JOURNAL_REMOTE).exists():
            pytest.skip("systemd-journal-remote is not installed (Debian package systemd-journal-remote)")
        self.journalctl = require_tool("journalctl")
        super().__init__(workdir, port, netns)
        self.output = workdir / "remote.journal"
        self.log = workdir / "journal-remote.log"
        workdir.mkdir(parents=True, exist_ok=True)

    def start(self) -> None:
        self._spawn(
            [JOURNAL_REMOTE, f"--listen-http={LOOPBACK}:{self.port}", f"--output={self.output}", "--split-mode=none"],
            self.log,
            lambda: tcp_listening(self.port, self.netns),
        )

    def entries(self) -> list[dict[str, object]]:
        """Every entry of the journal file, as `journalctl -o json` shows it."""
        if not self.output.exists():
            return []
        out = subprocess.run(
            [self.journalctl, f"--file={self.output}", "-o", "json", "--no-pager"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        ).stdout
        return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


@dataclass
class HttpRequest:
    at: float
    status: int
    headers: dict[str, str]
    records: list[dict[str, object]]


@dataclass
class HttpCollector:
    """A JSON-lines HTTP collector answering from a script of (status, headers), then 200."""

    script: list[tuple[int, dict[str, str]]] = field(default_factory=list)
    requests: list[HttpRequest] = field(default_factory=list)
    keep_alive: bool = False  # answer as HTTP/1.1, so a connection carries the next request too

    def __post_init__(self) -> None:
        collector = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1" if collector.keep_alive else "HTTP/1.0"

            def do_POST(self) -> None:
                at = time.time()
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = zlib.decompress(body, wbits=31)
                status, extra = collector.script.pop(0) if collector.script else (200, {})
                collector.requests.append(HttpRequest(at, status, dict(self.headers), json.loads(body)))
                self.send_response(status)
                for k, v in extra.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer((LOOPBACK, 0), Handler)
        self.port = int(self.server.server_address[1])
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def accepted(self) -> list[dict[str, object]]:
        return [r for req in self.requests if req.status == 200 for r in req.records]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def make_certificate(directory: Path, host: str = LOOPBACK) -> tuple[Path, Path]:
    """A self-signed certificate for `host`, an IP or a name (its own CA): (cert.pem, key.pem)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    try:
        san: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:  # a host name
        san = x509.DNSName(host)
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([san]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


class SyslogReceiver:
    """An RFC 6587 receiver on a loopback port (RFC 5425 when given a certificate); frames kept in order.

    With reset_first, the first connection is reset (SO_LINGER 0) after a few
    bytes were read and the rest left unread, as a collector crashing
    mid-stream would do.
    """

    def __init__(self, tls: tuple[Path, Path] | None = None, reset_first: bool = False) -> None:
        self.context: ssl.SSLContext | None = None
        if tls is not None:
            self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self.context.load_cert_chain(*tls)
        self.listener = socket.create_server((LOOPBACK, 0))
        self.port = int(self.listener.getsockname()[1])
        self.frames: list[bytes] = []
        self.handshake_errors = 0
        self.resets = 0
        self._reset_pending = reset_first
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _accept(self) -> socket.socket | None:
        raw, _ = self.listener.accept()
        if self.context is None:
            return raw
        try:
            raw.settimeout(5)
            return self.context.wrap_socket(raw, server_side=True)
        except (ssl.SSLError, OSError):
            self.handshake_errors += 1
            raw.close()
            return None

    def _serve(self) -> None:
        conns: dict[socket.socket, OctetCountingDecoder] = {}
        while not self._stop.is_set():
            readable, _, _ = select.select([self.listener, *conns], [], [], 0.05)
            for sock in readable:
                if sock is self.listener:
                    conn = self._accept()
                    if conn is not None:
                        conns[conn] = OctetCountingDecoder()
                    continue
                if self._reset_pending:
                    sock.recv(16)
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self._reset_pending = False
                    self.resets += 1
                    data = b""
                else:
                    try:
                        data = sock.recv(65536)
                    except (ssl.SSLError, OSError):
                        data = b""
                if data:
                    self.frames += conns[sock].feed(data)
                else:
                    del conns[sock]
                    sock.close()
        for sock in conns:
            sock.close()

    def close(self) -> None:
        self._stop.set()
        self.thread.join(timeout=5)
        self.listener.close()

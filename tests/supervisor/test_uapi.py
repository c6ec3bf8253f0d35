"""The WireGuard userspace API: parsing, replies, and the real `wg` tool."""

from __future__ import annotations

import base64
import errno
import ipaddress
import os
import secrets
import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import structlog
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from meshsup.actors.settings import Settings, parse
from meshsup.supervisor.uapi import (
    AllowedIp,
    DeviceState,
    Endpoint,
    Fwmark,
    GetRequest,
    ListenPort,
    PeerState,
    PersistentKeepaliveInterval,
    PresharedKey,
    PrivateKey,
    ProtocolVersion,
    PublicKey,
    Remove,
    ReplaceAllowedIps,
    ReplacePeers,
    SetRequest,
    UapiError,
    UpdateOnly,
    parse_request,
    serialize_errno,
    serialize_get,
    split_request,
)
from meshsup.supervisor.uapi_front import UapiFront
from meshsup.supervisor.uapi_server import SOCKET_DIR, socket_path

K1, K2, K3 = bytes(range(32)), bytes(range(32, 64)), bytes([7]) * 32


def test_set_request_with_every_key_parses_in_order() -> None:
    text = (
        f"set=1\nprivate_key={K1.hex()}\nlisten_port=51820\nfwmark=0\nreplace_peers=true\n"
        f"public_key={K2.hex()}\nupdate_only=true\npreshared_key={K3.hex()}\n"
        "endpoint=198.51.100.9:51820\npersistent_keepalive_interval=25\nreplace_allowed_ips=true\n"
        "allowed_ip=100.64.0.2/32\nallowed_ip=fd00::5/64\nprotocol_version=1\n"
        f"public_key={K3.hex()}\nendpoint=[fd00::1]:1\nremove=true\n"
    )
    assert parse_request(text.encode()) == SetRequest(
        [
            PrivateKey(K1),
            ListenPort(51820),
            Fwmark(0),
            ReplacePeers(),
            PublicKey(K2),
            UpdateOnly(),
            PresharedKey(K3),
            Endpoint("198.51.100.9", 51820),
            PersistentKeepaliveInterval(25),
            ReplaceAllowedIps(),
            AllowedIp(ipaddress.ip_network("100.64.0.2/32")),
            AllowedIp(ipaddress.ip_network("fd00::/64")),  # host bits masked, as the kernel does
            ProtocolVersion(1),
            PublicKey(K3),
            Endpoint("fd00::1", 1),
            Remove(),
        ]
    )


def test_get_request() -> None:
    assert parse_request(b"get=1\n") == GetRequest()


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (f"private_key={K1.hex()[:-2]}", errno.EINVAL),  # short key
        ("private_key=" + "zz" * 32, errno.EINVAL),
        ("private_key=" + "ab " * 21 + "a", errno.EINVAL),  # fromhex would skip spaces
        ("listen_port=65536", errno.EINVAL),
        ("listen_port=+1", errno.EINVAL),
        ("listen_port=", errno.EINVAL),
        ("fwmark=4294967296", errno.EINVAL),
        ("replace_peers=false", errno.EINVAL),
        ("endpoint=198.51.100.9:51820", errno.EINVAL),  # a peer key before any public_key
        (f"public_key={K2.hex()}\nlisten_port=1", errno.EINVAL),  # a device key inside a peer
        (f"public_key={K2.hex()}\nendpoint=example.com:51820", errno.EINVAL),
        (f"public_key={K2.hex()}\nendpoint=fd00::1:51820", errno.EINVAL),  # v6 needs brackets
        (f"public_key={K2.hex()}\nendpoint=198.51.100.9", errno.EINVAL),
        (f"public_key={K2.hex()}\nallowed_ip=10.0.0.0", errno.EINVAL),
        (f"public_key={K2.hex()}\nallowed_ip=10.0.0.0/33", errno.EINVAL),
        (f"public_key={K2.hex()}\nprotocol_version=2", errno.EINVAL),
        ("bogus_key=1", errno.EINVAL),
        ("no equals sign", errno.EPROTO),
    ],
)
def test_bad_set_lines_are_errno_values(body: str, code: int) -> None:
    result = parse_request(f"set=1\n{body}\n".encode())
    assert isinstance(result, UapiError)
    assert result.errno == code


@pytest.mark.parametrize("request_", [b"put=1\n", b"", b"get=1\nlisten_port=1\n", b"set=1\n\xff=1\n"])
def test_bad_framing_is_eproto(request_: bytes) -> None:
    result = parse_request(request_)
    assert isinstance(result, UapiError) and result.errno == errno.EPROTO


def test_split_request_frames_a_stream() -> None:
    assert split_request(b"get=1\n") == (None, b"get=1\n")
    assert split_request(b"get=1\n\nset=1\nfwmark=1\n\nget") == (b"get=1\n", b"set=1\nfwmark=1\n\nget")
    too_big = split_request(b"set=1\n" + b"fwmark=1\n" * 200_000)
    assert isinstance(too_big, UapiError) and too_big.errno == errno.EMSGSIZE


def test_serialize_get_matches_wireguard_go_layout() -> None:
    device = DeviceState(
        private_key=K1,
        listen_port=51820,
        peers=[
            PeerState(
                public_key=K2,
                endpoint=("fd00::9", 51820),
                allowed_ips=["100.64.0.2/32", ipaddress.ip_network("10.0.0.0/24")],
                last_handshake_time_sec=1700000000,
                last_handshake_time_nsec=5,
                rx_bytes=10,
                tx_bytes=20,
                persistent_keepalive_interval=25,
            )
        ],
    )
    assert serialize_get(device).decode() == (
        f"private_key={K1.hex()}\nlisten_port=51820\npublic_key={K2.hex()}\n"
        f"preshared_key={'00' * 32}\nprotocol_version=1\nendpoint=[fd00::9]:51820\n"
        "last_handshake_time_sec=1700000000\nlast_handshake_time_nsec=5\ntx_bytes=20\nrx_bytes=10\n"
        "persistent_keepalive_interval=25\nallowed_ip=100.64.0.2/32\nallowed_ip=10.0.0.0/24\nerrno=0\n\n"
    )
    assert serialize_get(DeviceState()) == b"errno=0\n\n"


def test_serialize_errno_is_negated_like_wireguard_go() -> None:
    assert serialize_errno(None) == b"errno=0\n\n"
    assert serialize_errno(UapiError(errno.EINVAL, "x")) == b"errno=-22\n\n"


# --- against the real `wg` binary -------------------------------------------


class UapiServer:
    """A tiny UAPI endpoint: answers get=1 from ``device`` and records every
    parsed set=1; ``refuse_listen_port`` makes it fail such sets."""

    def __init__(self, path: Path, device: DeviceState) -> None:
        self.device = device
        self.sets: list[SetRequest] = []
        self.refuse_listen_port: UapiError | None = None
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(path))
        self._listener.listen()
        self._listener.settimeout(0.1)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(5)
                self._handle(conn)

    def _handle(self, conn: socket.socket) -> None:
        buffer = b""
        while chunk := conn.recv(4096):
            buffer += chunk
            framed = split_request(buffer)
            if isinstance(framed, UapiError):
                conn.sendall(serialize_errno(framed))
                return
            request, buffer = framed
            if request is None:
                continue
            parsed = parse_request(request)
            if isinstance(parsed, GetRequest):
                conn.sendall(serialize_get(self.device))
            elif isinstance(parsed, SetRequest):
                self.sets.append(parsed)
                refuse = self.refuse_listen_port and any(isinstance(op, ListenPort) for op in parsed.operations)
                conn.sendall(serialize_errno(self.refuse_listen_port if refuse else None))
            else:
                conn.sendall(serialize_errno(parsed))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._listener.close()


@pytest.fixture
def uapi_server() -> Iterator[tuple[str, UapiServer]]:
    if shutil.which("wg") is None:
        pytest.skip("needs the wg tool (wireguard-tools)")
    rundir = Path("/var/run/wireguard")
    try:
        rundir.mkdir(mode=0o755, parents=True, exist_ok=True)
    except PermissionError:
        pytest.skip("needs root to create /var/run/wireguard")
    if not os.access(rundir, os.W_OK):
        pytest.skip("needs root to write /var/run/wireguard")
    ifname = "mstu" + secrets.token_hex(4)  # the socket directory is shared by all namespaces
    path = rundir / f"{ifname}.sock"
    server = UapiServer(path, DeviceState())
    try:
        yield ifname, server
    finally:
        server.stop()
        path.unlink(missing_ok=True)


def _b64(key: bytes) -> str:
    return base64.b64encode(key).decode()


@pytest.mark.netns
def test_wg_show_dump_reads_our_get_reply(uapi_server: tuple[str, UapiServer]) -> None:
    ifname, server = uapi_server
    private = X25519PrivateKey.generate()
    private_raw = private.private_bytes_raw()
    public_raw = private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    server.device = DeviceState(
        private_key=private_raw,
        listen_port=51820,
        peers=[
            PeerState(
                public_key=K2,
                preshared_key=K3,
                endpoint=("198.51.100.9", 51820),
                allowed_ips=["100.64.0.2/32", "10.20.0.0/16"],
                last_handshake_time_sec=1700000000,
                rx_bytes=1234,
                tx_bytes=5678,
                persistent_keepalive_interval=25,
            )
        ],
    )
    out = subprocess.run(["wg", "show", ifname, "dump"], capture_output=True, text=True, timeout=10, check=True)
    device_line, peer_line = out.stdout.strip().split("\n")
    assert device_line.split("\t") == [_b64(private_raw), _b64(public_raw), "51820", "off"]
    assert peer_line.split("\t") == [
        _b64(K2),
        _b64(K3),
        "198.51.100.9:51820",
        "100.64.0.2/32,10.20.0.0/16",
        "1700000000",
        "1234",
        "5678",
        "25",
    ]


@pytest.mark.netns
def test_wg_set_reaches_our_parser(uapi_server: tuple[str, UapiServer]) -> None:
    ifname, server = uapi_server
    cmd = ["wg", "set", ifname, "peer", _b64(K2), "allowed-ips", "10.0.0.0/24", "endpoint", "198.51.100.9:51820"]
    subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=True)
    assert server.sets == [
        SetRequest(
            [
                PublicKey(K2),
                Endpoint("198.51.100.9", 51820),
                ReplaceAllowedIps(),
                AllowedIp(ipaddress.ip_network("10.0.0.0/24")),
            ]
        )
    ]


@pytest.mark.netns
def test_wg_reports_our_errno(uapi_server: tuple[str, UapiServer]) -> None:
    ifname, server = uapi_server
    server.refuse_listen_port = UapiError(errno.EADDRINUSE, "port taken")
    out = subprocess.run(["wg", "set", ifname, "listen-port", "51821"], capture_output=True, text=True, timeout=10)
    assert out.returncode != 0
    assert os.strerror(errno.EADDRINUSE) in out.stderr


def test_the_socket_follows_the_interface_when_a_reload_renames_it(tmp_path: Path) -> None:
    if not os.access(SOCKET_DIR if SOCKET_DIR.exists() else SOCKET_DIR.parent, os.W_OK):
        pytest.skip(f"needs root to write {SOCKET_DIR}")
    old, new = ("mstu" + secrets.token_hex(4) for _ in range(2))  # the directory is shared: names unique

    def config(interface: str) -> Settings:
        return parse("node.toml", {"node": {"interface": interface}}, tmp_path, tmp_path)

    front = UapiFront(SimpleNamespace(config=config(old)), lambda new, done: None, structlog.get_logger())  # type: ignore[arg-type]
    try:
        assert front.serve(old) is None and socket_path(old).exists()
        front.follow(config(new))
        assert socket_path(new).exists() and not socket_path(old).exists()
    finally:
        if front.uapi is not None:
            front.uapi.close()

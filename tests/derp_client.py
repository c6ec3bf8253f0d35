"""A DERP client for tests, built from actors/wire/derp.py: a blocking socket, one frame at a time."""

from __future__ import annotations

import socket
import ssl
import time

from nacl.public import PrivateKey

from meshsup.actors.wire import derp
from meshsup.actors.wire.derp import FrameReader, FrameType


class Closed(Exception):
    """The relay ended the connection."""


class DerpClient:
    def __init__(
        self,
        addr: tuple[str, int],
        private: bytes | None = None,
        *,
        login: bool = True,
        fast_start: bool = False,
        tls: ssl.SSLContext | None = None,
        mesh_key: str = "",
    ) -> None:
        key = PrivateKey(private) if private else PrivateKey.generate()
        self.private, self.public = bytes(key), bytes(key.public_key)
        self.addr, self.fast_start, self.mesh_key = addr, fast_start, mesh_key
        sock = socket.create_connection(addr, timeout=5)
        self.sock = tls.wrap_socket(sock, server_hostname=addr[0]) if tls else sock
        self.reader = FrameReader()
        self.server_key = b""
        self.server_info: dict[str, object] = {}
        if login:
            self.login()

    def login(self, info: bytes | None = None) -> None:
        """The upgrade, the server's key, our proof (`info`: a ClientInfo frame of our own making)."""
        self.sock.sendall(derp.upgrade_request(f"{self.addr[0]}:{self.addr[1]}", fast_start=self.fast_start))
        if not self.fast_start:
            head = self.read_head()
            assert head.first[1] == "101", head
        ftype, payload = self.frame()
        assert ftype == FrameType.SERVER_KEY
        self.server_key = derp.parse_server_key(payload)
        self.sock.sendall(
            info or derp.client_info(self.private, self.public, self.server_key, derp.client_info_json(self.mesh_key))
        )
        ftype, payload = self.frame()
        assert ftype == FrameType.SERVER_INFO, ftype
        self.server_info = derp.open_server_info(self.private, self.server_key, payload)

    def read_head(self) -> derp.Head:
        data = b""
        while (split := derp.split_head(data)) is None:
            data += self._recv()
        head, size = split
        self.reader.feed(data[size:])
        return head

    def _recv(self, timeout: float = 5.0) -> bytes:
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(1 << 16)
        except (ConnectionResetError, ssl.SSLEOFError):
            data = b""
        if not data:
            raise Closed()
        return data

    def frame(self, timeout: float = 5.0) -> tuple[int, bytes]:
        deadline = time.monotonic() + timeout
        while (f := self.reader.next()) is None:
            self.reader.feed(self._recv(max(0.01, deadline - time.monotonic())))
        return f

    def expect(self, *types: int, timeout: float = 5.0) -> tuple[int, bytes]:
        """The next frame of one of `types`, skipping keep-alives and others."""
        deadline = time.monotonic() + timeout
        while True:
            ftype, payload = self.frame(max(0.01, deadline - time.monotonic()))
            if ftype in types:
                return ftype, payload

    def packet(self, timeout: float = 5.0) -> tuple[bytes, bytes]:
        """(source key, packet) of the next RecvPacket."""
        _, payload = self.expect(FrameType.RECV_PACKET, timeout=timeout)
        return payload[:32], payload[32:]

    def send(self, dst: bytes, packet: bytes) -> None:
        self.sock.sendall(derp.send_packet(dst, packet))

    def nothing(self, wait: float = 0.3) -> bool:
        """No packet arrives within `wait` (what a client must not get)."""
        try:
            self.expect(FrameType.RECV_PACKET, timeout=wait)
        except TimeoutError:
            return True
        return False

    def closed(self, timeout: float = 5.0) -> bool:
        """The relay closes the connection within `timeout` (frames before that are read and dropped)."""
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                self.frame(max(0.01, deadline - time.monotonic()))
        except Closed:
            return True
        except (TimeoutError, derp.FrameError):
            return False
        return False

    def close(self) -> None:
        self.sock.close()

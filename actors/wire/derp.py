"""DERP, protocol version 2, on the wire (sans-IO): frames, login boxes and the HTTP upgrade.

Byte-compatible with Tailscale's `derp` package: the constants, layouts and
limits below are its facts; the code is ours. A connection starts as HTTP
(`GET /derp` with `Upgrade: DERP`, answered `101 Switching Protocols`, or no
answer at all when the client asked for `Derp-Fast-Start: 1`), then carries
frames: a type byte and a big-endian u32 length, then that many bytes.

Login: the server sends ServerKey (magic + its public key); the client sends
ClientInfo (its public key, then a NaCl box of a JSON object sealed to the
server's key: opening it proves the client holds its private key); the
server answers ServerInfo (a box sealed to the client's key). A box is a
24-byte nonce followed by crypto_box's output, as Tailscale's SealTo writes it.

Both ends use FrameReader: it takes bytes as they come and hands back whole
frames, refusing (FrameError with a reason) any frame whose length is
outside what its type allows, before waiting for its payload.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from enum import IntEnum, IntFlag
from typing import Any, Final

from nacl.exceptions import CryptoError
from nacl.public import Box, PrivateKey, PublicKey

from meshsup.actors.kernel.types import Buffer
from meshsup.actors.wire.errors import WireError
from meshsup.actors.wire.ip import packed16, unpacked16

MAGIC: Final = "DERP🔑".encode()  # 44 45 52 50 f0 9f 94 91
PROTOCOL_VERSION: Final = 2  # v2: RecvPacket starts with the source key
KEY_LEN: Final = 32
NONCE_LEN: Final = 24
BOX_OVERHEAD: Final = 16  # Poly1305 tag
FRAME_HEADER_LEN: Final = 5
MAX_PACKET_SIZE: Final = 64 << 10  # payload of a Send/RecvPacket, without its key
MAX_INFO_LEN: Final = 1 << 20  # the client's bound on ServerInfo's JSON
MAX_CLIENT_INFO_LEN: Final = 256 << 10  # the server's bound on ClientInfo, before it trusts anyone
KEEPALIVE_INTERVAL: Final = 60.0  # seconds between a server's KeepAlive frames
PING_LEN: Final = 8
MAX_PING_LEN: Final = 1000  # a ping may carry extra bytes, within reason
MAX_HEAD: Final = 8 << 10  # longest HTTP head we read
FAST_START_HEADER: Final = "Derp-Fast-Start"
PROBE_PATHS: Final = frozenset({"/derp/probe", "/derp/latency-check"})
_U32 = struct.Struct(">I")
_HEADER = struct.Struct(">BI")


class FrameType(IntEnum):
    SERVER_KEY = 0x01  # 8B magic + 32B server public key (+ future use)
    CLIENT_INFO = 0x02  # 32B client public key + 24B nonce + box(JSON)
    SERVER_INFO = 0x03  # 24B nonce + box(JSON)
    SEND_PACKET = 0x04  # 32B destination key + packet
    RECV_PACKET = 0x05  # 32B source key + packet
    KEEP_ALIVE = 0x06  # empty
    NOTE_PREFERRED = 0x07  # 1 byte: 1 if this is the client's home relay
    PEER_GONE = 0x08  # 32B key + 1B reason
    PEER_PRESENT = 0x09  # 32B key [+ 16B IP + 2B port [+ 1B flags]]
    FORWARD_PACKET = 0x0A  # 32B source + 32B destination + packet (between meshed relays)
    WATCH_CONNS = 0x10  # empty: subscribe to PeerPresent/PeerGone (mesh key holders)
    CLOSE_PEER = 0x11  # 32B key (mesh key holders)
    PING = 0x12  # 8 bytes, echoed in a Pong
    PONG = 0x13
    HEALTH = 0x14  # UTF-8 problem text; empty means healthy again
    RESTARTING = 0x15  # u32 reconnect-in ms + u32 try-for ms


class PeerGoneReason(IntEnum):
    DISCONNECTED = 0x00  # the peer left this relay
    NOT_HERE = 0x01  # the relay has no such peer


class PeerPresentFlags(IntFlag):
    REGULAR = 1 << 0
    MESH_PEER = 1 << 1
    PROBER = 1 << 2
    NOT_IDEAL = 1 << 3


_PRESENT_LEN: Final = KEY_LEN + 16 + 2 + 1
# Payload lengths each frame type may have, (least, most). Other types are
# skipped by both ends (as Tailscale's do) when no longer than UNKNOWN_MAX.
LIMITS: Final[dict[int, tuple[int, int]]] = {
    FrameType.SERVER_KEY: (len(MAGIC) + KEY_LEN, 1 << 10),
    FrameType.CLIENT_INFO: (KEY_LEN + NONCE_LEN + BOX_OVERHEAD, MAX_CLIENT_INFO_LEN),
    FrameType.SERVER_INFO: (NONCE_LEN + BOX_OVERHEAD, NONCE_LEN + BOX_OVERHEAD + MAX_INFO_LEN),
    FrameType.SEND_PACKET: (KEY_LEN, KEY_LEN + MAX_PACKET_SIZE),
    FrameType.RECV_PACKET: (KEY_LEN, KEY_LEN + MAX_PACKET_SIZE),
    FrameType.KEEP_ALIVE: (0, 0),
    FrameType.NOTE_PREFERRED: (1, 1),
    FrameType.PEER_GONE: (KEY_LEN, KEY_LEN + 1),
    FrameType.PEER_PRESENT: (KEY_LEN, _PRESENT_LEN),
    FrameType.FORWARD_PACKET: (2 * KEY_LEN, 2 * KEY_LEN + MAX_PACKET_SIZE),
    FrameType.WATCH_CONNS: (0, 0),
    FrameType.CLOSE_PEER: (KEY_LEN, KEY_LEN),
    FrameType.PING: (PING_LEN, MAX_PING_LEN),
    FrameType.PONG: (PING_LEN, MAX_PING_LEN),
    FrameType.HEALTH: (0, 4 << 10),
    FrameType.RESTARTING: (8, 8),
}
UNKNOWN_MAX: Final = 2 * KEY_LEN + MAX_PACKET_SIZE


def type_name(ftype: int) -> str:
    """`send_packet`, or `type_0x42` for a type DERP does not define."""
    try:
        return FrameType(ftype).name.lower()
    except ValueError:
        return f"type_{ftype:#04x}"


class FrameError(WireError):
    """Input that breaks the DERP protocol."""


# --- writing frames ----------------------------------------------------------


def header(ftype: int, length: int) -> bytes:
    return _HEADER.pack(ftype, length)


def frame(ftype: int, *parts: Buffer) -> bytes:
    body = b"".join(parts)
    return _HEADER.pack(ftype, len(body)) + body


def server_key(public: bytes) -> bytes:
    return frame(FrameType.SERVER_KEY, MAGIC, public)


def send_packet(dst: bytes, packet: Buffer) -> bytes:
    if len(packet) > MAX_PACKET_SIZE:
        raise ValueError(f"packet of {len(packet)} bytes is over DERP's {MAX_PACKET_SIZE}")
    return frame(FrameType.SEND_PACKET, dst, packet)


def recv_packet(src: bytes, packet: Buffer) -> bytes:
    return frame(FrameType.RECV_PACKET, src, packet)


def keep_alive() -> bytes:
    return header(FrameType.KEEP_ALIVE, 0)


def note_preferred(preferred: bool) -> bytes:
    return frame(FrameType.NOTE_PREFERRED, b"\x01" if preferred else b"\x00")


def peer_gone(key: bytes, reason: PeerGoneReason) -> bytes:
    return frame(FrameType.PEER_GONE, key, bytes([reason]))


def peer_present(key: bytes, host: str, port: int, flags: PeerPresentFlags) -> bytes:
    """As a current server sends it: key, the client's IP (16 bytes, v4 mapped) and port, flags."""
    return frame(FrameType.PEER_PRESENT, key, packed16(host), port.to_bytes(2, "big"), bytes([flags]))


def ping(data: bytes) -> bytes:
    return frame(FrameType.PING, data)


def pong(data: bytes) -> bytes:
    return frame(FrameType.PONG, data)


def health(problem: str) -> bytes:
    return frame(FrameType.HEALTH, problem.encode())


def restarting(reconnect_in_ms: int, try_for_ms: int) -> bytes:
    return frame(FrameType.RESTARTING, _U32.pack(reconnect_in_ms), _U32.pack(try_for_ms))


def watch_conns() -> bytes:
    return header(FrameType.WATCH_CONNS, 0)


# --- login boxes -------------------------------------------------------------


def seal(private: bytes, peer: bytes, message: bytes) -> bytes:
    """nonce || crypto_box(message), as Tailscale's key.NodePrivate.SealTo."""
    return bytes(Box(PrivateKey(private), PublicKey(peer)).encrypt(message))


def open_box(private: bytes, peer: bytes, sealed: Buffer, reason: str) -> bytes:
    try:
        return Box(PrivateKey(private), PublicKey(peer)).decrypt(bytes(sealed))
    except CryptoError:
        raise FrameError(reason, "the box does not open with the sender's key") from None


def client_info(client_private: bytes, client_public: bytes, server_public: bytes, info: dict[str, Any]) -> bytes:
    """The ClientInfo frame; `info` as Tailscale's client sends it, e.g. client_info_json()."""
    return frame(FrameType.CLIENT_INFO, client_public, seal(client_private, server_public, json.dumps(info).encode()))


def client_info_json(mesh_key: str = "", can_ack_pings: bool = True) -> dict[str, Any]:
    """Tailscale's spelling: `version` and `meshKey` tagged, `CanAckPings` not."""
    info: dict[str, Any] = {"version": PROTOCOL_VERSION, "CanAckPings": can_ack_pings}
    if mesh_key:
        info["meshKey"] = mesh_key
    return info


def server_info(server_private: bytes, client_public: bytes, rate: int = 0, burst: int = 0) -> bytes:
    """ServerInfo; a rate limit, when there is one, as TokenBucketBytes{PerSecond,Burst}."""
    info: dict[str, Any] = {"version": PROTOCOL_VERSION}
    if rate:
        info.update(TokenBucketBytesPerSecond=rate, TokenBucketBytesBurst=burst)
    return frame(FrameType.SERVER_INFO, seal(server_private, client_public, json.dumps(info).encode()))


def _json_object(raw: bytes, reason: str) -> dict[str, Any]:
    """A JSON object with its keys lower-cased: Go's decoder matches field names case-insensitively."""
    try:
        value = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        raise FrameError(reason, "not JSON") from None
    if not isinstance(value, dict):
        raise FrameError(reason, "not a JSON object")
    return {str(k).lower(): v for k, v in value.items()}


def open_client_info(server_private: bytes, payload: Buffer) -> tuple[bytes, dict[str, Any]]:
    """(client public key, its JSON with lower-cased keys); FrameError if the box does not open."""
    key = bytes(payload[:KEY_LEN])
    info = _json_object(open_box(server_private, key, payload[KEY_LEN:], "client_info_box"), "client_info_json")
    return key, info


def open_server_info(client_private: bytes, server_public: bytes, payload: Buffer) -> dict[str, Any]:
    return _json_object(open_box(client_private, server_public, payload, "server_info_box"), "server_info_json")


# --- reading frames ----------------------------------------------------------


def parse_server_key(payload: Buffer) -> bytes:
    if bytes(payload[: len(MAGIC)]) != MAGIC:
        raise FrameError("server_key_magic", "no DERP magic in the server's greeting")
    return bytes(payload[len(MAGIC) : len(MAGIC) + KEY_LEN])


def parse_peer_gone(payload: Buffer) -> tuple[bytes, PeerGoneReason | int]:
    """Old servers send the key alone: that means disconnected."""
    reason = payload[KEY_LEN] if len(payload) > KEY_LEN else 0
    try:
        reason = PeerGoneReason(reason)
    except ValueError:
        pass
    return bytes(payload[:KEY_LEN]), reason


@dataclass(frozen=True)
class PeerPresent:
    key: bytes
    host: str | None
    port: int
    flags: PeerPresentFlags


def parse_peer_present(payload: Buffer) -> PeerPresent:
    host, port, flags = None, 0, PeerPresentFlags(0)
    if len(payload) >= KEY_LEN + 18:
        host = unpacked16(payload[KEY_LEN : KEY_LEN + 16])
        port = int.from_bytes(payload[KEY_LEN + 16 : KEY_LEN + 18], "big")
    if len(payload) > KEY_LEN + 18:
        flags = PeerPresentFlags(payload[KEY_LEN + 18])
    return PeerPresent(bytes(payload[:KEY_LEN]), host, port, flags)


def parse_restarting(payload: Buffer) -> tuple[int, int]:
    """(reconnect in, try for), in milliseconds."""
    return _U32.unpack_from(payload, 0)[0], _U32.unpack_from(payload, 4)[0]


class FrameReader:
    """Bytes in, whole frames out, in order; a frame's length is checked
    against its type's limits as soon as its header is in."""

    _COMPACT_AT = 256 << 10

    def __init__(self) -> None:
        self._buf = bytearray()
        self._pos = 0

    def feed(self, data: Buffer) -> None:
        self._buf += data

    def __len__(self) -> int:
        """Bytes held that are not yet a whole frame."""
        return len(self._buf) - self._pos

    def next(self) -> tuple[int, bytes] | None:
        """The next whole frame (type, payload), or None until more bytes come."""
        buf, pos = self._buf, self._pos
        if len(buf) - pos < FRAME_HEADER_LEN:
            self._compact()
            return None
        ftype, length = _HEADER.unpack_from(buf, pos)
        least, most = LIMITS.get(ftype, (0, UNKNOWN_MAX))
        if length > most:
            raise FrameError(f"{type_name(ftype)}_oversized", f"{length} bytes, at most {most}")
        if length < least:
            raise FrameError(f"{type_name(ftype)}_truncated", f"{length} bytes, at least {least}")
        end = pos + FRAME_HEADER_LEN + length
        if len(buf) < end:
            self._compact()
            return None
        self._pos = end
        return ftype, bytes(buf[pos + FRAME_HEADER_LEN : end])

    def unfinished(self) -> str | None:
        """Why the stream may not end here: the reason the frame it cuts off counts as, or None
        (whole frames still held, not yet taken, are no reason)."""
        buf, pos = self._buf, self._pos
        while held := len(buf) - pos:
            if held < FRAME_HEADER_LEN:
                return "header_truncated"
            ftype, length = _HEADER.unpack_from(buf, pos)
            if held < FRAME_HEADER_LEN + length:
                return f"{type_name(ftype)}_truncated"
            pos += FRAME_HEADER_LEN + length
        return None

    def _compact(self) -> None:
        if self._pos == len(self._buf):
            self._buf.clear()
            self._pos = 0
        elif self._pos >= self._COMPACT_AT:
            del self._buf[: self._pos]
            self._pos = 0


# --- the HTTP upgrade ----------------------------------------------------------


def upgrade_request(host: str, path: str = "/derp", fast_start: bool = False) -> bytes:
    """What Tailscale's derphttp client sends to start a DERP connection."""
    lines = [f"GET {path} HTTP/1.1", f"Host: {host}", "User-Agent: meshsup", "Upgrade: DERP", "Connection: Upgrade"]
    if fast_start:
        lines.append(f"{FAST_START_HEADER}: 1")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def upgrade_response(server_public: bytes) -> bytes:
    """Tailscale's handler's answer to an upgrade, byte for byte."""
    return (
        "HTTP/1.1 101 Switching Protocols\r\n"
        "Upgrade: DERP\r\n"
        "Connection: Upgrade\r\n"
        f"Derp-Version: {PROTOCOL_VERSION}\r\n"
        f"Derp-Public-Key: {server_public.hex()}\r\n\r\n"
    ).encode()


def plain_response(status: int, reason: str, body: str = "", extra: tuple[str, ...] = ()) -> bytes:
    """A short HTTP answer that closes the connection (probes and refusals)."""
    data = body.encode()
    head = [
        f"HTTP/1.1 {status} {reason}",
        "Content-Type: text/plain; charset=utf-8",
        f"Content-Length: {len(data)}",
        "Connection: close",
        *extra,
    ]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + data


@dataclass(frozen=True)
class Head:
    """An HTTP request or response head: its first line's three parts and its headers."""

    first: tuple[str, str, str]
    headers: dict[str, str]  # names lower-cased

    def header(self, name: str) -> str:
        return self.headers.get(name.lower(), "")


def split_head(data: Buffer) -> tuple[Head, int] | None:
    """The head at the start of `data` and its length, or None until it is all there.
    FrameError("http_head_too_long"/"bad_http") for what is not an HTTP head."""
    end = bytes(data[: MAX_HEAD + 4]).find(b"\r\n\r\n")
    if end < 0:
        if len(data) > MAX_HEAD:
            raise FrameError("http_head_too_long", f"no end of the head in {MAX_HEAD} bytes")
        return None
    try:
        lines = bytes(data[:end]).decode("ascii").split("\r\n")
    except UnicodeDecodeError:
        raise FrameError("bad_http", "the head is not ASCII") from None
    first = lines[0].split(" ", 2)
    if len(first) != 3 or not all(first):
        raise FrameError("bad_http", f"first line {lines[0][:60]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise FrameError("bad_http", f"header line {line[:60]!r}")
        headers[name.lower()] = value.strip()
    return Head((first[0], first[1], first[2]), headers), end + 4

"""WireGuard's cross-platform userspace API, sans-IO.

This is the text protocol ``wg`` speaks on ``/var/run/wireguard/IFACE.sock``
(https://www.wireguard.com/xplatform/): a request is ``get=1`` or ``set=1``
followed by ``key=value`` lines and ends with an empty line; keys are hex.
``split_request`` frames requests out of a byte stream, ``parse_request``
turns one into typed operations (or an errno), and ``serialize_get`` /
``serialize_errno`` produce the replies. The socket loop lives elsewhere.

Errors follow wireguard-go: ``errno=-22`` on the wire for EINVAL, which is
what ``wg`` turns back into "Invalid argument".
"""

from __future__ import annotations

import errno
import ipaddress
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Final

MAX_REQUEST: Final = 1 << 20  # far above any real config; bounds the buffer
KEY_LEN: Final = 32
_HEX: Final = frozenset(string.hexdigits)

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class UapiError:
    errno: int  # positive errno value, e.g. errno.EINVAL
    message: str


# --- set=1 operations, one class per key ------------------------------------


@dataclass(frozen=True)
class PrivateKey:
    key: bytes  # all zero: remove the private key


@dataclass(frozen=True)
class ListenPort:
    port: int  # 0: pick any


@dataclass(frozen=True)
class Fwmark:
    mark: int  # 0: remove


@dataclass(frozen=True)
class ReplacePeers:
    pass


@dataclass(frozen=True)
class PublicKey:
    key: bytes  # starts a peer section: the operations after it are this peer's


@dataclass(frozen=True)
class Remove:
    pass


@dataclass(frozen=True)
class UpdateOnly:
    pass


@dataclass(frozen=True)
class PresharedKey:
    key: bytes  # all zero: remove


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int


@dataclass(frozen=True)
class PersistentKeepaliveInterval:
    seconds: int  # 0: off


@dataclass(frozen=True)
class ReplaceAllowedIps:
    pass


@dataclass(frozen=True)
class AllowedIp:
    network: IPNetwork


@dataclass(frozen=True)
class ProtocolVersion:
    version: int


Operation = (
    PrivateKey
    | ListenPort
    | Fwmark
    | ReplacePeers
    | PublicKey
    | Remove
    | UpdateOnly
    | PresharedKey
    | Endpoint
    | PersistentKeepaliveInterval
    | ReplaceAllowedIps
    | AllowedIp
    | ProtocolVersion
)


@dataclass(frozen=True)
class GetRequest:
    pass


@dataclass(frozen=True)
class SetRequest:
    operations: list[Operation]


# --- value parsers: each raises ValueError on a bad value --------------------


def _key(value: str) -> bytes:
    if len(value) != 2 * KEY_LEN or not _HEX.issuperset(value):
        raise ValueError("a key is 64 hex digits")
    return bytes.fromhex(value)


def _uint(value: str, bits: int) -> int:
    # int() would also take "+1", " 1" and "1_0"; the protocol says digits.
    if not value.isascii() or not value.isdigit() or int(value) >= 1 << bits:
        raise ValueError(f"not an unsigned {bits}-bit number")
    return int(value)


def _true(value: str) -> None:
    if value != "true":
        raise ValueError('the only value is "true"')


def _endpoint(value: str) -> Endpoint:
    if value.startswith("["):
        host, sep, port = value[1:].partition("]:")
        if not sep:
            raise ValueError("expected [IPv6]:port")
        ipaddress.IPv6Address(host)
    else:
        host, sep, port = value.rpartition(":")
        if not sep:
            raise ValueError("expected IP:port")
        ipaddress.IPv4Address(host)
    return Endpoint(host, _uint(port, 16))


def _allowed_ip(value: str) -> AllowedIp:
    _, sep, bits = value.partition("/")
    if not sep or not bits.isascii() or not bits.isdigit():
        raise ValueError("expected IP/prefix-length")
    return AllowedIp(ipaddress.ip_network(value, strict=False))


def _protocol_version(value: str) -> ProtocolVersion:
    if value != "1":
        raise ValueError("only protocol version 1 exists")
    return ProtocolVersion(1)


def _public_key(value: str) -> PublicKey:
    return PublicKey(_key(value))


def _flag(cls: Callable[[], Operation]) -> Callable[[str], Operation]:
    def parse(value: str) -> Operation:
        _true(value)
        return cls()

    return parse


_DEVICE_KEYS: Final[dict[str, Callable[[str], Operation]]] = {
    "private_key": lambda v: PrivateKey(_key(v)),
    "listen_port": lambda v: ListenPort(_uint(v, 16)),
    "fwmark": lambda v: Fwmark(_uint(v, 32)),
    "replace_peers": _flag(ReplacePeers),
}
_PEER_KEYS: Final[dict[str, Callable[[str], Operation]]] = {
    "remove": _flag(Remove),
    "update_only": _flag(UpdateOnly),
    "preshared_key": lambda v: PresharedKey(_key(v)),
    "endpoint": _endpoint,
    "persistent_keepalive_interval": lambda v: PersistentKeepaliveInterval(_uint(v, 16)),
    "replace_allowed_ips": _flag(ReplaceAllowedIps),
    "allowed_ip": _allowed_ip,
    "protocol_version": _protocol_version,
}


# --- framing and parsing -----------------------------------------------------


def split_request(buffer: bytes) -> tuple[bytes | None, bytes] | UapiError:
    """Take the first complete request (up to its empty line) off ``buffer``:
    (request, rest), or (None, buffer) if it is not complete yet. An
    incomplete request larger than MAX_REQUEST is an error."""
    end = buffer.find(b"\n\n")
    if end < 0:
        if len(buffer) > MAX_REQUEST:
            return UapiError(errno.EMSGSIZE, "request too large")
        return None, buffer
    return buffer[: end + 1], buffer[end + 2 :]


def parse_request(request: bytes) -> GetRequest | SetRequest | UapiError:
    """Parse one framed request (lines ending in ``\\n``, no empty line)."""
    try:
        lines = request.decode("ascii").split("\n")
    except UnicodeDecodeError:
        return UapiError(errno.EPROTO, "request is not ASCII")
    if lines and lines[-1] == "":
        lines.pop()
    if lines == ["get=1"]:
        return GetRequest()
    if not lines or lines[0] != "set=1":
        return UapiError(errno.EPROTO, f"unknown operation {lines[0] if lines else ''!r}")
    return _parse_set(lines[1:])


def _parse_set(lines: Sequence[str]) -> SetRequest | UapiError:
    operations: list[Operation] = []
    in_peer = False
    for line in lines:
        key, sep, value = line.partition("=")
        if not sep:
            return UapiError(errno.EPROTO, f"line without '=': {line!r}")
        if key == "public_key":
            in_peer = True
            parser: Callable[[str], Operation] | None = _public_key
        else:
            parser = (_PEER_KEYS if in_peer else _DEVICE_KEYS).get(key)
        if parser is None:
            scope = "peer" if in_peer else "device"
            return UapiError(errno.EINVAL, f"invalid {scope} key {key!r}")
        try:
            operations.append(parser(value))
        except ValueError as e:
            return UapiError(errno.EINVAL, f"{key}: {e}")
    return SetRequest(operations)


# --- replies ----------------------------------------------------------------


@dataclass
class PeerState:
    public_key: bytes
    preshared_key: bytes | None = None
    endpoint: tuple[str, int] | None = None
    allowed_ips: Sequence[str | IPNetwork] = ()
    last_handshake_time_sec: int = 0
    last_handshake_time_nsec: int = 0
    rx_bytes: int = 0
    tx_bytes: int = 0
    persistent_keepalive_interval: int = 0


@dataclass
class DeviceState:
    private_key: bytes | None = None
    listen_port: int = 0
    fwmark: int = 0
    peers: Sequence[PeerState] = field(default_factory=list)


def _format_endpoint(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def serialize_get(device: DeviceState) -> bytes:
    """The reply to ``get=1``, in wireguard-go's key order, ending errno=0."""
    lines: list[str] = []
    if device.private_key:
        lines.append(f"private_key={device.private_key.hex()}")
    if device.listen_port:
        lines.append(f"listen_port={device.listen_port}")
    if device.fwmark:
        lines.append(f"fwmark={device.fwmark}")
    for peer in device.peers:
        lines.append(f"public_key={peer.public_key.hex()}")
        lines.append(f"preshared_key={(peer.preshared_key or bytes(KEY_LEN)).hex()}")
        lines.append("protocol_version=1")
        if peer.endpoint:
            lines.append(f"endpoint={_format_endpoint(*peer.endpoint)}")
        lines += [
            f"last_handshake_time_sec={peer.last_handshake_time_sec}",
            f"last_handshake_time_nsec={peer.last_handshake_time_nsec}",
            f"tx_bytes={peer.tx_bytes}",
            f"rx_bytes={peer.rx_bytes}",
            f"persistent_keepalive_interval={peer.persistent_keepalive_interval}",
        ]
        lines += [f"allowed_ip={ipaddress.ip_network(a, strict=False)}" for a in peer.allowed_ips]
    lines.append("errno=0")
    return ("\n".join(lines) + "\n\n").encode()


def serialize_errno(error: UapiError | None) -> bytes:
    """The reply to ``set=1``: errno=0 on success, else the negated errno."""
    return f"errno={-error.errno if error else 0}\n\n".encode()

"""Node configuration: TOML, wg-quick, or the embedded default, read into Settings.

Everything is checked before anything starts (by actors.settings, the one
parser of every section). A problem is a ConfigError that names the file,
the key and what is wrong, in one line.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import stat
import tomllib
from pathlib import Path
from typing import Any

from meshsup.actors.settings import DNS_DEFAULT, ConfigError, Settings, parse
from meshsup.actors.settings.node import INTERFACE_RULE, format_endpoint, valid_interface_name

# --- TOML ------------------------------------------------------------------


def load_toml(path: str | os.PathLike[str], state_dir: Path) -> Settings:
    file = str(path)
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except OSError as err:
        raise ConfigError(file, "(file)", f"cannot read: {err.strerror}") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(file, "(syntax)", str(err)) from None
    return parse(file, doc, Path(path).resolve().parent, state_dir)


# --- wg-quick --------------------------------------------------------------

# wg-quick's spelling -> our key; matched case-insensitively, as wg-quick does.
WG_INTERFACE_KEYS = {
    "PrivateKey": "private_key",
    "ListenPort": "listen_port",
    "Address": "addresses",
    "DNS": "dns",
    "MTU": "mtu",
}
WG_PEER_KEYS = {
    "PublicKey": "public_key",
    "PresharedKey": "preshared_key",
    "AllowedIPs": "allowed_ips",
    "Endpoint": "endpoints",
    "PersistentKeepalive": "persistent_keepalive",
}
_BY_LOWER = {k.lower(): v for k, v in {**WG_INTERFACE_KEYS, **WG_PEER_KEYS}.items()}
_SPELLING = {v: k for k, v in {**WG_INTERFACE_KEYS, **WG_PEER_KEYS}.items()}
_LIST_KEYS = {"addresses", "dns", "allowed_ips", "endpoints"}
_INT_KEYS = {"listen_port", "mtu", "persistent_keepalive"}
# [Interface] keys wg-quick knows and meshsup does not apply: refused by name, so a
# file never runs with less than it asks for; each with the value that asks for nothing.
WG_UNAPPLIED = {
    "table": ("auto", "meshsup routes AllowedIPs in the main table and does no policy routing"),
    "fwmark": ("off", "meshsup does no policy routing, so marks nothing"),
    "saveconfig": ("false", "meshsup never writes the file back"),
    **{
        hook: ("", "meshsup runs no commands; run them from the service (ExecStartPre=, ExecStartPost=, ExecStopPost=)")
        for hook in ("preup", "postup", "predown", "postdown")
    },
}
# wg-quick's own rule for the interface name it takes from NAME.conf.
WG_QUICK_NAME = re.compile(r"([a-zA-Z0-9_=+.-]{1,15})\.conf")


def load_wg_quick(path: str | os.PathLike[str], state_dir: Path, interface_name: str | None = None) -> Settings:
    """wg-quick's format, read as wg-quick reads it: [Interface] and [Peer] sections. The
    interface is named after the file (NAME.conf) unless ``interface_name`` is given."""
    file = str(path)
    if interface_name is None:
        interface_name = _interface_of(file)
    try:
        text = Path(path).read_text()
    except OSError as err:
        raise ConfigError(file, "(file)", f"cannot read: {err.strerror}") from None
    if stat.S_IMODE(os.stat(path).st_mode) & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(file, "(file)", "holds a private key but is readable by others; chmod 600 it")
    interface: dict[str, Any] | None = None
    peers: list[dict[str, Any]] = []
    current: dict[str, Any] | None = None
    mapping: dict[str, str] = {}
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if line.lower() == "[interface]":
            if interface is not None:
                raise ConfigError(file, f"line {lineno}", "a second [Interface] section")
            current, mapping, interface = {}, WG_INTERFACE_KEYS, {}
            current = interface
            continue
        if line.lower() == "[peer]":
            current, mapping = {}, WG_PEER_KEYS
            peers.append(current)
            continue
        key, sep, value = line.partition("=")
        if current is None or not sep:
            raise ConfigError(file, f"line {lineno}", "expected [Interface], [Peer] or Key = Value")
        name = _BY_LOWER.get(key.strip().lower())
        unapplied = WG_UNAPPLIED.get(key.strip().lower()) if mapping is WG_INTERFACE_KEYS else None
        if unapplied is not None:
            harmless, why = unapplied
            if not harmless or value.strip().lower() != harmless:
                raise ConfigError(file, f"line {lineno}: {key.strip()}", f"not applied: {why}")
            continue
        if name is None or name not in mapping.values():
            raise ConfigError(file, f"line {lineno}: {key.strip()}", "not supported by meshsup")
        value = value.strip()
        if name in _LIST_KEYS:
            current.setdefault(name, []).extend(v.strip() for v in value.split(",") if v.strip())
        elif name in _INT_KEYS:
            if not value.isdigit():
                raise ConfigError(file, key.strip(), f"{value!r} is not a number")
            current[name] = int(value)
        else:
            current[name] = value
    if interface is None:
        raise ConfigError(file, "[Interface]", "missing")
    if "private_key" not in interface:
        raise ConfigError(file, "PrivateKey", "is required in [Interface]")
    for i, peer in enumerate(peers, 1):
        peer["endpoints"] = [_resolve(file, i, e) for e in peer.get("endpoints", [])]
    interface["interface"] = interface_name
    dns_servers = interface.pop("dns", [])
    doc: dict[str, Any] = {"node": interface, "peers": peers}
    upstreams, search = [], []
    for server in dns_servers:
        try:
            ipaddress.ip_address(server)
            upstreams.append(f"udp://{format_endpoint(server, 53)}")
        except ValueError:
            search.append(server)  # wg-quick's reading of what is no address: a search domain
    if dns_servers:
        doc["dns"] = {**DNS_DEFAULT, "upstreams": upstreams, "search": search, "set_os_resolver": True}
    try:
        return parse(file, doc, Path(path).resolve().parent, state_dir)
    except ConfigError as err:
        raise ConfigError(file, _wg_key_name(err.key), err.problem) from None


def _interface_of(file: str) -> str:
    """NAME of PATH/NAME.conf, as wg-quick takes it; refused where wg-quick or the kernel would refuse it."""
    match = WG_QUICK_NAME.fullmatch(Path(file).name)
    if match is None or not valid_interface_name(match[1]):
        raise ConfigError(
            file,
            "(file name)",
            f"wg-quick names the interface after the file, NAME.conf with NAME {INTERFACE_RULE} "
            "(letters, digits, _=+.-): rename it or give --interface",
        )
    return match[1]


def _resolve(file: str, peer: int, endpoint: str) -> str:
    """HOST:PORT with HOST a name made HOST's first address, as `wg` does (getaddrinfo);
    anything else is left to the parser to judge."""
    host, sep, port = endpoint.rpartition(":")
    if not sep or not host or not port.isdigit() or host.startswith("["):
        return endpoint
    try:
        ipaddress.ip_address(host)
        return endpoint
    except ValueError:
        pass
    try:
        found = socket.getaddrinfo(host, int(port), type=socket.SOCK_DGRAM, proto=socket.IPPROTO_UDP)
    except (socket.gaierror, UnicodeError) as err:
        why = err.strerror if isinstance(err, socket.gaierror) else "not a host name"
        raise ConfigError(file, f"[Peer] {peer} Endpoint", f"host {host!r} does not resolve: {why}") from None
    return format_endpoint(str(found[0][4][0]), int(port))


def _wg_key_name(key: str) -> str:
    """Name a problem the way the wg-quick file spells it: "[Peer] 2 AllowedIPs"."""
    section, _, field = key.partition(".")
    label = _SPELLING.get(field, field)
    if section == "node":
        return f"[Interface] {label}"
    if section.startswith("peers["):
        return f"[Peer] {int(section[6:-1]) + 1} {label}"
    return key


def embedded_default(state_dir: Path) -> Settings:
    """No config given: a key in the state dir, meshsup0, DNS on, no peers."""
    return parse("(embedded default)", {}, state_dir, state_dir)

"""Node configuration: TOML, wg-quick, or the embedded default.

Everything is checked before anything starts. A problem is a ConfigError
that names the file, the key and what is wrong, in one line. The result is
a plain dict (msgpack-able) that the supervisor replays to every actor.
"""
from __future__ import annotations

import ipaddress
import os
import stat
import tomllib
from pathlib import Path
from typing import Any, Callable

from meshsup.actors.settings import keys

DEFAULT_PORT = 51820
DEFAULT_MTU = 1420
DEFAULT_INTERFACE = "meshsup0"

Config = dict[str, Any]


class ConfigError(Exception):
    def __init__(self, file: str, key: str, problem: str) -> None:
        super().__init__(f"{file}: {key}: {problem}")
        self.file, self.key, self.problem = file, key, problem


class _Checker:
    """Reads one table of a config file, remembering where errors point."""

    def __init__(self, file: str, table: dict[str, Any], prefix: str, allowed: set[str]) -> None:
        self.file, self.table, self.prefix = file, table, prefix
        if not isinstance(table, dict):
            raise ConfigError(file, prefix or "(top level)", "must be a table")
        for k in table:
            if k not in allowed:
                raise ConfigError(file, self.key(k), "unknown key")

    def key(self, k: str) -> str:
        return f"{self.prefix}.{k}" if self.prefix else k

    def fail(self, k: str, problem: str) -> ConfigError:
        return ConfigError(self.file, self.key(k), problem)

    def get(self, k: str, kind: type | tuple[type, ...], default: Any = None, required: bool = False) -> Any:
        if k not in self.table:
            if required:
                raise self.fail(k, "is required")
            return default
        v = self.table[k]
        if not isinstance(v, kind) or (isinstance(v, bool) and kind is int):
            names = kind.__name__ if isinstance(kind, type) else " or ".join(t.__name__ for t in kind)
            raise self.fail(k, f"must be {names}, not {type(v).__name__}")
        return v

    def strings(self, k: str, check: Callable[[str], Any] | None = None, default: list[str] | None = None) -> list[str]:
        v = self.get(k, list, default if default is not None else [])
        for item in v:
            if not isinstance(item, str):
                raise self.fail(k, "must be a list of strings")
            if check:
                try:
                    check(item)
                except ValueError as err:
                    raise self.fail(k, f"{item!r}: {err}") from None
        return list(v)

    def port(self, k: str, default: int) -> int:
        v = self.get(k, int, default)
        if not 0 <= v <= 65535:
            raise self.fail(k, f"{v} is not a port number")
        return v

    def key_material(self, k: str, file_k: str, base: Path, required: bool) -> bytes | None:
        """A key given inline or in a file that only its owner can read."""
        if k in self.table and file_k in self.table:
            raise self.fail(k, f"give either {k} or {file_k}, not both")
        if k in self.table:
            try:
                return keys.parse_key(self.get(k, str))
            except ValueError as err:
                raise self.fail(k, str(err)) from None
        if file_k in self.table:
            path = base / self.get(file_k, str)
            try:
                st = path.stat()
                text = path.read_text()
            except OSError as err:
                raise self.fail(file_k, f"cannot read {path}: {err.strerror}") from None
            if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
                raise self.fail(file_k, f"{path} is readable by others (mode {stat.S_IMODE(st.st_mode):04o}); chmod 600 it")
            try:
                return keys.parse_key(text)
            except ValueError as err:
                raise self.fail(file_k, f"{path}: {err}") from None
        if required:
            raise self.fail(k, f"is required (or {file_k})")
        return None


def parse_network(text: str) -> str:
    try:
        return str(ipaddress.ip_network(text, strict=False))
    except ValueError:
        raise ValueError("not an IP prefix") from None


def parse_interface_address(text: str) -> str:
    try:
        return str(ipaddress.ip_interface(text))
    except ValueError:
        raise ValueError("not an address with prefix length") from None


def parse_endpoint(text: str) -> tuple[str, int]:
    """host:port or [v6]:port, literal addresses only (no DNS at config time)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError("not host:port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError("host is not an IP address") from None
    return host, int(port)


def _label(name: str) -> str:
    if not name or len(name) > 63 or not all(c.isalnum() or c == "-" for c in name) or name[0] == "-":
        raise ValueError("must be a DNS label (letters, digits, '-')")
    return name.lower()


# --- TOML ------------------------------------------------------------------

TOP_KEYS = {"node", "peers", "actors", "supervisor", "dns", "netlog", "logging"}
NODE_KEYS = {"name", "private_key", "private_key_file", "listen_port", "interface", "addresses", "mtu"}
PEER_KEYS = {"name", "public_key", "preshared_key", "preshared_key_file", "allowed_ips", "endpoints",
             "persistent_keepalive"}
DNS_DEFAULT: dict[str, Any] = {"listen": ["127.0.0.1:53"], "domain": "mesh", "upstreams": []}


def load_toml(path: str | os.PathLike[str], state_dir: Path) -> Config:
    file = str(path)
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except OSError as err:
        raise ConfigError(file, "(file)", f"cannot read: {err.strerror}") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(file, "(syntax)", str(err)) from None
    top = _Checker(file, doc, "", TOP_KEYS)
    base = Path(path).resolve().parent
    node = _node(file, top.get("node", dict, {}), base, state_dir)
    peers_raw = top.get("peers", list, [])
    peers = [_peer(file, p, i, base) for i, p in enumerate(peers_raw)]
    _check_unique(file, node, peers)
    return _assemble(file, node, peers, top)


def _node(file: str, table: dict[str, Any], base: Path, state_dir: Path) -> dict[str, Any]:
    c = _Checker(file, table, "node", NODE_KEYS)
    private = c.key_material("private_key", "private_key_file", base, required=False)
    if private is None:
        private = keys.load_or_create(state_dir / "private.key")
    public = keys.public_of(private)
    interface = c.get("interface", str, DEFAULT_INTERFACE)
    if not 0 < len(interface) < 16 or "/" in interface or " " in interface:
        raise c.fail("interface", f"{interface!r} is not a valid interface name (1-15 characters)")
    mtu = c.get("mtu", int, DEFAULT_MTU)
    if not 576 <= mtu <= 65515:
        raise c.fail("mtu", f"{mtu} is outside 576..65515")
    addresses = c.strings("addresses", parse_interface_address) or keys.derived_addresses(public)
    name = c.get("name", str, "node")
    try:
        _label(name)
    except ValueError as err:
        raise c.fail("name", str(err)) from None
    return {
        "name": name.lower(),
        "private_key": keys.b64(private),
        "public_key": keys.b64(public),
        "listen_port": c.port("listen_port", DEFAULT_PORT),
        "interface": interface,
        "addresses": [parse_interface_address(a) for a in addresses],
        "mtu": mtu,
    }


def _peer(file: str, table: Any, index: int, base: Path) -> dict[str, Any]:
    c = _Checker(file, table, f"peers[{index}]", PEER_KEYS)
    public = c.key_material("public_key", "public_key_file", base, required=True)
    psk = c.key_material("preshared_key", "preshared_key_file", base, required=False)
    assert public is not None
    name = c.get("name", str, f"peer-{public[:4].hex()}")
    try:
        name = _label(name)
    except ValueError as err:
        raise c.fail("name", str(err)) from None
    keepalive = c.get("persistent_keepalive", int, 0)
    if not 0 <= keepalive <= 65535:
        raise c.fail("persistent_keepalive", f"{keepalive} is outside 0..65535 seconds")
    endpoints = c.strings("endpoints", parse_endpoint)
    return {
        "name": name,
        "public_key": keys.b64(public),
        "preshared_key": keys.b64(psk) if psk else "",
        "allowed_ips": [parse_network(a) for a in c.strings("allowed_ips", parse_network)],
        "endpoints": [format_endpoint(*parse_endpoint(e)) for e in endpoints],
        "persistent_keepalive": keepalive,
    }


def format_endpoint(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _check_unique(file: str, node: dict[str, Any], peers: list[dict[str, Any]]) -> None:
    seen_keys = {node["public_key"]: "node"}
    seen_names = {node["name"]: "node"}
    for i, p in enumerate(peers):
        if p["public_key"] in seen_keys:
            raise ConfigError(file, f"peers[{i}].public_key", f"same key as {seen_keys[p['public_key']]}")
        if p["name"] in seen_names:
            raise ConfigError(file, f"peers[{i}].name", f"{p['name']!r} is used twice")
        seen_keys[p["public_key"]] = f"peers[{i}]"
        seen_names[p["name"]] = f"peers[{i}]"


def _assemble(file: str, node: dict[str, Any], peers: list[dict[str, Any]], top: _Checker) -> Config:
    workers = _Checker(file, top.get("actors", dict, {}), "actors", {"crypto", "dns"})
    sup = _Checker(file, top.get("supervisor", dict, {}), "supervisor", {"intensity", "period"})
    intensity = sup.get("intensity", int, 5)
    period = sup.get("period", (int, float), 10)
    if intensity < 0:
        raise sup.fail("intensity", "must be 0 or more")
    if period <= 0:
        raise sup.fail("period", "must be more than 0 seconds")
    counts = {}
    for kind, default in (("crypto", 2), ("dns", 1)):
        n = workers.get(kind, int, default)
        if not 1 <= n <= 64:
            raise workers.fail(kind, f"{n} workers is outside 1..64")
        counts[kind] = n
    conf = {
        "node": node,
        "peers": peers,
        "actors": counts,
        "supervisor": {"intensity": intensity, "period": float(period)},
        "dns": top.get("dns", dict, None) or _default_dns(node),
        "netlog": top.get("netlog", dict, {}),
        "logging": top.get("logging", dict, {}),
        "source": file,
    }
    _check_sections(file, conf)
    return conf


def _default_dns(node: dict[str, Any]) -> dict[str, Any]:
    """DNS on the node's own mesh address, as MagicDNS: it collides with no local resolver."""
    v4 = [a.split("/")[0] for a in node["addresses"] if ":" not in a]
    return {**DNS_DEFAULT, "listen": [f"{v4[0]}:53"] if v4 else DNS_DEFAULT["listen"]}


def _check_sections(file: str, conf: Config) -> None:
    """[dns], [netlog] and [logging] are checked by the actors' own parsers, so both agree."""
    from meshsup.actors.dns.actor import dns_settings
    from meshsup.actors.settings.netlog import netlog_settings

    for check, section in ((dns_settings, "dns"), (netlog_settings, "netlog")):
        try:
            check(conf)
        except ValueError as err:
            key, _, problem = str(err).partition(": ")
            raise ConfigError(file, key if problem else section, problem or key) from None


# --- wg-quick --------------------------------------------------------------

# wg-quick's spelling -> our key; matched case-insensitively, as wg-quick does.
WG_INTERFACE_KEYS = {"PrivateKey": "private_key", "ListenPort": "listen_port", "Address": "addresses",
                     "DNS": "dns", "MTU": "mtu"}
WG_PEER_KEYS = {"PublicKey": "public_key", "PresharedKey": "preshared_key", "AllowedIPs": "allowed_ips",
                "Endpoint": "endpoints", "PersistentKeepalive": "persistent_keepalive"}
_BY_LOWER = {k.lower(): v for k, v in {**WG_INTERFACE_KEYS, **WG_PEER_KEYS}.items()}
_SPELLING = {v: k for k, v in {**WG_INTERFACE_KEYS, **WG_PEER_KEYS}.items()}
_LIST_KEYS = {"addresses", "dns", "allowed_ips", "endpoints"}
_INT_KEYS = {"listen_port", "mtu", "persistent_keepalive"}


def load_wg_quick(path: str | os.PathLike[str], state_dir: Path) -> Config:
    """wg-quick's format, read as wg-quick reads it: [Interface] and [Peer] sections."""
    file = str(path)
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
    dns_servers = interface.pop("dns", [])
    doc: dict[str, Any] = {"node": interface, "peers": peers}
    upstreams = []
    for server in dns_servers:
        try:
            ipaddress.ip_address(server)
            upstreams.append(f"udp://{format_endpoint(server, 53)}")
        except ValueError:
            pass  # wg-quick treats non-addresses as search domains; the mesh domain covers ours
    if upstreams:
        doc["dns"] = {**DNS_DEFAULT, "upstreams": upstreams, "set_os_resolver": True}
    base = Path(path).resolve().parent
    try:
        top = _Checker(file, doc, "", TOP_KEYS)
        node = _node(file, interface, base, state_dir)
        peer_cfgs = [_peer(file, p, i, base) for i, p in enumerate(peers)]
        _check_unique(file, node, peer_cfgs)
        return _assemble(file, node, peer_cfgs, top)
    except ConfigError as err:
        raise ConfigError(file, _wg_key_name(err.key), err.problem) from None


def _wg_key_name(key: str) -> str:
    """Name a problem the way the wg-quick file spells it: "[Peer] 2 AllowedIPs"."""
    section, _, field = key.partition(".")
    label = _SPELLING.get(field, field)
    if section == "node":
        return f"[Interface] {label}"
    if section.startswith("peers["):
        return f"[Peer] {int(section[6:-1]) + 1} {label}"
    return key


def embedded_default(state_dir: Path) -> Config:
    """No config given: a key in the state dir, meshsup0, DNS on, no peers."""
    top = _Checker("(embedded default)", {}, "", TOP_KEYS)
    node = _node("(embedded default)", {}, state_dir, state_dir)
    return _assemble("(embedded default)", node, [], top)

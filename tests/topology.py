"""Test hosts in network namespaces on one underlay, with meshsup nodes and wireguard-go peers.

Every host is a namespace with a veth into a bridge that lives in its own
namespace (198.51.100.0/24 underlay). Names carry random suffixes and close()
removes every namespace, link and process, so tests run in parallel.
"""
from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from supervisor.keys import b64, generate_private, public_of
from tests.nodes import Netns, Node


class Underlay:
    def __init__(self) -> None:
        self.switch = Netns("sw")
        self.switch.run("ip", "link", "add", "br0", "type", "bridge")
        self.switch.run("ip", "link", "set", "br0", "up")
        self.hosts: list[Netns] = [self.switch]
        self.tracked: list[Any] = []
        self.next_host = 1

    def track(self, thing: Any) -> Any:
        """Something running on the underlay (node, peer): closed before the hosts go."""
        self.tracked.append(thing)
        return thing

    def host(self) -> tuple[Netns, str]:
        """A new namespace with an underlay address; returns it and the address."""
        ns = Netns("h")
        self.hosts.append(ns)
        n = self.next_host
        self.next_host += 1
        addr = f"198.51.100.{n}"
        self.plug(ns, addr)
        return ns, addr

    def plug(self, ns: Netns, addr: str, ifname: str = "eth0") -> None:
        a, b = f"v{secrets.token_hex(4)}", f"v{secrets.token_hex(4)}"
        subprocess.run(["ip", "link", "add", a, "type", "veth", "peer", "name", b], check=True)
        subprocess.run(["ip", "link", "set", a, "netns", self.switch.name], check=True)
        subprocess.run(["ip", "link", "set", b, "netns", ns.name], check=True)
        self.switch.run("ip", "link", "set", a, "master", "br0", "up")
        ns.run("ip", "link", "set", b, "name", ifname)
        ns.run("ip", "addr", "add", f"{addr}/24", "dev", ifname)
        ns.run("ip", "link", "set", ifname, "up")

    def close(self) -> None:
        for thing in reversed(self.tracked):
            thing.close()
        for ns in reversed(self.hosts):
            ns.close()


class Identity:
    def __init__(self, name: str, index: int) -> None:
        self.name = name
        self.private = generate_private()
        self.public = b64(public_of(self.private))
        self.v4 = f"100.64.0.{index}"
        self.v6 = f"fd7a:115c:a1e0::{index}"
        self.endpoint = ""

    def allowed(self) -> list[str]:
        return [f"{self.v4}/32", f"{self.v6}/128"]


class WgGo:
    """Debian's wireguard-go as a plain WireGuard peer, run in the foreground."""

    def __init__(self, ns: Netns, ident: Identity, tmp: Path, port: int = 51820) -> None:
        self.ns, self.ident = ns, ident
        self.iface = f"wg{secrets.token_hex(4)}"
        self.log = open(tmp / f"{self.iface}.log", "w")
        self.proc = ns.popen("wireguard-go", "-f", self.iface, stdout=self.log, stderr=subprocess.STDOUT,
                             env={**os.environ, "WG_PROCESS_FOREGROUND": "1", "LOG_LEVEL": "error"})
        sock = Path(f"/var/run/wireguard/{self.iface}.sock")
        deadline = time.monotonic() + 10
        while not sock.exists():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError("wireguard-go did not start")
            time.sleep(0.05)
        key = tmp / f"{self.iface}.key"
        key.write_text(b64(ident.private))
        key.chmod(0o600)
        ns.run("wg", "set", self.iface, "private-key", str(key), "listen-port", str(port))
        ns.run("ip", "addr", "add", f"{ident.v4}/32", "dev", self.iface)
        ns.run("ip", "addr", "add", f"{ident.v6}/128", "dev", self.iface)
        ns.run("ip", "link", "set", self.iface, "mtu", "1420", "up")

    def add_peer(self, peer: Identity, keepalive: int = 0) -> None:
        args = ["wg", "set", self.iface, "peer", peer.public, "allowed-ips", ",".join(peer.allowed())]
        if peer.endpoint:
            args += ["endpoint", peer.endpoint]
        if keepalive:
            args += ["persistent-keepalive", str(keepalive)]
        self.ns.run(*args)
        for prefix in peer.allowed():
            self.ns.run("ip", "route", "replace", prefix, "dev", self.iface)

    def show(self) -> str:
        return self.ns.run("wg", "show", self.iface, "dump").stdout

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        Path(f"/var/run/wireguard/{self.iface}.sock").unlink(missing_ok=True)


def meshsup_config(tmp: Path, ident: Identity, peers: list[Identity], extra: str = "",
                   port: int = 51820) -> Path:
    key = tmp / f"{ident.name}.key"
    key.write_text(b64(ident.private))
    key.chmod(0o600)
    lines = [f'[node]\nname = "{ident.name}"\nprivate_key_file = "{key}"\nlisten_port = {port}\n'
             f'addresses = ["{ident.v4}/32", "{ident.v6}/128"]\n',
             '[supervisor]\nintensity = 20\nperiod = 10\n',
             '[dns]\nlisten = ["127.0.0.1:53"]\n']
    for p in peers:
        ep = f'\nendpoints = ["{p.endpoint}"]' if p.endpoint else ""
        lines.append(f'[[peers]]\nname = "{p.name}"\npublic_key = "{p.public}"\n'
                     f'allowed_ips = {p.allowed()!r}{ep}\n'.replace("'", '"'))
    path = tmp / f"{ident.name}-{secrets.token_hex(2)}.toml"
    path.write_text("\n".join(lines) + extra)
    return path


def ping(ns: Netns, addr: str, count: int = 3, size: int | None = None, timeout: int = 10) -> bool:
    args = ["ping", "-c", str(count), "-i", "0.2", "-W", "2", "-w", str(timeout)]
    if size is not None:
        args += ["-s", str(size), "-M", "do"]
    return ns.run(*args, addr, check=False).returncode == 0


def iperf3(client: Netns, server: Netns, addr: str, seconds: int = 10, reverse: bool = False,
           extra: tuple[str, ...] = ()) -> dict[str, Any]:
    """Run an iperf3 transfer; returns iperf3's JSON result."""
    import json

    srv = server.popen("iperf3", "-s", "-1", "-B", addr, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.3)
        args = ["iperf3", "-c", addr, "-t", str(seconds), "-J", *extra]
        if reverse:
            args.append("-R")
        r = client.run(*args, check=False, timeout=seconds + 30)
        return json.loads(r.stdout) if r.stdout.strip() else {"error": r.stderr}
    finally:
        if srv.poll() is None:
            srv.kill()
        srv.wait()


def stalled_intervals(result: dict[str, Any]) -> list[int]:
    """Indexes of one-second intervals that carried no bytes."""
    return [i for i, iv in enumerate(result.get("intervals", [])) if iv["sum"]["bytes"] == 0]


def have(*tools: str) -> str | None:
    missing = [t for t in tools if shutil.which(t) is None]
    return f"needs {', '.join(missing)} (installed by deploy/setup.sh)" if missing else None

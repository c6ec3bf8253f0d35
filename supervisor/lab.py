"""A small lab of hosts in network namespaces: meshsup nodes, wireguard-go peers, ping and iperf3.

`meshsup demo` builds its mesh with it and the integration tests build theirs.
Every host is a namespace with a veth into a bridge that lives in its own
namespace (198.51.100.0/24 underlay). Names carry random suffixes and close()
removes every namespace, link and process, so labs run side by side.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from meshsup.actors.settings.keys import b64, generate_private, public_of
from meshsup.supervisor.uapi_server import remove_if_stale, socket_path

# The directory holding the meshsup packages: child processes import them from there.
ROOT = Path(__file__).resolve().parent.parent
MESHSUP = [sys.executable, "-m", "meshsup.supervisor.cli"]


def is_root() -> bool:
    return os.geteuid() == 0


def have(*tools: str) -> str | None:
    missing = [t for t in tools if shutil.which(t) is None]
    return f"needs {', '.join(missing)} (installed by deploy/setup.sh)" if missing else None


class Netns:
    """A network namespace with a random name, removed on close."""

    def __init__(self, prefix: str = "ms") -> None:
        self.name = f"{prefix}{secrets.token_hex(3)}"
        subprocess.run(["ip", "netns", "add", self.name], check=True)
        try:
            self.run("ip", "link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise

    def run(self, *cmd: str, check: bool = True, **kw: Any) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ip", "netns", "exec", self.name, *cmd], check=check, text=True, capture_output=True, **kw
        )

    def popen(self, *cmd: str, **kw: Any) -> subprocess.Popen[str]:
        return subprocess.Popen(["ip", "netns", "exec", self.name, *cmd], text=True, **kw)

    def close(self) -> None:
        subprocess.run(["ip", "netns", "del", self.name], check=False, capture_output=True)


class Node:
    """A `meshsup start` (or `meshsup relay`) process; stopped by close(), which also ends by PID
    every process of the node's that outlived it (the node runs in a session of its own)."""

    def __init__(
        self,
        tmp: Path,
        *args: str,
        env: dict[str, str] | None = None,
        netns: Netns | None = None,
        faults: bool = True,
        command: str = "start",
        wrapper: tuple[str, ...] = (),
        same_as: Node | None = None,
    ) -> None:
        """``wrapper``: a command the node runs under (setpriv, as a service unit would).
        ``same_as``: a stopped (or killed) node this one starts again: its state dir and interface."""
        self.state_dir = same_as.state_dir if same_as else tmp / f"state-{secrets.token_hex(3)}"
        self.netns = netns
        self.iface = same_as.iface if same_as else f"ms{secrets.token_hex(4)}"
        full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
        if faults:
            full_env["MESHSUP_TEST_FAULTS"] = "1"
        cmd = [*wrapper, *MESHSUP, command, "--state-dir", str(self.state_dir), *args]
        if "--wg-config" in args and "--interface" not in args:
            self.iface = Path(args[args.index("--wg-config") + 1]).stem  # named after the file, as wg-quick does
        elif command == "start" and "--interface" not in args:
            cmd += ["--interface", self.iface]
        self.stdout_path = tmp / f"{self.state_dir.name}.out"
        self.stderr_path = tmp / f"{self.state_dir.name}.err"
        with open(self.stdout_path, "a") as out, open(self.stderr_path, "a") as err:
            prefix = ["ip", "netns", "exec", netns.name] if netns else []
            self.proc = subprocess.Popen(
                [*prefix, *cmd], stdout=out, stderr=err, env=full_env, cwd=tmp, start_new_session=True
            )

    def cli(self, *args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        r = subprocess.run(
            [*MESHSUP, args[0], "--state-dir", str(self.state_dir), *args[1:]],
            text=True,
            capture_output=True,
            timeout=timeout,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        if check and r.returncode != 0:
            raise AssertionError(f"meshsup {' '.join(args)} failed: {r.stderr}")
        return r

    def status(self) -> dict[str, Any]:
        return json.loads(self.cli("status", "--json").stdout)

    def actors(self) -> dict[str, dict[str, Any]]:
        return {a["name"]: a for a in self.status()["actors"]}

    def counters(self) -> dict[str, dict[str, int]]:
        """Each actor kind's counters, summed over its workers."""
        out: dict[str, dict[str, int]] = {}
        for a in self.status()["actors"]:
            kind = out.setdefault(a["kind"], {})
            for k, v in a["counters"].items():
                kind[k] = kind.get(k, 0) + v
        return out

    def wait(self, predicate: Any, timeout: float = 20.0, what: str = "condition") -> Any:
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"node exited with {self.proc.returncode}: {self.stderr()[-2000:]}")
            try:
                last = predicate()
            except (AssertionError, ValueError, KeyError):
                last = None
            if last:
                return last
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}; last: {last!r}")

    def wait_ready(self, timeout: float = 30.0) -> dict[str, Any]:
        return self.wait(lambda: (s := self.status())["node"]["ready"] and s, timeout, "node ready")

    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def stdout(self) -> str:
        return self.stdout_path.read_text()

    def processes(self) -> list[int]:
        """Every live process of the node: the supervisor, its fork server, the actors (renamed
        "meshsup: NAME", they no longer name the state dir) and what they run."""
        return session_members(self.proc.pid)

    def kill(self) -> None:
        """kill -9 of the whole node, every process of it at once, as a crash of the machine's
        view of it would be: nothing is stopped in order, nothing cleaned up. All are stopped
        first, so no actor sees its supervisor gone and cleans up before its own SIGKILL."""
        pids = self.processes()
        for pid in pids:
            _kill(pid, signal.SIGSTOP)
        for pid in pids:
            _kill(pid)
        self.proc.wait(10)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        # Anything the node failed to stop, or that outlived a supervisor killed outright, is
        # ended by PID, so nothing is leaked.
        for pid in {*self.processes(), *descendants_by_state_dir(self.state_dir)}:
            _kill(pid)
        remove_if_stale(socket_path(self.iface))  # a node killed outright leaves it behind


def _kill(pid: int, sig: signal.Signals = signal.SIGKILL) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def session_members(sid: int) -> list[int]:
    """PIDs of the live (not zombie) processes in session `sid`."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            # After the name, which may hold spaces and parentheses: state, ppid, pgrp, session.
            state, _, _, session = (entry / "stat").read_text().rsplit(")", 1)[1].split()[:4]
        except (OSError, ValueError):
            continue
        if int(session) == sid and state != "Z":
            pids.append(int(entry.name))
    return pids


def descendants_by_state_dir(state_dir: Path) -> list[int]:
    """PIDs of processes whose command line names this state dir."""
    pids = []
    needle = str(state_dir).encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "cmdline").read_bytes():
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


class Underlay:
    def __init__(self) -> None:
        self.switch = Netns("sw")
        try:
            self.switch.run("ip", "link", "add", "br0", "type", "bridge")
            self.switch.run("ip", "link", "set", "br0", "up")
        except BaseException:
            self.switch.close()
            raise
        self.hosts: list[Netns] = [self.switch]
        self.links: list[tuple[str, str]] = []
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
        # Both ends are born inside their namespaces, so none is ever left in the root one.
        subprocess.run(
            ["ip", "link", "add", a, "netns", self.switch.name, "type", "veth", "peer", "name", b, "netns", ns.name],
            check=True,
        )
        self.links.append((a, b))
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
        self.proc = ns.popen(
            "wireguard-go",
            "-f",
            self.iface,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "WG_PROCESS_FOREGROUND": "1", "LOG_LEVEL": "error"},
        )
        try:
            self._configure(tmp, port)
        except BaseException:
            self.close()
            raise

    def _configure(self, tmp: Path, port: int) -> None:
        sock = socket_path(self.iface)
        deadline = time.monotonic() + 10
        while not sock.exists():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError("wireguard-go did not start")
            time.sleep(0.05)
        key = tmp / f"{self.iface}.key"
        key.write_text(b64(self.ident.private))
        key.chmod(0o600)
        self.ns.run("wg", "set", self.iface, "private-key", str(key), "listen-port", str(port))
        self.ns.run("ip", "addr", "add", f"{self.ident.v4}/32", "dev", self.iface)
        self.ns.run("ip", "addr", "add", f"{self.ident.v6}/128", "dev", self.iface)
        self.ns.run("ip", "link", "set", self.iface, "mtu", "1420", "up")

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
        socket_path(self.iface).unlink(missing_ok=True)


def meshsup_config(tmp: Path, ident: Identity, peers: list[Identity], extra: str = "", port: int = 51820) -> Path:
    key = tmp / f"{ident.name}.key"
    key.write_text(b64(ident.private))
    key.chmod(0o600)
    lines = [
        f'[node]\nname = "{ident.name}"\nprivate_key_file = "{key}"\nlisten_port = {port}\n'
        f'addresses = ["{ident.v4}/32", "{ident.v6}/128"]\n',
        "[supervisor]\nintensity = 20\nperiod = 10\n",
        '[dns]\nlisten = ["127.0.0.1:53"]\n',
    ]
    for p in peers:
        ep = f'\nendpoints = ["{p.endpoint}"]' if p.endpoint else ""
        lines.append(
            f'[[peers]]\nname = "{p.name}"\npublic_key = "{p.public}"\nallowed_ips = {p.allowed()!r}{ep}\n'.replace(
                "'", '"'
            )
        )
    path = tmp / f"{ident.name}-{secrets.token_hex(2)}.toml"
    path.write_text("\n".join(lines) + extra)
    return path


def _ping(ns: Netns, addr: str, count: int, size: int | None, timeout: int) -> subprocess.CompletedProcess[str]:
    args = ["ping", "-c", str(count), "-i", "0.2", "-W", "2", "-w", str(timeout)]
    if size is not None:
        args += ["-s", str(size), "-M", "do"]
    return ns.run(*args, addr, check=False)


def ping(ns: Netns, addr: str, count: int = 3, size: int | None = None, timeout: int = 10) -> bool:
    return _ping(ns, addr, count, size, timeout).returncode == 0


_RTT = re.compile(r"= [\d.]+/([\d.]+)/[\d.]+/[\d.]+ ms")


def ping_rtt(ns: Netns, addr: str, count: int = 3, timeout: int = 10) -> float | None:
    """Average round trip in milliseconds, or None when not every echo was answered."""
    r = _ping(ns, addr, count, None, timeout)
    m = _RTT.search(r.stdout)
    return float(m.group(1)) if r.returncode == 0 and m else None


def iperf3(
    client: Netns, server: Netns, addr: str, seconds: int = 10, reverse: bool = False, extra: tuple[str, ...] = ()
) -> dict[str, Any]:
    """Run an iperf3 transfer; returns iperf3's JSON result."""
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


CLIENT_PORT, CLUSTER_PORT = 4222, 6222


class NatsServer:
    """nats-server with JetStream in a namespace (Debian's nats-server), alone or clustered;
    stopped by its own PID."""

    def __init__(
        self, ns: Netns, addr: str, tmp: Path, name: str, routes: list[str] = (), users: list[dict[str, Any]] = ()
    ) -> None:
        """`routes`: the other servers' addresses, for a cluster (JetStream's Raft needs 3);
        `users`: nats-server's authorization users (user, password, permissions)."""
        self.ns, self.addr, self.name = ns, addr, name
        self.url = f"nats://{addr}:{CLIENT_PORT}"
        self.log_path = tmp / f"nats-{name}.log"
        conf = tmp / f"nats-{name}.conf"
        text = (
            f'server_name: "{name}"\nlisten: "{addr}:{CLIENT_PORT}"\n'
            f'jetstream {{ store_dir: "{tmp / f"nats-{name}"}", max_memory_store: 64MB, max_file_store: 256MB }}\n'
        )
        if routes:
            urls = ", ".join(f'"nats://{r}:{CLUSTER_PORT}"' for r in routes)
            text += f'cluster {{ name: "mesh", listen: "{addr}:{CLUSTER_PORT}", routes: [{urls}] }}\n'
        if users:
            text += f"authorization: {json.dumps({'users': list(users)})}\n"  # nats-server reads JSON too
        conf.write_text(text)
        self.conf = conf
        self.proc: subprocess.Popen[str] | None = None
        self.start()

    def start(self) -> None:
        log = open(self.log_path, "a")
        self.proc = self.ns.popen("nats-server", "-c", str(self.conf), stdout=log, stderr=subprocess.STDOUT)
        log.close()

    def wait_ready(self, timeout: float = 20.0) -> None:
        """Until it says it serves clients."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log_path.read_text()
            if "Server is ready" in text and self.proc is not None and self.proc.poll() is None:
                return
            time.sleep(0.1)
        raise RuntimeError(f"nats-server {self.name} not ready: {self.log_path.read_text()[-2000:]}")

    def stop(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
            self.proc.wait(10)
        self.proc = None

    def close(self) -> None:
        self.stop(signal.SIGTERM)

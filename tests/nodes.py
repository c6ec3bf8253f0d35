"""Run real meshsup nodes for tests: each in its own state dir and network namespace."""
from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
MESHSUP = [sys.executable, "-m", "supervisor.cli"]


def is_root() -> bool:
    return os.geteuid() == 0


class Netns:
    """A network namespace with a random name, removed on close."""

    def __init__(self, prefix: str = "ms") -> None:
        self.name = f"{prefix}{secrets.token_hex(3)}"
        subprocess.run(["ip", "netns", "add", self.name], check=True)
        self.run("ip", "link", "set", "lo", "up")

    def run(self, *cmd: str, check: bool = True, **kw: Any) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ip", "netns", "exec", self.name, *cmd], check=check, text=True,
                              capture_output=True, **kw)

    def popen(self, *cmd: str, **kw: Any) -> subprocess.Popen[str]:
        return subprocess.Popen(["ip", "netns", "exec", self.name, *cmd], text=True, **kw)

    def close(self) -> None:
        subprocess.run(["ip", "netns", "del", self.name], check=False, capture_output=True)


class Node:
    """A `meshsup start` process; stopped (and its namespace removed) by close()."""

    def __init__(self, tmp: Path, *args: str, env: dict[str, str] | None = None,
                 netns: Netns | None = None, faults: bool = True) -> None:
        self.state_dir = tmp / f"state-{secrets.token_hex(3)}"
        self.netns = netns
        self.iface = f"ms{secrets.token_hex(4)}"
        full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
        if faults:
            full_env["MESHSUP_TEST_FAULTS"] = "1"
        cmd = [*MESHSUP, "start", "--state-dir", str(self.state_dir), *args]
        if "--interface" not in args:
            cmd += ["--interface", self.iface]
        self.stdout_path = tmp / f"{self.state_dir.name}.out"
        self.stderr_path = tmp / f"{self.state_dir.name}.err"
        with open(self.stdout_path, "w") as out, open(self.stderr_path, "w") as err:
            prefix = ["ip", "netns", "exec", netns.name] if netns else []
            self.proc = subprocess.Popen([*prefix, *cmd], stdout=out, stderr=err, env=full_env,
                                         cwd=tmp)

    def cli(self, *args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        r = subprocess.run([*MESHSUP, args[0], "--state-dir", str(self.state_dir), *args[1:]],
                           text=True, capture_output=True, timeout=timeout,
                           env={**os.environ, "PYTHONPATH": str(REPO)})
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

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        # Anything the node failed to stop is ended by PID, so tests never leak processes.
        for pid in descendants_by_state_dir(self.state_dir):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def descendants_by_state_dir(state_dir: Path) -> list[int]:
    """PIDs of processes whose command line or environment names this state dir."""
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


def process_title(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]

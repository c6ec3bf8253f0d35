"""Run real meshsup nodes for tests: each in its own state dir and network namespace.

The lab itself lives in supervisor/lab.py (`meshsup demo` uses it too); this
module keeps the names the tests import.
"""

from __future__ import annotations

import os
from pathlib import Path

from meshsup.supervisor.lab import MESHSUP, Netns, Node, descendants_by_state_dir, is_root

__all__ = [
    "REPO",
    "MESHSUP",
    "Netns",
    "Node",
    "descendants_by_state_dir",
    "is_root",
    "pid_alive",
    "process_title",
    "udp_counters",
    "udp_sockets",
]

REPO = Path(__file__).resolve().parent.parent


def process_title(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]


def udp_sockets(port: int, netns: Netns | None = None) -> list[tuple[int, int]]:
    """The kernel's view of each UDP socket bound to ``port`` (from /proc/net/udp and udp6, of ``netns``):
    (bytes waiting in its receive queue, datagrams it dropped)."""
    found = []
    for table in ("udp", "udp6"):
        path = f"/proc/net/{table}"
        text = netns.run("cat", path).stdout if netns else Path(path).read_text()
        for line in text.splitlines()[1:]:
            fields = line.split()  # sl local_address rem_address st tx_queue:rx_queue ... drops
            if int(fields[1].rsplit(":", 1)[1], 16) == port:
                found.append((int(fields[4].split(":")[1], 16), int(fields[-1])))
    return found


def udp_counters(netns: Netns) -> dict[str, int]:
    """The namespace kernel's UDP counters (/proc/net/snmp): datagrams in, out, and dropped for want of room."""
    header, values = [
        line.split() for line in netns.run("cat", "/proc/net/snmp").stdout.splitlines() if line.startswith("Udp:")
    ]
    return dict(zip(header[1:], map(int, values[1:])))

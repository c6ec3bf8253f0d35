"""Run real meshsup nodes for tests: each in its own state dir and network namespace.

The lab itself lives in supervisor/lab.py (`meshsup demo` uses it too); this
module keeps the names the tests import.
"""
from __future__ import annotations

import os
from pathlib import Path

from meshsup.supervisor.lab import MESHSUP, Netns, Node, descendants_by_state_dir, is_root

__all__ = ["REPO", "MESHSUP", "Netns", "Node", "descendants_by_state_dir", "is_root", "pid_alive",
           "process_title"]

REPO = Path(__file__).resolve().parent.parent


def process_title(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]

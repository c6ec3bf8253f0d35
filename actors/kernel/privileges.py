"""Giving up root: an actor that parses what strangers send runs as an unprivileged user.

The fork server is root, so every actor starts as root with all of the
node's capabilities. An actor that needs neither (actors.registry says which)
drops them in two steps, and refuses to run (PrivilegeError) if either fails:

1. `Drop.prepare`, first thing after the fork, while the process has one
   thread: no new privileges (no setuid or file-capability execs) and a
   capability bounding set of only the kept capabilities. Threads copy these
   from the thread that starts them, so the ZeroMQ threads to come get them too.
2. `Drop.finish`, once the actor has joined the bus (its sockets in the
   runtime dir, which only root may create, are bound) and before it reads
   any input: no supplementary groups, the user's uid and gid (glibc sets
   these on every thread), and the kept capabilities as the only permitted
   and effective ones, and not dumpable (no ptrace by the user's other
   processes). The threads already running keep no capability at
   all: the uid change clears theirs. Then every thread is checked in /proc:
   a drop that did not happen is an error, never a silent root actor.

The state dir's parents need not be open to the user (a 0700 home, a test's
tmp dir): the actor reaches the state dir through a descriptor opened while
root, as /proc/self/fd/N. So it does the directories it imports from (an
interpreter under /root, as pyenv installs it): a module first imported after
the drop (the idna codec, on the first name resolved) is still found.
"""

from __future__ import annotations

import ctypes
import os
import pwd
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Final

USER: Final = "meshsup"  # made by deploy/setup.sh: the group of every unprivileged kind's user, and their fallback
FALLBACK_USER: Final = "nobody"
CAP_NET_BIND_SERVICE: Final = 10  # <linux/capability.h>

# <linux/prctl.h>, <linux/capability.h>
_PR_GET_DUMPABLE, _PR_SET_DUMPABLE, _PR_SET_KEEPCAPS, _PR_CAPBSET_DROP, _PR_SET_NO_NEW_PRIVS = 3, 4, 8, 24, 38
_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL = 47, 4
_LINUX_CAPABILITY_VERSION_3: Final = 0x20080522

_libc = ctypes.CDLL(None, use_errno=True)


class PrivilegeError(Exception):
    """The drop could not be done, or did not take: the actor must not run."""


@dataclass(frozen=True, slots=True)
class Account:
    """The user the unprivileged actors run as."""

    name: str
    uid: int
    gid: int


def unprivileged_account(own: str = USER) -> Account:
    """The user `own` (a kind's own: deploy/setup.sh makes them), else meshsup, else nobody on a
    host without either (the caller says so: they may be shared with other kinds or daemons)."""
    for name in dict.fromkeys((own, USER, FALLBACK_USER)):
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            continue
        return Account(name, entry.pw_uid, entry.pw_gid)
    raise PrivilegeError(f"neither {own}, {USER} nor {FALLBACK_USER} is a user on this host")


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def _mask(caps: frozenset[int]) -> int:
    return sum(1 << c for c in caps)


def _prctl(option: int, arg: int = 0, arg3: int = 0) -> None:
    if _libc.prctl(option, ctypes.c_ulong(arg), ctypes.c_ulong(arg3), ctypes.c_ulong(0), ctypes.c_ulong(0)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl({option}): {os.strerror(err)}")


def _capset(caps: frozenset[int]) -> None:
    """This thread's permitted and effective sets: `caps`; inheritable: none."""
    mask = _mask(caps)
    low, high = mask & 0xFFFFFFFF, mask >> 32
    data = (_CapData * 2)(_CapData(low, low, 0), _CapData(high, high, 0))
    if _libc.capset(ctypes.byref(_CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)), data) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"capset: {os.strerror(err)}")


def _last_cap() -> int:
    return int(Path("/proc/sys/kernel/cap_last_cap").read_text())


@dataclass(frozen=True, slots=True)
class Drop:
    account: Account
    keep: frozenset[int]  # capability numbers

    def prepare(self, state_dir: str) -> str:
        """Step 1 (see the module): call with one thread, as root. Returns the state dir as
        the actor will reach it once it is the unprivileged user."""
        try:
            if os.geteuid() != 0:
                raise PrivilegeError(f"not root (euid {os.geteuid()}): cannot switch to {self.account.name}")
            threads = len(os.listdir("/proc/self/task"))
            if threads != 1:
                raise PrivilegeError(f"{threads} threads: the bounding set would miss all but this one")
            state = _handle(state_dir)
            _import_through_handles()
            _prctl(_PR_SET_NO_NEW_PRIVS, 1)
            for cap in range(_last_cap() + 1):
                if cap not in self.keep:
                    _prctl(_PR_CAPBSET_DROP, cap)
            _prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL)
        except OSError as err:
            raise PrivilegeError(f"cannot prepare to drop privileges: {err}") from None
        return state

    def finish(self) -> None:
        """Step 2 (see the module): become the account with only the kept capabilities, and check it."""
        uid, gid = self.account.uid, self.account.gid
        try:
            _prctl(_PR_SET_KEEPCAPS, 1)  # so that the uid change leaves this thread its permitted set ...
            os.setgroups([])
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
            _capset(self.keep)  # ... of which it keeps these
            _prctl(_PR_SET_KEEPCAPS, 0)
            # Where the other unprivileged kinds run as this user too (a host without their own users):
            # none may ptrace this one or read its memory. The uid change did this already unless the
            # host's fs.suid_dumpable says otherwise.
            _prctl(_PR_SET_DUMPABLE, 0)
        except OSError as err:
            raise PrivilegeError(f"cannot switch to {self.account.name} (uid {uid}): {err}") from None
        me = threading.get_native_id()
        problems = [f"thread {tid}: {p}" for tid, status in _threads() for p in self._problems(status, tid == me)]
        if _libc.prctl(_PR_GET_DUMPABLE, 0, 0, 0, 0) != 0:
            problems.append("dumpable (its user's other processes may ptrace it)")
        if problems:
            raise PrivilegeError(f"privileges not dropped as asked: {'; '.join(problems)}")

    def _problems(self, status: dict[str, str], main: bool) -> list[str]:
        """What is wrong with a thread's /proc status after the drop (the thread that dropped: `main`)."""
        keep, problems = _mask(self.keep), []
        ids = {"Uid": self.account.uid, "Gid": self.account.gid}
        for key, want in ids.items():
            if any(int(v) != want for v in status[key].split()):
                problems.append(f"{key} {' '.join(status[key].split())}, not {want}")
        if status.get("Groups", "").split():
            problems.append(f"supplementary groups {status['Groups']}")
        if status["NoNewPrivs"] != "1":
            problems.append("new privileges allowed")
        caps = {k: int(status[k], 16) for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")}
        if caps["CapBnd"] != keep or caps["CapInh"] or caps["CapAmb"]:
            problems.append(
                f"bounding {caps['CapBnd']:x}, inheritable {caps['CapInh']:x}, ambient "
                f"{caps['CapAmb']:x}: not only {keep:x}"
            )
        if (caps["CapPrm"], caps["CapEff"]) != ((keep, keep) if main else (0, 0)):
            problems.append(f"permitted {caps['CapPrm']:x}, effective {caps['CapEff']:x}")
        return problems


def _handle(directory: str) -> str:
    """A path to `directory` through a descriptor of it: it needs no search right on its parents."""
    return f"/proc/self/fd/{os.open(directory, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)}"


def _import_through_handles() -> None:
    """Reach sys.path's directories, and the packages already imported from them, through handles."""
    moved = {entry: _handle(entry) for entry in sys.path if entry and os.path.isdir(entry)}

    def move(path: str) -> str:
        for old in sorted(moved, key=len, reverse=True):  # lib-dynload lies inside the stdlib's directory
            if path == old or path.startswith(old + "/"):
                return moved[old] + path[len(old) :]
        return path

    sys.path[:] = [move(entry) for entry in sys.path]
    for module in list(sys.modules.values()):
        search = getattr(module, "__path__", None)
        if isinstance(search, list):  # a namespace package's is computed from its parent's
            search[:] = [move(path) for path in search]
    sys.path_importer_cache.clear()


def _threads() -> list[tuple[int, dict[str, str]]]:
    """Every thread of this process with its /proc status fields."""
    out = []
    for tid in os.listdir("/proc/self/task"):
        try:
            text = Path(f"/proc/self/task/{tid}/status").read_text()
        except FileNotFoundError:  # it ended meanwhile
            continue
        fields = dict(line.partition(":")[::2] for line in text.splitlines())
        out.append((int(tid), {k: v.strip() for k, v in fields.items()}))
    return out

"""Kernel resources the supervisor takes care of for its workers: the probe
of the listen port before anything starts, the TUN's queues, held for the
node's life and handed to each crypto worker at its spawn, and the part of
the state dir the unprivileged actors may use.
"""

from __future__ import annotations

import errno
import os
import pwd
import stat
from collections.abc import Mapping
from typing import Any

from meshsup.actors.bus.endpoints import Runtime
from meshsup.actors.kernel.files import UnsafePath
from meshsup.actors.kernel.privileges import USER, Account, PrivilegeError
from meshsup.actors.kernel.tun import Tun, make_persistent
from meshsup.actors.kernel.udp import UdpSocket
from meshsup.actors.registry import KINDS, InheritedFd, unprivileged
from meshsup.actors.settings import Settings


def probe_port(config: Settings) -> str | None:
    """Why the node cannot have its UDP port, or None if it can."""
    port = config.node.listen_port
    try:
        if port:
            # The node's own sockets share the port (SO_REUSEPORT), so an exclusive
            # probe bind is what tells us another program already has it.
            UdpSocket(port, gso=False, gro=False).close()
    except OSError as err:
        return f"UDP port {port} is in use: {err.strerror}"
    return None


class TunQueues:
    def __init__(self, log: Any) -> None:
        self.log = log
        self.queues: list[Tun] = []

    def open(self, config: Settings) -> None:
        """One queue of the TUN per crypto worker, opened first and held for the node's life.

        The kernel numbers a multi-queue TUN's queues in the order they attach
        and renumbers them when one detaches. Held here, worker k's queue stays
        number k across worker restarts, which is what tun-io's eBPF steering
        program relies on to send each packet to its peer's owner. A restarted
        worker gets the same queue again, with what the kernel queued meanwhile.
        """
        iface, queues = config.node.interface, []
        try:
            make_persistent(iface)  # as the router would: the link's mode and queue length come first
            for _ in range(config.actors.crypto):
                queues.append(Tun.open(iface))
                if not queues[-1].multi_queue:
                    raise OSError(errno.EOPNOTSUPP, "the kernel has no multi-queue TUN")
        except (OSError, ValueError) as err:
            for tun in queues:
                tun.close()
            self.log.warning(
                "crypto workers get no TUN queue of their own; tun-io reads for them", interface=iface, reason=str(err)
            )
            return
        self.queues = queues

    def for_actor(self, name: str, kind: str) -> InheritedFd | None:
        """Crypto worker k's queue, to pass at its spawn; None for others and for workers beyond the queues."""
        index = int(name.rsplit("-", 1)[1]) if kind == "crypto" else -1
        return InheritedFd(self.queues[index].fileno()) if 0 <= index < len(self.queues) else None

    def close(self) -> None:
        for tun in self.queues:
            tun.close()
        self.queues = []


def open_state_dir(runtime: Runtime, accounts: Mapping[str, Account]) -> None:
    """Let the unprivileged actors in: search the state dir and the runtime dir (the sockets
    meant for them are their group's), and each kind own its state dirs, 0700.

    A kind's dir left by root (a node whose actors ran as root) or by the user all unprivileged
    kinds once shared (meshsup) is handed over: what that user planted in it, the kind could
    have written as that user anyway. A dir of anyone else is refused."""
    groups = {a.gid for a in accounts.values()}
    if len(groups) != 1:
        users = ", ".join(sorted({a.name for a in accounts.values()}))
        raise PrivilegeError(f"the unprivileged users ({users}) have different primary groups: give them {USER}'s")
    runtime.open_to(groups.pop())
    shared = _uid_of(USER)
    for kind, spec in KINDS.items():
        if not unprivileged(kind):
            continue
        account = accounts[kind]
        for name in spec.state_dirs:
            path = runtime.state_dir / name
            try:
                os.mkdir(path, 0o700)
            except FileExistsError:
                pass
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                st = os.fstat(fd)
                if st.st_uid != account.uid and st.st_uid in (0, shared):
                    _hand_over(fd, account, st.st_uid)
                elif st.st_uid != account.uid:
                    raise UnsafePath(
                        f"{name} dir",
                        path,
                        st,
                        f"is neither root's, {USER}'s nor {account.name}'s",
                        f"remove it or chown -R {account.name} it",
                    )
            finally:
                os.close(fd)


def _uid_of(user: str) -> int | None:
    try:
        return pwd.getpwnam(user).pw_uid
    except KeyError:
        return None


def _hand_over(top: int, account: Account, previous: int) -> None:
    """Give a tree of uid `previous` (root, or the user the kinds once shared) to `account`: its
    directories and its regular files of `previous`, never a link (a symlink or a file linked from
    elsewhere, which `previous` may have planted to a file of its). Bottom up, so that a start cut
    short leaves the top as it was and the next one does it again. Through descriptors, following
    no symlink."""
    for _, dirs, files, fd in os.fwalk(".", topdown=False, dir_fd=top):
        for name in dirs + files:
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            if st.st_uid == previous and (stat.S_ISDIR(st.st_mode) or (stat.S_ISREG(st.st_mode) and st.st_nlink == 1)):
                os.chown(name, account.uid, account.gid, dir_fd=fd, follow_symlinks=False)
    os.fchmod(top, 0o700)  # while still ours: changing the mode of another's takes CAP_FOWNER, which the unit lacks
    os.fchown(top, account.uid, account.gid)

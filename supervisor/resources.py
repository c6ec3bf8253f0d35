"""Kernel resources the supervisor takes care of for its workers: the probe
of the listen port before anything starts, the TUN's queues, held for the
node's life and handed to each crypto worker at its spawn, and the part of
the state dir the unprivileged actors may use.
"""

from __future__ import annotations

import errno
import os
import stat
from typing import Any

from meshsup.actors.bus.endpoints import Runtime
from meshsup.actors.kernel.files import UnsafePath
from meshsup.actors.kernel.privileges import Account
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


def open_state_dir(runtime: Runtime, account: Account) -> None:
    """Let the unprivileged actors in: search the state dir and the runtime dir (the
    sockets meant for them are their group's), and own their kinds' state dirs."""
    runtime.open_to(account.gid)
    for name in sorted({d for kind, k in KINDS.items() if unprivileged(kind) for d in k.state_dirs}):
        path = runtime.state_dir / name
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            if st.st_uid == 0:
                _hand_over(fd, account)
            elif st.st_uid != account.uid:
                raise UnsafePath(
                    f"{name} dir",
                    path,
                    st,
                    f"is neither root's nor {account.name}'s",
                    f"remove it or chown -R {account.name} it",
                )
        finally:
            os.close(fd)


def _hand_over(top: int, account: Account) -> None:
    """Give a root-owned tree (just made, or left by a node whose netlog ran as root) to `account`.
    Only a tree the account could never write: it cannot have planted a link in it to
    a file of root's. Bottom up, so that a start cut short leaves the top root's and
    the next one does it again. Through descriptors, following no symlink."""
    for _, dirs, files, fd in os.fwalk(".", topdown=False, dir_fd=top):
        for name in dirs + files:
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode) or (stat.S_ISREG(st.st_mode) and st.st_nlink == 1):
                os.chown(name, account.uid, account.gid, dir_fd=fd, follow_symlinks=False)
    os.fchown(top, account.uid, account.gid)

"""Where the bus lives: ipc:// endpoints in a per-node runtime dir.

Only root creates files there. The node's unprivileged actors (DNS, netlog:
actors.registry) may search it and connect to the sockets meant for them
(`grant`); the rest stay root's.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from meshsup.actors.kernel.files import private_dir
from meshsup.actors.kernel.privileges import Drop


def grant(endpoint: str, unprivileged: bool) -> None:
    """Who may connect to a socket of the runtime dir: root only (0600), or the
    unprivileged actors too (0660: the socket has their group, see Runtime.open_to)."""
    os.chmod(endpoint.removeprefix("ipc://"), 0o660 if unprivileged else 0o600)


_CAPTURE = re.compile(r"pc(\d+)\.sock")


class Runtime:
    def __init__(
        self, state_dir: str | os.PathLike[str], drop: Drop | None = None, identity: bytes | None = None
    ) -> None:
        self.state_dir = Path(state_dir)
        self.dir = self.state_dir / "run"
        self.drop = drop  # in an actor that gives up root once it joined the bus (actors.base)
        # In an actor: what it is known by on its control socket (supervisor.hub.Hub.admit); None
        # lets the supervisor's socket pick one (an actor a test made, with no supervisor).
        self.identity = identity

    def check(self, create_state_dir: bool = False) -> None:
        """Refuse (UnsafePath) a state dir or runtime dir, where there is one, that
        another user owns or can write: they could plant the sockets, key and
        files the node trusts. `create_state_dir` makes a missing state dir 0700."""
        private_dir(self.state_dir, "state dir", create=create_state_dir)
        private_dir(self.dir, "runtime dir", follow=False)

    def create(self) -> None:
        """Make the state dir and runtime dir, 0700, or refuse (UnsafePath) unsafe ones."""
        private_dir(self.state_dir, "state dir", create=True)
        private_dir(self.dir, "runtime dir", create=True, follow=False)

    def open_to(self, gid: int) -> None:
        """Let the group `gid` (the unprivileged actors') search the state dir (0710) and the
        runtime dir, whose new files get that group (02710, set-group-ID): which sockets
        the group may connect to is then up to each socket's mode (`grant`)."""
        for path, mode, follow in ((self.state_dir, 0o710, True), (self.dir, 0o2710, False)):
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW))
            try:
                os.fchown(fd, -1, gid)
                os.fchmod(fd, mode)
            finally:
                os.close(fd)

    def _ipc(self, name: str) -> str:
        return f"ipc://{self.dir / name}"

    @property
    def control(self) -> str:
        """Supervisor ROUTER that the DEALER of every actor running as root connects to."""
        return self._ipc("control.sock")

    @property
    def unprivileged_control(self) -> str:
        """The same for the unprivileged actors: apart, so that none of them can take a
        root actor's identity (and the keys in its configuration)."""
        return self._ipc("control-u.sock")  # short: a socket path has at most 107 bytes

    @property
    def cli(self) -> str:
        return self._ipc("cli.sock")

    @property
    def events_in(self) -> str:
        """Where the root actors publish events (root's alone)."""
        return self._ipc("events-in.sock")

    @property
    def unprivileged_events_in(self) -> str:
        """Where the unprivileged actors publish: apart, so that the hub passes on only what such
        an actor may say (supervisor.hub.UNPRIVILEGED_TOPICS), never a root actor's event."""
        return self._ipc("events-u.sock")

    @property
    def publish_to(self) -> str:
        """This process's place to publish events: an actor that dropped root has only its own."""
        return self.events_in if self.drop is None else self.unprivileged_events_in

    @property
    def events_out(self) -> str:
        return self._ipc("events-out.sock")

    def inbox(self, actor: str) -> str:
        """The actor's data path socket (a unix seqpacket path, see actors.bus.datapath)."""
        return str(self.dir / f"{actor}.sock")

    def capture(self, pid: int) -> Path:
        """The socket a `meshsup capture` CLI listens on for the workers' packets, by its pid: a
        name as short as control-u.sock's, for the same 107-byte limit."""
        return self.dir / f"pc{pid}.sock"

    @staticmethod
    def capture_pid(path: str | os.PathLike[str]) -> int | None:
        """The pid in a capture socket's name; None for a name that is not one."""
        m = _CAPTURE.fullmatch(os.path.basename(path))
        return int(m.group(1)) if m else None

    @property
    def pidfile(self) -> Path:
        return self.dir / "supervisor.pid"

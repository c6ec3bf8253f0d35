"""Where the bus lives: ipc:// endpoints in a per-node runtime dir (0700)."""

from __future__ import annotations

import os
from pathlib import Path

from meshsup.actors.kernel.files import private_dir


class Runtime:
    def __init__(self, state_dir: str | os.PathLike[str]) -> None:
        self.state_dir = Path(state_dir)
        self.dir = self.state_dir / "run"

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

    def _ipc(self, name: str) -> str:
        return f"ipc://{self.dir / name}"

    @property
    def control(self) -> str:
        """Supervisor ROUTER that every actor's DEALER connects to."""
        return self._ipc("control.sock")

    @property
    def cli(self) -> str:
        return self._ipc("cli.sock")

    @property
    def events_in(self) -> str:
        return self._ipc("events-in.sock")

    @property
    def events_out(self) -> str:
        return self._ipc("events-out.sock")

    def inbox(self, actor: str) -> str:
        """The actor's data path socket (a unix seqpacket path, see actors.bus.datapath)."""
        return str(self.dir / f"{actor}.sock")

    @property
    def pidfile(self) -> Path:
        return self.dir / "supervisor.pid"

"""Where the bus lives: ipc:// endpoints in a per-node runtime dir (0700)."""
from __future__ import annotations

import os
from pathlib import Path


class Runtime:
    def __init__(self, state_dir: str | os.PathLike[str]) -> None:
        self.state_dir = Path(state_dir)
        self.dir = self.state_dir / "run"

    def create(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.dir.mkdir(mode=0o700, exist_ok=True)
        os.chmod(self.dir, 0o700)  # mkdir's mode is masked by umask

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

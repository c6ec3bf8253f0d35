"""The tun-io actor: the TUN file descriptor."""
from __future__ import annotations

from actors.base import Actor


class TunIoActor(Actor):
    kind = "tun-io"

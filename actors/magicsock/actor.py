"""The magicsock actor: the UDP socket and per-peer endpoints."""
from __future__ import annotations

from actors.base import Actor


class MagicsockActor(Actor):
    kind = "magicsock"

"""The netlog actor: flow aggregation and shipping to collectors."""
from __future__ import annotations

from actors.base import Actor


class NetlogActor(Actor):
    kind = "netlog"

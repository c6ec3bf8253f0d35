"""The router actor: netlink: TUN link, addresses, routes, OS DNS."""
from __future__ import annotations

from actors.base import Actor


class RouterActor(Actor):
    kind = "router"

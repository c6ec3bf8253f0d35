"""The node's WireGuard API: `wg show` answered from the running config and the
workers' live figures, `wg set` applied as a config change like a reload.
uapi_server.py serves the socket, wgapi.py converts between config and API."""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import Any

import zmq

from meshsup.actors.settings import Settings
from meshsup.supervisor.polled import register
from meshsup.supervisor.supervision import Tree
from meshsup.supervisor.uapi import GetRequest, SetRequest, UapiError, serialize_errno, serialize_get
from meshsup.supervisor.uapi_server import InUse, UapiServer
from meshsup.supervisor.wgapi import apply_set, device_state


class UapiFront:
    def __init__(
        self, tree: Tree, reconfigure: Callable[[Settings, Callable[[list[str]], None]], None], log: Any
    ) -> None:
        self.tree = tree
        self.reconfigure = reconfigure
        self.log = log
        self.uapi: UapiServer | None = None

    def serve(self, interface: str) -> str | None:
        """Open `wg`'s socket for `interface`; the reason if it cannot be served."""
        try:
            self.uapi = UapiServer(interface, self.on_uapi)
        except (InUse, OSError) as err:
            self.uapi = None
            return f"cannot serve the WireGuard API socket: {err}"
        return None

    def follow(self, new: Settings) -> None:
        """Before a config change: the socket's name follows the interface's."""
        if self.uapi is not None and new.node.interface != self.tree.config.node.interface:
            self.uapi.close()
            if error := self.serve(new.node.interface):
                self.log.error(error)

    def register(self, poller: zmq.Poller) -> set[int]:
        return register(poller, self.uapi)

    def on_ready(self, fd: int) -> None:
        if self.uapi is not None:
            self.uapi.on_ready(fd)

    def on_uapi(self, request: GetRequest | SetRequest, respond: Callable[[bytes], None]) -> None:
        """`wg show` and `wg set`: a set is a config change applied like a reload."""
        if isinstance(request, GetRequest):
            respond(serialize_get(device_state(self.tree.config, self.tree.live_peers())))
            return
        new = apply_set(self.tree.config, request)
        if isinstance(new, UapiError):
            self.log.warning("wg set refused", error=new.message)
            respond(serialize_errno(new))
        elif new == self.tree.config:
            respond(serialize_errno(None))
        else:
            self.log.info("applying wg set")
            self.reconfigure(
                new,
                lambda errors: respond(serialize_errno(UapiError(errno.EIO, "; ".join(errors)) if errors else None)),
            )

    def close(self) -> None:
        if self.uapi is not None:
            self.uapi.close()

"""The node's Prometheus endpoint in the supervisor: served while [metrics] listen is set,
moved when a reload changes it. scrape.py serves the socket, metrics.py makes the series,
exposition.py renders them."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import zmq

from meshsup.actors.registry import AnySettings
from meshsup.actors.settings import Settings
from meshsup.actors.settings.node import format_endpoint
from meshsup.supervisor.exposition import render
from meshsup.supervisor.metrics import families
from meshsup.supervisor.polled import register
from meshsup.supervisor.scrape import ScrapeServer
from meshsup.supervisor.supervision import Tree


class MetricsFront:
    def __init__(self, tree: Tree, status: Callable[[], dict[str, Any]], log: Any) -> None:
        self.tree = tree
        self.status = status
        self.log = log
        self.server: ScrapeServer | None = None

    def serve(self, config: AnySettings) -> str | None:
        """Listen where `config` says (nothing for none); the reason if it cannot."""
        listen = config.metrics.listen if isinstance(config, Settings) else None
        if listen is None:
            return None
        try:
            self.server = ScrapeServer(listen, self.render)
        except OSError as err:
            return f"cannot serve metrics on {format_endpoint(*listen)}: {err.strerror}"
        self.log.info("serving metrics", listen=format_endpoint(*listen))
        return None

    def follow(self, new: AnySettings) -> None:
        """Before a config change: a new address is listened on, the old one closed; if the new
        one cannot be had, the old one stays and the log says why."""
        listen = new.metrics.listen if isinstance(new, Settings) else None
        if listen == (self.server.listen if self.server else None):
            return
        old, self.server = self.server, None
        error = self.serve(new)
        if error:
            self.log.error(error)
            self.server = old
        elif old is not None:
            old.close()

    def render(self) -> str:
        return render(families(self.status(), self.tree.actors.values(), time.monotonic(), time.time()))

    def register(self, poller: zmq.Poller) -> set[int]:
        return register(poller, self.server)

    def on_ready(self, fd: int) -> None:
        if self.server is not None:
            self.server.on_ready(fd)

    def close(self) -> None:
        if self.server is not None:
            self.server.close()

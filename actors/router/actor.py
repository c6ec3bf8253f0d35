"""The router actor: the TUN link, its addresses, MTU and routes, via netlink.

It creates the TUN as a persistent link so a restarted tun-io reattaches to it
with nothing lost, and it removes the link (and with it every address and
route) when the node stops.
"""
from __future__ import annotations

from typing import Any

from pyroute2 import IPRoute

from actors.base import Actor, ConfigError
from actors.router.netconf import LinuxRouter
from actors.tunio.tun import make_persistent


class RouterActor(Actor):
    kind = "router"

    def __init__(self, name: str, runtime: Any) -> None:
        super().__init__(name, runtime)
        self.router: LinuxRouter | None = None
        self.failures: list[str] = []

    def configure(self, config: dict[str, Any]) -> None:
        super().configure(config)
        node = config["node"]
        iface = node["interface"]
        if self.router is not None and self.router.ifname != iface:
            self._remove_link()
        if self.router is None:
            try:
                with IPRoute() as ipr:
                    exists = bool(ipr.link_lookup(ifname=iface))
                if not exists:  # else a previous router made it and tun-io holds it
                    make_persistent(iface)
                self.router = LinuxRouter(iface)
            except (OSError, ValueError, LookupError) as err:
                raise ConfigError(f"cannot create TUN {iface}: {err}") from None
        changes = self.router.configure(node["addresses"], node["mtu"])
        routes = sorted({p for peer in config["peers"] for p in peer["allowed_ips"]})
        route_changes = self.router.set_routes(routes)
        self.failures = [*changes.failed, *changes.rejected, *route_changes.failed, *route_changes.rejected]
        if self.failures:
            self.log.warning("some link settings failed", failures=self.failures)
        if changes.added or route_changes.added or route_changes.removed:
            self.log.info("link configured", interface=iface, addresses=changes.added,
                          routes_added=route_changes.added, routes_removed=route_changes.removed)

    def _remove_link(self) -> None:
        assert self.router is not None
        iface = self.router.ifname
        self.router.close()
        self.router = None
        with IPRoute() as ipr:
            for index in ipr.link_lookup(ifname=iface):
                ipr.link("del", index=index)
        self.log.info("link removed", interface=iface)

    def status(self) -> dict[str, Any]:
        return {"interface": self.router.ifname if self.router else "", "failures": self.failures}

    def close(self) -> None:
        if self.router is not None:
            self._remove_link()

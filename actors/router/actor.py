"""The router actor: the TUN link, its addresses, MTU and routes, via netlink;
the namespace's resolv.conf; link changes published on the bus.

It creates the TUN as a persistent link so a restarted tun-io reattaches to it
with nothing lost, and it removes the link (and with it every address and
route) when the node stops. With ``[dns] set_os_resolver`` it points the
namespace's resolver at the DNS controller and puts the old one back when
the node stops or the setting goes. Every link or address change in the
namespace, and every change of a default route other than the node's own, is
published as LinkChanged (the DNS controller flushes its cache on it;
magicsock looks for its endpoints anew), one per link and kind of change in
each burst.
"""

from __future__ import annotations

import ipaddress
import socket
from collections import Counter
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from meshsup.actors.base import Actor, ConfigError
from meshsup.actors.bus.messages import LinkChanged
from meshsup.actors.kernel.tun import make_persistent
from meshsup.actors.router.exitroute import ExitRouting
from meshsup.actors.router.forwarding import Forwarding
from meshsup.actors.router.intercept import Interception
from meshsup.actors.router.netconf import LinkMonitor, LinuxRouter
from meshsup.actors.router.resolvconf import ResolvConf, for_this_namespace
from meshsup.actors.settings import DnsSettings, PeerSettings, Settings
from meshsup.actors.settings.node import IPNetwork


class RouterActor(Actor):
    kind = "router"

    def __init__(self, name: str, runtime: Any) -> None:
        super().__init__(name, runtime)
        self.router: LinuxRouter | None = None
        self.failures: list[str] = []
        self.peer_routes: dict[bytes, tuple[str, ...]] = {}  # each peer's routes through the link
        self.routed: Counter[str] = Counter()  # route -> peers that have it
        self.resolv: ResolvConf | None = None
        self.resolver_problems: list[str] = []
        self.forwarding: Forwarding | None = None
        self.exit: ExitRouting | None = None
        self.interception: Interception | None = None
        self.links_published = 0
        self.monitor = LinkMonitor()
        self.add_reader(self.monitor.fileno(), self._link_events)

    def configure(self, settings: Settings) -> None:
        node = settings.node
        iface = node.interface
        if self.router is not None and self.router.ifname != iface:
            self._remove_link()
        if self.router is None:
            try:
                with IPRoute() as ipr:
                    exists = bool(ipr.link_lookup(ifname=iface))
                if not exists:  # else the supervisor (holding the workers' queues) or a previous router made it
                    make_persistent(iface)
                self.router = LinuxRouter(iface)
            except (OSError, ValueError, LookupError) as err:
                raise ConfigError(f"cannot create TUN {iface}: {err}") from None
        changes = self.router.configure([str(a) for a in node.addresses], node.mtu)
        self.peer_routes = {p.public_key: _routes(node.exit_node, p) for p in settings.peers}
        self.routed = Counter(r for routes in self.peer_routes.values() for r in routes)
        route_changes = self.router.set_routes(sorted(self.routed))
        self.failures = [*changes.failed, *changes.rejected, *route_changes.failed, *route_changes.rejected]
        if self.failures:
            self.log.warning("some link settings failed", failures=self.failures)
        if changes.added or route_changes.added or route_changes.removed:
            self.log.info(
                "link configured",
                interface=iface,
                addresses=changes.added,
                routes_added=route_changes.added,
                routes_removed=route_changes.removed,
            )
        self._use_exit(settings)
        self._serve(iface, node.advertise_exit_node, node.advertise_routes)
        self._os_resolver(settings.dns)
        self._intercept(settings.dns.intercept)

    def change_peers(self, settings: Settings, changed: list[PeerSettings], removed: list[bytes]) -> None:
        """The changed peers' routes alone: a one-peer `wg set` adds or removes its routes, with no
        dump of the routing table (a prefix stays routed while any peer still has it)."""
        if self.router is None:
            self.configure(settings)
            return
        node = settings.node
        gone: set[str] = set()
        for key in [*removed, *(p.public_key for p in changed)]:
            for route in self.peer_routes.pop(key, ()):
                self.routed[route] -= 1
                if not self.routed[route]:
                    del self.routed[route]
                    gone.add(route)
        new: set[str] = set()
        for p in changed:
            self.peer_routes[p.public_key] = _routes(node.exit_node, p)
            for route in self.peer_routes[p.public_key]:
                new.update(() if self.routed[route] else (route,))
                self.routed[route] += 1
        route_changes = self.router.change_routes(sorted(new - gone), sorted(gone - new))
        if route_changes.failed or route_changes.rejected:
            self.failures = [*self.failures, *route_changes.failed, *route_changes.rejected]
            self.log.warning("some link settings failed", failures=self.failures)
        if route_changes.added or route_changes.removed:
            self.log.info(
                "link configured",
                interface=node.interface,
                routes_added=route_changes.added,
                routes_removed=route_changes.removed,
            )
        if node.exit_node:  # the exit node's peer may be among them
            self._use_exit(settings)

    def _use_exit(self, settings: Settings) -> None:
        """The default route through the exit node's peer, or none. The first call after a start
        also removes what a crashed router left (ExitRouting.apply)."""
        assert self.router is not None
        node = settings.node
        exit_peer = next((p for p in settings.peers if p.name == node.exit_node), None)
        defaults = [n for n in exit_peer.allowed_ips if n.prefixlen == 0] if exit_peer else []
        families = {socket.AF_INET if n.version == 4 else socket.AF_INET6 for n in defaults}
        if self.exit is None:
            self.exit = ExitRouting()
        try:
            self.exit.apply(self.router.index, families, node.exit_node_allow_lan, _servers(settings))
        except NetlinkError as err:
            raise ConfigError(f"cannot route through exit node {node.exit_node}: {err}") from None
        if exit_peer:
            self.log.info("using exit node", peer=exit_peer.name, allow_lan=node.exit_node_allow_lan)

    def _serve(self, iface: str, exit_node: bool, routes: tuple[IPNetwork, ...]) -> None:
        """Forwarding and masquerade for peers, or none. The first call after a
        start also clears what a crashed router left (Forwarding.apply)."""
        if self.forwarding is not None and self.forwarding.iface != iface:
            self._stop_serving()
        if self.forwarding is None:
            self.forwarding = Forwarding(iface, self.runtime.state_dir)
        try:
            self.forwarding.apply(exit_node, routes)
        except OSError as err:
            raise ConfigError(f"cannot set up forwarding for {iface}: {err}") from None
        if exit_node or routes:
            self.log.info("serving", exit_node=exit_node, routes=[str(r) for r in routes])

    def _stop_serving(self) -> None:
        assert self.forwarding is not None
        try:
            self.forwarding.remove()
        except OSError as err:
            self.log.error("cannot remove forwarding", interface=self.forwarding.iface, error=str(err))
        self.forwarding = None

    def _os_resolver(self, settings: DnsSettings) -> None:
        """resolv.conf at the controller's addresses, or back to what it was."""
        if not settings.set_os_resolver:
            self._restore_resolver()
            return
        if self.resolv is None:
            self.resolv = for_this_namespace(self.runtime.state_dir)
        first = not self.resolv.active
        try:
            self.resolver_problems = self.resolv.apply(settings.nameservers, [settings.domain, *settings.search])
        except OSError as err:
            raise ConfigError(f"cannot write {self.resolv.path}: {err}") from None
        if first and self.resolv.refused_backup:
            self.log.warning(
                "resolv.conf backup refused; the original is taken to have been absent",
                reason=self.resolv.refused_backup,
            )
        self.log.info(
            "resolver set",
            path=str(self.resolv.path),
            nameservers=settings.nameservers,
            problems=self.resolver_problems,
        )

    def _intercept(self, interfaces: tuple[str, ...]) -> None:
        """DNS coming in on these interfaces to the controller, or nowhere. The first call
        after a start also removes what a crashed router left (Interception.apply)."""
        if self.interception is None:
            self.interception = Interception(self.runtime.state_dir)
        changed = self.interception.applied != interfaces
        try:
            self.interception.apply(interfaces)
        except OSError as err:
            raise ConfigError(f"cannot intercept DNS on {', '.join(interfaces)}: {err}") from None
        if self.interception.missing:
            self.failures.append(f"dns.intercept: no interface {', '.join(self.interception.missing)}")
            self.log.warning("DNS not intercepted on missing interfaces", interfaces=self.interception.missing)
        if changed and interfaces:
            self.log.info("intercepting DNS", interfaces=list(interfaces))

    def _restore_resolver(self) -> None:
        if self.resolv is not None and self.resolv.active:
            self.resolv.restore()
            self.log.info("resolver restored", path=str(self.resolv.path))

    def _link_events(self) -> None:
        try:
            events = self.monitor.read_events()
        except OSError as err:  # the socket is broken; say so, do not spin on it
            self.log.error("link monitor failed", error=str(err))
            self.remove_reader(self.monitor.fileno())
            return
        for interface, change in dict.fromkeys((name, kind) for kind, name in events):
            self.publish(LinkChanged(interface=interface, change=change))
            self.links_published += 1

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
        return {
            "interface": self.router.ifname if self.router else "",
            "failures": self.failures,
            "resolv_conf": str(self.resolv.path) if self.resolv is not None and self.resolv.active else "",
            "counters": {"link_changes_published": self.links_published},
        }

    def close(self) -> None:
        self._restore_resolver()
        if self.interception is not None:
            self.interception.clear()
            self.interception.close()
        if self.forwarding is not None:
            self._stop_serving()
        if self.exit is not None:
            self.exit.clear()
            self.exit.close()
        self.monitor.close()
        if self.router is not None:
            self._remove_link()


def _servers(settings: Settings) -> list[str]:
    """The [coordination] servers given as addresses (a name's server is reached as routes say)."""
    out = []
    for url in settings.coordination.servers if settings.coordination else ():
        try:
            out.append(str(ipaddress.ip_address(url.split("://", 1)[1].rsplit(":", 1)[0].strip("[]"))))
        except ValueError:
            continue
    return out


def _routes(exit_node: str, peer: PeerSettings) -> tuple[str, ...]:
    """A peer's routes through the link: its allowed IPs. With an exit node in use its default route
    lives in a table of its own (_use_exit), never in main, where the node's marked underlay traffic
    would follow it into the tunnel."""
    return tuple(str(p) for p in peer.allowed_ips if not (exit_node and p.prefixlen == 0))

"""Using an exit node: the default route through the tunnel in a routing table
of our own, chosen by policy rules, as wg-quick does for 0.0.0.0/0:

    PRIORITY:     not fwmark EXIT_MARK lookup EXIT_TABLE
    PRIORITY - 1: lookup main suppress_prefixlength 0   (exit_node_allow_lan only)
    PRIORITY - 2: to SERVER lookup main                 (each [coordination] server's address)

The node's own underlay sockets carry EXIT_MARK (kernel.mark), so they skip the
table and leave by the underlay's routes; everything else takes the tunnel.
With allow_lan, main's routes other than its default (the underlay's connected
LANs among them) are looked up first and stay direct. The mesh's NATS servers stay
direct too: the coord actor (unprivileged, so its sockets carry no mark) must reach
them when the exit node is gone, to learn that it is.

Rules and routes carry our routing protocol number, so a restarted router finds
and removes what a crashed one left: ``apply`` always starts from a clean slate.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable
from typing import Final

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from meshsup.actors.router.netconf import MAIN_TABLE, RTPROT_MESHSUP, RouteRequests
from meshsup.actors.router.rules import DEFAULT_ROUTE, add_rule, remove_rules
from meshsup.actors.settings.node import EXIT_MARK, EXIT_TABLE

PRIORITY: Final = 5210  # ahead of main (32766); our two rules take this and the one before
_FIB_RULE_INVERT: Final = 0x2


class ExitRouting:
    def __init__(self) -> None:
        self._ipr = IPRoute()
        self._routes = RouteRequests()
        # (link index, families, allow_lan, bypass)
        self.applied: tuple[int, tuple[int, ...], bool, tuple[str, ...]] | None = None

    def apply(self, index: int, families: Iterable[int], allow_lan: bool, bypass: Iterable[str] = ()) -> None:
        """Route ``families`` (AF_INET, AF_INET6) by default through link ``index``,
        or nothing (no families); the addresses in ``bypass`` by main. Raises NetlinkError."""
        wanted = (index, tuple(sorted(families)), allow_lan, tuple(sorted(bypass)))
        if wanted == self.applied:
            return
        self.clear()
        for family in wanted[1]:
            for address in wanted[3]:
                if (":" in address) == (family == socket.AF_INET6):
                    add_rule(
                        self._ipr, family, MAIN_TABLE, PRIORITY - 2, dst=address, dst_len=128 if ":" in address else 32
                    )
            self._ipr.route(
                "add", dst=DEFAULT_ROUTE[family], oif=index, table=EXIT_TABLE, proto=RTPROT_MESHSUP, family=family
            )
            if allow_lan:
                add_rule(self._ipr, family, MAIN_TABLE, PRIORITY - 1, FRA_SUPPRESS_PREFIXLEN=0)
            add_rule(
                self._ipr, family, EXIT_TABLE, PRIORITY, fwmark=EXIT_MARK, fwmask=0xFFFFFFFF, flags=_FIB_RULE_INVERT
            )
        self.applied = wanted

    def clear(self) -> None:
        """Remove our rules and our routes in EXIT_TABLE (ours by protocol number), whoever added them."""
        for family in DEFAULT_ROUTE:
            remove_rules(self._ipr, family, (PRIORITY, PRIORITY - 1, PRIORITY - 2))
        # Read from our own dump: pyroute2's parses every route of every table, thousands with many peers.
        for prefix in self._routes.ours(None, EXIT_TABLE):
            family = socket.AF_INET6 if ":" in prefix else socket.AF_INET
            try:
                self._ipr.route("del", family=family, dst=DEFAULT_ROUTE[family], table=EXIT_TABLE)
            except NetlinkError:  # gone with its link meanwhile
                pass
        self.applied = None

    def close(self) -> None:
        self._ipr.close()
        self._routes.close()

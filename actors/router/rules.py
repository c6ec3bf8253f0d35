"""Policy routing rules of ours (exit node, DNS interception), told apart from everyone else's
by our routing protocol number: a restarted router finds and removes what a crashed one left."""

from __future__ import annotations

import socket
from collections.abc import Collection
from typing import Any, Final

from pyroute2 import IPRoute

from meshsup.actors.router.netconf import RTPROT_MESHSUP

DEFAULT_ROUTE: Final = {socket.AF_INET: "0.0.0.0/0", socket.AF_INET6: "::/0"}


def add_rule(ipr: IPRoute, family: int, table: int, priority: int, **match: Any) -> None:
    """``priority: <match> lookup table``, carrying our protocol number."""
    ipr.rule("add", family=family, table=table, priority=priority, protocol=RTPROT_MESHSUP, **match)


def remove_rules(ipr: IPRoute, family: int, priorities: Collection[int]) -> None:
    """Delete our rules at ``priorities``, whoever added them."""
    for rule in ipr.get_rules(family=family):
        priority = rule.get_attr("FRA_PRIORITY")
        if rule.get_attr("FRA_PROTOCOL") == RTPROT_MESHSUP and priority in priorities:
            ipr.rule("del", family=family, priority=priority)

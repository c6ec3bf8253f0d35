"""The host's own addresses a peer might reach the node's UDP port at: magicsock's local endpoints.

Read from rtnetlink on demand (one dump of links and addresses; magicsock
asks again when the router publishes a LinkChanged). An address counts if it
could carry a peer's datagrams: its interface is up and has a carrier, its
scope is global (so neither loopback nor link-local, which would need an
interface to be named), it is not tentative (DAD still running), failed DAD
or deprecated. The node's own tunnel is left out by name: an endpoint inside
the tunnel would route the tunnel through itself.

`source_address` is the address the kernel sends from to a given host: the
node's side of a datagram, as `meshsup capture --outer` shows it.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Collection
from typing import Final

from pyroute2 import IPRoute

from meshsup.actors.kernel.types import Endpoint

IFF_UP: Final = 0x1  # <linux/if.h>
IFF_LOOPBACK: Final = 0x8
IFF_RUNNING: Final = 0x40  # operationally up: carrier, or a link (dummy, TUN) that has no such thing
RT_SCOPE_UNIVERSE: Final = 0
IFA_F_DADFAILED: Final = 0x08  # <linux/if_addr.h>
IFA_F_DEPRECATED: Final = 0x20
IFA_F_TENTATIVE: Final = 0x40
_UNUSABLE: Final = IFA_F_DADFAILED | IFA_F_DEPRECATED | IFA_F_TENTATIVE


def local_endpoints(port: int, exclude: Collection[str] = (), netns: str | None = None) -> list[Endpoint]:
    """(address, port) for each usable address, IPv4 first, once each; `exclude` names interfaces to
    leave out (the node's tunnel). `netns` reads another namespace (this process stays where it is)."""
    with IPRoute(netns=netns, flags=0) if netns else IPRoute() as ipr:
        up = {
            link["index"]
            for link in ipr.get_links()
            if link["flags"] & (IFF_UP | IFF_RUNNING) == IFF_UP | IFF_RUNNING
            and not link["flags"] & IFF_LOOPBACK
            and link.get_attr("IFLA_IFNAME") not in exclude
        }
        found: dict[Endpoint, int] = {}
        for msg in ipr.get_addr():
            flags = msg.get_attr("IFA_FLAGS") or msg["flags"]  # the attribute holds all 32 bits
            if msg["index"] not in up or msg["scope"] != RT_SCOPE_UNIVERSE or flags & _UNUSABLE:
                continue
            # On point-to-point links IFA_ADDRESS may be the peer's.
            addr = ipaddress.ip_address(msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS"))
            if not (addr.is_loopback or addr.is_link_local or addr.is_multicast or addr.is_unspecified):
                found[(str(addr), port)] = addr.version
    return sorted(found, key=found.__getitem__)


def source_address(host: str) -> str:
    """The local address the kernel sends from to `host` (a route lookup: a UDP connect sends
    nothing); the unspecified address when no route reaches it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect((host, 9))  # any port: only the route matters
        except OSError:
            return "::" if family == socket.AF_INET6 else "0.0.0.0"
        return str(sock.getsockname()[0])

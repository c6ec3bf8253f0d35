"""Which of two direct paths to a peer is better, by Tailscale's betterAddr (wgengine/magicsock/endpoint.go).

Latency decides, in points: the faster path gets its percentage advantage
over the slower one (0 to 100). Then kinds of address earn a bonus, as long
as latencies are about equal: loopback 50, link-local 30, private 20 (less
likely to cost bandwidth than a public address), and IPv6 10 (more robust:
no NAT in the way). A path that wins by 1 point or less, with no bonus
against it, does not replace the current one: that stickiness keeps two
equivalent paths from flapping.
"""

from __future__ import annotations

import ipaddress
from typing import Final

from meshsup.actors.kernel.types import Endpoint

# Go's netip.Addr.IsPrivate (RFC 1918, RFC 4193), not Python's is_private, which also counts the
# documentation ranges (198.51.100.0/24, 203.0.113.0/24) and others as private.
_PRIVATE: Final = tuple(ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7"))
_STICKY_POINTS: Final = 1  # a latency advantage of 1% or less is no reason to move


def bonus(host: str) -> int:
    """The points an address earns for its kind, whatever its latency."""
    ip = ipaddress.ip_address(host)
    if ip.is_loopback:
        points = 50
    elif ip.is_link_local:
        points = 30
    elif any(ip in net for net in _PRIVATE):
        points = 20
    else:
        points = 0
    return points + (10 if ip.version == 6 else 0)


def better(a: Endpoint, a_latency: float, b: Endpoint, b_latency: float) -> bool:
    """Whether path `a` (its round trip in seconds) should replace the current path `b`."""
    if a == b:
        return False
    # Whole nanoseconds and integer division, as Go's time.Duration arithmetic rounds.
    a_ns, b_ns = round(a_latency * 1e9), round(b_latency * 1e9)
    a_points = b_points = 0
    if a_ns > b_ns and a_ns > 0:
        b_points = 100 - b_ns * 100 // a_ns
    elif b_ns > 0:
        a_points = 100 - a_ns * 100 // b_ns
    a_points += bonus(a[0])
    b_points += bonus(b[0])
    if a_points <= _STICKY_POINTS and b_points == 0:
        return False
    return a_points > b_points


def pingable(endpoint: Endpoint) -> bool:
    """An endpoint a peer's call-me-maybe may make us ping: a unicast address and a port. IPv6
    link-local ones are skipped, as Tailscale does: without an interface (zone) they lead nowhere."""
    ip = ipaddress.ip_address(endpoint[0])
    return endpoint[1] != 0 and not (ip.is_unspecified or ip.is_multicast or (ip.version == 6 and ip.is_link_local))


def canonical(endpoint: Endpoint) -> Endpoint:
    """The endpoint as the socket and disco name it ("2001:db8::1", an IPv4-mapped address as IPv4), so that a
    configured endpoint matches the source of what comes from it."""
    ip = ipaddress.ip_address(endpoint[0])
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return str(ip), endpoint[1]

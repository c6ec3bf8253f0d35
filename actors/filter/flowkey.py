"""A packet's flow key: protocol, source, destination and ports, cut from the headers in one go.

The key is bytes: protocol (1) + source + destination + source port (2) +
destination port (2), 13 bytes for IPv4 and 37 for IPv6, so that the
connection table answers a packet with one dict lookup. An IPv4 TCP or UDP
packet without options is one slice: the fields sit in that order. ICMP echo
carries its identifier in both port places, so that the reply's key is the
request's reversed; other protocols have no ports (zeros).
"""

from __future__ import annotations

from meshsup.actors.wire import ip

TCP, UDP, ICMP, ICMPV6 = 6, 17, 1, 58
ICMP_ECHO = frozenset({0, 8})  # reply, request
ICMPV6_ECHO = frozenset({128, 129})
ICMP_ERRORS = frozenset({3, 4, 5, 11, 12})  # quote the packet that caused them
ICMPV6_ERRORS = frozenset({1, 2, 3, 4})
FRAGMENT = b"fragment"  # a later fragment: no transport header to judge (the first one was judged)
_NO_PORTS = bytes(4)
_IPV6_EXTENSIONS = frozenset({0, 43, 44, 60})


def flow_key(p: bytes) -> bytes | None:
    """The packet's flow key, FRAGMENT, or None for a packet too short or not IP."""
    n = len(p)
    if n >= 24 and p[0] == 0x45:  # the bulk of traffic: IPv4 without options, TCP or UDP, unfragmented
        proto = p[9]
        if (proto == TCP or proto == UDP) and not (p[6] & 0x1F or p[7]):
            return p[9:10] + p[12:24]  # the fields are in key order already
    if not n:
        return None
    version = p[0] >> 4
    if version == 4:
        t = (p[0] & 15) * 4
        if t < 20 or n < t:
            return None
        if (p[6] & 0x1F) or p[7]:
            return FRAGMENT
        proto = p[9]
        addresses = 12, 20
    elif version == 6 and n >= 40:
        proto, t = p[6], 40
        addresses = 8, 40
        if proto in _IPV6_EXTENSIONS:
            return _ipv6_extended(p)
    else:
        return None
    if proto == TCP or proto == UDP:
        if n < t + 4:
            return None
        return bytes((proto,)) + p[addresses[0] : addresses[1]] + p[t : t + 4]
    head = bytes((proto,)) + p[addresses[0] : addresses[1]]
    if (proto == ICMP and version == 4) or (proto == ICMPV6 and version == 6):
        if n < t + 8:
            return None
        if p[t] in (ICMP_ECHO if proto == ICMP else ICMPV6_ECHO):
            ident = p[t + 4 : t + 6]
            return head + ident + ident
    return head + _NO_PORTS


def _ipv6_extended(p: bytes) -> bytes | None:
    """IPv6 with extension headers (rare): the slow, general walk of wire.ip."""
    proto = ip.protocol(p)
    if proto is None:
        return None
    ports = ip.ports(p)
    if ports is None and proto in (TCP, UDP):
        return FRAGMENT
    tail = _NO_PORTS if ports is None else ports[0].to_bytes(2, "big") + ports[1].to_bytes(2, "big")
    return bytes((proto,)) + p[8:40] + tail


def reverse(key: bytes) -> bytes:
    """The key of the packets that answer this one."""
    a = (len(key) - 5) // 2
    return key[:1] + key[1 + a : 1 + 2 * a] + key[1 : 1 + a] + key[3 + 2 * a :] + key[1 + 2 * a : 3 + 2 * a]


def quoted_key(p: bytes) -> bytes | None:
    """For an ICMP error, the key of the packet it quotes (None for anything else): the error
    belongs to that packet's flow, as a port unreachable belongs to the UDP flow it answers."""
    version = p[0] >> 4 if len(p) else 0
    if version == 4:
        t = (p[0] & 15) * 4
        errors, proto = ICMP_ERRORS, ICMP
    else:
        t, errors, proto = 40, ICMPV6_ERRORS, ICMPV6
    if len(p) < t + 8 + 20 or p[9 if version == 4 else 6] != proto or p[t] not in errors:
        return None
    quoted = flow_key(p[t + 8 :])
    return None if quoted is FRAGMENT else quoted

"""Whether an address is in any of many networks (netlog's mesh and subnets, the clients DNS answers).

By version, then prefix length: the networks as integers shifted down to that length, so a check
costs one set lookup per length in use, not one test per network (a mesh has a /32 a peer), and a
network comes or goes alone. Counted, as two peers may route the same network and one of them going
leaves it in.
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from collections.abc import Iterable

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class Prefixes:
    def __init__(self, networks: Iterable[IPNetwork] = ()) -> None:
        self._by_shift: dict[int, dict[int, Counter[int]]] = {4: {}, 6: {}}
        for network in networks:
            self.add(network)

    def add(self, network: IPNetwork) -> None:
        shift = network.max_prefixlen - network.prefixlen
        self._by_shift[network.version].setdefault(shift, Counter())[int(network.network_address) >> shift] += 1

    def remove(self, network: IPNetwork) -> None:
        """One of `network` out; nothing if it is not in."""
        shift = network.max_prefixlen - network.prefixlen
        shifts = self._by_shift[network.version]
        counts = shifts.get(shift)
        key = int(network.network_address) >> shift
        if counts is None or key not in counts:
            return
        counts[key] -= 1
        if not counts[key]:
            del counts[key]
            if not counts:
                del shifts[shift]

    def __contains__(self, address: IPAddress) -> bool:
        number = int(address)
        return any(number >> shift in counts for shift, counts in self._by_shift[address.version].items())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Prefixes) and self._by_shift == other._by_shift

    __hash__ = None  # type: ignore[assignment]  # mutable

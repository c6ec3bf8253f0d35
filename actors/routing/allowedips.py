"""Cryptokey routing table: longest-prefix match from IP address to peer.

One dict per (IP version, prefix length), keyed by the address shifted down
to its prefix; a lookup probes the lengths in use from longest to shortest.
A prefix belongs to at most one peer: inserting it for another peer moves it,
as in wireguard-go.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Hashable

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
_BITS = {4: 32, 16: 128}


class AllowedIPs:
    def __init__(self) -> None:
        # address length in bytes -> {prefix length: {address >> (bits - length): peer}}
        self._tables: dict[int, dict[int, dict[int, Hashable]]] = {4: {}, 16: {}}
        # address length in bytes -> [(shift, table)] ordered longest prefix first
        self._probes: dict[int, list[tuple[int, dict[int, Hashable]]]] = {4: [], 16: []}
        self._by_peer: dict[Hashable, set[Network]] = {}

    @staticmethod
    def _slot(network: Network) -> tuple[int, int, int]:
        size = 4 if network.version == 4 else 16
        shift = _BITS[size] - network.prefixlen
        return size, network.prefixlen, int(network.network_address) >> shift

    def _reindex(self, size: int) -> None:
        bits = _BITS[size]
        tables = self._tables[size]
        for length in [length for length, table in tables.items() if not table]:
            del tables[length]
        self._probes[size] = [(bits - length, tables[length]) for length in sorted(tables, reverse=True)]

    def insert(self, network: Network | str, peer: Hashable) -> None:
        """Route ``network`` (host bits are masked off) to ``peer``."""
        network = _network(network)
        size, length, key = self._slot(network)
        table = self._tables[size].setdefault(length, {})
        previous = table.get(key)
        if previous is not None:
            self._by_peer[previous].discard(network)
        table[key] = peer
        self._by_peer.setdefault(peer, set()).add(network)
        self._reindex(size)

    def remove(self, network: Network | str, peer: Hashable) -> None:
        """Remove ``network`` if (and only if) it belongs to ``peer``."""
        network = _network(network)
        size, length, key = self._slot(network)
        table = self._tables[size].get(length)
        if table is None or table.get(key) != peer:
            return
        del table[key]
        self._by_peer[peer].discard(network)
        self._reindex(size)

    def remove_peer(self, peer: Hashable) -> None:
        for network in list(self._by_peer.pop(peer, ())):
            size, length, key = self._slot(network)
            del self._tables[size][length][key]
        self._reindex(4)
        self._reindex(16)

    def get(self, network: Network | str) -> Hashable | None:
        """The peer that exact prefix ``network`` is routed to, None if the table lacks it."""
        size, length, key = self._slot(_network(network))
        return self._tables[size].get(length, {}).get(key)

    def networks(self, peer: Hashable) -> list[Network]:
        """The prefixes routed to ``peer`` (for status and `wg show allowed-ips`)."""
        return sorted(self._by_peer.get(peer, ()), key=lambda n: (n.version, n))

    def lookup(self, address: bytes) -> Hashable | None:
        """The peer owning the longest prefix containing ``address`` (4 or 16 raw bytes)."""
        probes = self._probes.get(len(address))
        if not probes:
            return None
        value = int.from_bytes(address, "big")
        for shift, table in probes:
            peer = table.get(value >> shift)
            if peer is not None:
                return peer
        return None


def _network(network: Network | str) -> Network:
    """A network as given (the settings' are parsed and masked: thousands of peers' are not made
    again), else parsed with its host bits masked off."""
    if isinstance(network, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
        return network
    return ipaddress.ip_network(network, strict=False)

"""What the node's settings say about its traffic: which addresses are the mesh, which are
subnets behind peers, which endpoint (or relayed key) is which peer."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from meshsup.actors.netlog.counting import CountsReader
from meshsup.actors.netlog.flows import Classifier, format_endpoint
from meshsup.actors.settings import PeerSettings, Settings
from meshsup.actors.settings.node import IPNetwork


def classifier(settings: Settings, anonymize_exit: bool) -> Classifier:
    """Mesh: the node's own networks and the peers' single addresses (as DNS names them).
    Subnets: the peers' other routes, but default routes, which make a peer an exit node; and the
    networks this node routes for its peers (advertise_routes). What a peer sends elsewhere through
    this node, an exit node, is exit traffic.
    Skipped: the node's DNS listeners."""
    mesh: list[IPNetwork] = [a.network for a in settings.node.addresses]
    subnets: list[IPNetwork] = list(settings.node.advertise_routes)
    for peer in settings.peers:
        peer_mesh, peer_subnets = peer_networks(peer)
        mesh += peer_mesh
        subnets += peer_subnets
    return Classifier(mesh, subnets, (), anonymize_exit, service_endpoints=list(settings.dns.listen))


def peer_networks(peer: PeerSettings) -> tuple[list[IPNetwork], list[IPNetwork]]:
    """A peer's part of the classifier: its mesh addresses and its subnets."""
    mesh = [net for net in peer.allowed_ips if net.prefixlen == net.max_prefixlen]
    subnets = [net for net in peer.allowed_ips if 0 < net.prefixlen < net.max_prefixlen]
    return mesh, subnets


class Endpoints:
    """Each configured endpoint ("host:port") -> its peer's mesh address as "ip:0", kept peer by
    peer. Two peers may name one endpoint (a stale entry, two peers behind one NAT mapping): the
    lower address is reported whatever the order they came in, and removing either leaves the
    other's."""

    def __init__(self, peers: Iterable[PeerSettings] = ()) -> None:
        self.by_endpoint: dict[str, str] = {}
        self._owners: dict[str, tuple[tuple[bytes, str], ...]] = {}  # endpoint -> (key, address) of each peer
        for peer in peers:
            self.add(peer)

    def add(self, peer: PeerSettings) -> None:
        for endpoint, address in peer_endpoints(peer).items():
            owners = tuple(o for o in self._owners.get(endpoint, ()) if o[0] != peer.public_key)
            self._set(endpoint, (*owners, (peer.public_key, address)))

    def remove(self, peer: PeerSettings) -> None:
        for endpoint in peer_endpoints(peer):
            self._set(endpoint, tuple(o for o in self._owners.get(endpoint, ()) if o[0] != peer.public_key))

    def _set(self, endpoint: str, owners: tuple[tuple[bytes, str], ...]) -> None:
        if owners:
            self._owners[endpoint] = owners
            self.by_endpoint[endpoint] = min(address for _, address in owners)
        else:
            self._owners.pop(endpoint, None)
            self.by_endpoint.pop(endpoint, None)


def endpoint_peers(settings: Settings) -> dict[str, str]:
    """Each configured endpoint -> its peer's mesh address (``Endpoints``), built from all the peers."""
    return Endpoints(settings.peers).by_endpoint


def peer_endpoints(peer: PeerSettings) -> dict[str, str]:
    """A peer's part of endpoint_peers."""
    address = peer_address(peer)
    if address is None:
        return {}
    return {format_endpoint(ipaddress.ip_address(host), port): address for host, port in peer.endpoints}


def key_peers(settings: Settings) -> dict[bytes, str]:
    """Each peer's public key -> its mesh address as "ip:0": whose traffic a relay carried."""
    return {p.public_key: address for p in settings.peers if (address := peer_address(p)) is not None}


def peer_address(peer: PeerSettings) -> str | None:
    hosts = sorted((net.network_address for net in peer.hosts), key=lambda a: a.version)
    return format_endpoint(hosts[0], 0) if hosts else None


def change_peers(
    reader: CountsReader,
    endpoints: Endpoints,
    rules: Classifier,
    gone: list[PeerSettings],
    changed: list[PeerSettings],
) -> None:
    """The `gone` peers (as they were) out of the endpoints, the reader's keys and the rules,
    the `changed` ones (as they are now) in: what building them from all the peers anew would give,
    at the cost of these peers alone. The rules change in place: what they routed is forgotten."""
    for old in gone:
        endpoints.remove(old)
        reader.key_peers.pop(old.public_key, None)
        rules.remove(*peer_networks(old))
    for peer in changed:
        endpoints.add(peer)
        if (address := peer_address(peer)) is not None:
            reader.key_peers[peer.public_key] = address
        rules.add(*peer_networks(peer))
    reader.forget_routes()

"""What the node's settings say about its traffic: which addresses are the mesh, which are
subnets behind peers, which endpoint (or relayed key) is which peer."""

from __future__ import annotations

import ipaddress

from meshsup.actors.netlog.flows import Classifier, format_endpoint
from meshsup.actors.settings import PeerSettings, Settings


def classifier(settings: Settings, anonymize_exit: bool) -> Classifier:
    """Mesh: the node's own networks and the peers' single addresses (as DNS names them).
    Subnets: the peers' other routes, but default routes, which make a peer an exit node; and the
    networks this node routes for its peers (advertise_routes). What a peer sends elsewhere through
    this node, an exit node, is exit traffic.
    Skipped: the node's DNS listeners."""
    mesh = [str(a.network) for a in settings.node.addresses]
    subnets = [str(net) for net in settings.node.advertise_routes]
    for peer in settings.peers:
        for net in peer.allowed_ips:
            if net.prefixlen == net.max_prefixlen:
                mesh.append(str(net))
            elif net.prefixlen:
                subnets.append(str(net))
    return Classifier(mesh, subnets, (), anonymize_exit, service_endpoints=list(settings.dns.listen))


def endpoint_peers(settings: Settings) -> dict[str, str]:
    """Each configured endpoint ("host:port") -> its peer's mesh address as "ip:0", IPv4 first."""
    out = {}
    for peer in settings.peers:
        address = _address(peer)
        if address is None:
            continue
        for host, port in peer.endpoints:
            out[format_endpoint(ipaddress.ip_address(host), port)] = address
    return out


def key_peers(settings: Settings) -> dict[bytes, str]:
    """Each peer's public key -> its mesh address as "ip:0": whose traffic a relay carried."""
    return {p.public_key: address for p in settings.peers if (address := _address(p)) is not None}


def _address(peer: PeerSettings) -> str | None:
    hosts = sorted((net.network_address for net in peer.hosts), key=lambda a: a.version)
    return format_endpoint(hosts[0], 0) if hosts else None

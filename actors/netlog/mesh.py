"""What the node's settings say about its traffic: which addresses are the mesh, which are
subnets behind peers, which endpoint is which peer."""

from __future__ import annotations

import ipaddress

from meshsup.actors.netlog.flows import Classifier, format_endpoint
from meshsup.actors.settings import Settings


def classifier(settings: Settings, anonymize_exit: bool) -> Classifier:
    """Mesh: the node's own networks and the peers' single addresses (as DNS names them).
    Subnets: the peers' other routes, but default routes, which make a peer an exit node.
    Skipped: the node's DNS listeners."""
    mesh = [str(a.network) for a in settings.node.addresses]
    subnets = []
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
        hosts = sorted((net.network_address for net in peer.hosts), key=lambda a: a.version)
        if not hosts:
            continue
        for host, port in peer.endpoints:
            out[format_endpoint(ipaddress.ip_address(host), port)] = format_endpoint(hosts[0], 0)
    return out

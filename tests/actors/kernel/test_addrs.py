"""The host's usable addresses, read from a namespace where every kind of address that must not count
sits beside the two that must."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from meshsup.actors.kernel.addrs import local_endpoints
from tests.nodes import Netns

PORT = 41641


@pytest.mark.netns
def test_local_endpoints_are_global_addresses_on_links_that_are_up(netns: Callable[..., Netns]) -> None:
    ns = netns("addr")
    run = ns.run

    def link(name: str, up: bool = True, carrier: bool = True) -> None:
        """A veth (no dummy module here): its peer, up or not, is its carrier."""
        run("ip", "link", "add", name, "type", "veth", "peer", "name", name + "p")
        for end, on in ((name, up), (name + "p", carrier)):
            if on:
                run("ip", "link", "set", end, "up")

    link("up0")
    run("ip", "addr", "add", "198.51.100.10/24", "dev", "up0")
    run("ip", "addr", "add", "2001:db8::10/64", "dev", "up0", "nodad")
    run("ip", "addr", "add", "198.51.100.70/26", "dev", "up0", "scope", "link")  # not global
    run("ip", "addr", "add", "169.254.7.7/16", "dev", "up0")  # link-local by its address, though global in scope
    run("ip", "addr", "add", "2001:db8::20/64", "dev", "up0", "nodad", "preferred_lft", "0")  # deprecated
    run("ip", "addr", "add", "203.0.113.50/32", "dev", "lo")  # on loopback
    link("down0", up=False)
    run("ip", "addr", "add", "198.51.100.12/24", "dev", "down0")
    link("nocarr0", carrier=False)
    run("ip", "addr", "add", "198.51.100.13/24", "dev", "nocarr0")
    link("tun9")  # stands in for the node's tunnel
    run("ip", "addr", "add", "100.64.0.1/32", "dev", "tun9")
    run("ip", "addr", "add", "fd7a:115c:a1e0::1/128", "dev", "tun9", "nodad")

    wanted = [("198.51.100.10", PORT), ("2001:db8::10", PORT)]
    assert local_endpoints(PORT, exclude={"tun9"}, netns=ns.name) == wanted
    # The tunnel's addresses would be there but for `exclude`; the other links' never are.
    assert local_endpoints(PORT, netns=ns.name) == [
        ("198.51.100.10", PORT),
        ("100.64.0.1", PORT),
        ("2001:db8::10", PORT),
        ("fd7a:115c:a1e0::1", PORT),
    ]
    run("ip", "link", "set", "nocarr0p", "up")  # the veth gets its carrier: its address counts now
    assert ("198.51.100.13", PORT) in local_endpoints(PORT, exclude={"tun9"}, netns=ns.name)

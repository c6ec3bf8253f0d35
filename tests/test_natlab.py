"""The NAT lab's faults, checked with plain UDP sockets made inside its namespaces: how each kind of
NAT maps, a blackhole that drops both ways and only between two addresses, mappings forgotten on
flush, a host renumbered in its LAN."""

from __future__ import annotations

import json
import select
import socket
import time
from collections.abc import Callable, Iterator

import pytest
from pyroute2.netns import create_socket

from tests.nodes import is_root
from tests.topology import NatLab, Netns, Underlay, have

TOOLS = ("nft", "conntrack")
pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(not is_root() or bool(have(*TOOLS)), reason=have(*TOOLS) or "needs root"),
]
PORT = 4000


Udp = Callable[..., socket.socket]


@pytest.fixture
def lab(underlay: Underlay) -> NatLab:
    return NatLab(underlay)


@pytest.fixture
def udp() -> Iterator[Udp]:
    """udp(ns, port=0): a UDP socket living in `ns`, bound to `port` on every address; closed at the end."""
    made: list[socket.socket] = []

    def make(ns: Netns, port: int = 0) -> socket.socket:
        s = create_socket(ns.name, socket.AF_INET, socket.SOCK_DGRAM, flags=0)
        made.append(s)
        s.bind(("0.0.0.0", port))
        s.settimeout(5)
        return s

    yield make
    for s in made:
        s.close()


def heard(s: socket.socket, data: bytes) -> tuple[str, int]:
    """Where `data` came from, waiting for it (datagrams before it are skipped)."""
    while True:
        got, source = s.recvfrom(2048)
        if got == data:
            return source


def nothing_waiting(s: socket.socket) -> bool:
    return not select.select([s], [], [], 0)[0]


def wait_until(check: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


@pytest.mark.parametrize("nat", ["masquerade", "random"])
def test_masquerade_maps_one_port_for_all_and_random_a_port_per_destination(lab: NatLab, udp: Udp, nat: str) -> None:
    (p1, addr1), (p2, addr2) = lab.public(), lab.public()
    servers = [udp(p1, PORT), udp(p1, PORT + 1), udp(p2, PORT)]
    host, _, public = lab.home(nat=nat)  # type: ignore[arg-type]
    client = udp(host)
    for dest in ((addr1, PORT), (addr1, PORT + 1), (addr2, PORT)):
        client.sendto(b"probe", dest)
    seen = [heard(s, b"probe") for s in servers]
    assert {addr for addr, _ in seen} == {public}
    ports = {port for _, port in seen}
    if nat == "masquerade":
        assert ports == {client.getsockname()[1]}  # kept, and the same to every destination
    else:
        assert len(ports) > 1  # three draws: all alike by chance about once in 10^9


def test_blackhole_drops_both_ways_between_the_home_and_one_address(lab: NatLab, udp: Udp) -> None:
    (p1, addr1), (p2, addr2) = lab.public(), lab.public()
    far, near = udp(p1, PORT), udp(p2, PORT)
    host, _, _ = lab.home()
    client = udp(host)
    client.sendto(b"hello", (addr1, PORT))
    mapped = heard(far, b"hello")
    far.sendto(b"reply", mapped)
    assert heard(client, b"reply") == (addr1, PORT)  # the path works both ways

    lab.blackhole(host, addr1)
    client.sendto(b"out", (addr1, PORT))
    far.sendto(b"in", mapped)
    wait_until(lambda: lab.blackholed(host, addr1) == (1, 1))  # each met the drop rule...
    assert nothing_waiting(far) and nothing_waiting(client)  # ...and neither got through
    client.sendto(b"beside", (addr2, PORT))  # another address is unaffected
    mapped2 = heard(near, b"beside")
    near.sendto(b"back", mapped2)
    assert heard(client, b"back") == (addr2, PORT)
    assert lab.blackholed(host, addr1) == (1, 1)

    lab.unblackhole(host, addr1)
    client.sendto(b"again", (addr1, PORT))
    assert heard(far, b"again") == mapped
    far.sendto(b"again", mapped)
    assert heard(client, b"again") == (addr1, PORT)


def test_flush_nat_forgets_the_mappings(lab: NatLab, udp: Udp) -> None:
    p1, addr1 = lab.public()
    far, other = udp(p1, PORT), udp(p1, PORT + 1)
    host, _, public = lab.home()
    client = udp(host)
    client.sendto(b"hello", (addr1, PORT))
    far.connect(heard(far, b"hello"))
    far.send(b"through")
    assert heard(client, b"through") == (addr1, PORT)

    lab.flush_nat(host)
    far.send(b"lost")
    with pytest.raises(TimeoutError):  # nothing maps the port now: the router drops it, as anything unasked
        far.recv(2048)
    assert nothing_waiting(client)
    client.sendto(b"anew", (addr1, PORT + 1))  # going out makes a mapping again
    assert heard(other, b"anew")[0] == public


def test_renumber_moves_the_host_to_another_address_of_its_lan(lab: NatLab, udp: Udp) -> None:
    p1, addr1 = lab.public()
    far = udp(p1, PORT)
    host, old, public = lab.home()
    client = udp(host)
    client.sendto(b"before", (addr1, PORT))
    heard(far, b"before")

    new = lab.renumber(host)
    assert new != old and new.rsplit(".", 1)[0] == old.rsplit(".", 1)[0] and lab.home_of(host).addr == new
    (eth0,) = json.loads(host.run("ip", "-j", "-4", "addr", "show", "dev", "eth0").stdout)
    assert [a["local"] for a in eth0["addr_info"]] == [new]
    client.sendto(b"after", (addr1, PORT))  # the same socket, now from the new address
    assert heard(far, b"after")[0] == public
    flows = lab.home_of(host).router.run("conntrack", "-L", "-p", "udp", "--orig-src", new).stdout
    assert f"dst={addr1}" in flows

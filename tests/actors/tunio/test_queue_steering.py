"""tun-io's queue steering: the maps follow its routes, a configuration by what differs, a
change of peers by the changed peers' prefixes alone, at once. Checked by what the attached
program returns (BPF_PROG_TEST_RUN) for a packet to each destination."""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import ipaddress
import os
import secrets
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from meshsup.actors.bus.endpoints import Runtime
from meshsup.actors.routing.shard import owner
from meshsup.actors.settings import PeerSettings, Settings, parse
from meshsup.actors.settings.keys import b64, generate_private, public_of
from meshsup.actors.tunio import actor as tunio
from meshsup.actors.tunio.actor import UNMATCHED_WORKER, TunIoActor
from meshsup.bpf.syscall import run_on_packet
from tests.bpf.test_steering import ipv4_udp, ipv6_udp
from tests.nodes import Netns

pytestmark = [pytest.mark.netns, pytest.mark.skipif(os.geteuid() != 0, reason="needs root for bpf() and TUN")]

WORKERS = 4
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def in_namespace(ns: Netns, fn: Callable[[], None]) -> None:
    """Run fn on a thread of its own that entered ``ns`` (setns moves the calling thread alone):
    the TUN tun-io opens is made there, and this process stays where it is."""

    def entered() -> None:
        fd = os.open(f"/run/netns/{ns.name}", os.O_RDONLY | os.O_CLOEXEC)
        try:
            if _libc.setns(fd, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns")
        finally:
            os.close(fd)
        fn()

    with ThreadPoolExecutor(max_workers=1) as pool:
        pool.submit(entered).result()


def peer_keys() -> dict[int, str]:
    """A public key owned by each worker."""
    keys: dict[int, str] = {}
    while len(keys) < WORKERS:
        public = public_of(generate_private())
        keys.setdefault(owner(public, WORKERS), b64(public))
    return keys


def node_settings(tmp_path: Path, peers: dict[str, tuple[str, list[str]]]) -> Settings:
    """name -> (public key, allowed IPs), in order: where two list one prefix, the later owns it."""
    doc = {
        "node": {"name": "alpha", "interface": "mst" + secrets.token_hex(4), "addresses": ["100.64.0.1/32"]},
        "actors": {"crypto": WORKERS},
        "peers": [{"name": n, "public_key": k, "allowed_ips": ips} for n, (k, ips) in peers.items()],
    }
    return parse("node.toml", doc, tmp_path, tmp_path)


@pytest.fixture
def actor(tmp_path: Path) -> Iterator[TunIoActor]:
    runtime = Runtime(tmp_path / "state")
    runtime.create()
    a = TunIoActor("tun-io", runtime)
    try:
        yield a
    finally:
        a.close()
        a.inbox.close()
        a.ctx.destroy(linger=0)


DESTINATIONS = ["10.7.1.5", "10.7.2.5", "10.7.3.5", "10.8.0.1", "fd07:1::5", "fd07:2::5"]


def steered(a: TunIoActor) -> dict[str, int]:
    """Where the attached program sends a packet to each destination."""
    assert a.steering is not None
    return {d: run_on_packet(a.steering.program, ipv6_udp(d) if ":" in d else ipv4_udp(d)) for d in DESTINATIONS}


def routed(a: TunIoActor) -> dict[str, int]:
    """Where tun-io's own routes send it (the unmatched worker where they have none)."""
    found = {d: a.table.routes.lookup(ipaddress.ip_address(d).packed) for d in DESTINATIONS}
    return {d: UNMATCHED_WORKER if w is None else w for d, w in found.items()}  # type: ignore[misc]


def with_ips(p: PeerSettings, *ips: str) -> PeerSettings:
    return dataclasses.replace(p, allowed_ips=tuple(ipaddress.ip_network(i) for i in ips))


def test_a_one_peer_change_moves_its_prefixes_alone(
    actor: TunIoActor, tmp_path: Path, netns: Callable[..., Netns]
) -> None:
    k = peer_keys()
    settings = node_settings(
        tmp_path,
        {
            "a": (k[1], ["10.7.1.0/24", "fd07:1::/64"]),
            "b": (k[2], ["10.7.2.0/24"]),
            "c": (k[3], ["10.7.0.0/16", "fd07::/16"]),
        },
    )
    in_namespace(netns(), lambda: actor.configure(settings))
    assert actor.status()["counters"]["steering"] == 1
    expected = {"10.7.1.5": 1, "10.7.2.5": 2, "10.7.3.5": 3, "10.8.0.1": 0, "fd07:1::5": 1, "fd07:2::5": 3}
    assert steered(actor) == routed(actor) == expected
    assert actor.counters["steering_writes"] == 5

    a, b, c = settings.peers
    # b takes a's /24 (listed by both, the later wins): that one entry is written, nothing else.
    b = with_ips(b, "10.7.2.0/24", "10.7.1.0/24")
    actor.change_peers(settings, [b], [])
    assert steered(actor) == routed(actor) == {**expected, "10.7.1.5": 2}
    assert actor.counters["steering_writes"] == 6

    # b leaves: its prefixes go (a's claim on the /24 went to b, as in wireguard-go), and c's /16
    # holds their destinations; tun-io's own routes say the same.
    settings = dataclasses.replace(settings, peers=(a, c))
    actor.change_peers(settings, [], [b.public_key])
    assert steered(actor) == routed(actor) == {**expected, "10.7.1.5": 3, "10.7.2.5": 3}
    assert actor.counters["steering_writes"] == 8

    # A whole configuration writes what differs: a's /64 moves to c, c's /16 goes, and a's /24,
    # listed by a alone now, is a's again.
    c = with_ips(c, "fd07::/16", "fd07:1::/64")
    actor.configure(dataclasses.replace(settings, peers=(a, c)))
    assert steered(actor) == routed(actor) == {**expected, "10.7.2.5": 0, "10.7.3.5": 0, "fd07:1::5": 3}
    assert actor.counters["steering_writes"] == 11
    assert actor.steering is not None
    assert set(map(str, actor.steering.held)) == {"10.7.1.0/24", "fd07::/16", "fd07:1::/64"}


def test_without_steering_tun_io_routes_and_says_so_once(
    actor: TunIoActor,
    tmp_path: Path,
    netns: Callable[..., Netns],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def refused(tun_fd: int, default: int) -> None:
        raise OSError(errno.EPERM, "bpf(BPF_MAP_CREATE 'meshsup_dst4'): Operation not permitted")

    monkeypatch.setattr(tunio, "QueueSteering", refused)
    warnings: list[str] = []
    monkeypatch.setattr(actor.log, "warning", lambda event, **_: warnings.append(event))
    k = peer_keys()
    settings = node_settings(tmp_path, {"a": (k[1], ["10.7.1.0/24"])})
    in_namespace(netns(), lambda: actor.configure(settings))
    other_tun = dataclasses.replace(settings.node, interface="mst" + secrets.token_hex(4))
    in_namespace(netns(), lambda: actor.configure(dataclasses.replace(settings, node=other_tun)))
    (a,) = settings.peers
    actor.change_peers(settings, [with_ips(a, "10.7.2.0/24")], [])
    assert actor.steering is None and actor.status()["counters"]["steering"] == 0
    assert routed(actor)["10.7.2.5"] == 1
    assert warnings.count("no eBPF queue steering: outgoing packets go through tun-io") == 1  # for two TUNs

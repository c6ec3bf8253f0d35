"""Link addresses and routes (real, in a throwaway namespace), FakeRouter,
the link monitor, and resolv.conf takeover."""

from __future__ import annotations

import ipaddress
import json
import os
import random
import secrets
import select
import shutil
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshsup.actors.router.netconf import (
    RTPROT_MESHSUP,
    FakeRouter,
    LinkEventParser,
    LinkMonitor,
    LinuxRouter,
    plan,
)
from meshsup.actors.router.resolvconf import BACKUP_SUFFIX, HEADER, ResolvConf

# --- planning and the fake ---------------------------------------------------------


def test_plan_adds_missing_removes_only_owned_and_reports_rejects() -> None:
    present = {"10.0.0.0/24", "10.1.0.0/16", "10.9.0.0/16"}
    owned = {"10.0.0.0/24", "10.1.0.0/16"}  # 10.9/16 belongs to someone else
    wanted = ["10.0.0.5/24", "fd00::1/64", "bogus", 7]
    changes = plan(present, owned, wanted, lambda s: str(ipaddress.ip_network(s, strict=False)))
    assert changes.added == ["fd00::/64"]
    assert changes.removed == ["10.1.0.0/16"]
    assert changes.rejected == ["'bogus'", "7"]


def test_fake_router_records_and_diffs() -> None:
    router = FakeRouter("tun9")
    router.configure(["100.64.0.1/32"])
    first = router.set_routes(["10.0.0.0/24", "fd00:1::/64"])
    again = router.set_routes(["10.0.0.0/24", "fd00:1::/64"])
    changed = router.set_routes(["10.0.0.0/24"])
    assert (first.added, again.added, again.removed) == (["10.0.0.0/24", "fd00:1::/64"], [], [])
    assert changed.removed == ["fd00:1::/64"]
    assert (router.mtu, router.is_up, router.addresses) == (1420, True, {"100.64.0.1/32"})
    assert router.teardown().removed == ["10.0.0.0/24", "100.64.0.1/32"]
    assert router.routes == set() and router.addresses == set()
    assert [name for name, _ in router.calls] == ["configure", "set_routes", "set_routes", "set_routes", "teardown"]


def test_fake_router_rejects_bad_mtu() -> None:
    assert FakeRouter().configure([], mtu=100).rejected == ["mtu 100"]


# --- link event parsing ------------------------------------------------------------


def _nlmsg(mtype: int, body: bytes) -> bytes:
    msg = struct.pack("=IHHII", 16 + len(body), mtype, 0, 0, 0) + body
    return msg + b"\0" * (-len(msg) % 4)


def _link(mtype: int, index: int, name: str) -> bytes:
    raw = name.encode() + b"\0"
    attr = struct.pack("=HH", 4 + len(raw), 3) + raw
    return _nlmsg(mtype, struct.pack("=BxHiII", 0, 0, index, 1, 0) + attr + b"\0" * (-len(attr) % 4))


def test_link_event_parser() -> None:
    parser = LinkEventParser()
    addr_v6 = _nlmsg(20, struct.pack("=BBBBI", 10, 64, 0, 0, 7))
    stream = _link(16, 7, "tun7") + addr_v6 + _link(17, 7, "tun7") + _nlmsg(21, struct.pack("=BBBBI", 2, 24, 0, 0, 9))
    assert parser.feed(stream) == [
        ("link", "tun7"),
        ("addr-added", "tun7"),  # name learnt from the link message
        ("link-removed", "tun7"),
        ("addr-removed", "9"),  # never-seen index: the number stands in
    ]
    assert parser.feed(stream[:20]) == []  # truncated: skipped, no exception
    assert parser.feed(b"\xff" * 40) == []


def _route(mtype: int, dst_len: int, protocol: int, oif: int | None) -> bytes:
    attrs = struct.pack("=HHI", 8, 4, oif) if oif is not None else b""
    return _nlmsg(mtype, struct.pack("=BBBBBBBBI", 2, dst_len, 0, 0, 254, protocol, 0, 1, 0) + attrs)


def test_link_event_parser_reports_default_routes_but_ours() -> None:
    parser = LinkEventParser()
    stream = (
        _link(16, 3, "eth0")
        + _route(24, 0, 3, 3)  # default via eth0 (boot)
        + _route(24, 24, 3, 3)  # a subnet: not the way out
        + _route(24, 0, RTPROT_MESHSUP, 9)  # a peer's 0.0.0.0/0 on our tunnel
        + _route(25, 0, 16, None)  # a multipath default (dhcp) goes
        + _route(25, 0, 3, 3)
    )
    assert parser.feed(stream) == [
        ("link", "eth0"),
        ("default-route-added", "eth0"),
        ("default-route-removed", ""),
        ("default-route-removed", "eth0"),
    ]


# --- resolv.conf ---------------------------------------------------------------------


def test_resolvconf_replaces_and_restores_a_file(tmp_path: Path) -> None:
    path = tmp_path / "resolv.conf"
    path.write_text("nameserver 198.51.100.53\n")
    rc = ResolvConf(path)
    assert rc.apply(["100.64.0.53", "fd00::53"], search=["mesh"]) == []
    text = path.read_text()
    assert text.startswith(HEADER)
    assert "nameserver 100.64.0.53\nnameserver fd00::53\nsearch mesh\n" in text
    assert "198.51.100.53" not in text
    rc.apply(["100.64.0.54"])  # a second apply keeps the first original
    rc.restore()
    assert path.read_text() == "nameserver 198.51.100.53\n"
    assert not (tmp_path / ("resolv.conf" + BACKUP_SUFFIX)).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["resolv.conf"]


def test_resolvconf_restores_a_symlink_and_a_missing_file(tmp_path: Path) -> None:
    stub = tmp_path / "stub-resolv.conf"
    stub.write_text("nameserver 127.0.0.53\n")
    link = tmp_path / "resolv.conf"
    link.symlink_to(stub)
    rc = ResolvConf(link)
    rc.apply(["100.64.0.53"])
    assert not link.is_symlink() and stub.read_text() == "nameserver 127.0.0.53\n"
    rc.restore()
    assert link.is_symlink() and os.readlink(link) == str(stub)

    missing = ResolvConf(tmp_path / "absent.conf")
    missing.apply(["100.64.0.53"])
    missing.restore()
    assert not (tmp_path / "absent.conf").exists()


def test_resolvconf_recovers_the_original_after_a_crash(tmp_path: Path) -> None:
    path = tmp_path / "resolv.conf"
    path.write_text("nameserver 198.51.100.53\n")
    ResolvConf(path).apply(["100.64.0.53"])  # this run "dies" without restore
    rc = ResolvConf(path)
    rc.apply(["100.64.0.54"])
    rc.restore()
    assert path.read_text() == "nameserver 198.51.100.53\n"


def test_resolvconf_bad_input_is_reported_not_raised(tmp_path: Path) -> None:
    path = tmp_path / "resolv.conf"
    path.write_text("original\n")
    rc = ResolvConf(path)
    assert rc.apply(["dns.example", None], search=["bad domain"]) == [  # type: ignore[list-item]
        "'dns.example'",
        "None",
        "'bad domain'",
        "no usable nameserver",
    ]
    assert path.read_text() == "original\n" and not rc.active
    assert rc.apply(["100.64.0.53", "nope"]) == ["'nope'"]
    assert "nameserver 100.64.0.53\n" in path.read_text()
    rc.restore()
    rc.restore()  # a second restore is a no-op
    assert path.read_text() == "original\n"


def test_resolv_conf_missing_before_a_crash_is_missing_after(tmp_path):
    path = tmp_path / "netns" / "resolv.conf"
    backup = tmp_path / "state" / "backup"
    backup.parent.mkdir()
    ResolvConf(path, backup=backup, in_place=True).apply(["127.0.0.1"], ["mesh"])  # this run "dies"
    assert path.read_text().startswith(HEADER) and not backup.exists()
    again = ResolvConf(path, backup=backup, in_place=True)
    again.apply(["127.0.0.1"])
    again.restore()
    assert not path.exists()


def test_resolv_conf_rewritten_in_place_keeps_its_inode(tmp_path):
    path = tmp_path / "resolv.conf"
    path.write_text("nameserver 198.51.100.53\n")
    inode = path.stat().st_ino
    resolv = ResolvConf(path, backup=tmp_path / "backup", in_place=True)
    resolv.apply(["127.0.0.1"], ["mesh"])
    assert path.stat().st_ino == inode and "nameserver 127.0.0.1\n" in path.read_text()
    assert (tmp_path / "backup").read_text() == "nameserver 198.51.100.53\n"
    resolv.restore()
    assert path.stat().st_ino == inode and path.read_text() == "nameserver 198.51.100.53\n"
    assert not (tmp_path / "backup").exists()


def test_resolv_conf_directories_made_for_it_are_removed_again(tmp_path):
    resolv = ResolvConf(tmp_path / "netns" / "ns1" / "resolv.conf", backup=tmp_path / "backup")
    resolv.apply(["127.0.0.1"])
    resolv.restore()
    assert list(tmp_path.iterdir()) == []
    resolv.apply(["127.0.0.1"])
    (tmp_path / "netns" / "ns2").mkdir()  # someone else's, made meanwhile
    resolv.restore()
    assert [p.relative_to(tmp_path) for p in tmp_path.rglob("*")] == [Path("netns"), Path("netns/ns2")]


@pytest.mark.netns
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")
def test_a_named_namespace_resolves_with_its_etc_netns_file():
    name = f"msrc{os.getpid() % 10000}{random.randrange(1000)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        probe = (
            "import pathlib; from meshsup.actors.router.resolvconf import for_this_namespace as f; "
            "print(f(pathlib.Path('/x')).path)"
        )
        inside = subprocess.run(
            ["ip", "netns", "exec", name, sys.executable, "-c", probe], capture_output=True, text=True, check=True
        ).stdout.strip()
        assert inside == f"/etc/netns/{name}/resolv.conf"
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


# --- the real kernel, in a throwaway namespace ------------------------------------------


def _ip_json(netns: str, *args: str) -> list[dict]:
    out = subprocess.run(["ip", "-n", netns, "-j", *args], check=True, capture_output=True, text=True, timeout=10)
    return json.loads(out.stdout or "[]")


@pytest.fixture
def tun_in_netns() -> Iterator[tuple[str, str]]:
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces")
    if shutil.which("ip") is None or not os.path.exists("/dev/net/tun"):
        pytest.skip("needs iproute2 and /dev/net/tun")
    netns, ifname = "msrt" + secrets.token_hex(3), "mstr" + secrets.token_hex(3)
    subprocess.run(["ip", "netns", "add", netns], check=True, capture_output=True, timeout=10)
    try:
        # A persistent TUN: it exists with no process holding it open.
        subprocess.run(
            ["ip", "-n", netns, "tuntap", "add", "mode", "tun", "name", ifname],
            check=True,
            capture_output=True,
            timeout=10,
        )
        yield netns, ifname
    finally:
        subprocess.run(["ip", "netns", "del", netns], capture_output=True, timeout=10)


@pytest.fixture
def router(tun_in_netns: tuple[str, str]) -> Iterator[LinuxRouter]:
    netns, ifname = tun_in_netns
    r = LinuxRouter(ifname, netns)
    try:
        yield r
    finally:
        r.close()


def _routes(netns: str, ifname: str) -> dict[str, str]:
    """dst -> protocol for every IPv4 and IPv6 route via ``ifname``."""
    found = {}
    for family in ("-4", "-6"):
        for route in _ip_json(netns, family, "route", "show", "dev", ifname):
            dst = route["dst"]
            if dst == "default":
                dst = "0.0.0.0/0" if family == "-4" else "::/0"
            elif "/" not in dst:
                dst += "/32" if family == "-4" else "/128"
            found[dst] = route.get("protocol", "boot")
    return found


@pytest.mark.netns
def test_configure_sets_addresses_mtu_and_up(tun_in_netns: tuple[str, str], router: LinuxRouter) -> None:
    netns, ifname = tun_in_netns
    changes = router.configure(["100.64.0.1/24", "fd00:64::1/64"])
    assert (changes.added, changes.failed) == (["100.64.0.1/24", "fd00:64::1/64"], [])
    (link,) = _ip_json(netns, "addr", "show", "dev", ifname)
    assert link["mtu"] == 1420
    assert "UP" in link["flags"]
    assert {(a["local"], a["prefixlen"]) for a in link["addr_info"]} >= {("100.64.0.1", 24), ("fd00:64::1", 64)}
    assert router.configure(["100.64.0.1/24", "fd00:64::1/64"]).added == []  # idempotent


@pytest.mark.netns
def test_set_routes_diffs_and_teardown_leaves_nothing(tun_in_netns: tuple[str, str], router: LinuxRouter) -> None:
    netns, ifname = tun_in_netns
    router.configure(["100.64.0.1/24", "fd00:64::1/64"])
    subprocess.run(["ip", "-n", netns, "route", "add", "10.99.0.0/16", "dev", ifname], check=True, timeout=10)
    ours = str(RTPROT_MESHSUP)

    first = router.set_routes(["10.20.0.0/16", "fd00:99::/64", "0.0.0.0/0", "100.64.0.0/24"])
    # 100.64.0.0/24 is already routed here for the link's own address: fine, not ours.
    assert (first.added, first.failed) == (["0.0.0.0/0", "10.20.0.0/16", "fd00:99::/64"], [])
    routes = _routes(netns, ifname)
    assert {d for d, p in routes.items() if p == ours} == {"0.0.0.0/0", "10.20.0.0/16", "fd00:99::/64"}
    assert routes["100.64.0.0/24"] == "kernel"

    second = router.set_routes(["10.20.0.0/16", "not-a-prefix"])
    assert (second.added, second.removed, second.rejected) == ([], ["0.0.0.0/0", "fd00:99::/64"], ["'not-a-prefix'"])
    assert {d for d, p in _routes(netns, ifname).items() if p == ours} == {"10.20.0.0/16"}
    unchanged = router.set_routes(["10.20.0.0/16"])
    assert (unchanged.added, unchanged.removed) == ([], [])

    router.set_routes(["10.20.0.0/16", "fd00:99::/64"])
    down = router.teardown()
    assert down.removed == ["10.20.0.0/16", "fd00:99::/64", "100.64.0.1/24", "fd00:64::1/64"]
    assert down.failed == []
    assert ours not in _routes(netns, ifname).values()
    (link,) = _ip_json(netns, "addr", "show", "dev", ifname)
    assert [a for a in link["addr_info"] if a.get("scope") != "link"] == []


@pytest.mark.netns
def test_a_restarted_router_finds_its_routes(tun_in_netns: tuple[str, str], router: LinuxRouter) -> None:
    netns, ifname = tun_in_netns
    router.configure(["100.64.0.1/24"])
    router.set_routes(["10.20.0.0/16"])
    fresh = LinuxRouter(ifname, netns)
    try:
        assert fresh.set_routes([]).removed == ["10.20.0.0/16"]
    finally:
        fresh.close()
    assert "10.20.0.0/16" not in _routes(netns, ifname)


@pytest.mark.netns
def test_missing_link_is_a_lookup_error(tun_in_netns: tuple[str, str]) -> None:
    with pytest.raises(LookupError):
        LinuxRouter("nosuchlink0", tun_in_netns[0])


@pytest.mark.netns
def test_link_monitor_sees_changes(tun_in_netns: tuple[str, str]) -> None:
    netns, ifname = tun_in_netns
    monitor = LinkMonitor(netns)
    try:
        events = _drain(monitor, lambda ev: ("link", ifname) in ev)
        assert ("link", "lo") in events  # the initial snapshot
        subprocess.run(["ip", "-n", netns, "addr", "add", "100.64.0.1/24", "dev", ifname], check=True, timeout=10)
        assert ("addr-added", ifname) in _drain(monitor, lambda ev: ("addr-added", ifname) in ev)
        subprocess.run(["ip", "-n", netns, "link", "set", ifname, "up"], check=True, timeout=10)
        ours = ["ip", "-n", netns, "route", "add", "default", "dev", ifname, "proto", str(RTPROT_MESHSUP)]
        subprocess.run([*ours, "metric", "5"], check=True, timeout=10)  # a peer's 0.0.0.0/0: not reported...
        subprocess.run(["ip", "-n", netns, "route", "add", "default", "via", "100.64.0.2"], check=True, timeout=10)
        events = _drain(monitor, lambda ev: ("default-route-added", ifname) in ev)
        assert events.count(("default-route-added", ifname)) == 1  # ...the underlay's is
        subprocess.run(["ip", "-n", netns, "-6", "route", "add", "default", "dev", ifname], check=True, timeout=10)
        assert ("default-route-added", ifname) in _drain(monitor, lambda ev: ("default-route-added", ifname) in ev)
        subprocess.run(["ip", "-n", netns, "route", "del", "default", "via", "100.64.0.2"], check=True, timeout=10)
        assert ("default-route-removed", ifname) in _drain(monitor, lambda ev: ("default-route-removed", ifname) in ev)
        subprocess.run(["ip", "-n", netns, "link", "del", ifname], check=True, timeout=10)
        assert ("link-removed", ifname) in _drain(monitor, lambda ev: ("link-removed", ifname) in ev)
    finally:
        monitor.close()


def _drain(monitor: LinkMonitor, done: object, timeout: float = 5) -> list[tuple[str, str]]:
    events: list[tuple[str, str]] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not done(events):  # type: ignore[operator]
        select.select([monitor], [], [], 0.2)
        events += monitor.read_events()
    return events

"""`meshsup ping`: the sans-IO ICMP echo core, peer resolution, and real pings between two nodes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from meshsup.supervisor.icmp import EchoSession, checksum, encode_echo, parse_echo, strip_ipv4_header
from meshsup.supervisor.ping import resolve, source_for
from tests.nodes import MESHSUP, REPO, Node, is_root
from tests.topology import Identity, Underlay, have, meshsup_config
from tests.wg_harness import icmp_packet

PEERS = [
    {"name": "bravo", "allowed_ips": ["10.20.0.0/16", "100.64.0.2/32", "fd7a:115c:a1e0::2/128"]},
    {"name": "charlie", "allowed_ips": ["10.20.30.0/24", "100.64.0.3/32"]},
]


def test_checksum_matches_rfc1071_example() -> None:
    # RFC 1071 section 3: these bytes sum to 0xddf2 (one's complement), checksum ~0xddf2.
    assert checksum(bytes.fromhex("0001f203f4f5f6f7")) == 0x220D
    assert checksum(bytes.fromhex("0001f203f4f5f6f7220d")) == 0


def test_ipv4_request_parses_back_and_checksums() -> None:
    msg = encode_echo(4, 0x1234, 7, b"hello")
    assert msg[0] == 8 and checksum(msg) == 0
    echo = parse_echo(4, msg)
    assert echo is not None and (echo.type, echo.ident, echo.seq, echo.payload) == (8, 0x1234, 7, b"hello")
    corrupted = msg[:-1] + b"X"
    assert parse_echo(4, corrupted) is None


def test_ipv6_request_leaves_checksum_to_the_kernel() -> None:
    msg = encode_echo(6, 1, 2, b"x")
    assert msg[0] == 128 and msg[2:4] == b"\0\0"
    echo = parse_echo(6, msg)
    assert echo is not None and (echo.ident, echo.seq) == (1, 2)


def test_parses_replies_built_by_an_independent_encoder() -> None:
    v4 = icmp_packet("100.64.0.2", "100.64.0.1", 0, 0xBEEF, 3, b"payload")
    message = strip_ipv4_header(v4)
    assert message is not None
    assert parse_echo(4, message) == parse_echo(4, encode_echo(4, 0xBEEF, 3, b"payload", reply=True))
    v6 = icmp_packet("fd7a:115c:a1e0::2", "fd7a:115c:a1e0::1", 129, 9, 4, b"p")
    echo = parse_echo(6, v6[40:])  # raw ICMPv6 sockets deliver no IP header
    assert echo is not None and (echo.type, echo.ident, echo.seq, echo.payload) == (129, 9, 4, b"p")


ICMP4 = b"\x45" + bytes(8) + b"\x01" + bytes(10)  # an IPv4 header saying ICMP, no ICMP message yet


@pytest.mark.parametrize(
    "junk",
    [
        b"",
        b"\x00",
        ICMP4[:12],
        ICMP4,
        ICMP4 + b"\x00\x00\xff",
        b"\x4f" + ICMP4[1:],
        b"\x60" + bytes(60),
        b"\x81\x00",
        b"\xc3\x7f\x10",
        bytes(8),
    ],
    ids=lambda junk: junk.hex() or "empty",
)
def test_junk_is_ignored_not_raised(junk: bytes) -> None:
    session = EchoSession("100.64.0.2", 1, b"x")
    session.request(0.0)
    assert session.receive("100.64.0.2", junk, 1.0) is None
    assert EchoSession("fd7a::2", 1, b"x").receive("fd7a::2", junk, 1.0) is None


def _reply_packet(src: str, ident: int, seq: int, payload: bytes) -> bytes:
    return icmp_packet(src, "100.64.0.1", 0, ident, seq, payload)


def test_session_counts_only_its_own_replies() -> None:
    s = EchoSession("100.64.0.2", 0x4242, b"data")
    for t in (0.0, 1.0, 2.0):
        s.request(t)
    assert s.receive("100.64.0.3", _reply_packet("100.64.0.3", 0x4242, 1, b"data"), 0.1) is None  # other host
    assert s.receive("100.64.0.2", _reply_packet("100.64.0.2", 0x4243, 1, b"data"), 0.1) is None  # other pinger
    assert s.receive("100.64.0.2", _reply_packet("100.64.0.2", 0x4242, 1, b"datX"), 0.1) is None  # mangled
    assert s.receive("100.64.0.2", _reply_packet("100.64.0.2", 0x4242, 9, b"data"), 0.1) is None  # never sent
    request = icmp_packet("100.64.0.2", "100.64.0.1", 8, 0x4242, 1, b"data")
    assert s.receive("100.64.0.2", request, 0.1) is None  # a request, not a reply
    first = s.receive("100.64.0.2", _reply_packet("100.64.0.2", 0x4242, 1, b"data"), 0.004)
    assert first is not None and first.seq == 1 and first.size == 12 and first.rtt == pytest.approx(0.004)
    assert s.receive("100.64.0.2", _reply_packet("100.64.0.2", 0x4242, 1, b"data"), 0.5) is None  # duplicate
    assert s.receive("100.64.0.2", _reply_packet("100.64.0.2", 0x4242, 3, b"data"), 2.002) is not None
    assert s.outstanding == 1  # seq 2 never answered
    summary = s.summary
    assert (summary.transmitted, summary.received, round(summary.loss)) == (3, 2, 33)
    assert summary.rtt_line() == "rtt min/avg/max/mdev = 2.000/3.000/4.000/1.000 ms"


def test_ipv6_session_accepts_scoped_source() -> None:
    s = EchoSession("fd7a:115c:a1e0::2", 5, b"p")
    s.request(0.0)
    reply = encode_echo(6, 5, 1, b"p", reply=True)
    assert s.receive("fd7a:115c:a1e0::2%ms0", reply, 0.001) is not None
    assert s.summary.rtt_line() is not None and EchoSession("fd7a::2", 5, b"").summary.rtt_line() is None


def test_resolve_names_and_addresses() -> None:
    assert resolve(PEERS, "bravo") == ("bravo", "100.64.0.2")  # first single address, not the subnet
    assert resolve(PEERS, "fd7a:115c:a1e0::2") == ("bravo", "fd7a:115c:a1e0::2")
    assert resolve(PEERS, "10.20.30.4") == ("charlie", "10.20.30.4")  # longest prefix wins
    assert resolve(PEERS, "10.20.1.1") == ("bravo", "10.20.1.1")
    with pytest.raises(ValueError, match="neither a peer nor an IP address"):
        resolve(PEERS, "delta")
    with pytest.raises(ValueError, match="in no peer's allowed IPs"):
        resolve(PEERS, "100.64.0.9")
    with pytest.raises(ValueError, match="no single address"):
        resolve([{"name": "net", "allowed_ips": ["10.0.0.0/8"]}], "net")
    assert source_for(["100.64.0.1/32", "fd7a:115c:a1e0::1/128"], 6) == "fd7a:115c:a1e0::1"
    with pytest.raises(ValueError, match="no IPv6 address"):
        source_for(["100.64.0.1/32"], 6)


@pytest.mark.netns
@pytest.mark.skipif(not is_root() or bool(have("ping")), reason=have("ping") or "needs root")
def test_ping_peer_by_name_and_address_then_down(tmp_path: Path) -> None:
    u = Underlay()
    try:
        (ns_a, addr_a), (ns_b, addr_b) = u.host(), u.host()
        a, b = Identity("alpha", 1), Identity("bravo", 2)
        a.endpoint, b.endpoint = f"{addr_a}:51820", f"{addr_b}:51820"
        alpha = u.track(Node(tmp_path, "--config", str(meshsup_config(tmp_path, a, [b])), netns=ns_a))
        bravo = u.track(Node(tmp_path, "--config", str(meshsup_config(tmp_path, b, [a])), netns=ns_b))
        alpha.wait_ready()
        bravo.wait_ready()

        # From the root namespace: the CLI enters the node's namespace to send.
        r = alpha.cli("ping", "bravo", "-c", "3", "-i", "0.2")
        assert f"PING bravo ({b.v4})" in r.stdout
        assert r.stdout.count(f"bytes from {b.v4}: icmp_seq=") == 3
        assert "3 packets transmitted, 3 received, 0% packet loss" in r.stdout

        # From inside the node's namespace, to an IPv6 mesh address.
        r = ns_a.run(
            *MESHSUP,
            "ping",
            "--state-dir",
            str(alpha.state_dir),
            b.v6,
            "-c",
            "2",
            "-i",
            "0.2",
            check=False,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        assert r.returncode == 0, r.stderr
        assert f"PING bravo ({b.v6})" in r.stdout and "2 received, 0% packet loss" in r.stdout

        bravo.close()
        r = alpha.cli("ping", "bravo", "-c", "2", "-i", "0.2", "-W", "1", check=False)
        assert r.returncode == 1
        assert "2 packets transmitted, 0 received, 100% packet loss" in r.stdout
        assert "icmp_seq=" not in r.stdout
    finally:
        u.close()

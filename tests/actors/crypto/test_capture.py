"""What a crypto worker's capture takes (actors.crypto.capture): a peer's packets, datagrams in their
underlay addresses, and key log lines that name the very ephemeral keys on the wire."""

from __future__ import annotations

import base64
import os

from meshsup.actors.crypto import messages
from meshsup.actors.crypto.capture import CaptureSpec, Tap
from meshsup.actors.crypto.device import Forward, Output
from meshsup.actors.crypto.noise import public_key
from meshsup.actors.crypto.peer import PeerConfig
from meshsup.actors.kernel.types import RELAY_HOST, Burst
from tests.actors.crypto.test_device import A_IP, B_IP, EA, EB, T0, Link, net, ping

C_IP = "100.64.0.3"
EC = ("203.0.113.3", 51820)
LOCAL = "198.51.100.1"


def tap(link: Link, peer: bytes | None, outer: bool = False) -> Tap:
    """A's capture; A also has a second peer, C, that nothing answers for."""
    if len(link.a.peers) == 1:
        link.a.set_peer(PeerConfig(public_key(os.urandom(32)), None, net(f"{C_IP}/32"), EC))
    return Tap(CaptureSpec("capture-1.sock", peer, outer, keylog=False), link.a, 51820, lambda host: LOCAL)


def udp(packet: bytes) -> tuple[str, int, str, int, bytes]:
    """(source, source port, destination, destination port, payload) of an IPv4 UDP packet."""
    src, dst = ".".join(map(str, packet[12:16])), ".".join(map(str, packet[16:20]))
    return src, int.from_bytes(packet[20:22], "big"), dst, int.from_bytes(packet[22:24], "big"), packet[28:]


def test_inner_takes_the_chosen_peers_packets_both_ways() -> None:
    link = Link()
    to_b, to_c, bad = ping(A_IP, B_IP, 1), ping(A_IP, C_IP, 2), b"\x45"
    from_b, from_c = ping(B_IP, A_IP, 3), ping(C_IP, A_IP, 4)
    out = Output(packets=[from_b, from_c])
    assert tap(link, link.b.public_key).take([to_b, to_c, bad], None, out) == [to_b, from_b]
    assert tap(link, None).take([to_b, to_c, bad], None, out) == [to_b, to_c, bad, from_b, from_c]
    assert tap(link, b"\x01" * 32).take([to_b], None, out) == []  # no such peer: nothing


def test_outer_wraps_datagrams_in_their_underlay_addresses() -> None:
    link = Link()
    capture = tap(link, link.b.public_key, outer=True)
    out = link.a.send([ping(A_IP, B_IP)], T0)  # an initiation to B
    (initiation,) = out.datagrams[0].datagrams
    assert [udp(p) for p in capture.take(None, None, out)] == [(LOCAL, 51820, *EB, initiation)]
    # What came in, from B and from C; a datagram handed on to another worker is that worker's to show.
    forwarded = b"\x04" + bytes(40)
    received = [Burst(EB, [b"\x04" + bytes(31), forwarded]), Burst(EC, [b"\x04" + bytes(35)])]
    handed = Output(foreign=[Forward(1, EB, forwarded)])
    assert [udp(p) for p in capture.take(None, received, handed)] == [(*EB, LOCAL, 51820, b"\x04" + bytes(31))]
    everyone = tap(link, None, outer=True)
    assert [udp(p)[0] for p in everyone.take(None, received, Output())] == [EB[0], EB[0], EC[0]]
    # Endpoints off the bus that are no IP address and port are not shown (and never looked up).
    junk = [Burst(("example.com", 1), [b"\x04"]), Burst(("198.51.100.9", 70000), [b"\x04"])]
    assert everyone.take(None, junk, Output()) == []
    # Through a relay: between the magic DERP address and the node's port on loopback.
    peer_b = link.a.peers[link.b.public_key]
    relayed = Output(datagrams=[Burst(peer_b.relay_endpoint, [b"\x04" + bytes(31)])])
    assert [udp(p)[:4] for p in capture.take(None, None, relayed)] == [("127.0.0.1", 51820, RELAY_HOST, 0)]


def key_log(lines: list[str]) -> list[tuple[str, bytes]]:
    return [(k, base64.b64decode(v)) for k, v in (line.split(" = ") for line in lines)]


def test_key_log_names_the_ephemeral_keys_on_the_wire() -> None:
    psk = os.urandom(32)
    link = Link(psk=psk)
    spec = CaptureSpec("capture-1.sock", None, outer=True, keylog=True)
    taps = {side: Tap(spec, device, 51820, lambda host: LOCAL) for side, device in link.devices.items()}
    link.a.keylog, link.b.keylog = [], []
    link.handshake()
    wire = {messages.message_type(d): d for _, _, d in link.wire}
    for side, device, other, ephemeral in (
        (EA, link.a, link.b, wire[messages.MESSAGE_INITIATION][8:40]),
        (EB, link.b, link.a, wire[messages.MESSAGE_RESPONSE][12:44]),
    ):
        logged = key_log(taps[side].key_lines())
        assert [k for k, _ in logged] == [
            "LOCAL_STATIC_PRIVATE_KEY",
            "REMOTE_STATIC_PUBLIC_KEY",
            "LOCAL_EPHEMERAL_PRIVATE_KEY",
            "PRESHARED_KEY",  # after its ephemeral key: the dissector links it to that one
        ]
        assert public_key(logged[0][1]) == device.public_key and logged[1][1] == other.public_key
        assert public_key(logged[2][1]) == ephemeral and logged[3][1] == psk
        assert taps[side].key_lines() == []  # each handshake once


def test_keys_are_noted_only_while_a_key_log_runs_and_rekey_starts_a_handshake() -> None:
    link = Link()
    link.handshake()
    assert link.a.keylog is None and link.b.keylog is None
    link.a.keylog = []
    out = link.a.rekey([link.b.public_key, b"\x02" * 32], T0 + 1)  # within REKEY_TIMEOUT of the last one
    assert [messages.message_type(d) for b in out.datagrams for d in b.datagrams] == [messages.MESSAGE_INITIATION]
    capture = Tap(CaptureSpec("capture-1.sock", b"\x03" * 32, False, True), link.a, 51820, lambda host: LOCAL)
    assert len(link.a.keylog) == 1 and capture.key_lines() == []  # another peer's: not in this log

"""DERP's wire format against the facts and byte vectors of Tailscale's derp package
(derp.go, derp_client.go, client_test.go, derp_test.go, derpserver/handler.go)."""

from __future__ import annotations

import json

import pytest
from nacl.bindings import crypto_box
from nacl.public import PrivateKey

from meshsup.actors.wire import derp
from meshsup.actors.wire.derp import FrameError, FrameReader, FrameType


def keypair() -> tuple[bytes, bytes]:
    k = PrivateKey.generate()
    return bytes(k), bytes(k.public_key)


def read_all(data: bytes) -> list[tuple[int, bytes]]:
    r = FrameReader()
    r.feed(data)
    out = []
    while (f := r.next()) is not None:
        out.append(f)
    assert len(r) == 0
    return out


def test_constants_are_tailscales() -> None:
    assert derp.MAGIC == bytes([0x44, 0x45, 0x52, 0x50, 0xF0, 0x9F, 0x94, 0x91])
    assert (derp.MAX_PACKET_SIZE, derp.KEY_LEN, derp.NONCE_LEN, derp.FRAME_HEADER_LEN) == (65536, 32, 24, 5)
    assert derp.PROTOCOL_VERSION == 2 and derp.KEEPALIVE_INTERVAL == 60.0
    assert {t.name: t.value for t in FrameType} == {
        "SERVER_KEY": 0x01,
        "CLIENT_INFO": 0x02,
        "SERVER_INFO": 0x03,
        "SEND_PACKET": 0x04,
        "RECV_PACKET": 0x05,
        "KEEP_ALIVE": 0x06,
        "NOTE_PREFERRED": 0x07,
        "PEER_GONE": 0x08,
        "PEER_PRESENT": 0x09,
        "FORWARD_PACKET": 0x0A,
        "WATCH_CONNS": 0x10,
        "CLOSE_PEER": 0x11,
        "PING": 0x12,
        "PONG": 0x13,
        "HEALTH": 0x14,
        "RESTARTING": 0x15,
    }
    assert (derp.PeerGoneReason.DISCONNECTED, derp.PeerGoneReason.NOT_HERE) == (0, 1)
    assert [int(f) for f in derp.PeerPresentFlags] == [1, 2, 4, 8]


# client_test.go, TestClientRecv: what a client reads.
@pytest.mark.parametrize(
    "data, ftype, payload",
    [
        (bytes([0x12, 0, 0, 0, 8, 1, 2, 3, 4, 5, 6, 7, 8]), FrameType.PING, bytes(range(1, 9))),
        (bytes([0x13, 0, 0, 0, 8, 1, 2, 3, 4, 5, 6, 7, 8]), FrameType.PONG, bytes(range(1, 9))),
        (bytes([0x14, 0, 0, 0, 3]) + b"BAD", FrameType.HEALTH, b"BAD"),
        (bytes([0x14, 0, 0, 0, 0]), FrameType.HEALTH, b""),
        (bytes([0x15, 0, 0, 0, 8, 0, 0, 0, 1, 0, 0, 0, 2]), FrameType.RESTARTING, bytes([0, 0, 0, 1, 0, 0, 0, 2])),
    ],
)
def test_tailscale_receive_vectors(data: bytes, ftype: FrameType, payload: bytes) -> None:
    assert read_all(data) == [(ftype, payload)]


def test_tailscale_send_vectors() -> None:
    # TestClientSendPing / TestClientSendPong, and the encoders matching the receive vectors.
    assert derp.ping(bytes(range(1, 9))) == bytes([0x12, 0, 0, 0, 8, 1, 2, 3, 4, 5, 6, 7, 8])
    assert derp.pong(bytes(range(1, 9))) == bytes([0x13, 0, 0, 0, 8, 1, 2, 3, 4, 5, 6, 7, 8])
    assert derp.health("BAD") == bytes([0x14, 0, 0, 0, 3]) + b"BAD"
    assert derp.health("") == bytes([0x14, 0, 0, 0, 0])
    assert derp.restarting(1, 2) == bytes([0x15, 0, 0, 0, 8, 0, 0, 0, 1, 0, 0, 0, 2])
    assert derp.parse_restarting(bytes([0, 0, 0, 1, 0, 0, 0, 2])) == (1, 2)
    assert derp.keep_alive() == bytes([0x06, 0, 0, 0, 0])
    assert derp.note_preferred(True) == bytes([0x07, 0, 0, 0, 1, 1])
    assert derp.note_preferred(False) == bytes([0x07, 0, 0, 0, 1, 0])
    assert derp.watch_conns() == bytes([0x10, 0, 0, 0, 0])


def test_packet_frames_and_peer_frames() -> None:
    a, b = bytes(range(32)), bytes(range(32, 64))
    assert derp.send_packet(a, b"hi") == bytes([0x04, 0, 0, 0, 34]) + a + b"hi"
    assert derp.recv_packet(b, b"hi") == bytes([0x05, 0, 0, 0, 34]) + b + b"hi"
    with pytest.raises(ValueError):
        derp.send_packet(a, bytes(derp.MAX_PACKET_SIZE + 1))
    assert read_all(derp.send_packet(a, bytes(derp.MAX_PACKET_SIZE))) == [(4, a + bytes(65536))]
    gone = derp.peer_gone(a, derp.PeerGoneReason.NOT_HERE)
    assert gone == bytes([0x08, 0, 0, 0, 33]) + a + b"\x01"
    assert derp.parse_peer_gone(gone[5:]) == (a, derp.PeerGoneReason.NOT_HERE)
    assert derp.parse_peer_gone(a) == (a, derp.PeerGoneReason.DISCONNECTED)  # an old server: key only
    present = derp.peer_present(a, "198.51.100.7", 41641, derp.PeerPresentFlags.REGULAR)
    assert present[:5] == bytes([0x09, 0, 0, 0, 51])  # key + 16B IP + 2B port + flags, as a current server
    assert present[5 + 32 : 5 + 48] == bytes(10) + b"\xff\xff" + bytes([198, 51, 100, 7])
    assert derp.parse_peer_present(present[5:]) == derp.PeerPresent(
        a, "198.51.100.7", 41641, derp.PeerPresentFlags.REGULAR
    )
    assert derp.parse_peer_present(a) == derp.PeerPresent(a, None, 0, derp.PeerPresentFlags(0))
    v6 = derp.peer_present(a, "2001:db8::1", 7, derp.PeerPresentFlags.MESH_PEER)
    assert derp.parse_peer_present(v6[5:]).host == "2001:db8::1"


def test_server_key_frame() -> None:
    _, pub = keypair()
    f = derp.server_key(pub)
    assert f[:5] == bytes([0x01, 0, 0, 0, 40]) and f[5:13] == derp.MAGIC and f[13:] == pub
    ((ftype, payload),) = read_all(f)
    assert derp.parse_server_key(payload) == pub
    assert derp.parse_server_key(payload + b"future") == pub  # the greeting may grow
    with pytest.raises(FrameError) as err:
        derp.parse_server_key(b"DERP!!!!" + pub)
    assert err.value.reason == "server_key_magic"


def test_login_boxes_are_nonce_then_crypto_box() -> None:
    c_priv, c_pub = keypair()
    s_priv, s_pub = keypair()
    sealed = derp.seal(c_priv, s_pub, b"{}")
    nonce, box = sealed[:24], sealed[24:]
    assert box == crypto_box(b"{}", nonce, s_pub, c_priv)  # libsodium's crypto_box, as Go's box.Seal
    assert len(sealed) == 24 + 16 + 2
    f = derp.client_info(c_priv, c_pub, s_pub, derp.client_info_json())
    ((ftype, payload),) = read_all(f)
    assert ftype == FrameType.CLIENT_INFO and payload[:32] == c_pub
    key, info = derp.open_client_info(s_priv, payload)
    assert key == c_pub and info == {"version": 2, "canackpings": True}
    # A box sealed with another private key than the one the frame names does not open.
    o_priv, _ = keypair()
    forged = c_pub + derp.seal(o_priv, s_pub, b"{}")
    with pytest.raises(FrameError) as err:
        derp.open_client_info(s_priv, forged)
    assert err.value.reason == "client_info_box"
    with pytest.raises(FrameError) as err:
        derp.open_client_info(s_priv, c_pub + derp.seal(c_priv, s_pub, b"[1]"))
    assert err.value.reason == "client_info_json"


@pytest.mark.parametrize("text", ['{"Version":5,"MeshKey":"abc"}', '{"version":5,"meshKey":"abc"}'])
def test_client_info_json_is_read_as_go_reads_it(text: str) -> None:
    # derp_test.go, TestClientInfoUnmarshal: either spelling is version 5, mesh key "abc".
    c_priv, c_pub = keypair()
    s_priv, s_pub = keypair()
    _, info = derp.open_client_info(s_priv, c_pub + derp.seal(c_priv, s_pub, text.encode()))
    assert (info["version"], info["meshkey"]) == (5, "abc")


def test_server_info() -> None:
    c_priv, c_pub = keypair()
    s_priv, s_pub = keypair()
    ((_, payload),) = read_all(derp.server_info(s_priv, c_pub))
    assert json.loads(derp.open_box(c_priv, s_pub, payload, "x")) == {"version": 2}
    ((_, payload),) = read_all(derp.server_info(s_priv, c_pub, rate=1000, burst=70000))
    assert derp.open_server_info(c_priv, s_pub, payload) == {
        "version": 2,
        "tokenbucketbytespersecond": 1000,
        "tokenbucketbytesburst": 70000,
    }


def test_reader_is_incremental() -> None:
    key = bytes(32)
    stream = derp.keep_alive() + derp.send_packet(key, b"x" * 300) + derp.ping(b"12345678")
    r = FrameReader()
    got = []
    for i in range(len(stream)):
        r.feed(stream[i : i + 1])
        while (f := r.next()) is not None:
            got.append(f)
        assert (r.unfinished() is None) == (len(r) == 0)
    assert got == [(6, b""), (4, key + b"x" * 300), (0x12, b"12345678")]


@pytest.mark.parametrize("ftype", sorted(derp.LIMITS))
def test_every_frame_type_refused_oversized_and_truncated(ftype: int) -> None:
    least, most = derp.LIMITS[ftype]
    name = derp.type_name(ftype)
    r = FrameReader()
    r.feed(derp.header(ftype, most + 1))  # refused on its header, before any payload
    with pytest.raises(FrameError) as err:
        r.next()
    assert err.value.reason == f"{name}_oversized"
    if least:
        r = FrameReader()
        r.feed(derp.header(ftype, least - 1) + bytes(least - 1))
        with pytest.raises(FrameError) as err:
            r.next()
        assert err.value.reason == f"{name}_truncated"
    r = FrameReader()  # a stream cut in the middle of the frame (of its header, for an empty one)
    r.feed(derp.header(ftype, max(least, 1)) if most else derp.header(ftype, 0)[:3])
    assert r.next() is None and r.unfinished() == (f"{name}_truncated" if most else "header_truncated")


def test_unknown_types_pass_within_bounds() -> None:
    assert read_all(derp.frame(0x42, b"abc")) == [(0x42, b"abc")]
    r = FrameReader()
    r.feed(derp.header(0x42, derp.UNKNOWN_MAX + 1))
    with pytest.raises(FrameError) as err:
        r.next()
    assert err.value.reason == "type_0x42_oversized"
    r = FrameReader()
    r.feed(b"\x04\x00")
    assert r.next() is None and r.unfinished() == "header_truncated"
    r = FrameReader()  # whole frames not yet taken are not a cut
    r.feed(derp.ping(b"12345678") * 2)
    assert r.unfinished() is None
    r.feed(derp.keep_alive()[:2])
    assert r.unfinished() == "header_truncated"


def test_http_upgrade_texts() -> None:
    pub = bytes(range(32))
    assert derp.upgrade_response(pub) == (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n"
        b"Derp-Version: 2\r\nDerp-Public-Key: " + pub.hex().encode() + b"\r\n\r\n"
    )
    req = derp.upgrade_request("relay.example:8080", fast_start=True)
    head, n = derp.split_head(req + b"\x02rest")  # type: ignore[misc]
    assert req[n:] == b"" and head.first == ("GET", "/derp", "HTTP/1.1")
    assert head.header("upgrade") == "DERP" and head.header("derp-fast-start") == "1"
    assert head.header("Host") == "relay.example:8080"
    resp, _ = derp.split_head(derp.upgrade_response(pub))  # type: ignore[misc]
    assert resp.first[1] == "101" and resp.header("Derp-Public-Key") == pub.hex()
    probe, _ = derp.split_head(derp.plain_response(200, "OK"))  # type: ignore[misc]
    assert probe.first == ("HTTP/1.1", "200", "OK") and probe.header("content-length") == "0"


def test_http_head_refusals() -> None:
    assert derp.split_head(b"GET /derp HTTP/1.1\r\nUpgrade: DERP\r\n") is None
    for bad in (
        b"\x16\x03\x01\x02\x00\r\n\r\n",
        b"GET\r\n\r\n",
        b"GET / HTTP/1.1\r\nno colon\r\n\r\n",
        b"GET / HTTP/1.1\r\nX: \xff\r\n\r\n",
    ):
        with pytest.raises(FrameError) as err:
            derp.split_head(bad)
        assert err.value.reason == "bad_http"
    with pytest.raises(FrameError) as err:
        derp.split_head(b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 2000)
    assert err.value.reason == "http_head_too_long"

"""Disco messages against the byte vectors of Tailscale's disco tests (disco/disco_test.go,
TestMarshalAndParse), the packet around them, every refusal, and the demultiplexing of
the node's one UDP port."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from nacl.public import Box, PrivateKey, PublicKey

from meshsup.actors.wire import disco, stun
from meshsup.actors.wire.demux import Protocol, protocol
from meshsup.actors.wire.disco import CallMeMaybe, DiscoError, Ping, Pong, SharedKey

TXID = bytes(range(1, 13))
NODE_KEY = bytes({1: 1, 2: 2, 30: 30, 31: 31}.get(i, 0) for i in range(32))

# TestMarshalAndParse: (name, message, the payload Tailscale marshals it to).
VECTORS = [
    ("ping", Ping(TXID), "01 00 01 02 03 04 05 06 07 08 09 0a 0b 0c"),
    (
        "ping_with_nodekey_src",
        Ping(TXID, NODE_KEY),
        "01 00 01 02 03 04 05 06 07 08 09 0a 0b 0c 00 01 02 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00"
        " 00 00 00 00 00 00 00 00 00 1e 1f",
    ),
    ("ping_with_padding", Ping(TXID, padding=3), "01 00 01 02 03 04 05 06 07 08 09 0a 0b 0c 00 00 00"),
    (
        "ping_with_padding_and_nodekey_src",
        Ping(TXID, NODE_KEY, padding=3),
        "01 00 01 02 03 04 05 06 07 08 09 0a 0b 0c 00 01 02 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00"
        " 00 00 00 00 00 00 00 00 00 1e 1f 00 00 00",
    ),
    (
        "pong",
        Pong(TXID, ("2.3.4.5", 1234)),
        "02 00 01 02 03 04 05 06 07 08 09 0a 0b 0c 00 00 00 00 00 00 00 00 00 00 ff ff 02 03 04 05 04 d2",
    ),
    (
        "pongv6",
        Pong(TXID, ("fed0::12", 6666)),
        "02 00 01 02 03 04 05 06 07 08 09 0a 0b 0c fe d0 00 00 00 00 00 00 00 00 00 00 00 00 00 12 1a 0a",
    ),
    ("call_me_maybe", CallMeMaybe(), "03 00"),
    (
        "call_me_maybe_endpoints",
        CallMeMaybe((("1.2.3.4", 567), ("2001::3456", 789))),
        "03 00 00 00 00 00 00 00 00 00 00 00 ff ff 01 02 03 04 02 37 20 01 00 00 00 00 00 00 00 00 00 00 00 00 34 56"
        " 03 15",
    ),
]


@pytest.mark.parametrize(("message", "want"), [v[1:] for v in VECTORS], ids=[v[0] for v in VECTORS])
def test_tailscale_vectors_marshal_and_parse_back(message: disco.Message, want: str) -> None:
    payload = disco.marshal(message)
    assert payload.hex(" ") == want
    assert disco.parse(payload) == message


def test_magic_is_tailscales() -> None:
    assert disco.MAGIC == bytes.fromhex("5453f09f92ac")


# --- what receivers ignore ---------------------------------------------------------------


def test_trailing_bytes_and_later_versions_are_ignored() -> None:
    pong = disco.marshal(Pong(TXID, ("2.3.4.5", 1234)))
    assert disco.parse(pong + b"future fields") == Pong(TXID, ("2.3.4.5", 1234))
    assert disco.parse(b"\x02\x07" + pong[2:]) == Pong(TXID, ("2.3.4.5", 1234))
    # A ping's bytes after the TxID and node key are padding, whatever the version.
    assert disco.parse(b"\x01\x05" + TXID + NODE_KEY + b"xyz") == Ping(TXID, NODE_KEY, padding=3)


def test_an_all_zero_node_key_is_none_as_in_tailscale() -> None:
    assert disco.parse(b"\x01\x00" + TXID + bytes(32 + 4)) == Ping(TXID, None, padding=4)


@pytest.mark.parametrize("body", [b"\x03\x01" + bytes(18), b"\x03\x00" + bytes(19), b"\x03\x00" + bytes(17)])
def test_a_call_me_maybe_of_a_layout_not_known_names_no_endpoints(body: bytes) -> None:
    assert disco.parse(body) == CallMeMaybe()


# --- the sealed packet -------------------------------------------------------------------


def _keys() -> tuple[bytes, bytes, bytes, bytes]:
    a, b = PrivateKey.generate(), PrivateKey.generate()
    return bytes(a), a.public_key.encode(), bytes(b), b.public_key.encode()


def test_seal_and_open_round_trip_both_ways() -> None:
    a_priv, a_pub, b_priv, b_pub = _keys()
    a_to_b, b_from_a = SharedKey(a_priv, b_pub), SharedKey(b_priv, a_pub)
    for _, message, _ in VECTORS:
        packet = a_to_b.seal(message)
        assert packet[:6] == disco.MAGIC and disco.sender(packet) == a_pub
        assert len(packet) == disco.MIN_LEN + len(disco.marshal(message))
        assert b_from_a.open(packet) == message
    assert a_to_b.seal(Ping(TXID)) != a_to_b.seal(Ping(TXID)), "every packet has its own nonce"
    assert SharedKey(a_priv, b_pub).open(SharedKey(b_priv, a_pub).seal(Ping(TXID))) == Ping(TXID)


def test_the_packet_is_nacl_crypto_box_as_tailscale_seals_it() -> None:
    """magic | sender key | nonce | crypto_box(payload), the box opened and made by NaCl itself."""
    a_priv, a_pub, b_priv, b_pub = _keys()
    nonce = bytes(range(24))
    sealed = Box(PrivateKey(a_priv), PublicKey(b_pub)).encrypt(bytes.fromhex(VECTORS[4][2].replace(" ", "")), nonce)
    assert SharedKey(b_priv, a_pub).open(disco.MAGIC + a_pub + sealed) == VECTORS[4][1]
    ours = SharedKey(a_priv, b_pub).seal(Ping(TXID, NODE_KEY))
    box = Box(PrivateKey(b_priv), PublicKey(a_pub))
    assert box.decrypt(ours[disco.HEADER_LEN :]) == disco.marshal(Ping(TXID, NODE_KEY))


def _sealed_payload(a_priv: bytes, b_pub: bytes, a_pub: bytes, payload: bytes) -> bytes:
    return disco.MAGIC + a_pub + bytes(Box(PrivateKey(a_priv), PublicKey(b_pub)).encrypt(payload))


def test_every_refusal_has_its_reason() -> None:
    a_priv, a_pub, b_priv, b_pub = _keys()
    c_priv, c_pub, _, _ = _keys()
    b_from_a = SharedKey(b_priv, a_pub)
    good = SharedKey(a_priv, b_pub).seal(Ping(TXID))
    tampered = bytearray(good)
    tampered[-1] ^= 1
    cases = {
        "short": good[: disco.MIN_LEN - 1],
        "bad_magic": b"TS\xf0\x9f\x92\xad" + good[6:],
        "wrong_sender": SharedKey(c_priv, b_pub).seal(Ping(TXID)),
        "bad_box": bytes(tampered),
        "unknown_type": _sealed_payload(a_priv, b_pub, a_pub, b"\x04\x00" + bytes(72)),
        "truncated": _sealed_payload(a_priv, b_pub, a_pub, b"\x01\x00" + TXID[:11]),
    }
    for reason, packet in cases.items():
        with pytest.raises(DiscoError) as err:
            b_from_a.open(packet)
        assert err.value.reason == reason, (reason, str(err.value))
    # A box sealed to someone else, under the right sender key, does not open either.
    with pytest.raises(DiscoError, match="bad_box"):
        b_from_a.open(_sealed_payload(a_priv, c_pub, a_pub, disco.marshal(Ping(TXID))))
    for payload in (b"", b"\x01", b"\x02\x00" + bytes(29)):
        with pytest.raises(DiscoError, match="truncated"):
            disco.parse(payload)


@pytest.mark.parametrize("peer", [bytes(32), bytes(31), bytes([1]) + bytes(31)], ids=["zero", "short", "low-order"])
def test_a_peer_key_that_cannot_make_a_box_is_refused(peer: bytes) -> None:
    with pytest.raises(DiscoError, match="bad_key"):
        SharedKey(bytes(PrivateKey.generate()), peer)


def test_ten_thousand_random_datagrams_with_the_magic_are_refused_without_an_exception() -> None:
    a_priv, a_pub, b_priv, b_pub = _keys()
    b_from_a = SharedKey(b_priv, a_pub)
    rng = random.Random(14)
    reasons: Counter[str] = Counter()
    for i in range(10_000):
        key = a_pub if i % 2 else rng.randbytes(32)  # half claim to be the peer, so the box is tried
        body = rng.randbytes(rng.randrange(0, 160))
        datagram = (disco.MAGIC + key + body)[: rng.choice([rng.randrange(len(disco.MAGIC), 120), 1 << 20])]
        assert protocol(datagram) is Protocol.DISCO
        with pytest.raises(DiscoError) as err:
            b_from_a.open(datagram)
        reasons[err.value.reason] += 1
    assert set(reasons) == {"short", "wrong_sender", "bad_box"}, reasons


def test_random_payloads_inside_a_good_box_parse_or_are_refused() -> None:
    rng = random.Random(99)
    for _ in range(10_000):
        payload = bytes([rng.randrange(0, 6), rng.randrange(0, 3)]) + rng.randbytes(rng.randrange(0, 80))
        try:
            disco.parse(payload)
        except DiscoError as err:
            assert err.reason in {"unknown_type", "truncated"}


# --- one port, three protocols --------------------------------------------------------------


def test_the_first_bytes_tell_wireguard_disco_and_stun_apart() -> None:
    a_priv, _, _, b_pub = _keys()
    transport = bytes([4, 0, 0, 0]) + stun.MAGIC_COOKIE.to_bytes(4, "big") + bytes(8 + 16)
    assert protocol(transport) is Protocol.WIREGUARD, "a receiver index equal to STUN's cookie is still WireGuard"
    for size, kind in ((148, 1), (92, 2), (64, 3), (32, 4), (1500, 4)):
        assert protocol(bytes([kind, 0, 0, 0]) + bytes(size - 4)) is Protocol.WIREGUARD
    assert protocol(stun.request(stun.new_txid())) is Protocol.STUN
    assert protocol(stun.response(b"t" * 12, ("198.51.100.7", 41641))) is Protocol.STUN
    assert protocol(SharedKey(a_priv, b_pub).seal(Ping(TXID))) is Protocol.DISCO
    assert protocol(disco.MAGIC) is Protocol.DISCO, "too short, but disco's to count"
    for other in (b"", b"\x04\0\0", bytes([1, 0, 0, 0]) + bytes(10), b"\x54\x53\xf0", b"GET / HTTP/1.1\r\n\r\n"):
        assert protocol(other) is None, other

"""STUN Binding against the byte vectors of Tailscale's net/stun tests (stun_test.go)."""

from __future__ import annotations

import zlib

import pytest

from meshsup.actors.wire import stun
from meshsup.actors.wire.stun import BindingClient, StunError

# TestParseResponse's responses from real servers: (name, bytes, transaction ID, address, port).
RESPONSES = [
    (
        "google-1",
        "0101000c2112a4422360b11e3ec68ffa93e08007002000080001c7866957856f",
        "2360b11e3ec68ffa93e08007",
        "72.69.33.45",
        59028,
    ),
    (
        "google-2",
        "0101000c2112a442f9f121cbde7d7c75923ce27100200008000 1c7876957856f".replace(" ", ""),
        "f9f121cbde7d7c75923ce271",
        "72.69.33.45",
        59029,
    ),
    (
        "stun.sipgate.net:10000",
        "010100442112a442482eb64715e8b28eaead644400010008 0001e4ab4845212d00040008 00012710d90a4498"
        "00050008 00012711d9747a8a80200008 0001c5b96957856f80220010 566f766964612e6f72672030 2e393600",
        "482eb64715e8b28eaead6444",
        "72.69.33.45",
        58539,
    ),
    (
        "stun.powervoip.com:3478",
        "010100242112a4427e57966829f444609d1deaa600010008 0001e9d34845212d00040008 00010d964d48a9d4"
        "00050008 00010d974d48a9d5",
        "7e57966829f444609d1deaa6",
        "72.69.33.45",
        59859,
    ),
    (
        "in-process pion server",
        "010100242112a442ebc2d36ef471217c4f3e308e8022000a 656e64706f696e746572000000200008 0001ce665e12a443"
        "80280004b699bb02 010100242112a442",
        "ebc2d36ef471217c4f3e308e",
        "127.0.0.1",
        61300,
    ),
    (
        "stuntman-server ipv6",
        "010100482112a44206f56685d28af3e69ce341e200010014 000290ce260200d1b4cfc10038b231fffeef96f6"
        "802b0014 00020d962604a880000200d100000000 00c5700100200014 0002b1dc0710a493b23aa785ea38c219"
        "620cd714",
        "06f56685d28af3e69ce341e2",
        "2602:d1:b4cf:c100:38b2:31ff:feef:96f6",
        37070,
    ),
    (
        "software-a (padding of a 1-byte attribute)",
        "010100142112a442ebc2d36ef471217c4f3e308e80220001 6100000000200008 0001ce665e12a443",
        "ebc2d36ef471217c4f3e308e",
        "127.0.0.1",
        61300,
    ),
]


@pytest.mark.parametrize("name, data, txid, host, port", RESPONSES, ids=[r[0] for r in RESPONSES])
def test_tailscale_response_vectors(name: str, data: str, txid: str, host: str, port: int) -> None:
    got_txid, mapped = stun.parse_response(bytes.fromhex(data.replace(" ", "")))
    assert (got_txid.hex(), mapped) == (txid, (host, port))


def test_a_request_type_is_not_a_response() -> None:
    # Tailscale's "software-abc" vector has a request's type (0x0001): a current parser refuses it.
    data = bytes.fromhex(
        "000100142112a442ebc2d36ef471217c4f3e308e80220003 6162630000200008 0001ce665e12a443".replace(" ", "")
    )
    with pytest.raises(StunError) as err:
        stun.parse_response(data)
    assert err.value.reason == "not_success_response"


# TestIs.
@pytest.mark.parametrize(
    "data, want",
    [
        (b"", False),
        (bytes(20), False),
        (bytes(4) + bytes.fromhex("2112a442") + bytes(11), False),
        (bytes(4) + bytes.fromhex("2112a442") + bytes(12), True),
        (bytes(4) + bytes.fromhex("2112a442") + bytes(12) + b"foo", True),
        (b"\xf0" + bytes(3) + bytes.fromhex("2112a442") + bytes(12), False),
        (b"\x40" + bytes(3) + bytes.fromhex("2112a442") + bytes(12), False),
        (b"\x20" + bytes(3) + bytes.fromhex("2112a442") + bytes(12), True),
    ],
)
def test_is(data: bytes, want: bool) -> None:
    assert stun.is_stun(data) is want


def test_request_layout_is_tailscales() -> None:
    txid = bytes(range(12))
    req = stun.request(txid)
    body = (
        bytes.fromhex("0001")
        + (4 + 8 + 8).to_bytes(2, "big")
        + bytes.fromhex("2112a442")
        + txid
        + bytes.fromhex("80220008")
        + b"tailnode"
    )
    fp = (zlib.crc32(body) ^ 0x5354554E).to_bytes(4, "big")
    assert req == body + bytes.fromhex("80280004") + fp
    assert stun.parse_binding_request(req) == stun.BindingRequest(txid, fingerprint=True)


def test_binding_request_refusals() -> None:
    txid = stun.new_txid()
    bare = stun._message(stun.BINDING_REQUEST, txid, [], with_fingerprint=False)  # what turnutils sends
    assert stun.parse_binding_request(bare) == stun.BindingRequest(txid, fingerprint=False)
    bad_fp = bytearray(stun.request(txid))
    bad_fp[-1] ^= 1
    cases = {
        "bad_fingerprint": bytes(bad_fp),
        "not_stun": b"GET / HTTP/1.1\r\n\r\n....",
        "not_binding_request": stun.response(txid, ("1.2.3.4", 5)),
        "bad_length": bare[:2] + b"\x00\x08" + bare[4:],
        "malformed_attributes": bare[:2] + b"\x00\x04" + bare[4:] + b"\x80\x22\x00\x09",
    }
    for reason, data in cases.items():
        with pytest.raises(StunError) as err:
            stun.parse_binding_request(data)
        assert err.value.reason == reason


# TestResponse: our answers read back.
@pytest.mark.parametrize(
    "n, host, port", [(1, "1.2.3.4", 254), (2, "1.2.3.4", 257), (3, "1::4", 254), (4, "1::4", 257)]
)
def test_response_round_trip(n: int, host: str, port: int) -> None:
    txid = bytes([n]) * 12
    for fp in (False, True):
        assert stun.parse_response(stun.response(txid, (host, port), fp)) == (txid, (host, port))


def test_response_layout() -> None:
    txid = bytes([1]) * 12
    resp = stun.response(txid, ("1.2.3.4", 254))
    # header, then XOR-MAPPED-ADDRESS: family 1, port ^ 0x2112, address ^ cookie; as Tailscale's stun.Response.
    assert resp == (
        bytes.fromhex("0101000c2112a442")
        + txid
        + bytes.fromhex("002000080001")
        + (254 ^ 0x2112).to_bytes(2, "big")
        + bytes([1 ^ 0x21, 2 ^ 0x12, 3 ^ 0xA4, 4 ^ 0x42])
    )
    assert stun.response(txid, ("::ffff:1.2.3.4", 254)) == resp  # a dual-stack socket's IPv4 client


def test_binding_client_retransmits_and_matches() -> None:
    c = BindingClient(rto=0.5, tries=3)
    assert c.due(0.0) == c.packet and c.due(0.1) is None
    assert c.due(0.5) == c.packet and c.due(1.0) is None and c.due(1.5) == c.packet
    assert c.due(10.0) is None and c.failed(2.4) is False and c.failed(3.5) is True
    assert c.receive(stun.response(stun.new_txid(), ("1.2.3.4", 5))) is None  # someone else's answer
    assert c.receive(b"junk") is None
    assert c.receive(stun.response(c.txid, ("1.2.3.4", 5))) == ("1.2.3.4", 5)
    assert c.result == ("1.2.3.4", 5) and c.failed(99.0) is False

"""TSMP packets against Tailscale's: the byte vectors of net/packet/tsmp_test.go
(TestTSMPDiscoKeyAdvertisementMarshal), the round trip of net/tstun/wrap_test.go
(TestTSMPDisco, TestFilterDropEmptyTSMPDiscoAdvertInbound), and the ping/pong
layout of tsmp.go with the pong's header as injectOutboundPong makes it."""

from __future__ import annotations

import ipaddress
import random
import struct
from collections import Counter

import pytest

from meshsup.actors.wire import ip, tsmp
from meshsup.actors.wire.tsmp import DiscoAdvertisement, Ping, Pong, TsmpError

ADVERT_KEY = b"a" * 32  # Tailscale's testKey
DATA = bytes(range(1, 9))


def rfc1071(header: bytes) -> int:
    """The IPv4 header checksum by the book, word by word, independent of ip.py's."""
    total = sum(struct.unpack(f"!{len(header) // 2}H", header))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def resummed(pkt: bytearray) -> bytes:
    """`pkt` with its IPv4 header checksum made right again after an edit."""
    pkt[10:12] = b"\0\0"
    pkt[10:12] = rfc1071(bytes(pkt[:20])).to_bytes(2, "big")
    return bytes(pkt)


def packed(*hosts: str) -> bytes:
    return b"".join(ipaddress.ip_address(h).packed for h in hosts)


# --- TestTSMPDiscoKeyAdvertisementMarshal ------------------------------------------------


def test_disco_advertisement_v4_header_is_tailscales() -> None:
    # IPv4: Ver(4)Len(5), TOS, Len(53), ID, Flags, TTL(64), Proto(99), Cksum
    want = bytes.fromhex("45000035000000004063705d") + packed("1.2.3.4", "4.3.2.1") + b"a" + ADVERT_KEY
    assert tsmp.disco_advertisement("1.2.3.4", "4.3.2.1", ADVERT_KEY) == want
    assert rfc1071(want[:10] + b"\0\0" + want[12:20]) == 0x705D
    assert tsmp.parse(want) == DiscoAdvertisement("1.2.3.4", "4.3.2.1", ADVERT_KEY)


def test_disco_advertisement_v6_header_is_tailscales() -> None:
    # IPv6: Ver(6)TCFlow, Len(33), NextHdr(99), HopLim(64)
    want = bytes.fromhex("6000000000216340") + packed("2001:db8::1", "2001:db8::2") + b"a" + ADVERT_KEY
    assert tsmp.disco_advertisement("2001:db8::1", "2001:db8::2", ADVERT_KEY) == want
    # TestTSMPDisco/IPv6DiscoAdvert: the source and key come back out.
    assert tsmp.parse(want) == DiscoAdvertisement("2001:db8::1", "2001:db8::2", ADVERT_KEY)


def test_an_advertisement_of_the_zero_key_is_refused() -> None:
    """TestFilterDropEmptyTSMPDiscoAdvertInbound: a 33-byte body of 'a' and zeros teaches nothing."""
    pkt = tsmp.disco_advertisement("1.2.3.4", "5.6.7.8", ADVERT_KEY)
    with pytest.raises(TsmpError, match="zero_key"):
        tsmp.parse(pkt[:21] + bytes(32))
    with pytest.raises(ValueError):
        tsmp.disco_advertisement("1.2.3.4", "5.6.7.8", bytes(32))


# --- ping and pong ------------------------------------------------------------------------


def test_ping_is_tailscales_layout() -> None:
    """sendTSMPPing: an IP4Header (ID 0) and 'p' with 8 bytes; 29 bytes in all."""
    head = bytes.fromhex("4500001d00000000406300000102030404030201")
    want = head[:10] + rfc1071(head).to_bytes(2, "big") + head[12:] + b"p" + DATA
    assert tsmp.ping("1.2.3.4", "4.3.2.1", DATA) == want
    assert tsmp.parse(want) == Ping("1.2.3.4", "4.3.2.1", DATA, 0)
    v6 = tsmp.ping("fd7a:115c:a1e0::1", "fd7a:115c:a1e0::2", DATA)
    assert v6 == bytes.fromhex("6000000000096340") + packed("fd7a:115c:a1e0::1", "fd7a:115c:a1e0::2") + b"p" + DATA


def test_pong_swaps_the_addresses_and_flips_the_ident_bits() -> None:
    """injectOutboundPong: the request's header ToResponse (addresses swapped, IPID ^= all ones),
    then TSMPPongReply.Marshal: 'o', the 8 bytes, the PeerAPI port."""
    request = bytearray(tsmp.ping("100.64.0.1", "100.64.0.2", DATA))
    request[4:6] = b"\x12\x34"
    ping = tsmp.parse(resummed(request))
    assert isinstance(ping, Ping) and ping == Ping("100.64.0.1", "100.64.0.2", DATA, 0x1234)
    answer = tsmp.pong(ping, peer_api_port=0xABCD)
    head = bytes.fromhex("4500001fedcb000040630000") + packed("100.64.0.2", "100.64.0.1")
    assert answer == head[:10] + rfc1071(head).to_bytes(2, "big") + head[12:] + b"o" + DATA + b"\xab\xcd"
    assert tsmp.parse(answer) == Pong("100.64.0.2", "100.64.0.1", DATA, 0xABCD)

    v6 = bytearray(tsmp.ping("fd7a::1", "fd7a::2", DATA))
    v6[1:4] = b"\x0a\xbc\xde"  # flow label 0xabcde
    ping6 = tsmp.parse(v6)
    assert isinstance(ping6, Ping) and ping6.ident == 0xABCDE
    answer6 = tsmp.pong(ping6)
    assert answer6[:8] == bytes.fromhex("60054321000b6340") and answer6[8:40] == packed("fd7a::2", "fd7a::1")
    assert tsmp.parse(answer6) == Pong("fd7a::2", "fd7a::1", DATA, 0)


def test_a_pong_from_an_old_node_has_no_port_and_trailing_bytes_are_ignored() -> None:
    answer = tsmp.pong(Ping("1.2.3.4", "4.3.2.1", DATA))
    old = bytearray(answer[:-2])
    old[2:4] = len(old).to_bytes(2, "big")
    assert tsmp.parse(resummed(old)) == Pong("4.3.2.1", "1.2.3.4", DATA, 0)
    # Bytes beyond the IP header's length (a buffer's slack) and beyond the message are not read.
    assert tsmp.parse(answer + b"slack") == tsmp.parse(answer)
    assert tsmp.parse(_with_body(b"p" + DATA + b"later fields")) == Ping("1.2.3.4", "4.3.2.1", DATA)


# --- refusals ------------------------------------------------------------------------------


def _with_body(body: bytes, *header_bytes: tuple[int, int]) -> bytes:
    """An IPv4 TSMP packet of `body`, with (offset, value) bytes set in its header, checksummed."""
    pkt = bytearray(tsmp.ping("1.2.3.4", "4.3.2.1", DATA)[:20] + body)
    pkt[2:4] = len(pkt).to_bytes(2, "big")
    for offset, value in header_bytes:
        pkt[offset] = value
    return resummed(pkt)


def test_every_refusal_has_its_reason() -> None:
    good = tsmp.ping("1.2.3.4", "4.3.2.1", DATA)
    bad_sum = bytearray(good)
    bad_sum[11] ^= 1
    v6 = tsmp.ping("fd7a::1", "fd7a::2", DATA)
    cases = {
        "not_ip": [b"", b"\x20" + good[1:]],
        "truncated": [good[:19], good[:-1], v6[:39], v6[:-1], b"\x44" + good[1:]],
        "not_tsmp": [_with_body(b"p" + DATA, (ip.IPV4_PROTOCOL, 6)), v6[:6] + b"\x2c" + v6[7:]],
        "fragment": [
            _with_body(b"p" + DATA, (ip.IPV4_FRAGMENT, 0x20)),
            _with_body(b"p" + DATA, (ip.IPV4_FRAGMENT + 1, 1)),
        ],
        "bad_checksum": [bytes(bad_sum)],
        "short": [_with_body(b""), _with_body(b"p" + DATA[:7]), _with_body(b"o"), _with_body(b"a" + ADVERT_KEY[:31])],
        "unknown_type": [_with_body(b"!\x06A\x01\x02\x01\xbb")],  # a rejected-connection message
    }
    for reason, packets in cases.items():
        for pkt in packets:
            with pytest.raises(TsmpError) as err:
                tsmp.parse(pkt)
            assert err.value.reason == reason, (reason, pkt.hex(), str(err.value))
    assert tsmp.parse(_with_body(b"p" + DATA, (ip.IPV4_FRAGMENT, 0x40))).data == DATA, "DF is no fragment"


def test_packets_of_mixed_families_or_odd_data_are_not_built() -> None:
    with pytest.raises(ValueError, match="one IP version"):
        tsmp.ping("1.2.3.4", "fd7a::1", DATA)
    with pytest.raises(ValueError, match="8 bytes"):
        tsmp.ping("1.2.3.4", "4.3.2.1", DATA[:7])


def test_random_packets_parse_or_are_refused_never_raise_otherwise() -> None:
    rng = random.Random(99)
    outcomes: Counter[str] = Counter()
    for _ in range(10_000):
        v4 = rng.random() < 0.5
        head = ip.IPV4_HEADER_MIN if v4 else ip.IPV6_HEADER
        pkt = bytearray([0x45 if v4 else 0x60]) + rng.randbytes(rng.randrange(0, 90))
        if len(pkt) > head and rng.random() < 0.8:  # mostly an IP header that holds, so that bodies are read
            pkt[head] = rng.choice(b"poa!")
            if v4:
                pkt[ip.IPV4_PROTOCOL], pkt[2:4], pkt[6:8] = tsmp.IPPROTO_TSMP, len(pkt).to_bytes(2, "big"), bytes(2)
                pkt = bytearray(resummed(pkt)) if rng.random() < 0.9 else pkt
            else:
                pkt[ip.IPV6_NEXT_HEADER], pkt[4:6] = tsmp.IPPROTO_TSMP, (len(pkt) - head).to_bytes(2, "big")
        try:
            outcomes[type(tsmp.parse(pkt)).__name__] += 1
        except TsmpError as err:
            outcomes[err.reason] += 1
    assert {"Ping", "Pong", "DiscoAdvertisement", "short", "unknown_type", "truncated", "bad_checksum"} <= set(outcomes)

"""Unit tests of the WireGuard primitives, wire formats, replay window, allowed IPs and TAI64N."""

from __future__ import annotations

import hashlib
import ipaddress
import os

import pytest

from meshsup.actors.crypto import messages
from meshsup.actors.crypto.cookie import CookieChecker, CookieGenerator, SourceRateLimiter, endpoint_bytes
from meshsup.actors.crypto.handshake import INITIAL_CHAIN_KEY, INITIAL_HASH
from meshsup.actors.crypto.noise import (
    StaticKey,
    aead_decrypt,
    aead_encrypt,
    counter_nonce,
    hash_,
    hchacha20,
    hmac_,
    kdf1,
    kdf2,
    kdf3,
    mac,
    xaead_decrypt,
    xaead_encrypt,
)
from meshsup.actors.crypto.replay import WINDOW_SIZE, ReplayFilter
from meshsup.actors.crypto.tai64n import is_after, tai64n
from meshsup.actors.routing.allowedips import AllowedIPs

SUNSCREEN = (
    b"Ladies and Gentlemen of the class of '99: If I could offer you only one tip for "
    b"the future, sunscreen would be it."
)


# --- primitives


def test_blake2s_known_values() -> None:
    assert hash_(b"").hex() == "69217a3079908094e11121d042354a7c1f55b6482ca1a51e1b250dfd1ed0eef9"
    # The Noise constants every WireGuard implementation hard-codes.
    assert INITIAL_CHAIN_KEY.hex() == "60e26daef327efc02ec335e2a025d2d016eb4206f87277f52d38d1988b78cd36"
    assert INITIAL_HASH.hex() == "2211b361081ac566691243db458ad5322d9c6c662293e8b70ee19c65ba079ef3"
    assert hash_(b"ab", b"c") == hash_(b"abc")


def test_mac_is_keyed_blake2s_128() -> None:
    key, data = os.urandom(32), b"mac1 covers everything before it"
    assert len(mac(key, data)) == 16
    assert mac(key, data) != mac(os.urandom(32), data)
    assert mac(key, data) != hashlib.blake2s(data, digest_size=16).digest()


@pytest.mark.parametrize("key_len", [32, 100])
def test_hmac_blake2s_follows_rfc2104(key_len: int) -> None:
    key, data = os.urandom(key_len), b"message"
    block = hashlib.blake2s(key).digest() if key_len > 64 else key
    block = block.ljust(64, b"\x00")
    inner = hashlib.blake2s(bytes(b ^ 0x36 for b in block) + data).digest()
    assert hmac_(key, data) == hashlib.blake2s(bytes(b ^ 0x5C for b in block) + inner).digest()


def test_kdf_outputs_chain() -> None:
    ck, data = os.urandom(32), os.urandom(32)
    t1, t2, t3 = kdf3(ck, data)
    assert kdf2(ck, data) == (t1, t2) and kdf1(ck, data) == t1
    prk = hmac_(ck, data)
    assert t3 == hmac_(prk, t2 + b"\x03") and len({t1, t2, t3}) == 3


def test_aead_counter_nonce_and_tamper() -> None:
    assert counter_nonce(1) == bytes(4) + b"\x01" + bytes(7)
    key = os.urandom(32)
    sealed = aead_encrypt(key, 7, b"payload", b"aad")
    assert len(sealed) == len(b"payload") + 16
    assert aead_decrypt(key, 7, sealed, b"aad") == b"payload"
    assert aead_decrypt(key, 8, sealed, b"aad") is None
    assert aead_decrypt(key, 7, sealed, b"other") is None


def test_hchacha20_draft_vector() -> None:
    # draft-irtf-cfrg-xchacha-03 section 2.2.1
    out = hchacha20(bytes(range(32)), bytes.fromhex("000000090000004a0000000031415927"))
    assert out.hex() == "82413b4227b27bfed30e42508a877d73a0f9e4d58a74a853c12ec41326d3ecdc"


def test_xchacha20_poly1305_draft_vector() -> None:
    # draft-irtf-cfrg-xchacha-03 appendix A.3.1
    key = bytes(range(0x80, 0xA0))
    nonce = bytes(range(0x40, 0x58))
    aad = bytes.fromhex("50515253c0c1c2c3c4c5c6c7")
    sealed = xaead_encrypt(key, nonce, SUNSCREEN, aad)
    assert sealed[:-16].hex() == (
        "bd6d179d3e83d43b9576579493c0e939572a1700252bfaccbed2902c21396cbb"
        "731c7f1b0b4aa6440bf3a82f4eda7e39ae64c6708c54c216cb96b72e1213b452"
        "2f8c9ba40db5d945b11b69b982c1bb9e3f3fac2bc369488f76b2383565d3fff9"
        "21f9664c97637da9768812f615c68b13b52e"
    )
    assert sealed[-16:].hex() == "c0875924c1c7987947deafd8780acf49"
    assert xaead_decrypt(key, nonce, sealed, aad) == SUNSCREEN
    assert xaead_decrypt(key, nonce, sealed[:-1] + b"\x00", aad) is None


def test_x25519_rfc7748_vector_and_low_order_point() -> None:
    alice = StaticKey(bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a"))
    bob = StaticKey(bytes.fromhex("5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb"))
    assert alice.public.hex() == "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"
    assert bob.public.hex() == "de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f"
    shared = "4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742"
    assert alice.dh(bob.public).hex() == shared and bob.dh(alice.public).hex() == shared
    assert alice.dh(bytes(32)) is None  # all-zero shared secret is refused, as by wireguard-go


# --- TAI64N


def test_tai64n_encoding_and_ordering() -> None:
    assert tai64n(0.0) == bytes.fromhex("400000000000000a00000000")
    assert tai64n(1.5)[:8] == bytes.fromhex("400000000000000b")
    t = 1_700_000_000.25
    assert is_after(tai64n(t + 0.02), tai64n(t))
    assert is_after(tai64n(t + 1), tai64n(t + 0.9))
    assert not is_after(tai64n(t), tai64n(t))
    assert not is_after(tai64n(t), tai64n(t + 5))
    # Whitening: times within one ~16.7 ms step are indistinguishable (and so not "after").
    assert tai64n(t + 0.001) == tai64n(t)


# --- wire formats


def test_message_pack_parse_roundtrip() -> None:
    init = messages.pack_initiation(7, b"e" * 32, b"s" * 48, b"t" * 28)
    assert len(init) == messages.INITIATION_SIZE == 148
    assert messages.parse_initiation(init) == messages.Initiation(
        7, b"e" * 32, b"s" * 48, b"t" * 28, bytes(16), bytes(16)
    )
    resp = messages.pack_response(1, 2, b"e" * 32, b"x" * 16, b"m" * 16, b"n" * 16)
    assert len(resp) == messages.RESPONSE_SIZE == 92
    assert messages.parse_response(resp) == messages.Response(1, 2, b"e" * 32, b"x" * 16, b"m" * 16, b"n" * 16)
    cookie = messages.pack_cookie_reply(9, b"n" * 24, b"c" * 32)
    assert len(cookie) == messages.COOKIE_REPLY_SIZE == 64
    assert messages.parse_cookie_reply(cookie) == messages.CookieReply(9, b"n" * 24, b"c" * 32)
    transport = messages.pack_transport_header(5, 2**64 - 1) + bytes(16)
    assert messages.parse_transport_header(transport) == messages.TransportHeader(5, 2**64 - 1)
    assert messages.message_type(transport) == messages.MESSAGE_TRANSPORT


@pytest.mark.parametrize(
    "parse,good",
    [
        (messages.parse_initiation, messages.pack_initiation(1, bytes(32), bytes(48), bytes(28))),
        (messages.parse_response, messages.pack_response(1, 2, bytes(32), bytes(16))),
        (messages.parse_cookie_reply, messages.pack_cookie_reply(1, bytes(24), bytes(32))),
        (messages.parse_transport_header, messages.pack_transport_header(1, 0) + bytes(16)),
    ],
)
def test_message_parse_rejects_wrong_length_and_type(parse, good: bytes) -> None:
    assert parse(good) is not None
    assert parse(good[:-1]) is None
    assert parse(b"") is None
    assert parse(b"\x05" + good[1:]) is None  # wrong type
    assert parse(good[:1] + b"\x01" + good[2:]) is None  # reserved bytes must be zero
    if parse is not messages.parse_transport_header:  # transport payloads vary in length
        assert parse(good + b"\x00") is None


# --- cookies


def test_mac1_mac2_and_cookie_reply_roundtrip() -> None:
    responder = StaticKey(os.urandom(32))
    checker = CookieChecker(responder.public, os.urandom)
    generator = CookieGenerator(responder.public)
    source = endpoint_bytes(("198.51.100.7", 4242))
    msg = generator.add_macs(messages.pack_initiation(3, os.urandom(32), os.urandom(48), os.urandom(28)), 0.0)
    assert checker.check_mac1(msg)
    assert msg[-16:] == bytes(16) and not checker.check_mac2(msg, source, 0.0)
    assert not checker.check_mac1(msg[:-32] + bytes(16) + msg[-16:])
    assert not CookieChecker(os.urandom(32), os.urandom).check_mac1(msg)

    reply = messages.parse_cookie_reply(checker.create_reply(msg, 3, source, 0.0))
    assert reply is not None and reply.receiver == 3
    assert generator.consume_reply(reply, 1.0)
    assert not generator.consume_reply(reply, 1.0), "a reply is consumed once"
    retry = generator.add_macs(msg, 2.0)
    assert checker.check_mac1(retry) and checker.check_mac2(retry, source, 2.0)
    assert not checker.check_mac2(retry, endpoint_bytes(("198.51.100.8", 4242)), 2.0)
    # The cookie lapses for the initiator after 120 s, and the responder's secret rotates.
    assert generator.add_macs(msg, 122.0)[-16:] == bytes(16)
    assert not checker.check_mac2(retry, source, 121.0)


def test_cookie_reply_for_another_message_is_rejected() -> None:
    responder = StaticKey(os.urandom(32))
    checker = CookieChecker(responder.public, os.urandom)
    generator = CookieGenerator(responder.public)
    source = endpoint_bytes(("198.51.100.7", 4242))
    first = generator.add_macs(messages.pack_initiation(1, os.urandom(32), bytes(48), bytes(28)), 0.0)
    generator.add_macs(messages.pack_initiation(2, os.urandom(32), bytes(48), bytes(28)), 0.0)
    reply = messages.parse_cookie_reply(checker.create_reply(first, 1, source, 0.0))
    assert reply is not None and not generator.consume_reply(reply, 0.0)


def test_source_rate_limiter_burst_then_rate() -> None:
    limiter = SourceRateLimiter()
    allowed = [limiter.allow("198.51.100.9", 0.0) for _ in range(10)]
    assert allowed.count(True) == 5
    assert limiter.allow("198.51.100.10", 0.0), "other sources are not affected"
    assert limiter.allow("198.51.100.9", 0.06)
    # IPv6 sources share a bucket per /64.
    assert sum(limiter.allow(f"2001:db8::{i}", 0.0) for i in range(10)) == 5


# --- replay window


def test_replay_in_order_and_duplicates() -> None:
    f = ReplayFilter()
    assert all(f.validate(i, 2**64) for i in range(20000))
    assert not f.validate(19999, 2**64)
    assert not f.validate(0, 2**64)


def test_replay_out_of_order_within_window() -> None:
    f = ReplayFilter()
    assert f.validate(100, 2**64)
    assert f.validate(50, 2**64)
    assert not f.validate(50, 2**64)
    assert f.validate(0, 2**64)
    assert f.validate(99, 2**64) and f.validate(101, 2**64)


def test_replay_window_edge() -> None:
    assert WINDOW_SIZE >= 8128
    f = ReplayFilter()
    assert f.validate(20000, 2**64)
    assert f.validate(20000 - WINDOW_SIZE, 2**64)
    assert not f.validate(20000 - WINDOW_SIZE - 1, 2**64)


def test_replay_window_wraps_its_ring() -> None:
    f = ReplayFilter()
    assert all(f.validate(i, 2**64) for i in range(0, 30000, 2))
    last = 29998
    odd_in_window = range(last - WINDOW_SIZE + 1, last, 2)
    assert all(f.validate(i, 2**64) for i in odd_in_window)
    assert not any(f.validate(i, 2**64) for i in range(1, last - WINDOW_SIZE, 2))


def test_replay_jump_beyond_window() -> None:
    f = ReplayFilter()
    for i in range(64 * 3):
        assert f.validate(i, 2**64)
    jump = 64 * 3 + 64 * 128  # the whole ring is recycled
    assert f.validate(jump, 2**64)
    assert not f.validate(5, 2**64)
    # Bits of the old counters must not linger in the recycled blocks.
    assert all(f.validate(i, 2**64) for i in range(jump - 64 * 3, jump))
    assert f.validate(10**12, 2**64) and not f.validate(jump, 2**64)


def test_replay_limit() -> None:
    f = ReplayFilter()
    limit = 2**64 - 2**13 - 1
    assert not f.validate(limit, limit)
    assert f.validate(limit - 1, limit)


# --- allowed IPs


def ip(text: str) -> bytes:
    return ipaddress.ip_address(text).packed


def test_allowed_ips_longest_prefix_v4() -> None:
    t = AllowedIPs()
    t.insert("10.0.0.0/8", "A")
    t.insert("10.1.0.0/16", "B")
    t.insert(ipaddress.ip_network("10.1.1.1/32"), "C")
    assert t.lookup(ip("10.1.1.1")) == "C"
    assert t.lookup(ip("10.1.2.3")) == "B"
    assert t.lookup(ip("10.2.0.1")) == "A"
    assert t.lookup(ip("11.0.0.1")) is None
    t.insert("0.0.0.0/0", "D")
    assert t.lookup(ip("11.0.0.1")) == "D"
    assert t.lookup(ip("fd00::1")) is None, "IPv4 default route does not cover IPv6"
    assert t.lookup(b"\x01\x02\x03") is None


def test_allowed_ips_longest_prefix_v6() -> None:
    t = AllowedIPs()
    t.insert("::/0", "A")
    t.insert("fd00::/64", "B")
    t.insert("fd00::1/128", "C")
    assert t.lookup(ip("fd00::1")) == "C"
    assert t.lookup(ip("fd00::2")) == "B"
    assert t.lookup(ip("fd00:0:0:1::2")) == "A"
    assert t.lookup(ip("10.0.0.1")) is None


def test_allowed_ips_move_remove_and_mask() -> None:
    t = AllowedIPs()
    t.insert("10.9.9.9/8", "A")  # host bits are masked off
    t.insert("10.1.0.0/16", "B")
    t.insert("10.1.0.0/16", "C")  # a prefix belongs to one peer: it moves
    assert t.lookup(ip("10.1.0.1")) == "C"
    assert t.networks("B") == [] and t.networks("A") == [ipaddress.ip_network("10.0.0.0/8")]
    assert t.get("10.1.0.0/16") == "C" and t.get("10.1.0.0/24") is None  # that prefix alone, no longest match
    t.remove("10.1.0.0/16", "B")  # not B's: no effect
    assert t.lookup(ip("10.1.0.1")) == "C"
    t.remove_peer("C")
    assert t.lookup(ip("10.1.0.1")) == "A"
    t.remove("10.0.0.0/8", "A")
    assert t.lookup(ip("10.1.0.1")) is None

"""`wg set` requests applied to a node's config, and `wg show` built from it (sans-IO)."""

from __future__ import annotations

import errno
import ipaddress
from dataclasses import replace
from pathlib import Path

from meshsup.actors.settings import PeerSettings, Settings, keys, parse
from meshsup.actors.settings.node import EXIT_MARK
from meshsup.supervisor.uapi import SetRequest, UapiError, parse_request, serialize_get
from meshsup.supervisor.wgapi import apply_set, device_state

NODE_PRIV = keys.generate_private()
K1, K2, K3 = (keys.public_of(keys.generate_private()) for _ in range(3))


def config(*peers: PeerSettings) -> Settings:
    node = parse("test.toml", {"node": {"name": "alpha", "private_key": keys.b64(NODE_PRIV)}}, Path("."), Path("."))
    return replace(node, peers=peers)


def peer(key: bytes, name: str, allowed: list[str]) -> PeerSettings:
    return PeerSettings(
        name=name,
        public_key=key,
        preshared_key=None,
        allowed_ips=tuple(ipaddress.ip_network(a) for a in allowed),
        endpoints=(),
        persistent_keepalive=0,
    )


def allowed(p: PeerSettings) -> list[str]:
    return [str(n) for n in p.allowed_ips]


def wg_set(conf: Settings, *lines: str) -> Settings | UapiError:
    request = parse_request(("set=1\n" + "".join(f"{line}\n" for line in lines)).encode())
    assert isinstance(request, SetRequest), request
    return apply_set(conf, request)


def test_new_peer_with_endpoint_keepalive_and_psk() -> None:
    psk = bytes(range(32))
    new = wg_set(
        config(),
        f"public_key={K1.hex()}",
        "endpoint=[fd00::2]:51820",
        f"preshared_key={psk.hex()}",
        "persistent_keepalive_interval=25",
        "allowed_ip=100.64.0.2/32",
        "allowed_ip=10.0.0.0/8",
    )
    assert isinstance(new, Settings)
    (p,) = new.peers
    assert p.name == f"peer-{K1[:4].hex()}" and p.endpoints == (("fd00::2", 51820),)
    assert p.preshared_key == psk and p.persistent_keepalive == 25
    assert allowed(p) == ["100.64.0.2/32", "10.0.0.0/8"]


def test_an_allowed_ip_moves_to_the_peer_that_claims_it() -> None:
    conf = config(peer(K1, "bravo", ["100.64.0.2/32", "10.0.0.0/8"]), peer(K2, "charlie", ["100.64.0.3/32"]))
    new = wg_set(conf, f"public_key={K2.hex()}", "allowed_ip=10.0.0.0/8")
    assert isinstance(new, Settings)
    assert allowed(new.peers[0]) == ["100.64.0.2/32"]
    assert allowed(new.peers[1]) == ["100.64.0.3/32", "10.0.0.0/8"]
    assert allowed(conf.peers[0]) == ["100.64.0.2/32", "10.0.0.0/8"]  # the running config is untouched


def test_replace_allowed_ips_remove_update_only_and_replace_peers() -> None:
    conf = config(peer(K1, "bravo", ["100.64.0.2/32"]), peer(K2, "charlie", ["100.64.0.3/32"]))
    new = wg_set(
        conf,
        f"public_key={K1.hex()}",
        "replace_allowed_ips=true",
        "allowed_ip=100.64.9.0/24",
        f"public_key={K2.hex()}",
        "remove=true",
        f"public_key={K3.hex()}",
        "update_only=true",
        "allowed_ip=100.64.0.4/32",
    )
    assert isinstance(new, Settings)
    assert [(p.name, allowed(p)) for p in new.peers] == [("bravo", ["100.64.9.0/24"])]
    assert wg_set(conf, "replace_peers=true") == replace(conf, peers=())


def test_own_key_is_ignored_and_a_new_private_key_drops_the_matching_peer() -> None:
    conf = config(peer(K1, "bravo", ["100.64.0.2/32"]))
    own = keys.public_of(NODE_PRIV)
    assert wg_set(conf, f"public_key={own.hex()}", "allowed_ip=100.64.0.9/32") == conf
    priv = keys.generate_private()
    new = wg_set(conf, f"private_key={priv.hex()}")
    assert isinstance(new, Settings) and new.node.public_key == keys.public_of(priv)
    new = wg_set(conf, f"private_key={keys.generate_private().hex()}", f"public_key={K1.hex()}", "remove=true")
    assert isinstance(new, Settings) and new.peers == ()


def test_refusals_name_the_problem() -> None:
    conf = config()
    assert wg_set(conf, "fwmark=7").errno == errno.EOPNOTSUPP
    assert wg_set(conf, "fwmark=0") == conf


def test_the_exit_nodes_fwmark_is_shown_and_may_be_set_to_itself() -> None:
    conf = config(peer(K1, "bravo", ["100.64.0.2/32", "0.0.0.0/0"]))
    using = replace(conf, node=replace(conf.node, exit_node="bravo"))
    assert f"fwmark={EXIT_MARK}\n" in serialize_get(device_state(using, {})).decode()
    assert "fwmark" not in serialize_get(device_state(conf, {})).decode()
    assert wg_set(using, f"fwmark={EXIT_MARK}") == using
    refused = wg_set(using, "fwmark=7")
    assert isinstance(refused, UapiError) and refused.errno == errno.EOPNOTSUPP and str(EXIT_MARK) in refused.message
    assert wg_set(conf, f"private_key={bytes(32).hex()}").errno == errno.EINVAL


def test_get_reports_live_figures_over_the_config() -> None:
    conf = config(replace(peer(K1, "bravo", ["100.64.0.2/32"]), endpoints=(("198.51.100.2", 51820),)))
    live = {
        keys.b64(K1): {"endpoint": "198.51.100.9:4000", "rx_bytes": 10, "tx_bytes": 20, "last_handshake": 1700000000}
    }
    text = serialize_get(device_state(conf, live)).decode()
    assert f"public_key={K1.hex()}\n" in text and "endpoint=198.51.100.9:4000\n" in text
    assert "rx_bytes=10\n" in text and "tx_bytes=20\n" in text and "last_handshake_time_sec=1700000000\n" in text
    assert "allowed_ip=100.64.0.2/32\n" in text and text.endswith("errno=0\n\n")
    assert "endpoint=198.51.100.2:51820\n" in serialize_get(device_state(conf, {})).decode()

"""The settings layer: parsed once into frozen typed objects, carried on the bus as plain data."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import pytest

from meshsup.actors.bus.codec import decode, encode
from meshsup.actors.bus.messages import Configure
from meshsup.actors.dns.rules import matches
from meshsup.actors.settings import ConfigError, Settings, parse, wire
from meshsup.actors.settings.keys import b64, generate_private, public_of
from meshsup.actors.settings.wire import WireError
from meshsup.supervisor import config as cfg
from tests.netlog_fixtures import make_certificate

PEER = b64(public_of(generate_private()))


def full_config(tmp_path: Path) -> Path:
    """Every section, with a value of every kind the settings hold."""
    make_certificate(tmp_path)  # cert.pem, named relative to the config file below
    path = tmp_path / "node.toml"
    path.write_text(f"""
[node]
name = "alpha"
private_key = "{b64(generate_private())}"
addresses = ["100.64.0.1/10", "fd7a:115c:a1e0::1/48"]
mtu = 1380
advertise_exit_node = true
advertise_routes = ["10.20.0.0/16", "fd00:20::/64"]
exit_node = "bravo"
exit_node_allow_lan = true

[[peers]]
name = "bravo"
public_key = "{PEER}"
preshared_key = "{b64(generate_private())}"
allowed_ips = ["100.64.0.2/32", "10.20.0.0/16", "::/0"]
endpoints = ["198.51.100.2:51820", "[2001:db8::2]:51821"]
persistent_keepalive = 25

[actors]
crypto = 3
dns = 2

[supervisor]
intensity = 7
period = 2.5

[dns]
listen = ["127.0.0.1:5353", "::1"]
upstreams = ["udp://198.51.100.53", "https://198.51.100.54/q#doh.example"]
timeout = 3
allow = ["192.168.0.0/16"]
rate_limit_window = 2
srv = [{{name = "_http._tcp", target = "bravo", port = 80, weight = 5}}]
source_overrides = [{{source = "10.9.0.0/16", upstreams = ["tcp://198.51.100.55"]}}]
routes = [{{suffix = "corp.example", upstreams = ["tls://198.51.100.56#dns.corp.example"]}}]
policy = "random"
rules = [{{match = "regex:^ads?\\\\.", action = "reject"}}, {{match = "qtype:AAAA", action = "fast"}}]
[dns.groups]
fast = ["udp://198.51.100.57"]
[dns.groups.near]
upstreams = ["udp://198.51.100.58", "tcp://198.51.100.59"]
policy = "min_latency"

[netlog]
interval = 2
collectors = [{{kind = "syslog", address = "tls://127.0.0.1:6514", ca_file = "cert.pem"}},
              {{kind = "ipfix", address = "udp://127.0.0.1:4739", template_interval = 30}}]

[logging]
level = "warning"
collectors = [{{kind = "http", address = "https://127.0.0.1:8443/logs", ca_file = "cert.pem", gzip = true}}]

[filter]
default = "reject"
outbound = true
[filter.groups]
ops = ["bravo"]
[[filter.rules]]
action = "accept"
src = ["group:ops", "10.9.0.0/16"]
dst = ["alpha:22", "[fd7a:115c:a1e0::1]:80-89", "*:*"]
proto = "tcp"
[[filter.rules]]
action = "deny"
src = ["*"]
dst = ["100.64.0.1:53"]
proto = 17

[[relays]]
name = "home"
url = "http://203.0.113.10:8080/derp"

[[relays]]
name = "far"
url = "https://[2001:db8::10]/derp"
stun = "203.0.113.11:3479"
ca_file = "cert.pem"
""")
    path.chmod(0o600)
    return path


def test_a_received_config_decoded_consuming_it_is_the_same_and_only_it_is_consumed(tmp_path: Path) -> None:
    """An actor decodes its Configure consuming it (wire.decode's consume); the supervisor's wire
    forms, given to one kind after another, are decoded as they are and stay whole."""
    settings = cfg.load_toml(full_config(tmp_path), tmp_path)
    kept = settings.to_wire()
    assert wire.decode(Settings, kept) == settings and kept == settings.to_wire()
    received = decode(encode(Configure(req=1, generation=1, config=kept)))
    assert isinstance(received, Configure)
    assert wire.decode(Settings, received.config, consume=True) == settings
    assert settings.peers and received.config["peers"] == [None] * len(settings.peers)


def test_the_wire_form_round_trips_through_the_bus(tmp_path: Path) -> None:
    settings = cfg.load_toml(full_config(tmp_path), tmp_path)
    msg = decode(encode(Configure(req=1, generation=1, config=settings.to_wire())))
    assert isinstance(msg, Configure)
    back = Settings.from_wire(msg.config)
    assert back == settings
    assert back.to_wire() == settings.to_wire()
    # What is worked out from the data comes back too, not only what equality compares.
    reject, fast = back.dns.rules
    assert matches(reject.matcher, "ad.example", 1) and not matches(reject.matcher, "bad.example", 1)
    assert matches(fast.matcher, "x.example", 28) and not matches(fast.matcher, "x.example", 1)
    assert [hash(u) for u in back.dns.upstreams] == [hash(u) for u in settings.dns.upstreams]
    assert (back.dns.policy, back.dns.groups["fast"].policy, back.dns.groups["near"].policy) == (
        "random",
        "failover",
        "min_latency",
    )
    assert [str(u) for u in back.dns.groups["near"].upstreams] == ["udp://198.51.100.58:53", "tcp://198.51.100.59:53"]
    assert back.netlog.collectors[0].ca_file == tmp_path / "cert.pem"
    home, far = back.relays
    assert (home.host, home.port, home.tls, home.stun, home.ca_file) == (
        "203.0.113.10",
        8080,
        False,
        ("203.0.113.10", 3478),
        None,
    )
    assert (far.host, far.port, far.tls, far.stun, far.ca_file) == (
        "2001:db8::10",
        443,
        True,
        ("203.0.113.11", 3479),
        tmp_path / "cert.pem",
    )
    assert far.hostport == "[2001:db8::10]:443"
    ops, dns = back.filter.rules
    assert (back.filter.default, back.filter.outbound) == ("reject", True)
    assert [str(n) for n in ops.sources] == ["100.64.0.2/32", "10.20.0.0/16", "::/0", "10.9.0.0/16"]
    assert [(str(d.network), d.first_port, d.last_port) for d in ops.destinations] == [
        ("100.64.0.1/32", 22, 22),
        ("fd7a:115c:a1e0::1/128", 22, 22),
        ("fd7a:115c:a1e0::1/128", 80, 89),
        ("0.0.0.0/0", 0, 65535),
        ("::/0", 0, 65535),
    ]
    assert (ops.protocol, dns.action, dns.protocol) == (6, "deny", 17)
    mesh = back.dns_for_mesh()
    assert mesh == settings.dns_for_mesh() and mesh.names["bravo"] == ("100.64.0.2",)
    assert [str(n) for n in mesh.sources] == [
        "100.64.0.0/10",
        "fd7a:115c:a1e0::/48",
        "100.64.0.2/32",
        "10.20.0.0/16",
        "::/0",
        "192.168.0.0/16",
    ]


def test_no_filter_table_accepts_everything_as_before(tmp_path: Path) -> None:
    settings = parse("n.toml", {"node": {"private_key": b64(generate_private())}}, tmp_path, tmp_path)
    assert not settings.filter.enabled and settings.filter.rules == ()


def test_the_exit_and_subnet_keys_are_read(tmp_path: Path) -> None:
    node = cfg.load_toml(full_config(tmp_path), tmp_path).node
    assert node.advertise_exit_node and node.exit_node_allow_lan and node.exit_node == "bravo"
    assert [str(r) for r in node.advertise_routes] == ["10.20.0.0/16", "fd00:20::/64"]
    plain = parse("n.toml", {"node": {"private_key": b64(generate_private())}}, tmp_path, tmp_path).node
    assert (plain.advertise_exit_node, plain.advertise_routes, plain.exit_node) == (False, (), "")


def test_settings_are_frozen(tmp_path: Path) -> None:
    settings = cfg.load_toml(full_config(tmp_path), tmp_path)
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.node.mtu = 1500  # type: ignore[misc]
    assert isinstance(settings.peers, tuple) and isinstance(settings.peers[0].allowed_ips, tuple)


@pytest.mark.parametrize(
    "doc, key, problem",
    [
        ({"colour": "red"}, "colour", "unknown key"),
        ({"node": {"mtu": 100}}, "node.mtu", "outside 576..65515"),
        ({"node": {"addresses": ["100.64.0.1/33"]}}, "node.addresses", "not an address with prefix length"),
        ({"peers": [{"public_key": PEER, "endpoints": ["example.com:1"]}]}, "peers[0].endpoints", "not an IP address"),
        ({"peers": [{"public_key": PEER}, {"public_key": PEER}]}, "peers[1].public_key", "same key as peers[0]"),
        ({"actors": {"crypto": 0}}, "actors.crypto", "outside 1..64"),
        ({"node": {"advertise_exit_node": 1}}, "node.advertise_exit_node", "must be bool"),
        ({"node": {"advertise_routes": ["10.20.0.0/33"]}}, "node.advertise_routes", "not an IP prefix"),
        ({"node": {"exit_node_allow_lan": "yes"}}, "node.exit_node_allow_lan", "must be bool"),
        ({"node": {"exit_node": "bravo"}}, "node.exit_node", "no peer named 'bravo'"),
        (
            {"node": {"exit_node": "bravo"}, "peers": [{"name": "bravo", "public_key": PEER}]},
            "node.exit_node",
            "neither 0.0.0.0/0 nor ::/0",
        ),
        ({"supervisor": {"period": 0}}, "supervisor.period", "more than 0"),
        ({"dns": {"ttl": -1}}, "dns.ttl", "outside"),
        ({"dns": {"rules": [{"match": "regex:(", "action": "reject"}]}}, "dns.rules[0].match", "bad regex"),
        ({"dns": {"bogus": 1}}, "dns", "unknown keys bogus"),
        ({"dns": {"policy": "fastest"}}, "dns.policy", "not one of failover, min_latency, random"),
        (
            {"dns": {"groups": {"near": {"upstreams": ["udp://198.51.100.1"], "policy": "best"}}}},
            "dns.groups.near.policy",
            "not one of",
        ),
        ({"netlog": {"interval": 0}}, "netlog.interval", "expected seconds"),
        ({"logging": {"level": "loud"}}, "logging.level", "expected one of"),
        ({"relays": [{"name": "r"}]}, "relays[0].url", "is required"),
        ({"filter": {"default": "drop"}}, "filter.default", "none of accept, deny, reject"),
        ({"filter": {"groups": {"ops": ["nobody"]}}}, "filter.groups.ops", "'nobody' is no peer"),
        (
            {"filter": {"rules": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}, {"src": ["*"]}]}},
            "filter.rules[1].action",
            "is required",
        ),
        ({"filter": {"rules": [{"action": "accept", "dst": ["*:*"]}]}}, "filter.rules[0].src", "is required"),
        (
            {"filter": {"rules": [{"action": "accept", "src": ["group:x"], "dst": ["*:*"]}]}},
            "filter.rules[0].src",
            "no such group",
        ),
        (
            {"filter": {"rules": [{"action": "accept", "src": ["nobody"], "dst": ["*:*"]}]}},
            "filter.rules[0].src",
            "neither",
        ),
        (
            {"filter": {"rules": [{"action": "accept", "src": ["*"], "dst": ["*"]}]}},
            "filter.rules[0].dst",
            "HOST:PORTS",
        ),
        (
            {"filter": {"rules": [{"action": "accept", "src": ["*"], "dst": ["*:9-2"]}]}},
            "filter.rules[0].dst",
            "no port range",
        ),
        (
            {"filter": {"rules": [{"action": "accept", "src": ["*"], "dst": ["*:http"]}]}},
            "filter.rules[0].dst",
            "no port",
        ),
        (
            {"filter": {"rules": [{"action": "accept", "src": ["*"], "dst": ["*:1"], "proto": "sctp"}]}},
            "filter.rules[0].proto",
            "none of any",
        ),
        (
            {"filter": {"rules": [{"action": "accept", "src": ["*"], "dst": ["*:1"], "proto": 300}]}},
            "filter.rules[0].proto",
            "no protocol",
        ),
        (
            {"filter": {"rules": [{"action": "allow", "src": ["*"], "dst": ["*:1"]}]}},
            "filter.rules[0].action",
            "none of",
        ),
        ({"relays": [{"url": "https://bad_name!/derp"}]}, "relays[0].url", "neither an IP address nor a DNS name"),
        ({"relays": [{"url": "ftp://203.0.113.1/derp"}]}, "relays[0].url", "is not http://"),
        ({"relays": [{"url": "http://203.0.113.1/"}]}, "relays[0].url", "is not http://"),
        ({"relays": [{"url": "http://203.0.113.1:99999/derp"}]}, "relays[0].url", "not a port number"),
        ({"relays": [{"url": "http://203.0.113.1/derp", "stun": "203.0.113.1"}]}, "relays[0].stun", "not host:port"),
        (
            {"relays": [{"url": "http://203.0.113.1/derp", "ca_file": "ca.pem"}]},
            "relays[0].ca_file",
            "only for an https",
        ),
        ({"relays": [{"url": "https://203.0.113.1/derp", "ca_file": "no.pem"}]}, "relays[0].ca_file", "no.pem"),
        ({"relays": [{"url": "http://203.0.113.1/derp", "colour": 1}]}, "relays[0].colour", "unknown key"),
        (
            {
                "relays": [
                    {"name": "r", "url": "http://203.0.113.1/derp"},
                    {"name": "r", "url": "http://203.0.113.2/derp"},
                ]
            },
            "relays[1].name",
            "also relays[0]",
        ),
    ],
)
def test_a_wrong_value_names_the_file_and_the_key(tmp_path: Path, doc: dict[str, Any], key: str, problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse("n.toml", {"node": {"private_key": b64(generate_private())}} | doc, tmp_path, tmp_path)
    err = caught.value
    assert (err.file, err.key) == ("n.toml", key) and problem in err.problem
    assert str(err).startswith(f"n.toml: {key}: ")


@pytest.mark.parametrize(
    "spoil, where",
    [
        (lambda w: w["node"].update(listen_port="51820"), "settings.node.listen_port"),
        (lambda w: w["node"].update(listen_port=True), "settings.node.listen_port"),
        (lambda w: w["peers"][0].update(allowed_ips=["10.0.0.0/99"]), "settings.peers[0].allowed_ips[0]"),
        (lambda w: w["peers"][0]["endpoints"][0].append(1), "settings.peers[0].endpoints[0]"),
        (lambda w: w["dns"].pop("ttl"), "settings.dns"),
        (lambda w: w["netlog"].update(extra=1), "settings.netlog"),
        (lambda w: w.update(node=[]), "settings.node"),
    ],
)
def test_a_wire_form_that_does_not_fit_is_refused_naming_where(tmp_path: Path, spoil: Any, where: str) -> None:
    wire = cfg.load_toml(full_config(tmp_path), tmp_path).to_wire()
    spoil(wire)
    with pytest.raises(WireError, match=f"^{re.escape(where)}: "):
        Settings.from_wire(wire)


def test_a_relay_may_be_named_by_host_name_its_stun_defaulting_to_that_host(tmp_path: Path) -> None:
    doc = {"node": {"private_key": b64(generate_private())}, "relays": [{"url": "https://relay.example/derp"}]}
    (relay,) = parse("n.toml", doc, tmp_path, tmp_path).relays
    assert (relay.host, relay.port, relay.tls, relay.stun) == ("relay.example", 443, True, ("relay.example", 3478))
    assert relay.hostport == "relay.example:443"


def test_the_embedded_default_has_no_relays(tmp_path: Path) -> None:
    assert cfg.embedded_default(tmp_path).relays == ()


def test_a_change_of_peers_gives_the_dns_settings_a_whole_config_would(tmp_path: Path) -> None:
    old = cfg.load_toml(full_config(tmp_path), tmp_path)
    bravo = old.peers[0]
    moved = dataclasses.replace(bravo, name="bravo2", allowed_ips=bravo.allowed_ips[:1])
    added = dataclasses.replace(bravo, name="charlie", public_key=public_of(generate_private()), allowed_ips=())
    new = dataclasses.replace(old, peers=(moved, added))
    changes = old.peer_changes(new)
    assert changes == ([moved, added], [])
    assert new.dns_peers_changed(old.dns_for_mesh(), [bravo], [moved, added]) == new.dns_for_mesh()
    assert old.peer_changes(dataclasses.replace(new, node=dataclasses.replace(new.node, mtu=1300))) is None

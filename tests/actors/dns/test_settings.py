"""The [dns] table read into DnsSettings, and wrong tables refused naming the key."""

from __future__ import annotations

import pytest

from meshsup.actors.settings.dns import DNS_KEYS, DnsSettings
from meshsup.actors.settings.dnstypes import SrvRecord, Upstream, UpstreamGroup


def test_settings_defaults_and_parsing():
    s = DnsSettings.from_config(
        {
            "listen": ["127.0.0.1:5353", "[::1]:53", "100.64.0.1"],
            "domain": "Mesh.",
            "upstreams": ["udp://198.51.100.53", "tls://198.51.100.54#dns.example"],
            "groups": {"corp": ["tcp://198.51.100.55:5353"]},
            "rules": [{"match": "suffix:ads.example", "action": "reject"}, {"match": "qtype:AAAA", "action": "corp"}],
            "routes": [{"suffix": "corp.example", "upstreams": ["tcp://198.51.100.53"]}],
            "srv": [{"name": "_http._tcp", "target": "alpha", "port": 80}],
            "source_overrides": [{"source": "10.0.0.0/8", "upstreams": ["udp://198.51.100.60"]}],
            "timeout": 1,
        },
        {"Alpha": ["100.64.0.1/32"]},
    )
    assert s.listen == (("127.0.0.1", 5353), ("::1", 53), ("100.64.0.1", 53))
    assert s.domain == "mesh"
    assert s.upstreams[1] == Upstream("tls", "198.51.100.54", 853, "", "dns.example")
    assert s.names == {"alpha": ("100.64.0.1",)}
    assert s.srv == (SrvRecord("_http._tcp.mesh", "alpha.mesh", 80),)
    assert (s.ttl, s.max_inflight, s.reject_rcode, s.timeout) == (600, 1024, "noerror", 1.0)
    assert {"listen", "domain", "upstreams", "set_os_resolver", "routes", "rules"} <= DNS_KEYS


@pytest.mark.parametrize(
    ("table", "names", "key"),
    [
        ({"upstreams": ["ftp://198.51.100.1"]}, {}, "dns.upstreams[0]"),
        ({"upstreams": ["udp://resolver.example"]}, {}, "dns.upstreams[0]"),
        ({"ttl": -1}, {}, "dns.ttl"),
        ({"ttl": True}, {}, "dns.ttl"),
        ({"serve_stale": 1}, {}, "dns.serve_stale"),
        ({"listen": ["127.0.0.1:99999"]}, {}, "dns.listen[0]"),
        ({"listen": []}, {}, "dns.listen"),
        ({"domain": "bad domain!"}, {}, "dns.domain"),
        ({"bogus": 1}, {}, "bogus"),
        ({"rules": [{"match": "suffix:x.example", "action": "nosuchgroup"}]}, {}, "dns.rules[0].action"),
        ({"rules": [{"match": "regex:([", "action": "reject"}]}, {}, "dns.rules[0].match"),
        ({"rules": [{"match": "glob:*", "action": "reject"}]}, {}, "dns.rules[0].match"),
        ({"rules": [{"match": "qtype:NOTATYPE", "action": "reject"}]}, {}, "dns.rules[0].match"),
        ({"reject_rcode": "servfail"}, {}, "dns.reject_rcode"),
        ({"srv": [{"name": "_x._tcp", "target": "alpha", "port": 70000}]}, {}, "dns.srv[0].port"),
        ({"srv": [{"name": "_x._tcp.elsewhere.", "target": "alpha", "port": 1}]}, {}, "dns.srv[0].name"),
        ({"routes": [{"suffix": "corp.example"}]}, {}, "dns.routes[0]"),
        ({"groups": {"reject": ["udp://198.51.100.1"]}}, {}, "dns.groups.reject"),
        ({"groups": {"g": []}}, {}, "dns.groups.g: empty"),
        ({"groups": {"g": "udp://198.51.100.1"}}, {}, "dns.groups.g: expected a list of upstream URLs or a table"),
        ({"groups": {"g": {"upstreams": []}}}, {}, "dns.groups.g.upstreams: empty"),
        ({"groups": {"g": {"policy": "random"}}}, {}, "dns.groups.g: missing upstreams"),
        ({"groups": {"g": {"upstreams": ["udp://x.example"]}}}, {}, "dns.groups.g.upstreams[0]"),
        ({"groups": {"g": {"upstreams": ["udp://198.51.100.1"], "w": 1}}}, {}, "dns.groups.g: unknown keys w"),
        ({"groups": {"g": {"upstreams": ["udp://198.51.100.1"], "policy": 1}}}, {}, "dns.groups.g.policy"),
        ({"policy": "round_robin"}, {}, "dns.policy"),
        ({"source_overrides": [{"source": "10.0.0.0/33", "upstreams": []}]}, {}, "dns.source_overrides[0].source"),
        ({"cache_min_ttl": 100, "cache_max_ttl": 10}, {}, "dns.cache_min_ttl"),
        ({"ca_file": "/nonexistent/ca.pem"}, {}, "dns.ca_file"),
        ({}, {"alpha": ["not-an-ip"]}, "names.alpha"),
        ({"set_os_resolver": True, "listen": ["127.0.0.1:5353"]}, {}, "dns.set_os_resolver"),
        ({"upstreams": ["tcp://resolver.example"]}, {}, "dns.upstreams[0]"),  # names only for the encrypted
        ({"upstreams": ["tls://bad_name.example"]}, {}, "dns.upstreams[0]"),
        ({"upstreams": ["tls://dns.example#other.example"]}, {}, "dns.upstreams[0]"),  # the name is the TLS name
        ({"upstreams": ["doq://198.51.100.1/path"]}, {}, "dns.upstreams[0]"),
        ({"upstreams": ["doq://dns.example"]}, {}, "dns.bootstrap"),  # nothing to resolve it through
        ({"groups": {"g": ["https://dns.example"]}, "upstreams": ["tls://198.51.100.1"]}, {}, "dns.bootstrap"),
        ({"upstreams": ["tls://dns.example"], "bootstrap": ["dns.example"]}, {}, "dns.bootstrap[0]"),
        ({"upstreams": ["tls://dns.example"], "bootstrap": ["127.0.0.1"]}, {}, "dns.bootstrap[0]"),  # ourselves
    ],
)
def test_settings_errors_name_the_key(table, names, key):
    with pytest.raises(ValueError) as error:
        DnsSettings.from_config(table, names)
    assert key in str(error.value)


def test_groups_in_both_forms_with_their_policies():
    s = DnsSettings.from_config(
        {
            "upstreams": ["udp://198.51.100.53"],
            "policy": "min_latency",
            "groups": {
                "corp": ["tcp://198.51.100.55:5353"],
                "fast": {"upstreams": ["udp://198.51.100.56", "udp://198.51.100.57"], "policy": "random"},
                "plain": {"upstreams": ["udp://198.51.100.58"]},
            },
            "rules": [{"match": "suffix:x.example", "action": "fast"}],
        },
        {},
    )
    assert s.policy == "min_latency" and DnsSettings().policy == "failover"
    assert s.groups == {
        "corp": UpstreamGroup((Upstream("tcp", "198.51.100.55", 5353),), "failover"),
        "fast": UpstreamGroup((Upstream("udp", "198.51.100.56", 53), Upstream("udp", "198.51.100.57", 53)), "random"),
        "plain": UpstreamGroup((Upstream("udp", "198.51.100.58", 53),), "failover"),
    }


def test_nameservers_for_resolv_conf():
    listen = ["127.0.0.53:53", "0.0.0.0:53", "[::]:53", "100.64.0.1:5353", "[fd7a::1]:53"]
    assert DnsSettings.from_config({"listen": listen, "set_os_resolver": True}, {}).nameservers == [
        "127.0.0.53", "127.0.0.1", "::1", "fd7a::1",
    ]  # fmt: skip


def test_upstreams_by_host_name_and_the_bootstrap_servers():
    s = DnsSettings.from_config(
        {
            "listen": ["127.0.0.1:5353"],
            "upstreams": ["udp://198.51.100.53", "tls://Dns.Example.", "doq://198.51.100.54#dns.example"],
            "routes": [{"suffix": "corp.example", "upstreams": ["https://doh.corp.example:8443"]}],
        },
        {},
    )
    named, by_address = s.upstreams[1], s.upstreams[2]
    assert named == Upstream("tls", "dns.example", 853) and named.named and named.tls_name == "dns.example"
    assert by_address == Upstream("doq", "198.51.100.54", 853, "", "dns.example") and not by_address.named
    assert str(s.routes[0].upstreams[0]) == "https://doh.corp.example:8443/dns-query"
    assert s.bootstrap == (("198.51.100.53", 53),)  # by default, the plain upstreams given by address
    explicit = DnsSettings.from_config(
        {"upstreams": ["tls://dns.example"], "bootstrap": ["198.51.100.1", "[2001:db8::1]:5353"]}, {}
    )
    assert explicit.bootstrap == (("198.51.100.1", 53), ("2001:db8::1", 5353))
    assert not Upstream("tls", "2001:db8::a", 853).named and not Upstream("tls", "198.51.100.1", 853).named

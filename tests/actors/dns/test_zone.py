"""The mesh zone: A, AAAA, PTR and SRV answers for the nodes' names."""

from __future__ import annotations

import random

import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.reversename
import pytest

from meshsup.actors.dns.message import Answer
from meshsup.actors.dns.zone import Zone
from meshsup.actors.settings.dnstypes import SrvRecord


@pytest.fixture
def zone() -> Zone:
    return Zone(
        "mesh",
        {"alpha": ["100.64.0.1", "fd7a:115c:a1e0::1"], "bravo": ["100.64.0.2", "100.64.0.3", "100.64.0.4"]},
        srv=[SrvRecord("_http._tcp.mesh", "alpha.mesh", 8080, 1, 5)],
        ttl=120,
        rng=random.Random(7),
    )


def ask(zone: Zone, name: str, rdtype: str) -> Answer | None:
    return zone.answer(dns.name.from_text(name), dns.rdatatype.from_text(rdtype), 1)


def texts(rrsets) -> list[str]:
    return sorted(r.to_text() for rrset in rrsets for r in rrset)


def test_zone_a_and_aaaa(zone):
    a = ask(zone, "ALPHA.mesh.", "A")
    assert a.rcode == dns.rcode.NOERROR and a.authoritative and texts(a.answer) == ["100.64.0.1"]
    assert a.answer[0].ttl == 120 and a.answer[0].name == dns.name.from_text("ALPHA.mesh.")
    assert texts(ask(zone, "alpha.mesh.", "AAAA").answer) == ["fd7a:115c:a1e0::1"]


def test_zone_shuffles_several_addresses(zone):
    orders = {tuple(r.to_text() for r in ask(zone, "bravo.mesh.", "A").answer[0]) for _ in range(40)}
    assert len(orders) > 1
    assert all(sorted(order) == ["100.64.0.2", "100.64.0.3", "100.64.0.4"] for order in orders)


def test_zone_name_without_ipv6_gets_empty_noerror_with_soa(zone):
    answer = ask(zone, "bravo.mesh.", "AAAA")
    assert answer.rcode == dns.rcode.NOERROR and answer.answer == ()
    assert answer.authority[0].rdtype == dns.rdatatype.SOA


def test_zone_mx_for_known_name_is_empty_noerror(zone):
    answer = ask(zone, "alpha.mesh.", "MX")
    assert answer.rcode == dns.rcode.NOERROR and answer.answer == ()


def test_zone_unknown_name_is_nxdomain_with_soa(zone):
    answer = ask(zone, "charlie.mesh.", "A")
    assert answer.rcode == dns.rcode.NXDOMAIN
    soa = answer.authority[0]
    assert soa.name == dns.name.from_text("mesh.") and soa[0].minimum == 120


def test_zone_ptr_v4_and_v6(zone):
    assert texts(ask(zone, "1.0.64.100.in-addr.arpa.", "PTR").answer) == ["alpha.mesh."]
    v6 = dns.reversename.from_address("fd7a:115c:a1e0::1").to_text()
    assert texts(ask(zone, v6, "PTR").answer) == ["alpha.mesh."]
    assert ask(zone, "9.9.64.100.in-addr.arpa.", "PTR") is None  # not ours: forwarded


def test_zone_srv_with_glue(zone):
    answer = ask(zone, "_http._tcp.mesh.", "SRV")
    assert texts(answer.answer) == ["1 5 8080 alpha.mesh."]
    assert texts(answer.additional) == ["100.64.0.1", "fd7a:115c:a1e0::1"]
    assert ask(zone, "_tcp.mesh.", "SRV").rcode == dns.rcode.NOERROR  # an empty non-terminal exists


def test_zone_leaves_other_names_alone(zone):
    assert ask(zone, "example.com.", "A") is None
    assert zone.answer(dns.name.from_text("alpha.mesh."), dns.rdatatype.A, dns.rdataclass.CH) is None


def test_a_change_of_names_answers_as_a_zone_made_anew(zone):
    zone.change_names({"bravo": ["100.64.0.9"], "charlie": ["fd7a:115c:a1e0::3"], "alpha": []})
    anew = Zone(
        "mesh",
        {"bravo": ["100.64.0.9"], "charlie": ["fd7a:115c:a1e0::3"]},
        srv=[SrvRecord("_http._tcp.mesh", "alpha.mesh", 8080, 1, 5)],
        ttl=120,
    )
    for name, rdtype in [
        ("alpha.mesh.", "A"),
        ("bravo.mesh.", "A"),
        ("charlie.mesh.", "AAAA"),
        ("2.0.64.100.in-addr.arpa.", "PTR"),
        ("9.0.64.100.in-addr.arpa.", "PTR"),
        ("_http._tcp.mesh.", "SRV"),
    ]:
        changed, made = ask(zone, name, rdtype), ask(anew, name, rdtype)
        assert made is not None or "2.0.64" in name, "the test asks what a zone answers"
        summary = [None if a is None else (a.rcode, texts(a.answer)) for a in (changed, made)]
        assert summary[0] == summary[1], name
    for name in ("2.0.64.100.in-addr.arpa.", "9.0.64.100.in-addr.arpa.", "bravo.mesh.", "alpha.mesh."):
        wire = dns.name.from_text(name).to_wire().lower()
        assert zone.covers(wire) == anew.covers(wire), name

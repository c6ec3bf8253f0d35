"""The mesh's own names, answered locally with Docker's embedded-DNS semantics.

- NAME.DOMAIN answers A and AAAA; several addresses come back shuffled.
- A known name without an address of the asked family (or asked for MX or
  any other type) gets NOERROR with an empty answer (MX: RFC 5321's
  implicit MX), never forwarded.
- A name under the domain that does not exist gets NXDOMAIN; both negative
  answers carry the domain's SOA so resolvers can cache them (RFC 2308).
- PTR for every mesh address, under in-addr.arpa and ip6.arpa.
- SRV from the configuration, with the targets' A/AAAA in additional.
"""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Mapping, Sequence

import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.PTR
import dns.rdtypes.IN.A
import dns.rdtypes.IN.AAAA
import dns.reversename
import dns.rrset

from meshsup.actors.dns.message import Answer
from meshsup.actors.settings.dnstypes import SrvRecord

_ADDRESS_TYPES = (dns.rdatatype.A, dns.rdatatype.AAAA)
REVERSE_V4, REVERSE_V6 = b"\x07in-addr\x04arpa\x00", b"\x03ip6\x04arpa\x00"


def _rdata(rdtype: int, text: str) -> dns.rdata.Rdata:
    return dns.rdata.from_text(dns.rdataclass.IN, rdtype, text)


def _reverse_wire(address: str) -> bytes:
    """An address's reverse name (under in-addr.arpa or ip6.arpa) in lowercase wire form."""
    return dns.reversename.from_address(address).to_wire().lower()


class Zone:
    def __init__(
        self,
        domain: str,
        names: Mapping[str, Sequence[str]],
        srv: Sequence[SrvRecord] = (),
        ttl: int = 600,
        rng: random.Random | None = None,
    ) -> None:
        self._origin = dns.name.from_text(domain)
        self._ttl = ttl
        self._rng = rng or random.Random()
        self._nodes: dict[dns.name.Name, dict[int, list[dns.rdata.Rdata]]] = {}
        # By the reverse name's wire form: as a Name, an IPv6 address's is 34 label objects, a
        # mesh of thousands of peers' megabytes.
        self._reverse: dict[bytes, list[dns.rdata.Rdata]] = {}
        origin = self._origin.to_text()
        soa = f"ns.{origin} hostmaster.{origin} 1 3600 600 86400 {ttl}"
        self._soa = dns.rrset.from_rdata_list(self._origin, ttl, [_rdata(dns.rdatatype.SOA, soa)])
        self._add(self._origin, dns.rdatatype.SOA, self._soa[0])
        for label, addresses in names.items():
            self._add_host(label, addresses)
        for record in srv:
            text = f"{record.priority} {record.weight} {record.port} {record.target}."
            self._add(dns.name.from_text(record.name), dns.rdatatype.SRV, _rdata(dns.rdatatype.SRV, text))
        # Empty non-terminals (e.g. _tcp.DOMAIN above _http._tcp.DOMAIN) exist: NOERROR, not NXDOMAIN.
        self._existing = {ancestor for name in self._nodes for ancestor in self._ancestors(name)}
        self._origin_wire = self._origin.to_wire().lower()

    def _add_host(self, label: str, addresses: Sequence[str]) -> dns.name.Name:
        host = dns.name.from_text(label, origin=self._origin)
        # Made directly, not parsed from text: a mesh of thousands of peers has as many records.
        pointer = dns.rdtypes.ANY.PTR.PTR(dns.rdataclass.IN, dns.rdatatype.PTR, host)
        for address in addresses:
            if ipaddress.ip_address(address).version == 4:
                family, rdata = dns.rdatatype.A, dns.rdtypes.IN.A.A(dns.rdataclass.IN, dns.rdatatype.A, address)
            else:
                family = dns.rdatatype.AAAA
                rdata = dns.rdtypes.IN.AAAA.AAAA(dns.rdataclass.IN, dns.rdatatype.AAAA, address)
            self._add(host, family, rdata)
            self._reverse.setdefault(_reverse_wire(address), []).append(pointer)
        return host

    def change_names(self, names: Mapping[str, Sequence[str]]) -> None:
        """These names' addresses replaced (none: the name is gone), the others' kept: a change of
        one peer among thousands costs that peer's records alone."""
        for label, addresses in names.items():
            host = dns.name.from_text(label, origin=self._origin)
            node = self._nodes.get(host, {})
            for family in _ADDRESS_TYPES:
                for rdata in node.pop(family, []):
                    reverse = _reverse_wire(rdata.address)
                    pointers = [r for r in self._reverse.get(reverse, []) if r.target != host]
                    if pointers:
                        self._reverse[reverse] = pointers
                    else:
                        self._reverse.pop(reverse, None)
            if not node:
                self._nodes.pop(host, None)
                self._existing.discard(host)
            if addresses:
                self._add_host(label, addresses)
                self._existing.update(self._ancestors(host))

    def _add(self, name: dns.name.Name, rdtype: int, rdata: dns.rdata.Rdata) -> None:
        rdatas = self._nodes.setdefault(name, {}).setdefault(rdtype, [])
        if rdata not in rdatas:
            rdatas.append(rdata)

    def _ancestors(self, name: dns.name.Name) -> list[dns.name.Name]:
        out = [name]
        while name != self._origin:
            name = name.parent()
            out.append(name)
        return out

    def suffixes(self) -> tuple[bytes, ...]:
        """Suffixes (lowercase wire form) of every name covers() is true of, and of some more."""
        return self._origin_wire, REVERSE_V4, REVERSE_V6

    def covers(self, qname: bytes) -> bool:
        """Whether a name (in lowercase wire form) is one answer() may answer:
        under the domain, or the reverse name of a mesh address."""
        if qname in self._reverse:
            return True
        if not qname.endswith(self._origin_wire):
            return False
        boundary, offset = len(qname) - len(self._origin_wire), 0
        while offset < boundary:
            offset += qname[offset] + 1
        return offset == boundary

    def answer(self, qname: dns.name.Name, qtype: int, qclass: int) -> Answer | None:
        """The local answer, or None when the question is not ours to answer."""
        if qclass != dns.rdataclass.IN:
            return None
        pointers = self._reverse.get(qname.to_wire().lower())
        if pointers is not None:
            return self._reverse_answer(qname, qtype, pointers)
        if not qname.is_subdomain(self._origin):
            return None
        if qname not in self._existing:
            return Answer(dns.rcode.NXDOMAIN, authority=(self._soa,), authoritative=True)
        node = self._nodes.get(qname, {})
        types = list(node) if qtype == dns.rdatatype.ANY else [qtype]
        answer = tuple(self._rrset(qname, t, node[t]) for t in types if t in node)
        if not answer:
            return Answer(dns.rcode.NOERROR, authority=(self._soa,), authoritative=True)
        return Answer(dns.rcode.NOERROR, answer=answer, additional=self._srv_glue(answer), authoritative=True)

    def _reverse_answer(self, qname: dns.name.Name, qtype: int, pointers: list[dns.rdata.Rdata]) -> Answer:
        if qtype not in (dns.rdatatype.PTR, dns.rdatatype.ANY):
            return Answer(dns.rcode.NOERROR, authoritative=True)
        return Answer(
            dns.rcode.NOERROR,
            answer=(self._rrset(qname, dns.rdatatype.PTR, pointers),),
            authoritative=True,
        )

    def _rrset(self, name: dns.name.Name, rdtype: int, rdatas: list[dns.rdata.Rdata]) -> dns.rrset.RRset:
        if rdtype in _ADDRESS_TYPES:
            # Shuffle so clients that take the first address spread the load.
            rdatas = self._rng.sample(rdatas, len(rdatas))
        return dns.rrset.from_rdata_list(name, self._ttl, rdatas)

    def _srv_glue(self, answer: tuple[dns.rrset.RRset, ...]) -> tuple[dns.rrset.RRset, ...]:
        targets = dict.fromkeys(r.target for rrset in answer if rrset.rdtype == dns.rdatatype.SRV for r in rrset)
        return tuple(
            self._rrset(target, family, self._nodes[target][family])
            for target in targets
            for family in _ADDRESS_TYPES
            if family in self._nodes.get(target, {})
        )

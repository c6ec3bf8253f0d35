"""Addresses, MTU and routes of the node's TUN link, over rtnetlink.

``LinuxRouter`` brings an existing link up with the node's addresses and
keeps the routes for the peers' allowed IPs in step with the configuration:
each call is given the whole wanted set, computes the difference from what
is there and changes only that, so calling it twice is a no-op.

Routes we add carry our own routing protocol number, so which routes are
ours is read back from the kernel rather than remembered: a restarted router
actor still finds and removes them. Addresses have no such tag; the ones we
added are remembered, and addresses someone else put on the link are never
removed.

``FakeRouter`` offers the same interface in memory for unit tests, and
``LinkMonitor`` turns rtnetlink notifications into ``(kind, ifname)`` events.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Final

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netns import create_socket

DEFAULT_MTU: Final = 1420
# rtm_protocol for our routes; 77 is unassigned in /etc/iproute2/rt_protos.
RTPROT_MESHSUP: Final = 77
MAIN_TABLE: Final = 254
_IFA_F_NODAD: Final = 0x02  # a tunnel address has nobody to collide with
# IPv4 needs 68; IPv6 is switched off on links below 1280.
_MTU_RANGE: Final = range(1280, 65536)
ROUTE_BATCH: Final = 256  # route requests a send: their acks (36 bytes each) fit any receive buffer
ROUTE_TIMEOUT: Final = 5.0  # for the kernel's acks of a batch
_RTM_NEWROUTE, _RTM_DELROUTE, _RTM_GETROUTE, _NLMSG_ERROR, _NLMSG_DONE = 24, 25, 26, 2, 3
_NLM_F_REQUEST, _NLM_F_ACK, _NLM_F_EXCL, _NLM_F_CREATE, _NLM_F_DUMP = 0x1, 0x4, 0x200, 0x400, 0x300
_RTA_DST, _RTA_TABLE = 1, 15
_RT_SCOPE_NOWHERE, _RTN_UNICAST = 255, 1
_U32, _I32 = struct.Struct("=I"), struct.Struct("=i")


@dataclass
class Changes:
    """What one call changed, refused as malformed, or failed to change."""

    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


def _normalise_prefix(text: str) -> str:
    return str(ipaddress.ip_network(text, strict=False))


def _normalise_address(text: str) -> str:
    return str(ipaddress.ip_interface(text))


def plan(present: set[str], owned: set[str], wanted: Iterable[object], normalise: Callable[[str], str]) -> Changes:
    """The additions and removals that turn ``present`` into ``wanted``,
    touching only ``owned`` entries when removing. Malformed wanted entries
    are listed in ``rejected`` and otherwise ignored."""
    changes = Changes()
    target: set[str] = set()
    for item in wanted:
        try:
            if not isinstance(item, str):
                raise TypeError
            target.add(normalise(item))
        except (TypeError, ValueError):
            changes.rejected.append(repr(item))
    changes.added = sorted(target - present)
    changes.removed = sorted((owned & present) - target)
    return changes


class LinuxRouter:
    """Configures one existing link (normally the node's TUN)."""

    def __init__(self, ifname: str, netns: str | None = None, *, table: int = MAIN_TABLE) -> None:
        """Attach to link ``ifname``, in network namespace ``netns`` if given
        (the namespace must exist; this process does not enter it). Raises
        LookupError if there is no such link."""
        self._ipr = IPRoute(netns=netns, flags=0) if netns else IPRoute()
        found = self._ipr.link_lookup(ifname=ifname)
        if not found:
            self._ipr.close()
            raise LookupError(f"no link named {ifname!r}")
        self.ifname = ifname
        self.index: int = found[0]
        self.table = table
        self._addresses: set[str] = set()
        self._netlink = RouteRequests(netns)

    def configure(self, addresses: Iterable[str], mtu: int = DEFAULT_MTU) -> Changes:
        """Set the MTU, make the link's addresses ``addresses`` (v4 and v6,
        "100.64.0.1/32" form) and bring it up."""
        changes = plan(self._current_addresses(), self._addresses, addresses, _normalise_address)
        if mtu in _MTU_RANGE:
            self._apply(changes, f"mtu {mtu}", lambda: self._ipr.link("set", index=self.index, mtu=mtu))
        else:
            changes.rejected.append(f"mtu {mtu}")
        changes.added = [a for a in changes.added if self._apply(changes, a, lambda: self._address("add", a))]
        self._addresses.update(changes.added)
        changes.removed = self._remove_addresses(changes, changes.removed)
        self._apply(changes, "link up", lambda: self._ipr.link("set", index=self.index, state="up"))
        return changes

    def set_routes(self, prefixes: Iterable[str]) -> Changes:
        """Route exactly ``prefixes`` (allowed IPs) via the link. A prefix the
        kernel already routes here for the link's own address counts as done."""
        ours = self._our_routes()
        changes = plan(ours, ours, prefixes, _normalise_prefix)
        changes.added = self._routes(changes, "add", changes.added)
        changes.removed = self._routes(changes, "del", changes.removed)
        return changes

    def change_routes(self, added: Iterable[str], removed: Iterable[str]) -> Changes:
        """Route ``added`` via the link and no longer ``removed``: a few routes' change, with no
        dump of the table (a change of one peer among thousands)."""
        changes = Changes()
        changes.added = self._routes(changes, "add", [_normalise_prefix(p) for p in added])
        changes.removed = self._routes(changes, "del", [_normalise_prefix(p) for p in removed])
        return changes

    def teardown(self) -> Changes:
        """Remove every route and address this router added."""
        changes = self.set_routes(())
        changes.removed += self._remove_addresses(changes, sorted(self._addresses))
        return changes

    def close(self) -> None:
        self._ipr.close()
        self._netlink.close()

    def _remove_addresses(self, changes: Changes, addresses: list[str]) -> list[str]:
        removed = [a for a in addresses if self._apply(changes, a, lambda: self._address("del", a))]
        # Forgotten either way; one that could not be removed is in failed.
        self._addresses.difference_update(addresses)
        return removed

    @staticmethod
    def _apply(changes: Changes, what: str, action: Callable[[], object]) -> bool:
        """Run one netlink change; True if it changed something. Failures
        are listed in ``changes.failed`` rather than raised."""
        try:
            action()
        except NetlinkError as e:
            # Already there / already gone is the state we wanted, not a failure.
            if e.code not in (errno.EEXIST, errno.ESRCH, errno.EADDRNOTAVAIL):
                changes.failed.append(f"{what} ({e})")
            return False
        return True

    def _address(self, command: str, text: str) -> None:
        iface = ipaddress.ip_interface(text)
        self._ipr.addr(
            command,
            index=self.index,
            address=str(iface.ip),
            prefixlen=iface.network.prefixlen,
            flags=_IFA_F_NODAD if iface.version == 6 else 0,
        )

    def _routes(self, changes: Changes, command: str, prefixes: list[str]) -> list[str]:
        """Add or delete routes, many a send (one netlink request each, a thousand routes in
        milliseconds where one at a time takes a second); those it changed. As _apply: a route
        already there (or already gone) is no failure, the others are listed in changes.failed."""
        done = []
        for start in range(0, len(prefixes), ROUTE_BATCH):
            chunk = prefixes[start : start + ROUTE_BATCH]
            for prefix, error in zip(chunk, self._netlink.routes(command, chunk, self.index, self.table)):
                if not error:
                    done.append(prefix)
                elif error not in (errno.EEXIST, errno.ESRCH, errno.EADDRNOTAVAIL):
                    changes.failed.append(f"{prefix} ({errno.errorcode.get(error, error)}: {os.strerror(error)})")
        return done

    def _current_addresses(self) -> set[str]:
        found = set()
        for msg in self._ipr.addr("dump", index=self.index):
            # On point-to-point links IFA_ADDRESS may be the peer's.
            ip = msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS")
            found.add(_normalise_address(f"{ip}/{msg['prefixlen']}"))
        return found

    def _our_routes(self) -> set[str]:
        return self._netlink.ours(self.index, self.table)


def rtnetlink_socket(netns: str | None = None) -> socket.socket:
    """A raw rtnetlink socket in the named network namespace (None: ours)."""
    if netns:
        return create_socket(netns, socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE, flags=0)
    return socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)


class RouteRequests:
    """Route changes as rtnetlink requests sent many at once, each acked: what pyroute2 sends
    for one route("add"/"del", dst, oif, proto=RTPROT_MESHSUP, table), without its round trip
    per route."""

    def __init__(self, netns: str | None = None) -> None:
        self._sock = rtnetlink_socket(netns)
        self._sock.settimeout(ROUTE_TIMEOUT)
        self._seq = 0

    def routes(self, command: str, prefixes: list[str], oif: int, table: int) -> list[int]:
        """Each prefix's errno (0: done), for at most ROUTE_BATCH prefixes (their acks must fit the
        socket's receive buffer). OSError when the kernel does not answer them all."""
        first = self._seq + 1
        requests = b"".join(self._request(command, p, oif, table, first + i) for i, p in enumerate(prefixes))
        self._seq += len(prefixes)
        self._sock.send(requests)
        errors: dict[int, int] = {}
        while len(errors) < len(prefixes):
            data = self._sock.recv(1 << 16)
            offset = 0
            while offset + _NLMSG.size <= len(data):
                length, kind, _, seq, _ = _NLMSG.unpack_from(data, offset)
                if length < _NLMSG.size:
                    break
                if kind == _NLMSG_ERROR and first <= seq <= self._seq:
                    errors[seq] = -_I32.unpack_from(data, offset + _NLMSG.size)[0]
                offset += _align(length)
        return [errors[seq] for seq in range(first, self._seq + 1)]

    def ours(self, oif: int | None, table: int) -> set[str]:
        """The prefixes routed by us (RTPROT_MESHSUP) via link `oif` (None: any) in `table`, from a
        dump of the routing tables (parsed here: pyroute2 takes a second for thousands)."""
        self._seq += 1
        seq = self._seq
        rtmsg = _RTMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0, 0, 0, 0, 0)
        self._sock.send(
            _NLMSG.pack(_NLMSG.size + len(rtmsg), _RTM_GETROUTE, _NLM_F_REQUEST | _NLM_F_DUMP, seq, 0) + rtmsg
        )
        found: set[str] = set()
        while True:
            data = self._sock.recv(1 << 20)
            offset = 0
            while offset + _NLMSG.size <= len(data):
                length, kind, _, got, _ = _NLMSG.unpack_from(data, offset)
                if length < _NLMSG.size:
                    return found
                end, body = offset + length, offset + _NLMSG.size
                offset += _align(length)
                if got != seq:
                    continue
                if kind == _NLMSG_DONE:
                    return found
                if kind == _NLMSG_ERROR:
                    raise OSError(-_I32.unpack_from(data, body)[0], "route dump refused")
                if kind != _RTM_NEWROUTE or body + _RTMSG.size > end:
                    continue
                family, dst_len, _, _, low_table, protocol, _, _, _ = _RTMSG.unpack_from(data, body)
                attrs = body + _RTMSG.size
                raw_table, raw_oif = _attr(data, attrs, end, _RTA_TABLE), _attr(data, attrs, end, _RTA_OIF)
                if (
                    protocol != RTPROT_MESHSUP
                    or (oif is not None and (raw_oif is None or _U32.unpack(raw_oif)[0] != oif))
                    or (_U32.unpack(raw_table)[0] if raw_table else low_table) != table
                ):
                    continue
                dst = _attr(data, attrs, end, _RTA_DST) or bytes(4 if family == socket.AF_INET else 16)
                found.add(f"{ipaddress.ip_address(dst)}/{dst_len}")

    @staticmethod
    def _request(command: str, prefix: str, oif: int, table: int, seq: int) -> bytes:
        network = ipaddress.ip_network(prefix)
        family = socket.AF_INET if network.version == 4 else socket.AF_INET6
        attrs = (
            _rtattr(_RTA_DST, network.network_address.packed)
            + _rtattr(_RTA_OIF, _U32.pack(oif))
            + _rtattr(_RTA_TABLE, _U32.pack(table))
        )
        if command == "add":
            kind, flags, scope = _RTM_NEWROUTE, _NLM_F_REQUEST | _NLM_F_ACK | _NLM_F_CREATE | _NLM_F_EXCL, 0
        else:  # any scope: as `ip route del`
            kind, flags, scope = _RTM_DELROUTE, _NLM_F_REQUEST | _NLM_F_ACK, _RT_SCOPE_NOWHERE
        rtmsg = _RTMSG.pack(family, network.prefixlen, 0, 0, table & 0xFF, RTPROT_MESHSUP, scope, _RTN_UNICAST, 0)
        body = rtmsg + attrs
        return _NLMSG.pack(_NLMSG.size + len(body), kind, flags, seq, 0) + body

    def close(self) -> None:
        self._sock.close()


def _rtattr(kind: int, value: bytes) -> bytes:
    length = _RTATTR.size + len(value)
    return _RTATTR.pack(length, kind) + value + bytes(_align(length) - length)


class FakeRouter:
    """LinuxRouter's interface over in-memory state; ``calls`` records each
    call with its arguments, in order."""

    def __init__(self, ifname: str = "faketun0") -> None:
        self.ifname = ifname
        self.calls: list[tuple[str, tuple[object, ...]]] = []
        self.addresses: set[str] = set()
        self.routes: set[str] = set()
        self.mtu: int | None = None
        self.is_up = False

    def configure(self, addresses: Iterable[str], mtu: int = DEFAULT_MTU) -> Changes:
        addresses = list(addresses)
        self.calls.append(("configure", (addresses, mtu)))
        changes = plan(self.addresses, self.addresses, addresses, _normalise_address)
        if mtu in _MTU_RANGE:
            self.mtu = mtu
        else:
            changes.rejected.append(f"mtu {mtu}")
        self.addresses = (self.addresses | set(changes.added)) - set(changes.removed)
        self.is_up = True
        return changes

    def set_routes(self, prefixes: Iterable[str]) -> Changes:
        prefixes = list(prefixes)
        self.calls.append(("set_routes", (prefixes,)))
        changes = plan(self.routes, self.routes, prefixes, _normalise_prefix)
        self.routes = (self.routes | set(changes.added)) - set(changes.removed)
        return changes

    def change_routes(self, added: Iterable[str], removed: Iterable[str]) -> Changes:
        added, removed = list(added), list(removed)
        self.calls.append(("change_routes", (added, removed)))
        changes = Changes(added=sorted(set(added) - self.routes), removed=sorted(set(removed) & self.routes))
        self.routes = (self.routes | set(added)) - set(removed)
        return changes

    def teardown(self) -> Changes:
        self.calls.append(("teardown", ()))
        changes = Changes(removed=sorted(self.routes) + sorted(self.addresses))
        self.routes.clear()
        self.addresses.clear()
        return changes

    def close(self) -> None:
        self.calls.append(("close", ()))


# --- link monitor -----------------------------------------------------------

RTMGRP_LINK: Final = 0x1
RTMGRP_IPV4_IFADDR: Final = 0x10
RTMGRP_IPV4_ROUTE: Final = 0x40
RTMGRP_IPV6_IFADDR: Final = 0x100
RTMGRP_IPV6_ROUTE: Final = 0x400
_NLMSG: Final = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_IFINFO: Final = struct.Struct("=BxHiII")  # family, type, index, flags, change
_IFADDR: Final = struct.Struct("=BBBBI")  # family, prefixlen, flags, scope, index
_RTMSG: Final = struct.Struct("=BBBBBBBBI")  # family, dst_len, src_len, tos, table, protocol, scope, type, flags
_RTATTR: Final = struct.Struct("=HH")
_IFLA_IFNAME: Final = 3
_IFA_LABEL: Final = 3
_RTA_OIF: Final = 4
_EVENT_KINDS: Final = {
    16: "link",
    17: "link-removed",
    20: "addr-added",
    21: "addr-removed",
    24: "default-route-added",
    25: "default-route-removed",
}


def _align(n: int) -> int:
    return (n + 3) & ~3


def _attr(data: bytes, start: int, end: int, wanted: int) -> bytes | None:
    while start + _RTATTR.size <= end:
        length, kind = _RTATTR.unpack_from(data, start)
        if length < _RTATTR.size or start + length > end:
            return None
        if kind == wanted:
            return data[start + _RTATTR.size : start + length]
        start += _align(length)
    return None


def _string_attr(data: bytes, start: int, end: int, wanted: int) -> str | None:
    raw = _attr(data, start, end, wanted)
    return None if raw is None else raw.split(b"\0", 1)[0].decode(errors="replace")


class LinkEventParser:
    """Sans-IO: rtnetlink messages in, ``(kind, ifname)`` events out.

    Kinds: "link" (a link appeared or changed: state, MTU, name),
    "link-removed", "addr-added", "addr-removed", and "default-route-added",
    "default-route-removed" for a default route (IPv4 or IPv6, any table or
    type) that is not ours: the underlay's way out changed. Routes for peers' allowed IPs
    (our protocol number, even a default one) and all other routes are
    skipped. Address and route messages carry only an interface index, so
    names are learnt from link messages; a route with no single interface
    (multipath, blackhole) has the name "".
    Truncated or unknown messages are skipped.
    """

    def __init__(self) -> None:
        self.names: dict[int, str] = {}

    def feed(self, data: bytes) -> list[tuple[str, str]]:
        events: list[tuple[str, str]] = []
        offset = 0
        while offset + _NLMSG.size <= len(data):
            length, mtype = _NLMSG.unpack_from(data, offset)[:2]
            if length < _NLMSG.size or offset + length > len(data):
                break
            body, end = offset + _NLMSG.size, offset + length
            kind = _EVENT_KINDS.get(mtype)
            if kind in ("link", "link-removed") and body + _IFINFO.size <= end:
                index = _IFINFO.unpack_from(data, body)[2]
                name = _string_attr(data, body + _IFINFO.size, end, _IFLA_IFNAME) or self.names.get(index, "")
                if kind == "link":
                    self.names[index] = name
                else:
                    self.names.pop(index, None)
                events.append((kind, name))
            elif kind in ("addr-added", "addr-removed") and body + _IFADDR.size <= end:
                index = _IFADDR.unpack_from(data, body)[4]
                label = _string_attr(data, body + _IFADDR.size, end, _IFA_LABEL)
                events.append((kind, self.names.get(index) or label or str(index)))
            elif kind and body + _RTMSG.size <= end:
                _, dst_len, _, _, _, protocol, _, _, _ = _RTMSG.unpack_from(data, body)
                if dst_len == 0 and protocol != RTPROT_MESHSUP:
                    oif = _attr(data, body + _RTMSG.size, end, _RTA_OIF)
                    index = int.from_bytes(oif, sys.byteorder) if oif and len(oif) == 4 else None
                    events.append((kind, "" if index is None else self.names.get(index) or str(index)))
            offset += _align(length)
        return events


class LinkMonitor:
    """A non-blocking rtnetlink socket subscribed to link, address and route
    changes. Poll ``fileno()``; ``read_events()`` drains what is ready. The
    first events are a snapshot of the existing links (one "link" each)."""

    def __init__(self, netns: str | None = None) -> None:
        self._sock = rtnetlink_socket(netns)
        groups = RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR | RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_ROUTE
        self._sock.bind((0, groups))
        self._sock.setblocking(False)
        self._parser = LinkEventParser()
        # RTM_GETLINK dump (NLM_F_REQUEST | NLM_F_DUMP) to learn current names.
        request = _NLMSG.pack(_NLMSG.size + _IFINFO.size, 18, 0x301, 1, 0) + bytes(_IFINFO.size)
        self._sock.send(request)

    def fileno(self) -> int:
        return self._sock.fileno()

    def read_events(self) -> list[tuple[str, str]]:
        """Events ready now. ("overrun", "") means the kernel dropped
        notifications: re-read whatever state you depend on."""
        events: list[tuple[str, str]] = []
        while True:
            try:
                data = self._sock.recv(65536)
            except BlockingIOError:
                return events
            except OSError as e:
                if e.errno != errno.ENOBUFS:
                    raise
                events.append(("overrun", ""))
                continue
            events.extend(self._parser.feed(data))

    def close(self) -> None:
        self._sock.close()

"""DNS interception (``[dns] intercept``): the ingress program on each listed
interface, and the policy routing that delivers what it marks locally:

    PRIORITY: fwmark INTERCEPT_MARK lookup INTERCEPT_TABLE
    INTERCEPT_TABLE: local default dev lo            (IPv4 and IPv6)

The program (meshsup.bpf.intercept) gives DNS to the DNS workers'
interception sockets (actors.dns.server); it is a clsact ingress filter of
our own priority, so filters others put on the same interface stay. The
interfaces it is on are written to a file in the state dir before it is
attached, and rules and routes carry our routing protocol number: ``apply``
first removes all of that, so a router restarted after a crash clears what
the dead one left, and ``clear`` on stop leaves nothing.
"""

from __future__ import annotations

import errno
import ipaddress
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from meshsup.actors.router.netconf import RTPROT_MESHSUP
from meshsup.actors.router.rules import DEFAULT_ROUTE, add_rule, remove_rules
from meshsup.actors.settings.dns import (
    INTERCEPT_MARK,
    INTERCEPT_TABLE,
    INTERCEPT_TCP_PORT,
    INTERCEPT_UDP_PORT,
    INTERCEPT_V4,
    INTERCEPT_V6,
)
from meshsup.bpf.intercept import Target, program
from meshsup.bpf.syscall import BPF_PROG_TYPE_SCHED_CLS, load_program

PRIORITY: Final = 5200  # ahead of the exit node's rules (exitroute) and of main
FILTER_PRIORITY: Final = 0x4453  # our filter among the interface's ingress filters
PROGRAM_NAME: Final = "meshsup_dns"
_INGRESS: Final = 0xFFFFFFF2  # TC_H_MAKE(TC_H_CLSACT, TC_H_MIN_INGRESS)
_EGRESS: Final = 0xFFFFFFF3
_ETH_P_ALL: Final = 0x0003
_ENOENT_LIKE: Final = (2, 19, 22)  # ENOENT, ENODEV, EINVAL: the filter or its link is gone already


def targets() -> tuple[Target, Target]:
    """Where the program sends IPv4 and IPv6 DNS: the interception sockets."""
    return (
        Target(ipaddress.ip_address(INTERCEPT_V4), INTERCEPT_UDP_PORT, INTERCEPT_TCP_PORT),
        Target(ipaddress.ip_address(INTERCEPT_V6), INTERCEPT_UDP_PORT, INTERCEPT_TCP_PORT),
    )


class Interception:
    def __init__(self, state_dir: Path) -> None:
        self._ipr = IPRoute()
        self._record = state_dir / "intercept.json"
        self.applied: tuple[str, ...] | None = None
        self.missing: list[str] = []  # listed interfaces that do not exist

    def apply(self, interfaces: Sequence[str]) -> None:
        """Intercept DNS coming in on ``interfaces`` (none: nowhere). An interface
        that does not exist is left out (``missing``). Raises OSError (a
        NetlinkError, or the kernel refusing the program)."""
        wanted = tuple(interfaces)
        if wanted == self.applied:
            return
        self.clear()
        if not wanted:
            self.applied = wanted
            return
        indexes = {name: self._ipr.link_lookup(ifname=name) for name in wanted}
        self.missing = [name for name, found in indexes.items() if not found]
        present = {name: found[0] for name, found in indexes.items() if found}
        self._route()
        fd = load_program(program(*targets(), INTERCEPT_MARK), PROGRAM_NAME, BPF_PROG_TYPE_SCHED_CLS)
        try:
            self._write(list(present))  # before attaching: a crash midway leaves nothing unrecorded
            for index in present.values():
                self._attach(index, fd)
        finally:
            os.close(fd)  # the filters hold the program
        self.applied = wanted

    def _route(self) -> None:
        for family, default in DEFAULT_ROUTE.items():
            self._ipr.route(
                "add",
                dst=default,
                type="local",
                scope=254,  # RT_SCOPE_HOST, as a local route has
                oif=self._ipr.link_lookup(ifname="lo")[0],
                table=INTERCEPT_TABLE,
                proto=RTPROT_MESHSUP,
                family=family,
            )
            add_rule(self._ipr, family, INTERCEPT_TABLE, PRIORITY, fwmark=INTERCEPT_MARK, fwmask=0xFFFFFFFF)

    def _attach(self, index: int, fd: int) -> None:
        try:
            self._ipr.tc("add", "clsact", index)
        except NetlinkError as err:
            if err.code != 17:  # EEXIST: the interface has one already (ours from before, or another's)
                raise
        self._ipr.tc(
            "add-filter",
            "bpf",
            index,
            handle=1,
            fd=fd,
            name=PROGRAM_NAME,
            parent=_INGRESS,
            prio=FILTER_PRIORITY,
            protocol=_ETH_P_ALL,
            direct_action=True,
        )

    def clear(self) -> None:
        """Remove our filters (on the interfaces recorded, whoever attached them), rules and routes."""
        for name in self._read():
            for index in self._ipr.link_lookup(ifname=name):
                self._detach(index)
        for family, default in DEFAULT_ROUTE.items():
            remove_rules(self._ipr, family, (PRIORITY,))
            # Deleted by its protocol, which the kernel matches, not looked for: a dump is of every
            # route the host has (thousands, with as many peers), filtered here.
            try:
                ours = {"type": "local", "scope": 254, "table": INTERCEPT_TABLE, "proto": RTPROT_MESHSUP}
                self._ipr.route("del", family=family, dst=default, **ours)
            except NetlinkError as err:
                if err.code != errno.ESRCH:  # not there (nor its table)
                    raise
        self._record.unlink(missing_ok=True)
        self.applied = None
        self.missing = []

    def _detach(self, index: int) -> None:
        try:
            self._ipr.tc("del-filter", "bpf", index, handle=1, parent=_INGRESS, prio=FILTER_PRIORITY)
        except NetlinkError as err:
            if err.code not in _ENOENT_LIKE:
                raise
        try:
            if not any(self._ipr.get_filters(index=index, parent=hook) for hook in (_INGRESS, _EGRESS)):
                self._ipr.tc("del", "clsact", index)  # nobody else's filters on it: no trace of ours
        except NetlinkError as err:
            if err.code not in _ENOENT_LIKE:
                raise

    def _write(self, interfaces: list[str]) -> None:
        self._record.write_text(json.dumps(interfaces))

    def _read(self) -> list[str]:
        try:
            names = json.loads(self._record.read_text())
        except (FileNotFoundError, ValueError):
            return []
        return [n for n in names if isinstance(n, str)] if isinstance(names, list) else []

    def close(self) -> None:
        self._ipr.close()

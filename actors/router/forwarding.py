"""Serving as an exit node or subnet router: IP forwarding on, and a masquerade of
what peers send out through the node, in an nftables table of our own
(``inet meshsup-<interface>``).

The table is written as an nft script and loaded by ``nft -f -``: pyroute2
0.9.7's nftables knows only IPv4 address, masquerade and verdict expressions,
with no interface-name match and no IPv6 prefixes, so it cannot say "from the
tunnel, out of another link". Each script first deletes whatever table of that
name is there, in the same transaction, so a table left by a crashed router is
replaced or removed on the next start, and a reload never leaves a half state.

Forwarding is switched on namespace-wide (the replies come back in on the
underlay link, which must forward too). The values before our first change are
kept in a file in the state dir, so a router restarted after a crash still
puts back what was there before the node ran.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from meshsup.actors.settings.node import IPNetwork

FORWARDING_SYSCTLS: Final = ("net/ipv4/ip_forward", "net/ipv6/conf/all/forwarding")


def table_name(iface: str) -> str:
    return f"meshsup-{iface}"


def ruleset(iface: str, exit_node: bool, routes: Sequence[IPNetwork]) -> str:
    """The nft script that leaves our table holding exactly these masquerades
    (none: no table). Traffic in from the tunnel and out of another link is
    masqueraded: all of it for an exit node, else only toward ``routes``."""
    table = f"inet {table_name(iface)}"
    lines = [f"table {table} {{}}", f"delete table {table}"]  # the create makes the delete safe
    from_tunnel = f'iifname "{iface}" oifname != "{iface}"'
    if exit_node:
        rules = [f"{from_tunnel} masquerade"]
    else:
        rules = []
        for family, version in (("ip", 4), ("ip6", 6)):
            prefixes = [str(r) for r in routes if r.version == version]
            if prefixes:
                rules.append(f"{from_tunnel} {family} daddr {{ {', '.join(prefixes)} }} masquerade")
    if rules:
        lines += [
            f"table {table} {{",
            "  chain postrouting {",
            "    type nat hook postrouting priority srcnat; policy accept;",
            *(f"    {r}" for r in rules),
            "  }",
            "}",
        ]
    return "\n".join(lines) + "\n"


class Sysctls:
    """Sets sysctls, remembering (in ``saved``) what they were before the first change."""

    def __init__(self, saved: Path, root: Path = Path("/proc/sys")) -> None:
        self.saved, self.root = saved, root

    def set(self, names: Sequence[str], value: str) -> None:
        if not self.saved.exists():  # else the values from before a crash are kept
            before = {n: (self.root / n).read_text().strip() for n in names}
            self.saved.write_text(json.dumps(before))
        for n in names:
            (self.root / n).write_text(value + "\n")

    def restore(self) -> None:
        if not self.saved.exists():
            return
        for name, value in json.loads(self.saved.read_text()).items():
            (self.root / name).write_text(value + "\n")
        self.saved.unlink()


class Forwarding:
    """The node's forwarding and masquerade for one tunnel link."""

    def __init__(
        self, iface: str, state_dir: Path, nft: Sequence[str] = ("nft",), sysctl_root: Path = Path("/proc/sys")
    ) -> None:
        self.iface = iface
        self.sysctls = Sysctls(state_dir / f"forwarding-{iface}.json", sysctl_root)
        self.nft = tuple(nft)
        self.applied: tuple[bool, tuple[IPNetwork, ...]] | None = None

    def apply(self, exit_node: bool, routes: Sequence[IPNetwork]) -> None:
        """Serve as asked (nothing: all off and as before). Raises OSError if
        the sysctls cannot be written or nft refuses the table."""
        wanted = (exit_node, tuple(routes))
        if wanted == self.applied:
            return
        self.applied = None  # until this succeeds: a later call does it all again
        serving = exit_node or bool(routes)
        if serving:
            self.sysctls.set(FORWARDING_SYSCTLS, "1")
        elif shutil.which(self.nft[0]) is None:  # a node that never served needs no nft: no table of ours
            self.sysctls.restore()
            self.applied = wanted
            return
        r = subprocess.run(
            [*self.nft, "-f", "-"], input=ruleset(self.iface, exit_node, routes), text=True, capture_output=True
        )
        if r.returncode != 0:
            raise OSError(f"nft: {r.stderr.strip()}")
        if not serving:
            self.sysctls.restore()
        self.applied = wanted

    def remove(self) -> None:
        self.apply(False, ())

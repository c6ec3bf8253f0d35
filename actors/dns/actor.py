"""The dns actor: the DNS controller."""
from __future__ import annotations

from actors.base import Actor


class DnsActor(Actor):
    kind = "dns"

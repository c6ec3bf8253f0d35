"""The connection table: a flow's key in either direction -> its entry, one dict lookup a packet.

Timeouts are Nebula's (TCP 12 minutes, UDP 3, other protocols 10), counted
from the flow's last packet. The table is bounded: at the bound, expired
flows are swept (at most once a second) and then the oldest flows evicted,
counted in `evictions`.
"""

from __future__ import annotations

from collections.abc import Iterator

from meshsup.actors.filter.flowkey import TCP, UDP, reverse

TIMEOUTS = {TCP: 12 * 60.0, UDP: 3 * 60.0}
OTHER_TIMEOUT = 10 * 60.0
DEFAULT_MAX_FLOWS = 65536
SWEEP_INTERVAL = 1.0


def timeout_of(key: bytes) -> float:
    return TIMEOUTS.get(key[0], OTHER_TIMEOUT)


class Flow:
    """One connection: its keys, when it expires, and who let it in."""

    __slots__ = ("key", "reply_key", "expires", "rule", "local")

    def __init__(self, key: bytes, expires: float, rule: int | None, local: bool) -> None:
        self.key, self.reply_key = key, reverse(key)
        self.expires = expires
        self.rule = rule  # index of the rule that accepted it; None: the default, or opened here
        self.local = local  # opened by this node (its first packet went out)


class FlowTable:
    def __init__(self, max_flows: int = DEFAULT_MAX_FLOWS) -> None:
        self.max_flows = max_flows
        self.by_key: dict[bytes, Flow] = {}  # each flow twice: by its key and by its reply's
        self.evictions = 0
        self._next_sweep = 0.0

    def __len__(self) -> int:
        return len(self.by_key) // 2

    def __iter__(self) -> Iterator[Flow]:
        return (f for k, f in self.by_key.items() if k is f.key)

    def live(self, key: bytes, now: float) -> Flow | None:
        """The unexpired flow of this key, its timeout renewed."""
        flow = self.by_key.get(key)
        if flow is None:
            return None
        if flow.expires <= now:
            self.remove(flow)
            return None
        flow.expires = now + timeout_of(key)
        return flow

    def add(self, key: bytes, rule: int | None, local: bool, now: float) -> Flow:
        if len(self) >= self.max_flows:
            self._make_room(now)
        flow = Flow(key, now + timeout_of(key), rule, local)
        self.by_key[key] = flow
        self.by_key[flow.reply_key] = flow
        return flow

    def remove(self, flow: Flow) -> None:
        self.by_key.pop(flow.key, None)
        self.by_key.pop(flow.reply_key, None)

    def sweep(self, now: float) -> None:
        """Forget the expired flows."""
        for flow in [f for f in self if f.expires <= now]:
            self.remove(flow)

    def _make_room(self, now: float) -> None:
        if now >= self._next_sweep:
            self._next_sweep = now + SWEEP_INTERVAL
            self.sweep(now)
        while len(self) >= self.max_flows:  # dicts keep insertion order: the first is the oldest
            self.remove(next(iter(self.by_key.values())))
            self.evictions += 1

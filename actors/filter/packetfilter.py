"""The filter: rules for a flow's first packet, the connection table for the rest.

Inbound (from peers) is always judged; outbound (to peers) only with
`outbound = true`, but what goes out always opens a flow, so that its
answers pass under a default of deny. A packet of a known flow costs one
dict lookup, and a run of one flow's packets in a batch one lookup in all.
Changing the rules re-judges the live flows: those the new rules no longer
accept are cut (their next packet is judged anew), the rest keep going.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from meshsup.actors.filter.conntrack import DEFAULT_MAX_FLOWS, FlowTable
from meshsup.actors.filter.flowkey import FRAGMENT, TCP, UDP, flow_key, quoted_key, reverse
from meshsup.actors.filter.reject import reject_reply
from meshsup.actors.filter.rules import RuleSet
from meshsup.actors.settings.filter import ACCEPT, REJECT, FilterSettings

SWEEP_EVERY = 30.0  # seconds between sweeps of expired flows from `tick`
MAX_DECIDED = 1024  # accepted flows remembered for flow logs between two takes (a flush a second)


class Filter:
    def __init__(self, settings: FilterSettings, max_flows: int = DEFAULT_MAX_FLOWS) -> None:
        self.settings = settings
        self.rules = RuleSet(settings)
        self.table = FlowTable(max_flows)
        self.hits = [0] * len(settings.rules)  # flows (or refused packets) each rule decided
        self.drops: Counter[str] = Counter()  # by reason: deny, reject, default_deny, default_reject, malformed
        self.cut = 0  # live flows a rule change ended
        # Flows a rule accepted, key as the node sends -> rule, for flow logs (while `recording`; at
        # most MAX_DECIDED between two `take_decided`, the rest counted in `unlogged`).
        self.recording = False
        self.decided: dict[bytes, int] = {}
        self.unlogged = 0
        self._next_sweep = 0.0

    def configure(self, settings: FilterSettings, now: float) -> None:
        """New rules: live flows are judged again by their first packet's key; flows this
        node opened are judged only when outbound packets are."""
        if settings == self.settings:
            return
        if settings.rules != self.settings.rules:  # hits belong to the rules they were counted for
            self.hits = [0] * len(settings.rules)
        self.settings, self.rules = settings, RuleSet(settings)
        for flow in list(self.table):
            if flow.local and not settings.outbound:
                continue
            action, rule = self.rules.judge(flow.key)
            if action == ACCEPT:
                flow.rule = rule
            else:
                self.table.remove(flow)
                self.cut += 1

    def inbound(self, packets: list[bytes], now: float) -> tuple[list[bytes], list[bytes]]:
        """(packets that pass, replies to send back to their senders) for packets from peers."""
        return self._judge(packets, now, judged=True, local=False)

    def outbound(self, packets: list[bytes], now: float) -> tuple[list[bytes], list[bytes]]:
        """(packets that pass, replies for the node) for packets to peers."""
        return self._judge(packets, now, judged=self.settings.outbound, local=True)

    def _judge(self, packets: list[bytes], now: float, judged: bool, local: bool) -> tuple[list[bytes], list[bytes]]:
        passed: list[bytes] = []
        replies: list[bytes] = []
        live = self.table.live
        append = passed.append
        # A run of one flow needs one lookup: `last` is the key of the last packet passed, and for
        # IPv4 TCP or UDP, `tail` its addresses and ports as they sit in the packet (bytes 12-24),
        # checked before any key is cut (a fragment taken for the flow's packet passes anyway).
        last: bytes | None = None
        tail: bytes | None = None
        proto = -1
        for p in packets:
            if p[12:24] == tail and p[9] == proto and p[0] == 0x45:
                append(p)
                continue
            key = flow_key(p)
            if key is None:
                self.drops["malformed"] += 1
                continue
            if key == last or key is FRAGMENT:
                append(p)
                continue
            if live(key, now) is not None:
                append(p)
                last, tail, proto = key, *_tail(p, key)
                continue
            related = quoted_key(p)
            if related is not None and related in self.table.by_key:
                append(p)  # an ICMP error about a flow of ours
                continue
            action, rule = self.rules.judge(key) if judged else (ACCEPT, None)
            if rule is not None:
                self.hits[rule] += 1
            if action == ACCEPT:
                self.table.add(key, rule, local, now)
                if rule is not None and self.recording:  # flow logs key a connection by its local end
                    self._decided(key if local else reverse(key), rule)
                append(p)
                last, tail, proto = key, *_tail(p, key)
                continue
            self.drops[action if rule is not None else f"default_{action}"] += 1
            if action == REJECT and (reply := reject_reply(p)) is not None:
                replies.append(reply)
        return passed, replies

    def _decided(self, key: bytes, rule: int) -> None:
        if len(self.decided) < MAX_DECIDED:
            self.decided[key] = rule
        else:
            self.unlogged += 1

    def take_decided(self) -> dict[bytes, int]:
        decided, self.decided = self.decided, {}
        return decided

    def tick(self, now: float) -> None:
        if now >= self._next_sweep:
            self._next_sweep = now + SWEEP_EVERY
            self.table.sweep(now)

    def status(self) -> dict[str, Any]:
        return {
            "hits": self.hits,
            "drops": dict(self.drops),
            "flows": len(self.table),
            "evictions": self.table.evictions,
            "cut": self.cut,
            "unlogged": self.unlogged,
        }


def _tail(p: bytes, key: bytes) -> tuple[bytes | None, int]:
    """For an IPv4 TCP or UDP packet without options, what `_judge` compares the next ones by."""
    return (key[1:], key[0]) if p[0] == 0x45 and (key[0] == TCP or key[0] == UDP) else (None, -1)

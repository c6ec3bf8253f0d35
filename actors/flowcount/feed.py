"""The counting actors' side of flow logging (tun-io, magicsock, crypto workers):
tallies flushed to netlog, until acknowledged.

The owning actor counts into `tx` and `rx` (actors.flowcount.tally.Tally) as batches go
by, calls `tick` from its loop and hands netlog's acknowledgements to
`take`. About once a second the deltas go to netlog as FlowCounts. Nothing
is lost on the way: a flush netlog cannot take (it is restarting, or full)
goes back into the tallies; one it took but did not acknowledge (it died
before logging it) is sent again as it is, and netlog counts it once.
Counting is on only while [netlog] has collectors.
"""

from __future__ import annotations

import random

from meshsup.actors.base import Actor
from meshsup.actors.bus.codec import Message
from meshsup.actors.bus.messages import FlowCounts, FlowCountsAck
from meshsup.actors.flowcount.tally import INNER, PacketTally, Tally, chunks
from meshsup.actors.settings import Settings

NETLOG = "netlog"
MAX_PERIOD = 1.0  # seconds between flushes; shorter for short windows
RESEND_AFTER = 1.0  # seconds without an acknowledgement


class FlowFeed:
    def __init__(self, actor: Actor, layer: str) -> None:
        actor.accept_from_unprivileged(NETLOG, FlowCountsAck)  # netlog runs unprivileged (actors.registry)
        self.outbox = actor.outbox
        self.source = actor.name
        self.layer = layer
        self.tx: Tally = PacketTally() if layer == INNER else Tally()
        self.rx: Tally = PacketTally() if layer == INNER else Tally()
        self.rules: dict[bytes, int] = {}  # connection key -> the filter rule that accepted it (crypto workers)
        self.period = MAX_PERIOD
        self.epoch = random.getrandbits(31)
        self.seq = 0
        self.unacked: dict[int, tuple[FlowCounts, float]] = {}  # seq -> (message, when last sent)
        self._next_flush = 0.0

    def configure(self, settings: Settings) -> None:
        on = bool(settings.netlog.collectors)
        self.tx.enabled = self.rx.enabled = on
        self.period = min(MAX_PERIOD, settings.netlog.interval / 4)
        if on:
            self.outbox.connect([NETLOG])
        else:
            self.unacked.clear()

    def take(self, msg: Message) -> bool:
        """True if `msg` was netlog's acknowledgement (consumed here)."""
        if not isinstance(msg, FlowCountsAck):
            return False
        if msg.epoch == self.epoch:
            self.unacked.pop(msg.seq, None)
        return True

    def tick(self, now: float) -> None:
        if now >= self._next_flush:
            self._next_flush = now + self.period
            self.flush(now)

    def flush(self, now: float) -> None:
        for seq, (msg, sent) in list(self.unacked.items()):
            if now - sent >= RESEND_AFTER and self.outbox.send(NETLOG, msg):
                self.unacked[seq] = (msg, now)
        parts = chunks(self.tx.drain(), self.rx.drain())
        rules, self.rules = [[k, i] for k, i in self.rules.items()], {}
        if rules and not parts:
            parts = [([], [])]
        for tx, rx in parts:
            self.seq += 1
            msg = FlowCounts(
                source=self.source, epoch=self.epoch, seq=self.seq, layer=self.layer, tx=tx, rx=rx, rules=rules
            )
            if self.outbox.send(NETLOG, msg):
                self.unacked[self.seq] = (msg, now)
            else:  # it never left: count it again with the next flush
                self.tx.restore(tx)
                self.rx.restore(rx)
                self.rules.update(rules)
            rules = []  # the first part carries them

    def close(self) -> None:
        """The last counts, and what is not acknowledged. A message sent is already in
        netlog's socket queue (actors.bus.datapath), so the outbox may close at once."""
        self.flush(float("inf"))

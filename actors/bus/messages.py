"""Every message that crosses the bus. Tags are stable; bump VERSION on change."""

from __future__ import annotations

from typing import Any

from meshsup.actors.bus.codec import Message, message

# --- supervisor <-> actor control (DEALER/ROUTER, request/ack) -------------


@message("actor.hello")
class Hello(Message):
    name: str
    kind: str
    pid: int


@message("actor.heartbeat")
class Heartbeat(Message):
    name: str
    seq: int
    status: dict[str, Any]  # counters and actor-specific state for `status`


@message("actor.configure", version=2)
class Configure(Message):
    req: int
    generation: int
    config: dict[str, Any]  # actors.settings.Settings, in its wire form


@message("actor.command")
class Command(Message):
    """A request other than configuration: `op` names it, `args` carry it."""

    req: int
    op: str
    args: dict[str, Any]


@message("actor.ack")
class Ack(Message):
    req: int
    ok: bool
    error: str
    result: dict[str, Any]


@message("actor.stop")
class Stop(Message):
    req: int


# --- CLI <-> supervisor (REQ/ROUTER) ---------------------------------------


@message("cli.request")
class CliRequest(Message):
    command: str
    args: dict[str, Any]


@message("cli.reply")
class CliReply(Message):
    ok: bool
    error: str
    result: dict[str, Any]


# --- events (PUB -> supervisor proxy -> SUB) -------------------------------


@message("event.link_changed")
class LinkChanged(Message):
    interface: str
    change: str


@message("event.name_learned")
class NameLearned(Message):
    name: str
    addresses: list[str]


# --- data path (PUSH -> PULL, point to point) ------------------------------


@message("data.packets")
class PacketBatch(Message):
    """IP packets between tun-io and crypto; `packets` is a batch.pack blob.

    No sequence number: a peer's packets all go through its one owning
    worker, so each stream stays in order without re-sequencing."""

    packets: bytes


@message("data.datagrams")
class DatagramBatch(Message):
    """WireGuard datagrams to or from one underlay endpoint (crypto <-> magicsock)."""

    host: str
    port: int
    packets: bytes


# --- to netlog: traffic counts and the node's own logs ---------------------


@message("netlog.flow_counts")
class FlowCounts(Message):
    """Counter deltas since the last flush, from tun-io or magicsock (actors.netlog.counting).

    Entries are [key, packets, bytes]. `layer` "inner": keys are raw
    connection keys of IP packets, tx read from the TUN, rx written to it.
    `layer` "underlay": keys are [host, port], tx sent there, rx received.
    netlog acknowledges each (FlowCountsAck to `source`); one not
    acknowledged is sent again as it is, and netlog counts it once.
    """

    source: str  # the sending actor
    epoch: int  # the sender's run: its sequence numbers start again with a new one
    seq: int
    layer: str
    tx: list[Any]
    rx: list[Any]


@message("netlog.flow_counts_ack")
class FlowCountsAck(Message):
    """netlog has logged FlowCounts `seq` of `epoch`: the sender may forget it."""

    epoch: int
    seq: int


@message("netlog.log_line")
class LogLine(Message):
    """One structured log event of a process of the node, as its JSON line (actors.log)."""

    seq: int  # per process, counting from 0: a gap is lines dropped on the way
    line: str

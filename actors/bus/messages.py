"""Every message that crosses the bus. Tags are stable; bump VERSION on change."""

from __future__ import annotations

from dataclasses import field
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


@message("actor.peers")
class PeersChanged(Message):
    """A config change that touched peers alone, as the changes only, so that a one-peer
    `wg set` costs one peer's work in every actor (a whole Configure would be every peer's).
    It turns generation `base` into `generation`; an actor at another generation answers
    {"applied": False} and gets the whole Configure instead."""

    req: int
    base: int
    generation: int
    peers: list[Any]  # actors.settings.PeerSettings added or changed, each in its wire form
    removed: list[bytes]  # public keys


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
    """The router saw the namespace's network change: `change` is "link", "link-removed",
    "addr-added", "addr-removed", "default-route-added" or "default-route-removed"
    (router/netconf.py's LinkEventParser), or "overrun" when the kernel dropped notifications."""

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


# --- paths: magicsock <-> crypto (disco, TSMP) ------------------------------


@message("path.set")
class PathSet(Message):
    """magicsock -> the crypto worker owning `peer` (a disco peer): the direct path to use.

    From its first PathSet a peer's endpoint moves only by PathSet: WireGuard
    roaming stays for peers that speak no disco. A path is trusted for
    `trusted_for` seconds from receipt (a pong's 6.5 s; magicsock refreshes it
    with each heartbeat's pong); untrusted, the peer's datagrams go through
    the relay."""

    peer: bytes  # WireGuard public key
    host: str  # "": no direct path, use the relay
    port: int
    trusted_for: float


@message("path.report")
class PathReport(Message):
    """crypto -> magicsock, at most once a second and only when there is news."""

    active: list[bytes]  # peers with data sent or received since the last report
    handshakes: list[bytes]  # peers whose handshake completed since the last report
    demoted: list[Any]  # [peer, host, port, reason]: direct paths the worker stopped using


@message("path.tsmp")
class TsmpBatch(Message):
    """TSMP packets (IP protocol 99) of one peer, as a batch.pack blob. crypto -> magicsock: what the
    peer sent inside the tunnel, checked against its allowed IPs, never written to the TUN.
    magicsock -> crypto: packets to seal to the peer (no route lookup: the peer is named)."""

    peer: bytes
    packets: bytes


@message("path.underlay")
class UnderlayIn(Message):
    """crypto -> magicsock: disco and STUN datagrams a worker's peer socket read from `host:port`."""

    host: str
    port: int
    packets: bytes


# --- packet capture: crypto -> `meshsup capture` (supervisor/capture.py) -----


@message("capture.packets")
class CaptureBatch(Message):
    """Packets a crypto worker saw together, at `ts` (unix nanoseconds, the worker's clock), as a
    batch.pack blob: IP packets (inner), or WireGuard datagrams in IP and UDP headers (outer).
    Sent to the capture's own socket, never to an actor; dropped and counted when it is full."""

    source: str  # the worker
    ts: int
    packets: bytes


@message("capture.keys")
class CaptureKeys(Message):
    """Key log lines (Wireshark's wg.keylog_file format) of handshakes made during a capture that
    asked for them: the only way session keys leave a crypto worker."""

    source: str
    lines: list[str]


# --- to netlog: traffic counts and the node's own logs ---------------------


@message("netlog.flow_counts")
class FlowCounts(Message):
    """Counter deltas since the last flush, from tun-io or magicsock (actors.netlog.counting).

    Entries are [key, packets, bytes]. `layer` "inner": keys are raw
    connection keys of IP packets, tx read from the TUN, rx written to it.
    `layer` "underlay": keys are [host, port], tx sent there, rx received; what a
    DERP relay carried, [RELAY_HOST, the relay's number, the peer's key].
    netlog acknowledges each (FlowCountsAck to `source`); one not
    acknowledged is sent again as it is, and netlog counts it once.
    `rules` (inner, from crypto workers with a [filter]): [key, index] of
    the connections a filter rule accepted since the last flush, the key
    that of the connection's first packet as the node sends it (turned
    around if a peer sent it), in the same layout but for ICMP echo, whose
    identifier fills both port places (the `rule` of flow records'
    connection entries).
    """

    source: str  # the sending actor
    epoch: int  # the sender's run: its sequence numbers start again with a new one
    seq: int
    layer: str
    tx: list[Any]
    rx: list[Any]
    rules: list[Any] = field(default_factory=list)


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


# --- between relay workers (actors.relay) ----------------------------------


@message("relay.client_up")
class RelayClientUp(Message):
    """A DERP client logged in on `worker`; the newest login of a key (`since`, then
    the worker's name) is the one that stays, as a second connection replaces the first."""

    worker: str
    key: bytes
    host: str
    port: int
    flags: int  # derp.PeerPresentFlags
    since: float  # wall-clock time of the login


@message("relay.client_down")
class RelayClientDown(Message):
    """The client of `key` that logged in on `worker` at `since` left."""

    worker: str
    key: bytes
    since: float


@message("relay.worker_up")
class RelayWorkerUp(Message):
    """A relay worker (re)started at `started`: its clients from before are gone; the
    others tell it theirs (RelayRoster). Sent a few times while the bus connects."""

    worker: str
    started: float


@message("relay.roster")
class RelayRoster(Message):
    """Every client logged in on `worker`, as [key, host, port, flags, since] (answer to worker_up)."""

    worker: str
    clients: list[Any]


@message("relay.frames")
class RelayFrames(Message):
    """DERP RecvPacket frames for clients of the receiving worker: each entry is the
    destination key (32 bytes) then the whole frame, back to back."""

    frames: bytes


# --- coordination: coord -> supervisor (control socket) ----------------------


@message("coord.mesh", version=2)
class MeshPeers(Message):
    """The peers the mesh's bucket holds for this node: whole, then each change of them (peers
    added or changed, keys removed; `seq` one more than the last). The supervisor merges them with
    [[peers]] and applies them in its ordered steps; after a change it missed it asks for the
    whole set (Command "whole")."""

    revision: int  # the bucket's last revision behind them
    peers: list[Any]  # actors.settings.node.PeerSettings, each in its wire form: all, or those changed
    addresses: list[str]  # the node's own, taken from the pools; []: as configured
    policy: dict[str, Any]  # {"filter": [filter] table, "dns": mesh-wide [dns] keys}; {}: none
    # peer's public key (base64) -> what its record says for magicsock: "relay" (its home relay's
    # name, a first hint where to reach it), "disco" (its disco key, base64: a cross-check)
    hints: dict[str, dict[str, str]] = field(default_factory=dict)  # all, or those of the changed peers
    seq: int = 0
    whole: bool = True
    removed: list[bytes] = field(default_factory=list)  # public keys (whole: none)

"""A crypto worker's own ways in and out of the kernel, so the hot path has no hops.

- A queue of the multi-queue TUN. Given one by the supervisor (it holds
  queue k for worker k, so the queue keeps its number), the worker reads it:
  tun-io's eBPF program steers every outgoing packet to the queue of its
  peer's owner, so a peer's packets reach its owner with no hop and in the
  kernel's order. Without one the worker attaches a write-only queue
  (``Tun.open_writer``) and tun-io reads for it. Either way what the worker
  decrypts goes to the kernel at once, TCP runs coalesced.
- One UDP socket per peer the worker owns and knows an endpoint for, bound
  to the listen port with SO_REUSEPORT and connected to that endpoint. The
  kernel hands a datagram to the socket connected to its source before any
  unconnected one, so a peer's traffic reaches its owner directly, and
  magicsock's unconnected socket gets the rest (initiations from endpoints
  not seen yet, peers whose worker is restarting). Datagrams leave from the
  listen port, so peers see the node's endpoint unchanged. The socket
  follows the peer's endpoint as it roams or as magicsock moves it. The
  port carries disco and STUN too: what a peer socket reads of them is
  magicsock's (``take_underlay``), handed to it over the bus.

Each part may be missing (a kernel without multi-queue TUN, listen port 0,
a refused bind): the worker then goes through tun-io or magicsock over the
bus for it, and says so once. A crash closes the worker's descriptors: its
peers' datagrams fall back to magicsock until the restarted worker connects
again, and nothing else changes.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from meshsup.actors.kernel.tun import Tun
from meshsup.actors.kernel.types import Buffer, Burst, Endpoint
from meshsup.actors.kernel.udp import UdpSocket
from meshsup.actors.wire.demux import Protocol, protocol

from .messages import MESSAGE_TRANSPORT

Receive = Callable[[list[Burst]], None]
Read = Callable[[list[bytes]], None]
Underlay = Callable[[Burst], None]
RECV_BATCH = 512
READ_BATCH = 256
_UNDERLAY = (Protocol.DISCO, Protocol.STUN)


def take_underlay(bursts: list[Burst]) -> list[Burst]:
    """Take the disco and STUN datagrams out of `bursts` (in place) and return them, a burst per
    sender. Only datagrams that are no transport message are classified (handshakes, disco, STUN,
    garbage): transport is nearly all the traffic, and this costs each a byte compare."""
    taken: list[Burst] = []
    for endpoint, datagrams in bursts:
        if not [d for d in datagrams if not d or d[0] != MESSAGE_TRANSPORT]:
            continue  # all transport (a list comprehension is the cheapest loop here)
        keep: list[bytes] = []
        take: list[bytes] = []
        for d in datagrams:
            (take if d and d[0] != MESSAGE_TRANSPORT and protocol(d) in _UNDERLAY else keep).append(d)
        if take:
            datagrams[:] = keep
            taken.append(Burst(endpoint, take))
    return taken


class DirectPaths:
    def __init__(
        self,
        log: Any,
        add_reader: Callable[[int, Callable[[], None]], None],
        remove_reader: Callable[[int], None],
        receive: Receive,
        read: Read,
        underlay: Underlay,
        queue: Tun | None = None,
    ) -> None:
        self.log = log
        self._add_reader, self._remove_reader, self._receive = add_reader, remove_reader, receive
        self._read = read
        self._underlay = underlay
        self.queue = queue  # the supervisor's queue for this worker, if any
        self.tun: Tun | None = None
        self.interface = ""
        self.port = 0
        self.mark = 0  # the firewall mark on the sockets (kernel.mark)
        self.sockets: dict[Endpoint, UdpSocket] = {}  # by the endpoint each is connected to
        self.peer_endpoints: dict[bytes, Endpoint] = {}  # owned peer -> endpoint with a socket
        self.tun_dropped = 0
        self.tun_read = 0  # packets read from our own queue
        self._complaints: set[str] = set()

    def configure(self, interface: str, port: int, mark: int = 0) -> None:
        """Attach the TUN queue and take the listen port and firewall mark (sockets follow in ``set_endpoints``)."""
        if interface != self.interface:
            self.interface = interface
            self._close_tun()
            self._attach_tun(interface)
        if port != self.port:
            self.port = port
            self.set_endpoints({})
            if port == 0:
                self._once("udp", "listen port 0: datagrams go through magicsock")
        if mark != self.mark:  # a connected socket keeps its route: each is made anew with the mark
            self.mark = mark
            self.reconnect()

    def _attach_tun(self, interface: str) -> None:
        if self.queue is not None and self.queue.name == interface:
            self.tun = self.queue
            self._add_reader(self.tun.fileno(), self._tun_readable)
            self.log.info("reading and writing our own TUN queue", interface=interface, coalescing=self.tun.vnet_hdr)
            return
        try:
            self.tun = Tun.open_writer(interface)
        except (OSError, ValueError) as err:
            self._once("tun", "no TUN write queue of our own; decrypted packets go through tun-io", reason=str(err))
        else:
            self.log.info("writing to the TUN directly", interface=interface, coalescing=self.tun.vnet_hdr)

    def _tun_readable(self) -> None:
        if self.tun is not None:
            packets = self.tun.read_batch(READ_BATCH)
            self.tun_read += len(packets)
            self._read(packets)

    def set_endpoints(self, endpoints: dict[bytes, Endpoint | None]) -> None:
        """Keep one connected socket for each owned peer with an endpoint (and none for others)."""
        self.update_endpoints({**dict.fromkeys(self.peer_endpoints), **endpoints})

    def update_endpoints(self, endpoints: dict[bytes, Endpoint | None]) -> None:
        """The sockets of these peers alone follow their endpoints (None: no socket)."""
        # Sockets closed first: a peer may move to an endpoint another one leaves.
        for key, e in sorted(endpoints.items(), key=lambda item: item[1] is not None and bool(self.port)):
            endpoint = (str(e[0]), int(e[1])) if e is not None and self.port else None
            if self.peer_endpoints.get(key) == endpoint:
                continue
            if endpoint is None:
                self._close(self.peer_endpoints.pop(key))
                continue
            if endpoint in self.sockets:
                continue  # two peers configured with one endpoint: the first one's socket serves
            old = self.peer_endpoints.pop(key, None)
            sock = self.sockets.pop(old) if old is not None else None
            if sock is None:
                sock = self._bind()
                if sock is None:
                    continue
            try:
                sock.connect(endpoint)
            except (OSError, ValueError) as err:
                self.log.warning(
                    "cannot connect a socket to a peer; it goes through magicsock",
                    endpoint=f"{endpoint[0]}:{endpoint[1]}",
                    reason=str(err),
                )
                self._remove_reader(sock.fileno())
                sock.close()
                continue
            self.sockets[endpoint] = sock
            self.peer_endpoints[key] = endpoint

    def reconnect(self) -> None:
        """The host's addresses or routes changed: a connected socket keeps the source address the
        kernel chose at connect, which may be gone, so each peer's socket is made anew."""
        endpoints: dict[bytes, Endpoint | None] = dict(self.peer_endpoints)
        for key in list(self.peer_endpoints):
            self._close(self.peer_endpoints.pop(key))
        self.set_endpoints(endpoints)

    def _bind(self) -> UdpSocket | None:
        try:
            sock = UdpSocket(self.port, reuse_port=True, mark=self.mark)
        except OSError as err:
            self._once(
                "udp",
                "cannot share the listen port; datagrams go through magicsock",
                port=self.port,
                reason=err.strerror,
            )
            return None
        # Until it is connected the socket may get anyone's datagram: the
        # device hands back those of other workers' sessions (Output.foreign).
        self._add_reader(sock.fileno(), lambda: self._peer_readable(sock))
        return sock

    def _peer_readable(self, sock: UdpSocket) -> None:
        bursts = sock.recv_batch(RECV_BATCH)
        for burst in take_underlay(bursts):
            self._underlay(burst)
        self._receive(bursts)

    def _close(self, endpoint: Endpoint) -> None:
        sock = self.sockets.pop(endpoint)
        self._remove_reader(sock.fileno())
        sock.close()

    def write(self, packets: Sequence[Buffer]) -> bool:
        """Packets to the kernel; False when there is no writer (use tun-io)."""
        if self.tun is None:
            return False
        self.tun_dropped += self.tun.write_batch(packets)
        return True

    def send(self, burst: Burst) -> bool:
        """A burst to a peer; False when no socket is connected to its endpoint (use magicsock)."""
        sock = self.sockets.get(burst.endpoint)
        if sock is None:
            return False
        sock.send_batch(burst)
        return True

    def counters(self) -> dict[str, int]:
        tun = self.tun.stats if self.tun is not None else None
        udp = Counter[str]()
        for sock in self.sockets.values():
            udp.update(dataclasses.asdict(sock.stats))
        return {
            "direct_tun": int(tun is not None),
            "direct_sockets": len(self.sockets),
            "tun_writes": tun.tx_writes if tun else 0,
            "tun_coalesced": tun.tx_coalesced if tun else 0,
            "tun_dropped": self.tun_dropped,
            "tun_read": self.tun_read,
            **{f"udp_{k}": v for k, v in udp.items()},
        }

    def close(self) -> None:
        for endpoint in list(self.sockets):
            self._close(endpoint)
        self.peer_endpoints.clear()
        self._close_tun()

    def _close_tun(self) -> None:
        if self.tun is None:
            return
        if self.tun is self.queue:
            self._remove_reader(self.tun.fileno())
            self.queue = None  # the supervisor keeps its own copy: the queue stays attached
        self.tun.close()
        self.tun = None

    def _once(self, what: str, message: str, **fields: Any) -> None:
        if what not in self._complaints:
            self._complaints.add(what)
            self.log.warning(message, **fields)

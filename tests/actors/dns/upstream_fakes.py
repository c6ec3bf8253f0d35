"""Upstreams with a character, for the policy tests: one that answers only when told
(dead, then recovering), and a forwarder that delays another upstream (this kernel
has no netem)."""

from __future__ import annotations

import heapq
import select
import socket
import threading
import time
from dataclasses import dataclass, field

import dns.message
import dns.rdatatype

from tests.dns_fixtures import endpoint, make_socket
from tests.nodes import Netns


@dataclass
class Arrival:
    at: float  # time.monotonic() when it came
    name: str
    rdtype: str


class _UdpUpstream:
    """A UDP upstream on an address of its own (in ns), served by a thread of its own until stop().
    A subclass sets up what its _run needs before calling __init__, which starts the thread."""

    def __init__(self, ns: Netns | None) -> None:
        self.host, self.port = endpoint(ns)
        self._sock = make_socket(socket.SOCK_DGRAM, ns)
        self._sock.bind((self.host, self.port))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"udp://{self.host}:{self.port}"

    def _run(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self._sock.close()


class SilentUpstream(_UdpUpstream):
    """A UDP upstream that hears everything (arrivals, timed) and answers NOERROR only
    while `answering` is set: dead until a test brings it back."""

    def __init__(self, ns: Netns | None = None) -> None:
        self.answering = threading.Event()
        self.arrivals: list[Arrival] = []
        super().__init__(ns)

    def _run(self) -> None:
        while not self._stop.is_set():
            if not select.select([self._sock], [], [], 0.05)[0]:
                continue
            wire, source = self._sock.recvfrom(65535)
            try:
                query = dns.message.from_wire(wire)
            except Exception:
                continue
            question = query.question[0]
            rdtype = dns.rdatatype.to_text(question.rdtype)
            self.arrivals.append(Arrival(time.monotonic(), question.name.to_text(), rdtype))
            if self.answering.is_set():
                self._sock.sendto(dns.message.make_response(query).to_wire(), source)


@dataclass(order=True)
class _Due:
    at: float
    wire: bytes = field(compare=False)
    source: tuple[str, int] = field(compare=False)


class DelayingForwarder(_UdpUpstream):
    """Listens on a UDP address of its own (in ns) and passes each query on to target
    `delay` seconds later, answers straight back: a slow upstream made of a fast one."""

    def __init__(self, target: tuple[str, int], delay: float, ns: Netns | None = None) -> None:
        self.target, self.delay = target, delay
        self.forwarded = 0
        self._back = make_socket(socket.SOCK_DGRAM, ns)
        self._back.connect(target)
        self._clients: dict[bytes, tuple[str, int]] = {}  # the query ID's client
        super().__init__(ns)

    def _run(self) -> None:
        due: list[_Due] = []
        while not self._stop.is_set():
            wait = min(0.05, max(0.0, due[0].at - time.monotonic())) if due else 0.05
            readable = select.select([self._sock, self._back], [], [], wait)[0]
            if self._sock in readable:
                wire, source = self._sock.recvfrom(65535)
                heapq.heappush(due, _Due(time.monotonic() + self.delay, wire, source))
            if self._back in readable:
                try:
                    answer = self._back.recv(65535)
                except OSError:  # the target is gone (ICMP): its clients time out
                    answer = b""
                client = self._clients.pop(answer[:2], None)
                if client is not None:
                    self._sock.sendto(answer, client)
            while due and due[0].at <= time.monotonic():
                item = heapq.heappop(due)
                self._clients[item.wire[:2]] = item.source
                try:
                    self._back.send(item.wire)
                    self.forwarded += 1
                except OSError:  # an ICMP error from an earlier one: this query is lost
                    pass

    def stop(self) -> None:
        super().stop()
        self._back.close()

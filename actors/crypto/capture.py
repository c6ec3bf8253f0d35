"""What a crypto worker gives `meshsup capture`: sans-IO, no sockets, no clocks.

A capture asks each worker for one layer of its peers' traffic, as
Tailscale's capture hook does, optionally for one peer:

- inner: the IP packets the worker read from the TUN for a peer (before
  encryption) and the ones it decrypted for the TUN. A packet is a peer's
  when cryptokey routing gives it that peer: its destination going out, its
  source coming in (the device's own checks, so nothing else passes them).
- outer: the WireGuard datagrams, each wrapped in the IP and UDP header of
  the underlay addresses it went between (actors.wire.pcap.udp_packet). A
  datagram is a peer's when it went to or came from the peer's endpoint or
  its relayed address. A datagram through a relay travels over the relay's
  TCP connection; it is shown as UDP between RELAY_HOST (Tailscale's magic
  DERP address) and the node's listen port on 127.0.0.1.

Datagrams a worker hands on to another (another's session or peer) are left
to the worker that owns them, which sees them in turn: none is shown twice.

With a key log the device notes the ephemeral key of every handshake it
takes part in (Device.keylog); `key_lines` writes them in the format of
Wireshark's WireGuard dissector (wg.keylog_file), with which tshark decrypts
the outer capture's transport data.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass

from meshsup.actors.kernel.types import RELAY_HOST, RELAYED, Burst, Endpoint
from meshsup.actors.settings.keys import b64
from meshsup.actors.wire.ip import IPV4_DST, IPV4_SRC, IPV6_DST, IPV6_SRC
from meshsup.actors.wire.pcap import udp_packet

from .device import Device, Output
from .handshake import NO_PRESHARED_KEY

LOOPBACK = "127.0.0.1"
MAX_SOURCES = 4096  # underlay hosts whose local address is remembered


@dataclass(frozen=True)
class CaptureSpec:
    socket: str  # the unix socket `meshsup capture` reads batches from
    peer: bytes | None  # one peer's traffic, or every peer's
    outer: bool  # the WireGuard datagrams instead of the packets inside
    keylog: bool  # send session keys too


def _address(packet: bytes, v4: slice, v6: slice) -> bytes | None:
    if not packet:
        return None
    version = packet[0] >> 4
    if version == 4 and len(packet) >= 20:
        return packet[v4]
    if version == 6 and len(packet) >= 40:
        return packet[v6]
    return None


class Tap:
    """Picks the captured packets out of a worker's batches."""

    def __init__(self, spec: CaptureSpec, device: Device, port: int, source_for: Callable[[str], str]) -> None:
        self.spec = spec
        self.device = device
        self.port = port  # the node's listen port: our side of every datagram
        self._source_for = source_for  # the local address the kernel sends from to a host (IO: injected)
        self._sources: dict[str, str] = {}

    def take(self, sent: list[bytes] | None, received: list[Burst] | None, out: Output) -> list[bytes]:
        """The packets of one batch to record: `sent` went into Device.send, `received` into
        Device.receive, `out` is what the device made of them."""
        if self.spec.outer:
            return self._outer(received, out)
        taken: list[bytes] = []
        if sent:
            taken += self._inner(sent, IPV4_DST, IPV6_DST)
        if out.packets:
            taken += self._inner(out.packets, IPV4_SRC, IPV6_SRC)
        return taken

    def _inner(self, packets: list[bytes], v4: slice, v6: slice) -> list[bytes]:
        want = self.spec.peer
        if want is None:
            return [p for p in packets if p]
        lookup = self.device.allowed_ips.lookup
        taken = []
        for p in packets:
            address = _address(p, v4, v6)
            if address is not None and lookup(address) == want:  # the routing table holds public keys
                taken.append(p)
        return taken

    def _outer(self, received: list[Burst] | None, out: Output) -> list[bytes]:
        endpoints = self._endpoints()
        taken: list[bytes] = []
        if received:
            handed_on = {id(f.data) for f in out.forwards + out.foreign}
            for endpoint, datagrams in received:
                ends = self._ends(endpoint, endpoints)
                if ends is not None:
                    remote, local = ends
                    taken += [udp_packet(remote, local, d) for d in datagrams if id(d) not in handed_on]
        for endpoint, datagrams in out.datagrams:
            ends = self._ends(endpoint, endpoints)
            if ends is not None:
                remote, local = ends
                taken += [udp_packet(local, remote, d) for d in datagrams]
        return taken

    def _endpoints(self) -> set[Endpoint] | None:
        """The chosen peer's endpoint and relayed address (None: every peer's)."""
        if self.spec.peer is None:
            return None
        peer = self.device.peers.get(self.spec.peer)
        if peer is None:
            return set()
        return {peer.relay_endpoint} | ({tuple(peer.endpoint)} if peer.endpoint else set())

    def _ends(self, endpoint: Endpoint, wanted: set[Endpoint] | None) -> tuple[Endpoint, Endpoint] | None:
        """(remote, local) underlay addresses of a datagram to or from `endpoint`; None when it is
        not a wanted one, or no IP address and port (what came over the bus is not trusted)."""
        if wanted is not None and tuple(endpoint) not in wanted:
            return None
        host, port = endpoint[0], endpoint[1]
        if not isinstance(port, int) or not 0 <= port < 65536:
            return None
        if host.startswith(RELAYED):
            return (RELAY_HOST, 0), (LOOPBACK, self.port)
        source = self._sources.get(host)
        if source is None:
            try:
                ipaddress.ip_address(host)  # never a name: looking one up would block the worker
            except ValueError:
                return None
            if len(self._sources) >= MAX_SOURCES:  # spoofed senders must not grow it without end
                self._sources.clear()
            source = self._sources[host] = self._source_for(host)
        return (host, port), (source, self.port)

    def key_lines(self) -> list[str]:
        """The key log lines of the handshakes since the last call, for the chosen peer(s)."""
        noted = self.device.keylog
        if not noted:
            return []
        self.device.keylog = []
        local = b64(self.device.static.private)
        lines = []
        for peer, ephemeral, psk in noted:
            if self.spec.peer is not None and peer != self.spec.peer:
                continue
            lines += [
                f"LOCAL_STATIC_PRIVATE_KEY = {local}",
                f"REMOTE_STATIC_PUBLIC_KEY = {b64(peer)}",
                f"LOCAL_EPHEMERAL_PRIVATE_KEY = {b64(ephemeral)}",
            ]
            if psk != NO_PRESHARED_KEY:  # follows its ephemeral key, as the dissector links them
                lines.append(f"PRESHARED_KEY = {b64(psk)}")
        return lines

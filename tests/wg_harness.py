"""Drive an actors.crypto Device over a real UDP socket, for the interop test.

Run inside a network namespace. There is no TUN: the harness crafts ICMP
echo requests (IPv4 and IPv6) to --ping targets and answers echo requests
that arrive through the tunnel. It prints READY once bound and, at the end,
one JSON line: replies per target, echo requests answered, device counters,
events and peer status.
"""

from __future__ import annotations

import argparse
import base64
import ipaddress
import json
import os
import select
import socket
import struct
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from meshsup.actors.crypto.device import Device, Output  # noqa: E402
from meshsup.actors.crypto.peer import PeerConfig  # noqa: E402
from meshsup.actors.kernel.types import Burst  # noqa: E402
from meshsup.supervisor.icmp import checksum  # noqa: E402

ECHO_ID = 0x4D53  # "MS"


def icmp_packet(src: str, dst: str, icmp_type: int, ident: int, seq: int, payload: bytes) -> bytes:
    """An IPv4 ICMP or IPv6 ICMPv6 echo message with valid checksums."""
    s, d = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    body = struct.pack("!BBHHH", icmp_type, 0, 0, ident, seq) + payload
    if s.version == 4:
        body = body[:2] + struct.pack("!H", checksum(body)) + body[4:]
        header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(body), seq, 0, 64, 1, 0, s.packed, d.packed)
        return header[:10] + struct.pack("!H", checksum(header)) + header[12:] + body
    pseudo = s.packed + d.packed + struct.pack("!I3xB", len(body), 58)
    body = body[:2] + struct.pack("!H", checksum(pseudo + body)) + body[4:]
    return struct.pack("!IHBB16s16s", 6 << 28, len(body), 58, 64, s.packed, d.packed) + body


def parse_icmp(packet: bytes) -> tuple[str, str, int, int, int, bytes] | None:
    """(src, dst, type, id, seq, payload) of an ICMP echo message, else None."""
    version = packet[0] >> 4
    if version == 4 and packet[9] == 1:
        ihl = (packet[0] & 0x0F) * 4
        src, dst, body = packet[12:16], packet[16:20], packet[ihl:]
    elif version == 6 and packet[6] == 58:
        src, dst, body = packet[8:24], packet[24:40], packet[40:]
    else:
        return None
    icmp_type, _, _, ident, seq = struct.unpack("!BBHHH", body[:8])
    return (str(ipaddress.ip_address(src)), str(ipaddress.ip_address(dst)), icmp_type, ident, seq, body[8:])


def host_port(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--private-key", required=True)
    ap.add_argument("--peer", required=True, help="peer public key, base64")
    ap.add_argument("--psk")
    ap.add_argument("--endpoint", help="peer endpoint HOST:PORT")
    ap.add_argument("--listen", required=True, help="local HOST:PORT")
    ap.add_argument("--allowed", action="append", default=[])
    ap.add_argument("--src4", default="100.64.0.1")
    ap.add_argument("--src6", default="fd00::1")
    ap.add_argument("--ping", action="append", default=[])
    ap.add_argument("--count", type=int, default=3)
    ap.add_argument("--size", type=int, default=84, help="total IP packet size of each echo request")
    ap.add_argument("--answer", type=int, default=0, help="exit after answering this many echo requests")
    ap.add_argument("--timeout", type=float, default=10.0)
    args = ap.parse_args()

    device = Device(base64.b64decode(args.private_key))
    device.set_peer(
        PeerConfig(
            public_key=base64.b64decode(args.peer),
            preshared_key=base64.b64decode(args.psk) if args.psk else None,
            allowed_ips=[ipaddress.ip_network(a) for a in args.allowed],
            endpoint=host_port(args.endpoint) if args.endpoint else None,
        )
    )
    listen = host_port(args.listen)
    sock = socket.socket(socket.AF_INET6 if ":" in listen[0] else socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(listen)
    sock.setblocking(False)
    print("READY", flush=True)

    replies = {target: set() for target in args.ping}
    answered = 0
    events: list[list[str]] = []

    def flush(out: Output) -> list[bytes]:
        for endpoint, datagrams in out.datagrams:
            for datagram in datagrams:
                sock.sendto(datagram, endpoint)
        events.extend([e.kind, base64.b64encode(e.public_key).decode()] for e in out.events)
        return out.packets

    requests = []
    for target in args.ping:
        src = args.src4 if ipaddress.ip_address(target).version == 4 else args.src6
        overhead = 28 if ipaddress.ip_address(target).version == 4 else 48
        for seq in range(1, args.count + 1):
            payload = bytes((seq + i) & 0xFF for i in range(args.size - overhead))
            requests.append(icmp_packet(src, target, 8 if overhead == 28 else 128, ECHO_ID, seq, payload))
    inbox = flush(device.send(requests, time.monotonic()))

    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        for packet in inbox:
            echo = parse_icmp(packet)
            if echo is None:
                continue
            src, dst, icmp_type, ident, seq, payload = echo
            if icmp_type in (0, 129) and ident == ECHO_ID and src in replies:
                replies[src].add((seq, len(packet)))
            elif icmp_type in (8, 128):
                reply = icmp_packet(dst, src, 0 if icmp_type == 8 else 129, ident, seq, payload)
                flush(device.send([reply], time.monotonic()))
                answered += 1
        inbox = []
        done = all(len(got) >= args.count for got in replies.values()) and answered >= args.answer
        if done:
            break
        now = time.monotonic()
        wake = device.next_deadline()
        wait = 0.05 if wake is None else min(0.05, max(0.0, wake - now))
        if select.select([sock], [], [], wait)[0]:
            batch = []
            while True:
                try:
                    data, addr = sock.recvfrom(65535)
                except BlockingIOError:
                    break
                batch.append(Burst((addr[0], addr[1]), [data]))
            inbox = flush(device.receive(batch, time.monotonic()))
        inbox += flush(device.tick(time.monotonic()))

    print(
        json.dumps(
            {
                "replies": {t: sorted(got) for t, got in replies.items()},
                "answered": answered,
                "counters": dict(device.counters),
                "events": events,
                "status": device.status(time.monotonic()),
            }
        ),
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

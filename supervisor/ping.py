"""`meshsup ping`: ICMP echo to a peer through the node's tunnel, sent from the node's namespace;
or, with --type disco|tsmp, meshsup's own pings, which the node's magicsock sends.

The peer is found in the running node's status (the CLI fetches it); the echo logic is the
sans-IO `supervisor.icmp`; this module is the socket loop around it. A disco ping goes to the
peer's UDP port as Tailscale's disco does, on the direct path when one is trusted, else through
its relay, and each pong says which; a TSMP ping goes inside the WireGuard tunnel (IP protocol
99) and is answered by the peer's meshsup, never by its host's network stack.
"""

from __future__ import annotations

import argparse
import ctypes
import ipaddress
import os
import secrets
import select
import socket
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from meshsup.supervisor.icmp import EchoSession, Reply

PAYLOAD = (b"meshsup " * 7)[:56]  # ping's 56 data bytes
_CLONE_NEWNET = 0x40000000
POLL = 0.02  # seconds between asking magicsock whether a pong came


def resolve(peers: list[dict[str, Any]], target: str) -> tuple[str, str]:
    """(peer name, address) for a peer's name or an address inside some peer's allowed IPs."""
    for p in peers:
        if p["name"] == target:
            hosts = [n for n in map(ipaddress.ip_network, p["allowed_ips"]) if n.num_addresses == 1]
            if not hosts:
                raise ValueError(f"peer {target} has no single address in its allowed IPs; ping an IP")
            return target, str(hosts[0].network_address)
    try:
        addr = ipaddress.ip_address(target)
    except ValueError:
        names = ", ".join(p["name"] for p in peers) or "none"
        raise ValueError(f"{target!r} is neither a peer nor an IP address (peers: {names})") from None
    owners = [
        (net.prefixlen, p["name"]) for p in peers for net in map(ipaddress.ip_network, p["allowed_ips"]) if addr in net
    ]
    if not owners:
        raise ValueError(f"{addr} is in no peer's allowed IPs, so the tunnel does not carry it")
    return max(owners)[1], str(addr)  # longest prefix, as cryptokey routing picks


def source_for(addresses: list[str], version: int) -> str:
    for a in addresses:
        iface = ipaddress.ip_interface(a)
        if iface.version == version:
            return str(iface.ip)
    raise ValueError(f"the node has no IPv{version} address to ping from")


@contextmanager
def netns_of(pid: int) -> Iterator[None]:
    """Run the body in the network namespace of `pid` (sockets made there stay there)."""
    there, here = f"/proc/{pid}/ns/net", "/proc/self/ns/net"
    if os.stat(there).st_ino == os.stat(here).st_ino:
        yield
        return
    libc = ctypes.CDLL(None, use_errno=True)
    with open(here) as home, open(there) as target:
        if libc.setns(target.fileno(), _CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "cannot enter the node's network namespace")
        try:
            yield
        finally:
            libc.setns(home.fileno(), _CLONE_NEWNET)


def open_socket(version: int, interface: str, source: str) -> socket.socket:
    """A raw ICMP socket bound to the tunnel interface, so the echo cannot leave any other way."""
    family, proto = (socket.AF_INET, socket.IPPROTO_ICMP) if version == 4 else (socket.AF_INET6, socket.IPPROTO_ICMPV6)
    sock = socket.socket(family, socket.SOCK_RAW, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, interface.encode())
        sock.bind((source, 0))
    except OSError:
        sock.close()
        raise
    return sock


def exchange(
    sock: socket.socket,
    session: EchoSession,
    count: int,
    interval: float,
    wait: float,
    on_reply: Callable[[Reply], None],
) -> None:
    """Send `count` requests `interval` apart; take replies until all are in or `wait` after the last."""
    target = str(session.target)
    next_send = time.monotonic()
    deadline = float("inf")
    while True:
        now = time.monotonic()
        if session.summary.transmitted < count and now >= next_send:
            request = session.request(now)
            try:
                sock.sendto(request, (target, 0))
            except OSError as err:
                print(f"meshsup: ping: send: {err.strerror}", file=sys.stderr)
            next_send = now + interval
            if session.summary.transmitted == count:
                deadline = now + wait
        if session.summary.transmitted == count and (session.outstanding == 0 or now >= deadline):
            return
        until = next_send if session.summary.transmitted < count else deadline
        if select.select([sock], [], [], max(0.0, until - now))[0]:
            data, source = sock.recvfrom(65535)
            reply = session.receive(source[0], data, time.monotonic())
            if reply is not None:
                on_reply(reply)


def refusal(args: argparse.Namespace) -> str | None:
    """Why these arguments cannot be run, before any node is asked; None when they can."""
    if args.count < 1 or args.interval <= 0 or args.wait <= 0:
        return "-c must be at least 1, -i and -W above 0"
    return None


def run_path(args: argparse.Namespace, status: dict[str, Any], call: Callable[..., Any]) -> int:
    """A disco or TSMP ping: magicsock sends each and tells whether its pong came, by which path.
    `call(command, args)`: the running node's answer (a CliReply)."""
    try:
        name, addr = resolve(status["peers"], args.target)
    except ValueError as err:
        print(f"meshsup: ping: {err}", file=sys.stderr)
        return 2
    key = next(p["public_key"] for p in status["peers"] if p["name"] == name)
    print(f"PING {name} ({addr}) with {args.type}", flush=True)
    sent = received = 0
    try:
        for i in range(args.count):
            if i:
                time.sleep(args.interval)
            reply = call("path_ping", {"type": args.type, "peer": key})
            if not reply.ok:
                print(f"meshsup: ping: {reply.error}", file=sys.stderr)
                return 1
            sent += 1
            while not (result := call("path_ping_result", {"request": reply.result["request"]})).result.get("done"):
                if not result.ok:
                    print(f"meshsup: ping: {result.error}", file=sys.stderr)
                    return 1
                time.sleep(POLL)
            latency = result.result.get("latency")
            if latency is None:
                print(f"timeout from {name} ({addr}): no pong", flush=True)
                continue
            received += 1
            print(f"pong from {name} ({addr}) {result.result['path']} in {latency * 1000:.3f} ms", flush=True)
    except KeyboardInterrupt:
        pass
    print(f"\n--- {name} {args.type} ping statistics ---\n{sent} sent, {received} received")
    return 0 if received else 1


def run(args: argparse.Namespace, status: dict[str, Any]) -> int:
    """Ping as `args` say, given the running node's status."""
    node = status["node"]
    try:
        name, addr = resolve(status["peers"], args.target)
        version = ipaddress.ip_address(addr).version
        source = source_for(node["addresses"], version)
        with netns_of(node["pid"]):
            sock = open_socket(version, node["interface"], source)
    except ValueError as err:
        print(f"meshsup: ping: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"meshsup: ping: {err.strerror or err} (raw ICMP in the node's namespace needs root)", file=sys.stderr)
        return 1
    session = EchoSession(addr, secrets.randbits(16), PAYLOAD)
    print(f"PING {name} ({addr}) from {source} {node['interface']}: {len(PAYLOAD)} data bytes", flush=True)
    try:
        exchange(
            sock,
            session,
            args.count,
            args.interval,
            args.wait,
            lambda r: print(f"{r.size} bytes from {addr}: icmp_seq={r.seq} time={r.rtt * 1000:.3f} ms", flush=True),
        )
    except KeyboardInterrupt:
        pass  # like ping: Ctrl-C ends the run and prints the tally
    finally:
        sock.close()
    s = session.summary
    print(
        f"\n--- {name} ping statistics ---\n{s.transmitted} packets transmitted, {s.received} received, "
        f"{s.loss:.0f}% packet loss"
    )
    if rtt := s.rtt_line():
        print(rtt)
    return 0 if s.received else 1

"""Probes run inside a test namespace (`python -m tests.actors.filter.probe KIND ...`): what a user
sees of the filter, printed as one word per probe.

  serve TCP_PORTS UDP_PORTS   echo servers on every address (ports comma-separated); prints "ready"
  tcp ADDR PORT               open | reset | timeout
  udp ADDR PORT               reply | unreachable | timeout
  hold ADDR PORT,PORT         opens a connection to each, echoes once, prints "held"; then, for each
                              line on stdin, echoes on each again and prints its outcome (ok | cut)
  random SRC DST N SEED       N packets of random protocol, ports, flags and payload, SRC -> DST
"""

from __future__ import annotations

import ipaddress
import random
import socket
import struct
import sys
import threading

TIMEOUT = 3.0


def family(addr: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


def serve(tcp_ports: list[int], udp_ports: list[int]) -> None:
    def echo_tcp(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    def accept(s: socket.socket) -> None:
        while True:
            conn, _ = s.accept()
            threading.Thread(target=echo_tcp, args=(conn,), daemon=True).start()

    def echo_udp(s: socket.socket) -> None:
        while True:
            data, peer = s.recvfrom(65536)
            s.sendto(data, peer)

    for port in tcp_ports:
        s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("::", port))
        s.listen(16)
        threading.Thread(target=accept, args=(s,), daemon=True).start()
    for port in udp_ports:
        s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        s.bind(("::", port))
        threading.Thread(target=echo_udp, args=(s,), daemon=True).start()
    print("ready", flush=True)
    sys.stdin.read()  # until the test closes our stdin


def tcp(addr: str, port: int) -> str:
    try:
        socket.create_connection((addr, port), timeout=TIMEOUT).close()
        return "open"
    except ConnectionRefusedError:
        return "reset"
    except TimeoutError:
        return "timeout"


def udp(addr: str, port: int) -> str:
    with socket.socket(family(addr), socket.SOCK_DGRAM) as s:
        s.settimeout(TIMEOUT)
        s.connect((addr, port))
        s.send(b"probe")
        try:
            return "reply" if s.recv(100) == b"probe" else "garbled"
        except (ConnectionRefusedError, OSError) as err:
            return "timeout" if isinstance(err, TimeoutError) else "unreachable"


def echo(s: socket.socket) -> str:
    try:
        s.sendall(b"x" * 1000)
        got = b""
        while len(got) < 1000:
            chunk = s.recv(1000 - len(got))
            if not chunk:
                return "cut"
            got += chunk
        return "ok"
    except OSError:
        return "cut"


def hold(addr: str, ports: list[int]) -> None:
    conns = [socket.create_connection((addr, p), timeout=TIMEOUT) for p in ports]
    print(" ".join(echo(c) for c in conns), "held", flush=True)
    for _ in sys.stdin:
        print(" ".join(echo(c) for c in conns), flush=True)


def random_packets(src: str, dst: str, n: int, seed: int) -> None:
    rng = random.Random(seed)
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    a, b = ipaddress.ip_address(src).packed, ipaddress.ip_address(dst).packed
    for _ in range(n):
        proto = rng.choice([6, 17, 1, rng.randrange(256)])
        payload = rng.randbytes(rng.randrange(0, 200))
        if proto in (6, 17) and len(payload) >= 14:  # plausible ports and TCP flags, the rest random
            payload = (
                struct.pack("!HH", rng.randrange(65536), rng.choice([22, 23, 1053, 1054, rng.randrange(65536)]))
                + payload[4:]
            )
        header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 0, 0, 64, proto, 0, a, b)
        try:
            s.sendto(header + payload, (dst, 0))
        except OSError:
            pass  # the kernel refuses some (e.g. a buffer full): what matters is what reaches the node
    print("sent", flush=True)


def main(argv: list[str]) -> None:
    kind, *args = argv
    if kind == "serve":
        serve([int(p) for p in args[0].split(",") if p], [int(p) for p in args[1].split(",") if p])
    elif kind == "tcp":
        print(tcp(args[0], int(args[1])))
    elif kind == "udp":
        print(udp(args[0], int(args[1])))
    elif kind == "hold":
        hold(args[0], [int(p) for p in args[1].split(",")])
    elif kind == "random":
        random_packets(args[0], args[1], int(args[2]), int(args[3]))


if __name__ == "__main__":
    main(sys.argv[1:])

"""What a cold forward costs the DNS server itself, steadily enough to compare two versions.

Run: .venv/bin/python tests/bench/bench_dns_cost.py [--names 3000] [--burst 8] [--callgrind]

One DnsServer in this process (no node, no fork server), an upstream dnsmasq
that answers every name under example.test, and a client process that asks
never-asked names in bursts of --burst, each burst answered before the next
(so every run sees the same batches, however fast the server is). Prints the
server process's CPU time per query (user and system); with --callgrind, the
instructions it executed per query instead, counted by valgrind from the
first query of the client to its last: a figure that other load on the
machine does not move, where the CPU time does (bench_dns.py gives the
whole node's figures against dnsmasq's).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import re
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from meshsup.actors.dns.server import DnsServer  # noqa: E402
from meshsup.actors.settings.dns import DnsSettings  # noqa: E402
from tests.dns_fixtures import endpoint, need_tool, start_dnsmasq  # noqa: E402

INSIDE = "BENCH_DNS_COST_UNDER_CALLGRIND"  # set in the copy of this script valgrind runs

CLIENT = """
import secrets, socket, sys
import dns.message
host, port, names, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
tag = secrets.token_hex(3)
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
    sock.settimeout(10)
    queries = [dns.message.make_query(f"c{tag}-{i}.example.test", "A", use_edns=0).to_wire() for i in range(names)]
    for start in range(0, names, size):
        burst = queries[start : start + size]  # made beforehand: they leave back to back
        for query in burst:
            sock.sendto(query, (host, port))
        for _ in burst:
            sock.recv(4096)
"""


async def ask(host: str, port: int, names: int, burst: int) -> None:
    client = await asyncio.create_subprocess_exec(sys.executable, "-c", CLIENT, host, str(port), str(names), str(burst))
    if await client.wait():
        raise RuntimeError("the client failed (an answer did not come in 10 s?)")


def callgrind(on: bool) -> None:
    argv = ["callgrind_control", "-i", "on" if on else "off", str(os.getpid())]
    subprocess.run(argv, check=True, capture_output=True)


async def serve(tmp: Path, args: argparse.Namespace) -> None:
    upstream = start_dnsmasq(tmp, ["--address=/example.test/203.0.113.7"], ttl=3600, name="upstream", log_queries=False)
    host, port = endpoint()
    config = {"listen": [f"{host}:{port}"], "upstreams": [f"udp://{upstream.host}:{upstream.port}"]}
    server = DnsServer(DnsSettings.from_config({**config, "cache_size": 100_000}, {}))
    await server.start()
    gc.freeze()  # as the dns actor does
    try:
        await ask(host, port, 300, args.burst)  # warm up: imports, first sockets
        under_callgrind = INSIDE in os.environ
        if under_callgrind:
            callgrind(True)
        before = resource.getrusage(resource.RUSAGE_SELF)
        await ask(host, port, args.names, args.burst)
        after = resource.getrusage(resource.RUSAGE_SELF)
        if under_callgrind:
            callgrind(False)
        else:
            user, system = ((b - a) / args.names * 1e6 for a, b in zip(before[:2], after[:2], strict=True))
            figures = f"{user:.1f} us user, {system:.1f} us system a query"
            print(f"{args.names} cold names in bursts of {args.burst}: {figures}")
    finally:
        await server.close()
        upstream.stop()


def counted(args: argparse.Namespace, tmp: Path) -> None:
    """This script again under valgrind; the instructions it counted, per query."""
    need_tool("valgrind", "callgrind_control", "callgrind_annotate")
    out = tmp / "callgrind.out"
    argv = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}", sys.executable]
    argv += [__file__, "--names", str(args.names), "--burst", str(args.burst)]
    subprocess.run(argv, check=True, capture_output=True, env={**os.environ, INSIDE: "1"})
    totals = subprocess.run(["callgrind_annotate", str(out)], check=True, capture_output=True, text=True).stdout
    match = re.search(r"([\d,]+) \(100\.0%\)\s+PROGRAM TOTALS", totals)
    if match is None:
        raise RuntimeError(f"callgrind_annotate printed no total:\n{totals}")
    per_query = int(match.group(1).replace(",", "")) / args.names
    print(f"{args.names} cold names in bursts of {args.burst}: {per_query:,.0f} instructions a query")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--names", type=int, default=3000)
    ap.add_argument("--burst", type=int, default=8)
    ap.add_argument("--callgrind", action="store_true", help="count instructions (slow: a minute or two)")
    args = ap.parse_args()
    need_tool("dnsmasq")
    with tempfile.TemporaryDirectory() as tmp:
        if args.callgrind:
            counted(args, Path(tmp))
        else:
            asyncio.run(serve(Path(tmp), args))


if __name__ == "__main__":
    main()

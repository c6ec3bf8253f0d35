"""The UDP transport on its own: burst sockets time their queries out under
one timer, each query at its own deadline, and close when none is left."""

from __future__ import annotations

import asyncio
import os
import socket

import dns.message

from meshsup.actors.dns.transport import Transport
from meshsup.actors.settings.dnstypes import parse_upstream
from tests.dns_fixtures import loopback_address


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_udp_queries_time_out_each_at_its_own_deadline() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:  # takes queries, answers none
        silent.bind((loopback_address(), 0))
        upstream = parse_upstream("udp://{}:{}".format(*silent.getsockname()))
        query = dns.message.make_query("slow.example.test", "A").to_wire()

        async def run() -> None:
            loop = asyncio.get_running_loop()
            transport = Transport()
            fds = open_fds()
            ended: list[tuple[str, str, float]] = []
            all_ended = loop.create_future()

            def done(token: str, answer: bytes | None, reason: str) -> None:
                ended.append((token, reason, loop.time()))
                if len(ended) == 3:
                    all_ended.set_result(None)

            started = loop.time()
            transport.start(upstream, query, 0.6, done, "long")
            await asyncio.sleep(0)  # the next loop turn: a new burst, on a new socket
            transport.start(upstream, query, 0.2, done, "short")  # sent later, due sooner: the timer moves up
            transport.start(upstream, query, 0.3, done, "middle")
            await asyncio.wait_for(all_ended, 5)
            assert [(token, reason) for token, reason, _ in ended] == [
                ("short", "timeout"),
                ("middle", "timeout"),
                ("long", "timeout"),
            ]
            for (_, _, at), timeout in zip(ended, (0.2, 0.3, 0.6), strict=True):
                assert at - started >= timeout
            assert transport.counters["upstream_sockets_udp"] == 2
            assert open_fds() == fds + 1  # both burst sockets closed; the epoll set they were watched in stays
            transport.close()
            assert open_fds() == fds

        asyncio.run(run())

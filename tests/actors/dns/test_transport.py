"""The UDP transport on its own: burst sockets time their queries out under
one timer, each query at its own deadline, and close when none is left."""

from __future__ import annotations

import asyncio
import os
import socket

import dns.message
import pytest

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


def test_a_burst_leaves_from_one_port_and_its_answers_find_their_queries_in_any_order() -> None:
    """Four queries of one loop turn, the third too large to send: it fails at
    once as a network error, the others leave all the same and are answered
    whatever order their answers come in (a stray and an oversized one among
    them, counted)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as server:
        server.bind((loopback_address(), 0))
        server.setblocking(False)
        upstream = parse_upstream("udp://{}:{}".format(*server.getsockname()))
        names = ["a.example.test", "b.example.test", "huge.example.test", "d.example.test"]
        queries = [dns.message.make_query(name, "A").to_wire() for name in names]
        queries[2] += b"\x00" * 70_000  # no datagram is that long

        async def run() -> None:
            loop = asyncio.get_running_loop()
            transport = Transport()
            ended: dict[str, tuple[bytes | None, str]] = {}
            all_ended = loop.create_future()
            received: list[tuple[bytes, tuple[str, int]]] = []

            def done(token: str, answer: bytes | None, reason: str) -> None:
                ended[token] = (answer, reason)
                if len(ended) == len(names):
                    all_ended.set_result(None)

            def upstream_readable() -> None:
                received.append(server.recvfrom(4096))
                if len(received) < 3:
                    return
                sources = {source for _, source in received}
                assert len(sources) == 1, "a burst shares one socket"
                (source,) = sources
                server.sendto(b"\xff\xff\x81\x80" + b"\x00" * 8, source)  # a stray answer: an ID nobody waits on
                server.sendto(received[0][0][:2] + b"\x81\x80" + b"\x00" * 5000, source)  # too long
                for query, _ in reversed(received):
                    answer = dns.message.make_response(dns.message.from_wire(query))
                    server.sendto(answer.to_wire(), source)

            loop.add_reader(server.fileno(), upstream_readable)
            try:
                for name, query in zip(names, queries, strict=True):
                    transport.start(upstream, query, 5, done, name)
                await asyncio.wait_for(all_ended, 5)
            finally:
                loop.remove_reader(server.fileno())
            assert ended["huge.example.test"] == (None, "network")
            for name in ("a.example.test", "b.example.test", "d.example.test"):
                answer, reason = ended[name]
                assert reason == "" and answer is not None
                assert str(dns.message.from_wire(answer).question[0].name) == name + "."
            assert transport.counters["upstream_sockets_udp"] == 1
            assert transport.counters["upstream_udp_mismatched"] == 1
            assert transport.counters["upstream_udp_oversized"] == 1
            transport.close()

        asyncio.run(run())


def test_an_upstream_port_nobody_listens_on_fails_the_burst_as_refused() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as gone:
        gone.bind((loopback_address(), 0))
        upstream = parse_upstream("udp://{}:{}".format(*gone.getsockname()))

    async def run() -> None:
        loop = asyncio.get_running_loop()
        transport = Transport()
        ended: list[tuple[str, str]] = []
        both = loop.create_future()

        def done(token: str, answer: bytes | None, reason: str) -> None:
            ended.append((token, reason))
            if len(ended) == 2:
                both.set_result(None)

        for token in ("first", "second"):
            transport.start(upstream, dns.message.make_query(token + ".test", "A").to_wire(), 5, done, token)
        await asyncio.wait_for(both, 3)  # well before the timeout
        assert sorted(ended) == [("first", "refused"), ("second", "refused")]
        transport.close()

    asyncio.run(run())


def test_held_queries_leave_together_when_sent_and_answers_come_between_the_hooks() -> None:
    """A caller that holds the transport (a listener reading a batch of queries)
    has its queries leave when it says, however many loop turns later, on one
    socket; the answers of a batch are handed out between the two hooks."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as server:
        server.bind((loopback_address(), 0))
        server.setblocking(False)
        upstream = parse_upstream("udp://{}:{}".format(*server.getsockname()))

        async def run() -> None:
            loop = asyncio.get_running_loop()
            transport = Transport()
            events: list[str] = []
            transport.answer_hooks = (lambda: events.append("before"), lambda: events.append("after"))
            both = loop.create_future()

            def done(token: str, answer: bytes | None, reason: str) -> None:
                events.append(f"{token} {reason or 'answered'}")
                if len([e for e in events if " " in e]) == 2:
                    both.set_result(None)

            transport.hold()
            for token in ("first", "second"):
                transport.start(upstream, dns.message.make_query(token + ".test", "A").to_wire(), 5, done, token)
            for _ in range(3):
                await asyncio.sleep(0)
            with pytest.raises(BlockingIOError):
                server.recvfrom(4096)  # held: nothing has left
            transport.send_held()
            received = []
            for _ in range(100):
                try:
                    received.append(server.recvfrom(4096))
                except BlockingIOError:
                    if len(received) == 2:
                        break
                    await asyncio.sleep(0.01)
            assert len(received) == 2 and received[0][1] == received[1][1]  # one burst, one source port
            for query, source in received:  # both in one datagram each, read by the transport in one go
                server.sendto(dns.message.make_response(dns.message.from_wire(query)).to_wire(), source)
            await asyncio.wait_for(both, 5)
            assert events[0] == "before" and events[-1] == "after"
            assert sorted(events[1:-1]) == ["first answered", "second answered"]
            transport.close()

        asyncio.run(run())

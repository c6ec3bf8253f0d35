"""burst.c: a burst of datagrams out in one system call with their IDs set,
the datagrams waiting in in one, replies out to their addresses in one, on
real loopback sockets."""

from __future__ import annotations

import errno
import random
import select
import socket
from collections.abc import Iterator

import pytest

from meshsup.actors.dns import burst
from tests.dns_fixtures import loopback_address


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """A connected, non-blocking client socket and the socket it sends to."""
    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
    try:
        server.bind((loopback_address(), 0))
        server.settimeout(5)
        client.connect(server.getsockname())
        yield client, server
    finally:
        client.close()
        server.close()


def wait_readable(sock: socket.socket) -> None:
    assert select.select([sock], [], [], 5)[0], "nothing arrived"


def test_a_burst_leaves_with_the_ids_given_in_place_of_the_first_two_bytes(pair) -> None:
    client, server = pair
    queries = [b"\x00\x00first", b"\xff\xffsecond", b"\x12\x34"]
    assert burst.send(client.fileno(), [1, 0xABCD, 0xFFFF], queries, 0) == 3
    assert [server.recv(100) for _ in queries] == [b"\x00\x01first", b"\xab\xcdsecond", b"\xff\xff"]


def test_start_skips_the_queries_sent_before(pair) -> None:
    client, server = pair
    assert burst.send(client.fileno(), [1, 2, 3], [b"..a", b"..b", b"..c"], 1) == 2
    assert [server.recv(100) for _ in range(2)] == [b"\x00\x02b", b"\x00\x03c"]


def test_a_query_that_cannot_leave_stops_the_burst_there(pair) -> None:
    """The first is sent and counted; the next call, from the one too large, raises."""
    client, server = pair
    queries = [b"..ok", b".." + b"x" * 70_000, b"..after"]
    assert burst.send(client.fileno(), [1, 2, 3], queries, 0) == 1
    with pytest.raises(OSError) as raised:
        burst.send(client.fileno(), [1, 2, 3], queries, 1)
    assert raised.value.errno == errno.EMSGSIZE
    assert server.recv(100) == b"\x00\x01ok"


def test_the_datagrams_waiting_come_in_order_and_none_is_an_empty_list(pair) -> None:
    client, server = pair
    assert burst.receive(client.fileno(), 16, 4096) == []
    for n in range(5):
        server.sendto(bytes([n]) * (n + 1), client.getsockname())
    wait_readable(client)
    assert burst.receive(client.fileno(), 3, 4096) == [b"\x00", b"\x01\x01", b"\x02\x02\x02"]
    assert burst.receive(client.fileno(), 16, 4096) == [b"\x03" * 4, b"\x04" * 5]
    assert burst.receive(client.fileno(), 16, 4096) == []


def test_a_datagram_longer_than_size_is_none_and_one_of_size_is_whole(pair) -> None:
    client, server = pair
    for length in (8, 9, 5000, 0):
        server.sendto(b"a" * length, client.getsockname())
    wait_readable(client)
    received: list[bytes | None] = []
    while len(received) < 4:  # loopback delivers them in order, but a batch may hold only those arrived yet
        received += burst.receive(client.fileno(), 16, 8)
    assert received == [b"a" * 8, None, None, b""]


def test_an_error_the_socket_reports_is_raised_as_its_oserror() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as gone:
        gone.bind((loopback_address(), 0))
        address = gone.getsockname()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK) as client:
        client.connect(address)
        assert burst.send(client.fileno(), [7], [b"..nobody listens"], 0) == 1
        wait_readable(client)  # the port unreachable
        with pytest.raises(ConnectionRefusedError):
            burst.receive(client.fileno(), 16, 4096)


def test_a_closed_descriptor_is_an_oserror() -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    fd = sock.fileno()
    sock.close()
    for call in (lambda: burst.send(fd, [1], [b"..x"], 0), lambda: burst.receive(fd, 1, 100)):
        with pytest.raises(OSError) as raised:
            call()
        assert raised.value.errno == errno.EBADF


@pytest.mark.parametrize(
    ("args", "error"),
    [
        ((3, [1], [b"..x", b"..y"], 0), ValueError),  # more queries than IDs
        ((3, [1], [b"x"], 0), ValueError),  # no room for an ID
        ((3, [1], ["..x"], 0), ValueError),  # not bytes
        ((3, [0x10000], [b"..x"], 0), ValueError),
        ((3, [-1], [b"..x"], 0), ValueError),
        ((3, ["1"], [b"..x"], 0), TypeError),
        ((3, [1], [b"..x"], 1), ValueError),  # nothing left from start
        ((3, [1], [b"..x"], -1), ValueError),
        ((3, [1] * 65, [b"..x"] * 65, 0), ValueError),  # more than a call takes
        ((3, (1,), (b"..x",), 0), TypeError),
        ((-1, [1], [b"..x"], 0), ValueError),
        ((3, [1], [b"..x"]), TypeError),
    ],
)
def test_send_refuses_what_is_not_a_burst(args, error) -> None:
    with pytest.raises(error):
        burst.send(*args)


@pytest.mark.parametrize("args", [(3, 0, 100), (3, 65, 100), (3, 1, 0), (3, 1, 65537), (-1, 1, 100), (3, 1)])
def test_receive_refuses_counts_and_sizes_out_of_range(args) -> None:
    with pytest.raises((ValueError, TypeError)):
        burst.receive(*args)


@pytest.fixture
def family_sockets(request) -> Iterator[tuple[socket.socket, list[socket.socket]]]:
    """An unconnected, non-blocking sender and three receivers of request.param's family on loopback."""
    family = request.param
    host = loopback_address() if family == socket.AF_INET else "::1"
    made = [socket.socket(family, socket.SOCK_DGRAM) for _ in range(4)]
    try:
        for sock in made:
            try:
                sock.bind((host, 0))
            except OSError:
                pytest.skip("needs IPv6 on the loopback interface")
            sock.settimeout(5)
        made[0].setblocking(False)
        yield made[0], made[1:]
    finally:
        for sock in made:
            sock.close()


@pytest.mark.parametrize("family_sockets", [socket.AF_INET, socket.AF_INET6], indirect=True)
def test_replies_leave_each_to_its_address_as_sendto_takes_it(family_sockets) -> None:
    sender, receivers = family_sockets
    addresses = [r.getsockname() for r in receivers]  # IPv6: (host, port, flowinfo, scope_id)
    if sender.family == socket.AF_INET6:
        addresses[1] = addresses[1][:2]  # the short form goes too
    replies = [b"r0", b"r1" * 700, b""]
    assert burst.send_to(sender.fileno(), replies, addresses, 0) == 3
    assert [r.recv(4096) for r in receivers] == replies
    assert burst.send_to(sender.fileno(), replies, addresses, 2) == 1  # from start on
    assert receivers[2].recv(10) == b""


def test_at_most_64_replies_leave_in_a_call(pair) -> None:
    _, server = pair
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
        sender.setblocking(False)
        replies = [b"%d" % i for i in range(70)]
        addresses = [server.getsockname()] * 70
        assert burst.send_to(sender.fileno(), replies, addresses, 0) == 64
        assert burst.send_to(sender.fileno(), replies, addresses, 64) == 6
        assert [server.recv(10) for _ in range(70)] == replies


@pytest.mark.parametrize(
    "address",
    [("no-such-host", 53), ("127.0.0.1",), ("127.0.0.1", 70000), (b"127.0.0.1", 53), "127.0.0.1:53", ("::1", -1)],
)
def test_an_address_that_is_not_one_stops_the_replies_there(pair, address) -> None:
    """Those before it leave; from it on, the call raises ValueError and sends nothing."""
    _, server = pair
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
        sender.setblocking(False)
        addresses = [server.getsockname(), address, server.getsockname()]
        assert burst.send_to(sender.fileno(), [b"a", b"b", b"c"], addresses, 0) == 1
        with pytest.raises(ValueError):
            burst.send_to(sender.fileno(), [b"a", b"b", b"c"], addresses, 1)
        assert burst.send_to(sender.fileno(), [b"a", b"b", b"c"], addresses, 2) == 1
        assert [server.recv(10) for _ in range(2)] == [b"a", b"c"]


def test_a_reply_too_large_to_leave_raises_when_it_comes_first(pair) -> None:
    _, server = pair
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
        sender.setblocking(False)
        replies, addresses = [b"x" * 70_000, b"ok"], [server.getsockname()] * 2
        with pytest.raises(OSError) as raised:
            burst.send_to(sender.fileno(), replies, addresses, 0)
        assert raised.value.errno == errno.EMSGSIZE
        assert burst.send_to(sender.fileno(), replies, addresses, 1) == 1
        assert server.recv(10) == b"ok"


def test_send_to_checks_its_arguments(pair) -> None:
    client, server = pair
    address = server.getsockname()
    with pytest.raises(ValueError):
        burst.send_to(client.fileno(), [b"a"], [address, address], 0)  # lengths differ
    with pytest.raises(ValueError):
        burst.send_to(client.fileno(), [b"a"], [address], 1)  # start past the end
    with pytest.raises(TypeError):
        burst.send_to(client.fileno(), [b"a"], (address,), 0)  # not a list
    with pytest.raises(TypeError):
        burst.send_to(client.fileno(), ["a"], [address], 0)  # not bytes
    with pytest.raises(ValueError):
        burst.send_to(-1, [b"a"], [address], 0)


@pytest.mark.parametrize("family_sockets", [socket.AF_INET, socket.AF_INET6], indirect=True)
def test_datagrams_come_in_with_their_senders_as_recvfrom_gives_them(family_sockets) -> None:
    receiver, senders = family_sockets
    address = receiver.getsockname()
    assert burst.receive_from(receiver.fileno(), 64, 4096) == []
    for i, sender in enumerate(senders):
        sender.sendto(b"q%d" % i if i < 2 else b"x" * 4097, address)
    got: list[tuple[bytes | None, tuple]] = []
    while len(got) < 3:
        wait_readable(receiver)
        got += burst.receive_from(receiver.fileno(), 64, 4096)
    expected = [b"q0", b"q1", None]  # the third longer than size
    assert got == [(data, sender.getsockname()) for data, sender in zip(expected, senders, strict=True)]
    senders[0].sendto(b"a" * 4096, address)  # as long as size: whole
    senders[0].sendto(b"b", address)
    wait_readable(receiver)
    assert burst.receive_from(receiver.fileno(), 1, 4096) == [(b"a" * 4096, senders[0].getsockname())]
    assert burst.receive_from(receiver.fileno(), 1, 4096) == [(b"b", senders[0].getsockname())]
    with pytest.raises(ValueError):
        burst.receive_from(receiver.fileno(), 65, 4096)
    with pytest.raises(ValueError):
        burst.receive_from(receiver.fileno(), 1, 0)


@pytest.mark.parametrize("family_sockets", [socket.AF_INET, socket.AF_INET6], indirect=True)
def test_random_batches_arrive_and_leave_as_recvfrom_and_sendto_have_them(family_sockets) -> None:
    """Differential: 200 random batches (sizes at, around and past the limit, senders
    and receivers mixed, any start) each way against what the socket module sees;
    at most 40 datagrams of a batch, so that they fit the receive buffers."""
    rng = random.Random(41)
    listener, peers = family_sockets
    address = listener.getsockname()
    for _ in range(200):
        size = rng.choice([1, 2, 12, 512, 1232, 2048, rng.randint(1, 2048)])
        sent = [
            (rng.choice(peers), rng.randbytes(rng.choice([0, 1, size - 1, size, size + 1, rng.randint(0, 2100)])))
            for _ in range(rng.randint(1, 40))
        ]
        for peer, data in sent:
            peer.sendto(data, address)
        got: list[tuple[bytes | None, tuple]] = []
        while len(got) < len(sent):
            wait_readable(listener)
            got += burst.receive_from(listener.fileno(), rng.randint(1, 64), size)
        assert got == [(data if len(data) <= size else None, peer.getsockname()) for peer, data in sent]
        replies = [rng.randbytes(rng.randint(0, 3000)) for _ in range(rng.randint(1, 40))]
        to = [rng.choice(peers) for _ in replies]
        start = rng.randrange(len(replies))
        done = start
        while done < len(replies):
            done += burst.send_to(listener.fileno(), replies, [peer.getsockname() for peer in to], done)
        for index in range(start, len(replies)):
            assert to[index].recv(4096) == replies[index]

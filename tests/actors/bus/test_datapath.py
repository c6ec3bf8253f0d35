"""The data path between actors (unix seqpacket sockets) and batch splitting."""

from __future__ import annotations

import select
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from meshsup.actors.bus import batch, datapath
from meshsup.actors.bus.codec import decode, encode
from meshsup.actors.bus.messages import PacketBatch


class Loop:
    """The part of the actor loop an Inbox needs: readers, polled by hand."""

    def __init__(self) -> None:
        self.readers: dict[Any, Callable[[], None]] = {}
        self.got: list[PacketBatch] = []
        self.truncated = 0

    def inbox(self, path: Path) -> datapath.Inbox:
        return datapath.Inbox(
            str(path),
            self.readers.__setitem__,
            lambda fd: self.readers.pop(fd, None),
            lambda frame: self.got.append(decode(frame)),
            self.count_truncated,
        )

    def count_truncated(self) -> None:
        self.truncated += 1

    def run(self, until: Callable[[], bool]) -> None:
        for _ in range(50):
            if until():
                return
            ready, _, _ = select.select(list(self.readers), [], [], 0.1)
            for fd in ready:
                if fd in self.readers:
                    self.readers[fd]()
        raise AssertionError("condition never met")


def test_batches_arrive_whole_and_in_order(tmp_path: Path) -> None:
    loop = Loop()
    inbox = loop.inbox(tmp_path / "crypto-0.sock")
    out = datapath.Outbox(lambda name: str(tmp_path / f"{name}.sock"))
    sent = [PacketBatch(packets=batch.pack([bytes([i]) * 1400] * 40)) for i in range(100)]
    assert all(out.send("crypto-0", m) for m in sent)
    loop.run(lambda: len(loop.got) == len(sent))
    assert loop.got == sent
    inbox.close()
    out.close()
    assert not (tmp_path / "crypto-0.sock").exists()


def test_a_missing_or_restarted_receiver_costs_counted_batches_only(tmp_path: Path) -> None:
    path = tmp_path / "tun-io.sock"
    out = datapath.Outbox(lambda name: str(tmp_path / f"{name}.sock"))
    msg = PacketBatch(packets=batch.pack([b"x" * 100]))
    assert not out.send("tun-io", msg)  # nobody listens yet
    loop = Loop()
    inbox = loop.inbox(path)
    assert out.send("tun-io", msg)
    loop.run(lambda: len(loop.got) == 1)
    inbox.close()  # the receiver goes away and comes back as a new process would
    assert not out.send("tun-io", msg)
    inbox = loop.inbox(path)
    assert out.send("tun-io", msg)
    loop.run(lambda: len(loop.got) == 2)
    assert out.dropped["tun-io"] == 2
    inbox.close()
    out.close()


def test_a_full_receiver_drops_instead_of_blocking(tmp_path: Path) -> None:
    loop = Loop()
    inbox = loop.inbox(tmp_path / "magicsock.sock")
    out = datapath.Outbox(lambda name: str(tmp_path / f"{name}.sock"))
    msg = PacketBatch(packets=batch.pack([b"y" * 1400] * 40))
    results = [out.send("magicsock", msg) for _ in range(2000)]  # nobody reads: the buffer fills
    assert results[0] and not results[-1]
    assert out.dropped["magicsock"] == results.count(False) > 0
    inbox.close()
    out.close()


def test_an_oversized_message_is_counted_and_the_next_one_read(tmp_path: Path) -> None:
    loop = Loop()
    inbox = loop.inbox(tmp_path / "crypto-1.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
        s.connect(str(tmp_path / "crypto-1.sock"))
        s.send(b"\0" * (datapath.MAX_MESSAGE + 1))
        ok = PacketBatch(packets=b"")
        s.send(encode(ok))
        loop.run(lambda: loop.got == [ok])
    assert loop.truncated == 1
    inbox.close()


@pytest.mark.parametrize("sizes", [[], [100], [1400] * 200, [30_000, 40_000, 10, 59_998, 65_535]])
def test_pack_split_keeps_order_and_bounds(sizes: list[int]) -> None:
    packets = [bytes([i % 256]) * n for i, n in enumerate(sizes)]
    blobs = batch.pack_split(packets)
    assert [p for b in blobs for p in batch.unpack(b)] == packets
    assert all(len(b) <= batch.MAX_BYTES or len(batch.unpack(b)) == 1 for b in blobs)
    # Greedy: no two neighbours would have fitted in one batch.
    assert all(len(a) + len(b) > batch.MAX_BYTES for a, b in zip(blobs, blobs[1:]))

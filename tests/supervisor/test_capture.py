"""`meshsup capture`'s own parts: the pcap file it writes from worker batches, peer names, and the
supervisor asking every worker at once."""

from __future__ import annotations

import io
from typing import Any

import pytest

from meshsup.actors.bus import batch
from meshsup.actors.bus.codec import encode
from meshsup.actors.bus.messages import Ack, CaptureBatch, CaptureKeys, Command, LinkChanged
from meshsup.actors.wire import pcap
from meshsup.supervisor.capture import Writer, fan_out, peer_key


def test_writer_turns_batches_into_records_up_to_the_count() -> None:
    out, keys = io.BytesIO(), io.StringIO()
    writer = Writer(out, keys, count=3)
    writer.take(encode(CaptureBatch(source="crypto-0", ts=7_000_001_000, packets=batch.pack([b"\x45a", b"\x45b"]))))
    writer.take(encode(CaptureKeys(source="crypto-0", lines=["LOCAL_STATIC_PRIVATE_KEY = x", "PRESHARED_KEY = y"])))
    writer.take(b"\x93garbage")
    writer.take(encode(LinkChanged(interface="eth0", change="link")))  # not a capture's message
    assert not writer.done
    writer.take(encode(CaptureBatch(source="crypto-1", ts=8_000_000_000, packets=batch.pack([b"\x45c", b"\x45d"]))))
    assert writer.done and writer.written == 3 and writer.bad == 2
    first = pcap.records(7_000_001_000, [b"\x45a", b"\x45b"])
    assert out.getvalue() == pcap.file_header() + first + pcap.record(8 * 10**9, b"\x45c")
    assert keys.getvalue() == "LOCAL_STATIC_PRIVATE_KEY = x\nPRESHARED_KEY = y\n"


def test_peer_by_name_or_key() -> None:
    peers = [{"name": "bravo", "public_key": "B="}, {"name": "charlie", "public_key": "C="}]
    assert peer_key(peers, "charlie") == "C=" and peer_key(peers, "B=") == "B="
    with pytest.raises(ValueError, match=r"no peer 'delta' \(peers: bravo, charlie\)"):
        peer_key(peers, "delta")


class Hub:
    """Answers each request as `answers` says: an Ack's fields, or None for no answer."""

    def __init__(self, answers: dict[str, tuple[bool, str] | None]) -> None:
        self.answers, self.asked = answers, []

    def request(self, actor: str, make: Any, done: Any) -> None:
        cmd = make(len(self.asked))
        assert isinstance(cmd, Command) and cmd.op == "capture"
        self.asked.append((actor, cmd.args))
        answer = self.answers[actor]
        done(None if answer is None else Ack(req=cmd.req, ok=answer[0], error=answer[1], result={"packets": 1}))


def test_fan_out_answers_once_every_worker_did() -> None:
    replies: list[tuple] = []
    reply = lambda ok, error="", result=None: replies.append((ok, error, result))  # noqa: E731
    hub = Hub({"crypto-0": (True, ""), "crypto-1": (True, "")})
    fan_out(hub, ["crypto-0", "crypto-1"], {"socket": "s"}, reply)
    assert hub.asked == [("crypto-0", {"socket": "s"}), ("crypto-1", {"socket": "s"})]
    assert replies == [(True, "", {"workers": {"crypto-0": {"packets": 1}, "crypto-1": {"packets": 1}}})]
    replies.clear()
    refusing = Hub({"crypto-0": (False, "another capture is running"), "crypto-1": None})
    fan_out(refusing, ["crypto-0", "crypto-1"], {}, reply)
    assert replies == [(False, "crypto-0: another capture is running; crypto-1: did not answer", {"workers": {}})]
    replies.clear()
    fan_out(Hub({}), [], {}, reply)
    assert replies == [(False, "no crypto workers", None)]

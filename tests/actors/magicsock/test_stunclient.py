"""magicsock's STUN prober, sans-IO: rounds, retransmits, give-ups, what counts as an answer,
and what it concludes about the NAT."""

from __future__ import annotations

import itertools
import socket

import pytest

from meshsup.actors.kernel.types import Endpoint
from meshsup.actors.magicsock.stunclient import ROUND_EVERY, StunProber, stun_servers
from meshsup.actors.wire import stun

S1, S2, S6 = ("203.0.113.1", 3478), ("203.0.113.2", 3478), ("2001:db8::1", 3478)
HOME = ("198.51.100.7", 41641)


def counting_rng() -> object:
    """Distinct transaction IDs; the round jitter's four bytes come out as 0x80000000, the middle."""
    counter = itertools.count(1)

    def rng(n: int) -> bytes:
        return b"\x80\0\0\0" if n == 4 else next(counter).to_bytes(n, "big")

    return rng


def sent(prober: StunProber) -> dict[Endpoint, list[bytes]]:
    """Transaction IDs of the requests due now, by server."""
    out: dict[Endpoint, list[bytes]] = {}
    for server, packet in prober.datagrams_to_send():
        out.setdefault(server, []).append(stun.parse_binding_request(packet).txid)
    return out


def answer(txid: bytes, mapped: Endpoint) -> bytes:
    return stun.response(txid, mapped, with_fingerprint=True)


def started(*servers: Endpoint, now: float = 100.0) -> tuple[StunProber, dict[Endpoint, list[bytes]]]:
    p = StunProber(servers, rng=counting_rng())  # type: ignore[arg-type]
    assert p.get_timer() is not None and p.get_timer() <= now  # the first round is due at once
    p.handle_timer(now)
    return p, sent(p)


def test_a_round_asks_every_server_and_learns_the_reflexive_address() -> None:
    p, reqs = started(S1, S2)
    assert set(reqs) == {S1, S2} and len({t for ts in reqs.values() for t in ts}) == 2
    assert p.reflexive() == [] and p.mapping_varies() is None and not p.fresh(100.0)
    assert p.receive(answer(reqs[S1][0], HOME), S1, 100.01)
    assert p.reflexive() == [HOME]  # known at once, before the round ends
    assert p.mapping_varies() is None  # judged on a finished round
    assert p.receive(answer(reqs[S2][0], HOME), S2, 100.02)
    assert p.reflexive() == [HOME] and p.mapping_varies() is False and p.fresh(100.02)
    assert p.counters["answers"] == 2 and p.counters["requests"] == 2
    # Every server answered: nothing is resent, the next round waits for its time.
    assert p.get_timer() == pytest.approx(100.0 + sum(ROUND_EVERY) / 2)


def test_two_servers_that_see_different_ports_mean_the_mapping_varies() -> None:
    p, reqs = started(S1, S2)
    p.receive(answer(reqs[S1][0], HOME), S1, 100.01)
    p.receive(answer(reqs[S2][0], (HOME[0], 50000)), S2, 100.01)
    assert p.mapping_varies() is True
    assert sorted(p.reflexive()) == sorted([HOME, (HOME[0], 50000)])


def test_one_answer_cannot_judge_the_mapping_nor_can_two_of_different_families() -> None:
    p, reqs = started(S1, S6)
    p.receive(answer(reqs[S1][0], HOME), S1, 100.01)
    p.receive(answer(reqs[S6][0], ("2001:db8:1::7", 41641)), S6, 100.01)
    assert p.mapping_varies() is None and len(p.reflexive()) == 2


def test_retransmits_follow_the_doubling_rto_and_a_silent_server_is_given_up_at_3_1_s() -> None:
    p, reqs = started(S1, S2, now=0.0)
    p.receive(answer(reqs[S2][0], HOME), S2, 0.01)
    times = [0.0]
    while (t := p.get_timer()) is not None and t < 5.0:
        p.handle_timer(t)
        again = sent(p)
        if again:
            assert again == {S1: reqs[S1]}  # the same transaction, again; the answered server is left alone
            times.append(t)
    assert times == pytest.approx([0.0, 0.1, 0.3, 0.7, 1.5])
    assert p.counters["timeouts"] == 1 and p.counters["retransmits"] == 4
    assert p.get_timer() == pytest.approx(sum(ROUND_EVERY) / 2)  # the round ended at 3.1 s
    assert p.reflexive() == [HOME] and p.mapping_varies() is None  # one answer in the finished round
    assert not p.receive(answer(reqs[S1][0], HOME), S1, 3.2)  # too late: the round is over
    assert p.counters["unknown_txid"] == 1


def test_only_an_answer_to_our_request_from_its_server_counts() -> None:
    p, reqs = started(S1, S2)
    planted = ("203.0.113.66", 4444)
    assert not p.receive(answer(reqs[S1][0], planted), S2, 100.01)  # right ID, another server
    assert not p.receive(answer(reqs[S1][0], planted), ("203.0.113.1", 3479), 100.01)  # another port
    assert not p.receive(answer(b"\x07" * 12, planted), S1, 100.01)  # nobody's ID
    assert not p.receive(stun.request(reqs[S1][0]), S1, 100.01)  # a request, not an answer
    assert not p.receive(b"\x00\x01 not stun at all", S1, 100.01)
    assert p.reflexive() == [] and not p.fresh(100.01)
    assert p.counters["wrong_source"] == 2 and p.counters["unknown_txid"] == 1
    assert p.counters["stun_not_success_response"] == 1 and p.counters["stun_not_stun"] == 1
    assert p.receive(answer(reqs[S1][0], HOME), S1, 100.02)
    assert not p.receive(answer(reqs[S1][0], HOME), S1, 100.03)  # a retransmit's answer as well
    assert p.counters["duplicate_answers"] == 1 and p.counters["answers"] == 1


def test_a_dual_stack_sockets_view_of_the_server_and_any_spelling_of_it_match() -> None:
    p, reqs = started(S1, ("2001:DB8:0::1", 3478))
    assert set(reqs) == {S1, S6}  # sent to the one spelling
    assert p.receive(answer(reqs[S1][0], HOME), ("::ffff:203.0.113.1", 3478), 100.01)
    assert p.receive(answer(reqs[S6][0], ("2001:db8:1::7", 1)), ("2001:db8:0:0::1", 3478), 100.01)
    assert p.counters["answers"] == 2


def test_rounds_repeat_every_20_to_26_s_and_a_round_replaces_what_the_last_found() -> None:
    p, reqs = started(S1, S2, now=0.0)
    p.receive(answer(reqs[S1][0], HOME), S1, 0.01)
    p.receive(answer(reqs[S2][0], HOME), S2, 0.01)
    nxt = p.get_timer()
    assert nxt is not None and ROUND_EVERY[0] <= nxt <= ROUND_EVERY[1]
    p.handle_timer(nxt - 0.001)
    assert sent(p) == {}
    p.handle_timer(nxt)
    second = sent(p)
    assert set(second) == {S1, S2} and second[S1] != reqs[S1]  # new transactions
    moved = ("198.51.100.7", 60000)
    p.receive(answer(second[S1][0], moved), S1, nxt + 0.01)
    assert p.reflexive() == [moved, HOME]  # the old one stays until this round ends...
    t = p.get_timer()
    while t is not None and t < nxt + 5:
        p.handle_timer(t)
        t = p.get_timer()
    assert p.reflexive() == [moved]  # ...without it: S2 went silent
    assert p.counters["rounds"] == 2


def test_a_round_without_any_answer_forgets_the_address() -> None:
    p, reqs = started(S1, now=0.0)
    p.receive(answer(reqs[S1][0], HOME), S1, 0.01)
    t = p.get_timer()
    assert t is not None
    p.handle_timer(t)
    while (t := p.get_timer()) is not None and p.counters["timeouts"] == 0:
        p.handle_timer(t)
    assert p.reflexive() == [] and p.mapping_varies() is None
    assert p.fresh(ROUND_EVERY[1]) and not p.fresh(0.01 + 27.0)  # the last answer ages out at 27 s


def test_refresh_starts_a_round_at_once_and_drops_the_running_ones_answers() -> None:
    p, reqs = started(S1, S2)
    p.receive(answer(reqs[S1][0], HOME), S1, 100.01)
    p.receive(answer(reqs[S2][0], HOME), S2, 100.01)
    p.handle_timer(p.get_timer() or 0)
    second = sent(p)
    p.receive(answer(second[S1][0], ("198.51.100.7", 1)), S1, 200.0)  # then the link changes
    p.refresh(200.1)
    third = sent(p)
    assert set(third) == {S1, S2} and third[S1] != second[S1]
    assert p.reflexive() == [HOME]  # the last finished round's, not the dropped round's
    assert not p.receive(answer(second[S2][0], HOME), S2, 200.2)  # the dropped round's transaction
    assert p.counters["unknown_txid"] == 1


def test_set_servers() -> None:
    p, reqs = started(S1, S2)
    p.receive(answer(reqs[S1][0], HOME), S1, 100.01)
    p.receive(answer(reqs[S2][0], ("198.51.100.7", 2)), S2, 100.01)
    p.set_servers([S2, S1], 101.0)  # the same servers: nothing happens
    assert sent(p) == {}
    p.set_servers([S2], 102.0)  # S1 is gone, and with it what it saw; a round starts now
    assert set(sent(p)) == {S2}
    assert p.reflexive() == [("198.51.100.7", 2)]
    p.set_servers([], 103.0)
    assert p.get_timer() is None and p.reflexive() == [] and sent(p) == {}
    assert StunProber([]).get_timer() is None


def test_stun_servers_resolves_names_through_the_lookup() -> None:
    answers = {
        "relay.example": [
            (socket.AF_INET6, ("2001:db8::5", 3478, 0, 0)),
            (socket.AF_INET, ("203.0.113.5", 3478)),
            (socket.AF_INET, ("203.0.113.6", 3478)),
        ],
        "203.0.113.9": [(socket.AF_INET, ("203.0.113.9", 3478))],
    }

    def lookup(host: str, port: int, socktype: int) -> list[tuple[int, object]] | None:
        assert socktype == socket.SOCK_DGRAM
        if host == "broken.example":
            raise OSError("no such name")
        return answers.get(host)  # None: still being looked up

    stuns = [("relay.example", 3478), ("pending.example", 3478), ("broken.example", 3478), ("203.0.113.9", 3478)]
    assert stun_servers(stuns, lookup) == [("2001:db8::5", 3478), ("203.0.113.5", 3478), ("203.0.113.9", 3478)]

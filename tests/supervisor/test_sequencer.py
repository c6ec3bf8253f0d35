"""The sequencer's steps: a change of peers alone goes as the changed peers, in order, and an
actor that cannot apply it gets the whole config in its step."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from meshsup.actors.base import MANY_PEERS
from meshsup.actors.bus.codec import Message, decode, encode
from meshsup.actors.bus.messages import Ack, Configure, PeersChanged
from meshsup.actors.registry import KINDS, settings_for
from meshsup.actors.settings import PeerSettings, Settings, parse, wire
from meshsup.actors.settings.keys import b64, generate_private, public_of
from meshsup.supervisor.sequencer import Sequencer
from meshsup.supervisor.supervision import ActorProc, Tree


class Hub:
    """The bus as the sequencer sees it: each request is kept, to be acked by the test."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, Message]] = []
        self.waiting: list[Any] = []

    def request(self, actor: str, make: Any, done: Any) -> None:
        msg = decode(encode(make(len(self.sent))))  # as it crosses the bus
        self.sent.append((actor, msg))
        self.waiting.append(done)

    def ack(self, **result: Any) -> None:
        done = self.waiting.pop(0)
        done(Ack(req=0, ok=True, error="", result=result))


def node(tmp: Path, peers: int) -> Settings:
    doc = {
        "node": {"private_key": b64(generate_private()), "addresses": ["100.64.0.1/32"]},
        "peers": [
            {"public_key": b64(public_of(generate_private())), "allowed_ips": [f"100.64.1.{i}/32"]}
            for i in range(1, peers + 1)
        ],
    }
    return parse("n.toml", doc, tmp, tmp)


@pytest.fixture
def running(tmp_path: Path) -> tuple[Sequencer, Tree, Hub]:
    hub = Hub()
    tree = Tree(node(tmp_path, 3), None, hub, None, None, None)  # type: ignore[arg-type]
    for name, kind in tree.wanted():
        tree.actors[name] = ActorProc(name, kind, state="running")
    return Sequencer(tree, hub), tree, hub  # type: ignore[arg-type]


def test_a_change_of_peers_alone_goes_as_those_peers_to_every_actor_in_order(running: Any) -> None:
    sequencer, tree, hub = running
    old = tree.config
    added = PeerSettings("new", public_of(generate_private()), None, (), (), 0)
    new = replace(old, peers=(replace(old.peers[0], persistent_keepalive=25), old.peers[1], added))
    errors: list[list[str]] = []
    sequencer.reconfigure(new, errors.append)
    while hub.waiting:
        hub.ack(applied=True)
    assert errors == [[]] and tree.generation == 2
    assert [actor for actor, _ in hub.sent] == sequencer.reconfigure_order()
    for _, msg in hub.sent:
        assert isinstance(msg, PeersChanged) and (msg.base, msg.generation) == (1, 2)
        assert [wire.decode(PeerSettings, p) for p in msg.peers] == [new.peers[0], added]
        assert msg.removed == [old.peers[2].public_key]
    assert old.with_peers(*old.peer_changes(new)) == new


def test_an_actor_at_another_generation_gets_the_whole_config_in_its_step(running: Any) -> None:
    sequencer, tree, hub = running
    new = replace(tree.config, peers=tree.config.peers[:1])
    sequencer.reconfigure(new, lambda errors: None)
    hub.ack(applied=False)  # magicsock missed a change
    actor, msg = hub.sent[-1]
    assert actor == "magicsock" and isinstance(msg, Configure) and msg.generation == tree.generation
    assert Settings.from_wire(msg.config).peers == tuple(replace(p, preshared_key=None) for p in new.peers)
    hub.ack()
    assert isinstance(hub.sent[-1][1], PeersChanged) and hub.sent[-1][0] == "crypto-0"


def test_any_other_change_goes_as_the_whole_config(running: Any) -> None:
    sequencer, tree, hub = running
    new = replace(tree.config, node=replace(tree.config.node, mtu=1380))
    sequencer.reconfigure(new, lambda errors: None)
    while hub.waiting:
        hub.ack()
    assert all(isinstance(msg, Configure) for _, msg in hub.sent) and len(hub.sent) == len(tree.actors)


def test_a_change_of_most_peers_goes_as_the_whole_config(running: Any, tmp_path: Path) -> None:
    """A mesh's first peers, thousands at once: the whole config, as at a start (an actor takes it
    in one go, and gives back what decoding it left)."""
    sequencer, tree, hub = running
    many = node(tmp_path, 2 * MANY_PEERS + 50).peers
    sequencer.reconfigure(replace(tree.config, peers=many), lambda errors: None)
    while hub.waiting:
        hub.ack()
    assert all(isinstance(msg, Configure) for _, msg in hub.sent) and len(hub.sent) == len(tree.actors)


@pytest.mark.parametrize("psk", [None, bytes(range(32))], ids=["no-psk", "psk"])
def test_every_kind_is_configured_with_its_own_share_of_the_settings(running: Any, psk: bytes | None) -> None:
    """With a preshared key only the kinds that use keys get it; without, every kind the same peers."""
    _, tree, _ = running
    first, *rest = tree.config.peers
    tree.config = replace(tree.config, relays=(), peers=(replace(first, preshared_key=psk), *rest))
    for kind in KINDS:
        given = Settings.from_wire(tree.configure_message(kind, 0, 1).config)
        assert given == settings_for(kind, tree.config), kind
        assert given.holds_secrets == KINDS[kind].keys, kind

"""Reconfiguration: a new config reaches the running actors in ordered, acked steps.

The control path
----------------
    new config ──> Supervisor.reconfigure ──> Sequencer.reconfigure ──> one step per actor,
    (reload: CLI     (the `wg` API socket        (the tree takes the      each Configure acked
     or SIGHUP;       follows a new interface     config, generation + 1)  before the next is sent
     `wg set`;        name first)
     `scale`; the
     mesh's peers
     from coord)

`reload` and `wg set` stop before this when the new config equals the running
one. Each step is a Configure carrying the whole config (without the keys for
the actors that use none: actors.registry); an actor takes from it what it
needs. A change that touched the peers alone (a `wg set`, most reloads of a
large mesh) goes as a PeersChanged instead: the peers added or changed and the
keys removed, so a one-peer change costs each actor one peer's work, not every
peer's (a change of most of them, as a mesh's first peers, goes whole, as at a
start: base.MANY_PEERS). It names the generation it applies to; an actor at another one (it
restarted, or missed a step) answers so and is sent the whole config in the
same step. The steps go to the running actors by kind, in this order (workers of
one kind by name):

    magicsock -> crypto-N -> tun-io -> netlog -> router -> dns-N -> coord

- magicsock before crypto: magicsock listens on the (new) port before the
  workers get the peers, so handshakes can go out at once.
- tun-io after crypto: no comment gives a reason; in effect tun-io steers
  packets to a peer's (new) owner only after the workers took their peers.
- netlog before the router: flow logging is set before the router changes
  the link, so the first packets are counted.
- the router before DNS: some DNS managers refuse a link without an address.

Starting and stopping follow actors/registry.py START_ORDER instead (netlog,
router, magicsock, crypto, tun-io, dns) and its reverse: netlog starts before
the router and stops after it, so the first and the last packets are counted.
At start, a kind waits only for those it needs (STARTS_AFTER): DNS for the
router, not the dataplane; the crypto workers start together; coord at once.

A step's deadline is hub.REQUEST_TIMEOUT (5 s) for its ack. A step that is
refused (the ack's error) or gets no answer (the deadline passed, or the actor
died meanwhile) adds an error; the sequence goes on with the next step and
ends by handing every error to its caller (the reply to `reload` or `wg set`;
`scale` and SIGHUP drop them). The new config stays the running one either
way: nothing is rolled back.

An actor not running when its turn comes (starting, backing off after a
crash, stopping) is skipped: whenever it (re)starts, its hello is answered
with a Configure of the running config and generation (supervision.py,
deadline START_TIMEOUT; a refusal there kills and restarts it), so a restart
during a sequence replays the current config to it; one whose Configure was on
its way when a sequence began is configured again, at the new generation,
before it counts as running. Sequences are not queued
behind each other, and each whole config is read when its step is sent: a
sequence overtaken by a newer one sends the newer config, labelled with the
newer generation, so that the overtaken sequence's changes of peers that reach
that actor afterwards are known as applied and skipped (a newer one's apply in
turn, as the sequences walk the actors in one order and each actor takes its
requests in order).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from meshsup.actors.base import MANY_PEERS
from meshsup.actors.bus.codec import Message
from meshsup.actors.bus.messages import Ack
from meshsup.actors.settings import Settings
from meshsup.supervisor.hub import Hub
from meshsup.supervisor.supervision import Tree

Step = Callable[[int], Message]  # a request id -> the request


class Sequencer:
    def __init__(self, tree: Tree, hub: Hub) -> None:
        self.tree = tree
        self.hub = hub

    def run_steps(self, steps: list[tuple[str, Step]], finished: Callable[[list[str]], None]) -> None:
        """Send each request only after the previous one was acked (or failed). An ack that says
        {"applied": False} (a change of peers the actor could not apply) sends it the whole config."""
        errors: list[str] = []
        queue = deque(steps)
        self.tree.reconfiguring += 1

        def next_step(ack: Ack | None = None, name: str = "") -> None:
            if name and (ack is None or not ack.ok):
                errors.append(f"{name}: {'no answer' if ack is None else ack.error}")
            elif name and ack is not None and ack.result.get("applied") is False:
                queue.appendleft((name, self._whole(self.tree.actors[name].kind)))
            while queue:
                actor, make = queue.popleft()
                a = self.tree.actors.get(actor)
                if a is None or a.state != "running":
                    continue  # a starting actor gets the new config on its own hello
                self.hub.request(actor, make, lambda ack, actor=actor: next_step(ack, actor))
                return
            self.tree.reconfiguring -= 1
            finished(errors)

        next_step()

    def reconfigure(self, new: Settings, finished: Callable[[list[str]], None]) -> None:
        old = self.tree.config
        changes = old.peer_changes(new) if isinstance(old, Settings) else None
        if changes is not None and len(changes[0]) + len(changes[1]) > len(new.peers) // 2 + MANY_PEERS:
            changes = None  # most peers changed (a mesh's first ones): the whole config, as at a start
        self.tree.config = new
        self.tree.generation += 1
        gen = self.tree.generation
        steps: list[tuple[str, Step]] = []
        for name in self.reconfigure_order():
            kind = self.tree.actors[name].kind
            if changes is None:
                steps.append((name, self._whole(kind)))
            else:
                changed, removed = changes
                steps.append((name, lambda req, kind=kind: self.tree.peers_message(kind, req, gen, changed, removed)))
        self.run_steps(steps, finished)

    def _whole(self, kind: str) -> Step:
        """A Configure of the running config, labelled with its generation when sent."""
        return lambda req: self.tree.configure_message(kind, req, self.tree.generation)

    def reconfigure_order(self) -> list[str]:
        """The seed's order: magicsock before peers to crypto; netlog before router before DNS."""
        order = ("magicsock", "crypto", "tun-io", "netlog", "router", "dns", "relay", "coord")
        by_kind = {k: [a.name for a in self.tree.actors.values() if a.kind == k] for k in order}
        return [n for k in order for n in sorted(by_kind[k])]

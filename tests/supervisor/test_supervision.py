"""Which actors the tree starts together: a kind waits only for the kinds it needs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from meshsup.actors.bus.messages import Ack, Hello
from meshsup.actors.settings import Settings, parse
from meshsup.actors.settings.keys import b64, generate_private
from meshsup.supervisor.supervision import ActorProc, Tree


class Log:
    def info(self, *args: Any, **kw: Any) -> None:
        pass


def tree(tmp: Path) -> tuple[Tree, list[str]]:
    doc = {"node": {"private_key": b64(generate_private()), "addresses": ["100.64.0.1/32"]}}
    config: Settings = parse("n.toml", doc, tmp, tmp)
    t = Tree(config, None, None, None, None, Log())  # type: ignore[arg-type]
    spawned: list[str] = []

    def spawn(a: ActorProc) -> None:
        a.state = "starting"
        spawned.append(a.name)

    t._spawn = spawn  # type: ignore[method-assign]
    t.start()
    return t, spawned


def started_after(t: Tree, spawned: list[str], running: list[str]) -> list[str]:
    """What the tree starts once `running` run."""
    for name in running:
        t.actors[name].state = "running"
    spawned.clear()
    t.start_next()
    return sorted(spawned)


def test_the_workers_start_together_and_dns_beside_the_dataplane(tmp_path: Path) -> None:
    t, spawned = tree(tmp_path)
    assert started_after(t, spawned, []) == ["netlog"]
    assert started_after(t, spawned, ["netlog"]) == ["router"]
    assert started_after(t, spawned, ["router"]) == ["dns-0", "magicsock"]
    assert started_after(t, spawned, ["magicsock"]) == ["crypto-0", "crypto-1"]
    assert started_after(t, spawned, ["crypto-0"]) == []  # tun-io waits for every worker
    assert started_after(t, spawned, ["crypto-1"]) == ["tun-io"]
    assert not t.ready
    assert started_after(t, spawned, ["tun-io", "dns-0"]) == [] and t.ready


def test_a_restart_waits_for_what_its_kind_needs(tmp_path: Path) -> None:
    t, spawned = tree(tmp_path)
    for a in t.actors.values():
        a.state = "running"
    t.actors["magicsock"].state = "backoff"  # died, restarting later
    t.actors["crypto-0"].state = "backoff"
    t.start_queue.extend(["magicsock", "crypto-0"])
    assert started_after(t, spawned, []) == ["magicsock"]
    assert started_after(t, spawned, ["magicsock"]) == ["crypto-0"]


def test_coord_starts_at_once_beside_netlog(tmp_path: Path) -> None:
    doc = {
        "node": {"private_key": b64(generate_private()), "addresses": ["100.64.0.1/32"]},
        "coordination": {"servers": ["nats://127.0.0.1:4222"], "mesh": "t"},
    }
    t = Tree(parse("n.toml", doc, tmp_path, tmp_path), None, None, None, None, Log())  # type: ignore[arg-type]
    spawned: list[str] = []
    t._spawn = lambda a: (setattr(a, "state", "starting"), spawned.append(a.name))  # type: ignore[assignment]
    t.start()
    t.start_next()
    assert sorted(spawned) == ["coord", "netlog"]


class Hub:
    """Requests kept, for the test to answer."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, Any, Any]] = []

    def request(self, actor: str, make: Any, done: Any, timeout: float) -> None:
        self.sent.append((actor, make(len(self.sent)), done))


def test_an_actor_starting_across_a_change_gets_the_new_config_before_it_runs(tmp_path: Path) -> None:
    """A change while its first Configure is on its way skips it (the sequencer sends only to running
    actors): it is configured again, at the new generation, before it counts as running."""
    t, _ = tree(tmp_path)
    hub = t.hub = Hub()  # type: ignore[assignment]
    netlog = t.actors["netlog"]
    netlog.state = "starting"
    t.on_actor_message(netlog, Hello(name="netlog", kind="netlog", pid=7))
    t.generation += 1  # a sequence began meanwhile (sequencer.py)
    _, first, done = hub.sent[-1]
    assert first.generation == 1
    done(Ack(req=first.req, ok=True, error="", result={}))
    assert netlog.state == "starting" and hub.sent[-1][1].generation == 2
    hub.sent[-1][2](Ack(req=hub.sent[-1][1].req, ok=True, error="", result={}))
    assert netlog.state == "running"

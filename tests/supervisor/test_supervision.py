"""Which actors the tree starts together: a kind waits only for the kinds it needs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

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

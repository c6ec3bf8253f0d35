"""The node's end of the CLI socket: `meshsup status`, `stop`, `reload`, `scale`, `capture`
(and `fault` in tests), one request, one reply; control.py is the CLI's end."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import zmq

from meshsup.actors.base import FAULTS_ENV
from meshsup.actors.bus.codec import DecodeError, decode, encode
from meshsup.actors.bus.endpoints import Runtime, grant
from meshsup.actors.bus.messages import CliReply, CliRequest, Command
from meshsup.actors.registry import SCALABLE, start_order
from meshsup.actors.settings import Settings
from meshsup.actors.settings.keys import b64
from meshsup.actors.settings.relay import RelaySettings
from meshsup.supervisor import capture, relay
from meshsup.supervisor.health import Health
from meshsup.supervisor.hub import Hub, bind
from meshsup.supervisor.supervision import Tree
from meshsup.supervisor.wgapi import peer_status

Reply = Callable[..., None]
PATH_OPS = ("path_ping", "path_ping_result")  # CLI commands magicsock answers (its ops without "path_")


def _why(ack: Any) -> str:
    return "" if ack is not None and ack.ok else (ack.error if ack is not None else "magicsock did not answer")


class CliServer:
    def __init__(
        self,
        ctx: zmq.Context,
        runtime: Runtime,
        tree: Tree,
        hub: Hub,
        reload: Callable[[Reply], None],
        reconfigure: Callable[[Settings, Callable[[list[str]], None]], None],
        health: Health,
    ) -> None:
        self.tree = tree
        self.health = health
        self.hub = hub
        self.reload = reload
        self.reconfigure = reconfigure
        self.socket = bind(ctx, zmq.ROUTER, runtime.cli)
        grant(runtime.cli, unprivileged=False)
        # With [coordination]: what the supervisor made of the mesh's peers and policy (node.py)
        self.mesh_status: Callable[[], dict[str, Any]] = dict

    def drain(self) -> None:
        for _ in range(64):
            try:
                frames = self.socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(frames) != 3 or frames[1] != b"":
                self.hub.count_drop("malformed", "cli envelope")
                continue
            ident = frames[0]
            reply = lambda ok, error="", result=None, ident=ident: self.socket.send_multipart(  # noqa: E731
                [ident, b"", encode(CliReply(ok=ok, error=error, result=result or {}))]
            )
            try:
                msg = decode(frames[2])
            except DecodeError as err:
                self.hub.count_drop(err.reason, str(err))
                reply(False, f"bad request: {err}")
                continue
            if not isinstance(msg, CliRequest):
                reply(False, f"unexpected message {msg.TAG}")
                continue
            self.on_cli(msg, reply)

    def on_cli(self, msg: CliRequest, reply: Reply) -> None:
        cmd, args = msg.command, msg.args
        if cmd == "status":
            reply(True, result=self.status())
        elif cmd == "stop":
            reply(True, result={"stopping": True})
            self.tree.stopping = True
        elif cmd == "reload":
            self.reload(reply)
        elif cmd == "scale":
            kind, count = args.get("kind"), args.get("count")
            kinds = SCALABLE & set(start_order(self.tree.config))
            if kind not in kinds:
                reply(False, f"{kind!r} cannot be scaled; scalable kinds: {', '.join(sorted(kinds))}")
            elif not isinstance(count, int) or not 1 <= count <= 64:
                reply(False, "worker count must be 1..64")
            else:
                # The running actors get the new count as a config change (a whole one: not only
                # peers differ), then the tree starts or stops workers to match it.
                config = self.tree.config
                self.reconfigure(replace(config, actors=replace(config.actors, **{kind: count})), lambda errors: None)
                self.tree.follow_counts()
                reply(True, result={"kind": kind, "count": count})
        elif cmd in PATH_OPS and "magicsock" in self.tree.actors:
            # `meshsup ping --type disco|tsmp`: magicsock starts the ping and answers whether it came back.
            self.hub.request(
                "magicsock",
                lambda req: Command(req=req, op=cmd.removeprefix("path_"), args=dict(args)),
                lambda ack: reply(ack is not None and ack.ok, _why(ack), ack.result if ack and ack.ok else {}),
            )
        elif cmd == "capture":  # `meshsup capture` (supervisor/capture.py): every configured crypto worker
            workers = [name for name, a in self.tree.actors.items() if a.kind == "crypto" and a.state == "running"]
            capture.fan_out(self.hub, workers, dict(args), reply)
        elif cmd == "fault" and os.environ.get(FAULTS_ENV) == "1":
            name = str(args.get("actor"))
            if name not in self.tree.actors:
                reply(False, f"no actor {name!r}")
                return
            self.hub.request(
                name,
                lambda req: Command(req=req, op="fault", args={"mode": args.get("mode")}),
                lambda ack: reply(ack is not None and ack.ok, _why(ack)),
            )
        else:
            reply(False, f"unknown command {cmd!r}")

    def status(self) -> dict[str, Any]:
        if isinstance(self.tree.config, RelaySettings):
            return {
                **relay.status(self.tree.config, self._actors(), self.tree.ready, self.tree.generation),
                "supervisor": {"bus_dropped": self.hub.bus_dropped},
                "health": self._health(),
            }
        node = self.tree.config.node
        magicsock = self.tree.actors["magicsock"].status if "magicsock" in self.tree.actors else {}
        coord = self.tree.actors["coord"].status if "coord" in self.tree.actors else None
        return {
            "node": {
                "name": node.name,
                "public_key": b64(node.public_key),
                "interface": node.interface,
                "listen_port": node.listen_port,
                "addresses": [str(a) for a in node.addresses],
                "ready": self.tree.ready,
                "pid": os.getpid(),
                "generation": self.tree.generation,
            },
            "actors": self._actors(),
            "peers": peer_status(self.tree.config, self.tree.live_peers(), magicsock),
            "relays": magicsock.get("relays", []),
            "disco": magicsock.get("disco", {}),
            "filter": filter_status(
                self.tree.config, [a.status.get("filter", {}) for a in self.tree.actors.values() if a.kind == "crypto"]
            ),
            "supervisor": {"bus_dropped": self.hub.bus_dropped},
            "health": self._health(),
            **({} if coord is None else {"coordination": {**_coordination(coord), "applied": self.mesh_status()}}),
        }

    def _health(self) -> list[dict[str, Any]]:
        return [w.to_json() for w in self.health.warnings()]

    def _actors(self) -> list[dict[str, Any]]:
        out = []
        for a in self.tree.actors.values():
            entry = {
                "name": a.name,
                "kind": a.kind,
                "pid": a.pid,
                "state": a.state,
                "restarts": a.restarts,
                "last_exit": a.exit_reason,
                "holds_keys": a.status.get("holds_keys", False),
                "bus_dropped": a.status.get("bus_dropped", {}),
                "counters": a.status.get("counters", {}),
            }
            if a.kind == "dns":  # each worker's own view (actors.dns.choice)
                entry["upstreams"] = a.status.get("upstreams", {})
            elif a.kind == "relay":
                entry.update(
                    bad_input=a.status.get("bad_input", {}),
                    dropped=a.status.get("dropped", {}),
                    send_dropped=a.status.get("send_dropped", {}),
                )
            out.append(entry)
        return out


def filter_status(config: Settings, workers: list[dict[str, Any]]) -> dict[str, Any]:
    """The packet filter's figures, summed over the crypto workers (each filters its own peers);
    a worker still counting for other rules (a reload under way) is left out of the hits."""
    rules = config.filter.rules
    hits = [0] * len(rules)
    drops: Counter[str] = Counter()
    totals: Counter[str] = Counter()
    for w in workers:
        worker_hits = w.get("hits", [])
        if len(worker_hits) == len(rules):
            hits = [a + b for a, b in zip(hits, worker_hits)]
        drops.update(w.get("drops", {}))
        totals.update({k: w.get(k, 0) for k in ("flows", "evictions", "cut")})
    return {
        "enabled": config.filter.enabled,
        "default": config.filter.default,
        "outbound": config.filter.outbound,
        "rules": [{"index": i, "action": r.action, "hits": h} for i, (r, h) in enumerate(zip(rules, hits))],
        "drops": dict(drops),
        **{k: totals[k] for k in ("flows", "evictions", "cut")},
    }


def _coordination(coord: dict[str, Any]) -> dict[str, Any]:
    """The coord actor's view of the mesh (actors/coord): whether the bucket is reachable, its
    revision, the live records, the node's taken addresses, refusals by reason."""
    mesh = coord.get("mesh", {})
    return {
        "up": coord.get("up", False),
        "revision": mesh.get("revision", 0),
        "records": mesh.get("records", []),
        "addresses": coord.get("addresses", []),
        "record_revision": coord.get("record_revision", 0),
        "refused": mesh.get("dropped", {}),
        "conflicts": mesh.get("conflicts", 0),
        "claim_mismatches": mesh.get("claim_mismatches", 0),
        "counters": coord.get("counters", {}),
    }

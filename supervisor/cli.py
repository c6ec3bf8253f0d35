"""`meshsup`: start a node or a relay, or talk to a running one through its control socket."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from meshsup.actors.bus.endpoints import Runtime
from meshsup.actors.kernel.files import UnsafePath
from meshsup.actors.kernel.privileges import PrivilegeError
from meshsup.actors.log import setup
from meshsup.actors.registry import KINDS, accounts, start_fork_server
from meshsup.actors.settings import Settings
from meshsup.actors.settings.keys import b64, load_or_create_disco
from meshsup.actors.settings.node import INTERFACE_RULE, valid_interface_name
from meshsup.supervisor import capture, relay
from meshsup.supervisor import config as cfg
from meshsup.supervisor.control import NotRunning, call

DEFAULT_STATE_DIR = "/var/lib/meshsup"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="meshsup", description="a supervised mesh-VPN node speaking WireGuard")
    sub = p.add_subparsers(dest="command", required=True)

    def cmd(name: str, help: str, state_dir: str = DEFAULT_STATE_DIR) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=help)
        c.add_argument(
            "--state-dir",
            default=os.environ.get("MESHSUP_STATE_DIR", state_dir),
            help=f"keys, spool and runtime sockets (default {state_dir})",
        )
        return c

    start = cmd("start", "run a node in the foreground")
    src = start.add_mutually_exclusive_group()
    src.add_argument("--config", help="TOML configuration")
    src.add_argument("--wg-config", help="wg-quick configuration ([Interface], [Peer]); NAME.conf names the interface")
    start.add_argument("--crypto-workers", type=int)
    start.add_argument("--dns-workers", type=int)
    start.add_argument("--interface", help="TUN interface name (overrides the config)")
    start.add_argument("--listen-port", type=int, help="UDP port (overrides the config)")
    relay.add_arguments(cmd("relay", "run a DERP relay and STUN server in the foreground", relay.DEFAULT_STATE_DIR))
    status = cmd("status", "show actors and peers")
    status.add_argument("--json", action="store_true")
    status.add_argument("--check", action="store_true", help="print the health warnings; exit 1 while any stands")
    cmd("reload", "re-read the configuration (also SIGHUP)")
    scale = cmd("scale", "change an actor's worker count")
    scale.add_argument("kind")
    scale.add_argument("count", type=int)
    cmd("stop", "stop the node (also SIGTERM)")
    ping = cmd("ping", "ping a peer: ICMP echo through the tunnel, or meshsup's disco or TSMP ping")
    ping.add_argument("target", metavar="PEER|IP")
    ping.add_argument("--type", choices=["icmp", "disco", "tsmp"], default="icmp")
    ping.add_argument("-c", dest="count", type=int, default=4, help="requests to send (default 4)")
    ping.add_argument("-i", dest="interval", type=float, default=1.0, help="seconds apart (default 1)")
    ping.add_argument("-W", dest="wait", type=float, default=2.0, help="seconds to wait at the end (default 2)")
    capture.add_arguments(cmd("capture", "write the node's packets (or its WireGuard datagrams) to a pcap file"))
    demo = sub.add_parser("demo", help="a small mesh in network namespaces, end to end (needs root)")
    demo.add_argument("--seconds", type=int, default=3, help="iperf3 seconds per pair (default 3)")
    demo.add_argument(
        "--mesh", action="store_true", help="a mesh that configures itself through a nats-server the demo starts"
    )
    fault = cmd("fault", argparse.SUPPRESS)  # test-only; refused unless MESHSUP_TEST_FAULTS=1
    fault.add_argument("actor")
    fault.add_argument("mode")
    return p


def load_config(args: argparse.Namespace, state_dir: Path) -> Settings:
    if args.interface is not None and not valid_interface_name(args.interface):
        raise cfg.ConfigError(
            "--interface", "interface", f"{args.interface!r} is not a valid interface name ({INTERFACE_RULE})"
        )
    if args.config:
        conf = cfg.load_toml(args.config, state_dir)
    elif args.wg_config:
        conf = cfg.load_wg_quick(args.wg_config, state_dir, args.interface)
    else:
        conf = cfg.embedded_default(state_dir)
    node, actors = conf.node, conf.actors
    if args.interface is not None:
        node = replace(node, interface=args.interface)
    if args.listen_port is not None:
        if not 0 <= args.listen_port <= 65535:
            raise cfg.ConfigError("--listen-port", "listen_port", "not a port number")
        node = replace(node, listen_port=args.listen_port)
    for kind in ("crypto", "dns"):
        n = getattr(args, f"{kind}_workers")
        if n is not None:
            if not 1 <= n <= 64:
                raise cfg.ConfigError(f"--{kind}-workers", f"actors.{kind}", f"{n} is outside 1..64")
            actors = replace(actors, **{kind: n})
    node = replace(node, disco_key=load_or_create_disco(state_dir))  # a node that runs runs disco
    return replace(conf, node=node, actors=actors)


def peer_stanza(conf: Settings) -> str:
    node = conf.node
    public, addresses = b64(node.public_key), [str(a) for a in node.addresses]
    return (
        f"# this node's public key: {public}\n"
        f'# for a meshsup node\'s config:\n[[peers]]\nname = "{node.name}"\n'
        f'public_key = "{public}"\nallowed_ips = {json.dumps(addresses)}\n'
        f'endpoints = ["THIS_HOST:{node.listen_port}"]\n'
        f"# for a WireGuard peer (wg-quick):\n[Peer]\nPublicKey = {public}\n"
        f"AllowedIPs = {', '.join(addresses)}\nEndpoint = THIS_HOST:{node.listen_port}\n"
    )


def start(args: argparse.Namespace) -> int:
    """`meshsup start` (a node) and `meshsup relay`: the same supervisor, other actors."""
    start_fork_server()  # first: it preloads the actors while the supervisor reads its config and sets up
    from meshsup.supervisor.node import Supervisor
    from meshsup.supervisor.resources import open_state_dir

    state_dir = Path(args.state_dir)
    runtime = Runtime(state_dir)
    load = relay.relay_config if args.command == "relay" else load_config
    try:
        runtime.check(create_state_dir=True)  # before the config, which may make the key in it
        conf = load(args, state_dir)
        runtime.create()
        users = accounts()
        open_state_dir(runtime, users)
    except PrivilegeError as err:
        print(f"meshsup: {err}: run deploy/setup.sh, which makes the users", file=sys.stderr)
        return 2
    except UnsafePath as err:
        print(f"meshsup: refusing to start: {err}, or choose another --state-dir", file=sys.stderr)
        return 2
    except cfg.ConfigError as err:
        print(f"meshsup: config error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # the state dir cannot be made or read: a permission, a full disk
        print(f"meshsup: {err}", file=sys.stderr)
        return 2
    if _running_pid(runtime):
        print(f"meshsup: a node is already running with state dir {state_dir}", file=sys.stderr)
        return 1
    log = setup("supervisor", runtime)
    for kind, account in users.items():
        if account.name != KINDS[kind].user:
            log.warning(
                "an unprivileged kind runs as a user it shares (with other kinds, or daemons)",
                kind=kind,
                user=account.name,
                uid=account.uid,
                missing=KINDS[kind].user,
                fix="deploy/setup.sh makes the users",
            )
    print(relay.relay_stanza(conf) if args.command == "relay" else peer_stanza(conf), flush=True)
    sup = Supervisor(conf, runtime, users, lambda: load(args, state_dir), log)
    code = sup.run()
    if sup.failure:
        print(f"meshsup: node stopped: {sup.failure}", file=sys.stderr)
    return code


def _running_pid(runtime: Runtime) -> int | None:
    try:
        pid = int(runtime.pidfile.read_text())
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError):
        return None


def _print_status(result: dict[str, Any]) -> None:
    node = result["node"]
    print(
        f"node {node['name']}  {node['public_key']}  {node['interface']}  "
        f"port {node['listen_port']}  {'ready' if node['ready'] else 'starting'}"
    )
    print(f"\n{'ACTOR':<12} {'PID':>7} {'STATE':<9} {'RESTARTS':>8}  BUS DROPS")
    for a in result["actors"]:
        drops = sum(a["bus_dropped"].values())
        print(f"{a['name']:<12} {a['pid']:>7} {a['state']:<9} {a['restarts']:>8}  {drops}")
    if result["peers"]:
        print(f"\n{'PEER':<16} {'ENDPOINT':<24} {'RX':>12} {'TX':>12}  {'HANDSHAKE':<16} PATH")
        for p in result["peers"]:
            print(
                f"{p['name']:<16} {p['endpoint'] or '-':<24} {_size(p['rx_bytes']):>12} "
                f"{_size(p['tx_bytes']):>12}  {_ago(p['last_handshake'], time.time()):<16} {_path(p)}"
            )
            for c in p.get("candidates", []):
                print(f"{'':<16} candidate {c['endpoint']:<24} {_ms(c['latency_ms'])}")
            if p.get("why"):
                print(f"{'':<16} relayed: {p['why']}")
    upstreams = [(a["name"], url, u) for a in result["actors"] for url, u in a.get("upstreams", {}).items()]
    if upstreams:  # each DNS worker's own view
        print(f"\n{'DNS UPSTREAM':<36} {'WORKER':<8} {'STATE':<6} {'LATENCY':>10} {'CHOSEN':>8}")
        for worker, url, u in upstreams:
            print(f"{url:<36} {worker:<8} {u['state']:<6} {_ms(u['latency_ms']):>10} {u['chosen']:>8}")
    if result.get("relays"):
        print(f"\n{'RELAY':<16} {'ADDRESS':<16} {'STATE':<10} {'LATENCY':>10}  URL")
        for r in result["relays"]:
            home = " (home)" if r["home"] else ""
            print(f"{r['name']:<16} {r['address']:<16} {r['state']:<10} {_ms(r['latency_ms']):>10}  {r['url']}{home}")
    if coord := result.get("coordination"):
        refused = sum(coord["refused"].values()) - coord["refused"].get("replayed", 0)
        print(
            f"\ncoordination {'up' if coord['up'] else 'DOWN (the mesh runs on as it was)'}  "
            f"revision {coord['revision']}  records {len(coord['records'])}  refused {refused}"
            + (f"  policy refused: {coord['applied']['policy_error']}" if coord["applied"].get("policy_error") else "")
        )


def _warning_lines(health: list[dict[str, Any]]) -> list[str]:
    return [
        f"{w['code']:<22} {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(w['since'])):<20} {w['message']}"
        for w in health
    ]


def _check(health: list[dict[str, Any]]) -> int:
    """`status --check`, for monitors: 0 and "healthy", or 1 and each warning standing."""
    print("\n".join(_warning_lines(health)) if health else "healthy")
    return 1 if health else 0


def _path(peer: dict[str, Any]) -> str:
    """direct, relay NAME LATENCY (down: not connected), or - before any packet."""
    if peer["path"] == "direct" and peer.get("latency_ms") is not None:
        return f"direct {_ms(peer['latency_ms'])}"
    if peer["path"] != "relay":
        return peer["path"] or "-"
    latency = peer["latency_ms"]
    return f"relay {peer['relay'] or '-'} {'down' if latency is None else _ms(latency)}"


def _ms(latency: float | None) -> str:
    return "-" if latency is None else f"{latency:.1f} ms"


def _size(n: float) -> str:
    """Bytes as `wg show` prints transfer: B, KiB, MiB, GiB."""
    units, i = ("B", "KiB", "MiB", "GiB"), 0
    while n >= 1024 and i < len(units) - 1:
        n, i = n / 1024, i + 1
    return f"{n:.0f} B" if i == 0 else f"{n:.2f} {units[i]}"


def _ago(then: float, now: float) -> str:
    if not then:
        return "never"
    seconds = max(0, int(now - then))
    minutes, s = divmod(seconds, 60)
    return f"{minutes} min {s} s ago" if minutes else f"{s} s ago"


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command in ("start", "relay"):
        return start(args)
    if args.command == "ping":
        from meshsup.supervisor.ping import refusal

        if why := refusal(args):
            print(f"meshsup: ping: {why}", file=sys.stderr)
            return 2
    if args.command == "demo":
        from meshsup.supervisor.demo import run as demo

        return demo(args.seconds, args.mesh)
    runtime = Runtime(args.state_dir)
    if args.command == "capture":
        return capture.run(args, runtime)
    request: dict[str, Any] = {}
    if args.command == "scale":
        request = {"kind": args.kind, "count": args.count}
    elif args.command == "fault":
        request = {"actor": args.actor, "mode": args.mode}
    try:
        reply = call(runtime, "status" if args.command == "ping" else args.command, request)
    except NotRunning as err:
        print(f"meshsup: {err}", file=sys.stderr)
        return 1
    except UnsafePath as err:
        print(f"meshsup: refusing to connect: {err}", file=sys.stderr)
        return 1
    except OSError as err:  # the state dir cannot be read: another user's, most likely
        print(f"meshsup: {err}", file=sys.stderr)
        return 1
    if not reply.ok:
        print(f"meshsup: {args.command}: {reply.error}", file=sys.stderr)
        return 1
    if args.command == "ping":
        from meshsup.supervisor import ping

        if args.type == "icmp":
            return ping.run(args, reply.result)
        return ping.run_path(args, reply.result, lambda command, request: call(runtime, command, request))
    if args.command == "status":
        if args.check:
            return _check(reply.result.get("health", []))
        if args.json:
            print(json.dumps(reply.result, indent=2))
        else:
            (relay.print_status if "relay" in reply.result else _print_status)(reply.result)
            if reply.result.get("health"):
                print(f"\n{'HEALTH':<22} {'SINCE':<20} MESSAGE")
                print("\n".join(_warning_lines(reply.result["health"])))
    elif args.command == "stop":
        print("stopping")
    elif reply.result:
        print(json.dumps(reply.result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

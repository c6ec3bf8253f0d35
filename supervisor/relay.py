"""`meshsup relay`: a DERP relay with a STUN server, run by the same supervisor as a node.

Its workers are actors of kind `relay` (actors/relay/): started, watched,
restarted and scaled like a node's crypto workers, shown by `status`,
stopped by `stop`. This module turns the command line into the relay's
config, checks its ports are free, tells how a node refers to the relay,
and answers `status` for it. The relay's key lives in the state dir
(relay.key), as a node's does; so does the mesh key (mesh.key) that lets
a client watch every login (DERP's WatchConns).
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket
from pathlib import Path
from typing import Any

from meshsup.actors.kernel.files import GROUP_OTHER_ANY, read_owned, write_atomic
from meshsup.actors.settings import ConfigError, keys
from meshsup.actors.settings.node import SupervisorSettings
from meshsup.actors.settings.relay import DEFAULT_STUN_PORT, RelayConf, RelayCounts, RelaySettings

DEFAULT_LISTEN = "0.0.0.0:8080"
DEFAULT_STATE_DIR = "/var/lib/meshsup-relay"
MAX_WORKERS = 64


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--listen",
        default=DEFAULT_LISTEN,
        metavar="HOST:PORT",
        help=f"DERP over HTTP, or HTTPS with --tls-cert (default {DEFAULT_LISTEN})",
    )
    p.add_argument(
        "--stun-listen",
        metavar="HOST:PORT",
        help=f"STUN's UDP address (default the --listen host, port {DEFAULT_STUN_PORT}); 'off' for none",
    )
    p.add_argument("--tls-cert", metavar="FILE", help="certificate chain (PEM): serve HTTPS")
    p.add_argument("--tls-key", metavar="FILE", help="its private key (PEM)")
    p.add_argument("--relay-workers", type=int, default=1, metavar="N", help="worker processes (default 1)")
    p.add_argument(
        "--name",
        default=socket.gethostname().split(".")[0].lower(),
        help="how nodes name this relay (default the host name)",
    )
    p.add_argument(
        "--rate-limit",
        type=int,
        default=0,
        metavar="BYTES",
        help="bytes per second each client may send (default 0: no limit)",
    )
    p.add_argument(
        "--rate-burst",
        type=int,
        default=0,
        metavar="BYTES",
        help="bytes a client may send at once above the rate (at least 64 KiB + 32)",
    )


def _hostport(flag: str, text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    try:
        ipaddress.ip_address(host)
        number = int(port)
    except ValueError:
        raise ConfigError(flag, flag.lstrip("-"), f"{text!r} is not IP:PORT (a literal address)") from None
    if not sep or not 1 <= number <= 65535:
        raise ConfigError(flag, flag.lstrip("-"), f"{text!r}: not a port number 1..65535")
    return host, number


def _text(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def mesh_key(path: Path) -> str:
    """The relay's mesh key (64 hex digits), made 0600 on first start."""
    try:
        return read_owned(path, "mesh key file", GROUP_OTHER_ANY).decode(errors="replace").strip()
    except FileNotFoundError:
        key = os.urandom(32).hex()
        write_atomic(path, (key + "\n").encode(), 0o600)
        return key


def relay_config(args: argparse.Namespace, state_dir: Path) -> RelaySettings:
    listen = _hostport("--listen", args.listen)
    stun = None
    if args.stun_listen != "off":
        stun = _hostport("--stun-listen", args.stun_listen or _text(listen[0], DEFAULT_STUN_PORT))
    if bool(args.tls_cert) != bool(args.tls_key):
        raise ConfigError("--tls-cert", "tls", "give both --tls-cert and --tls-key, or neither")
    for flag, path in (("--tls-cert", args.tls_cert), ("--tls-key", args.tls_key)):
        if path and not os.access(path, os.R_OK):
            raise ConfigError(flag, flag.lstrip("-"), f"cannot read {path}")
    if not 1 <= args.relay_workers <= MAX_WORKERS:
        raise ConfigError("--relay-workers", "actors.relay", f"{args.relay_workers} is outside 1..{MAX_WORKERS}")
    if args.rate_limit < 0 or args.rate_burst < 0:
        raise ConfigError("--rate-limit", "rate", "must be 0 or more")
    private = keys.load_or_create(state_dir / "relay.key")
    host = "THIS_HOST" if ipaddress.ip_address(listen[0]).is_unspecified else listen[0]
    conf = RelayConf(
        name=args.name,
        private_key=private,
        public_key=keys.public_of(private),
        listen=listen,
        stun_listen=stun,
        tls_cert=os.path.abspath(args.tls_cert) if args.tls_cert else "",
        tls_key=os.path.abspath(args.tls_key) if args.tls_key else "",
        rate=args.rate_limit,
        burst=args.rate_burst,
        mesh_key=mesh_key(state_dir / "mesh.key"),
        url=f"{'https' if args.tls_cert else 'http'}://{_text(host, listen[1])}/derp",
        stun=_text(host, stun[1]) if stun else "",
    )
    return RelaySettings(conf, RelayCounts(args.relay_workers), SupervisorSettings())


def relay_stanza(conf: RelaySettings) -> str:
    r = conf.relay
    lines = [
        f"# this relay's public key: {keys.b64(r.public_key)}",
        "# for a meshsup node's config:",
        "[[relays]]",
        f'name = "{r.name}"',
        f'url = "{r.url}"',
    ]
    if r.stun:
        lines.append(f'stun = "{r.stun}"')
    return "\n".join(lines) + "\n"


def probe(conf: RelaySettings) -> str | None:
    """Why the relay cannot have its ports, or None: an exclusive bind finds another program on them
    (the workers share theirs with SO_REUSEPORT)."""
    r = conf.relay
    for kind, where, what in ((socket.SOCK_STREAM, r.listen, "TCP"), (socket.SOCK_DGRAM, r.stun_listen, "UDP")):
        if where is None:
            continue
        host, port = where
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, kind) as s:
            try:
                if kind == socket.SOCK_STREAM:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind((host, port))
            except OSError as err:
                return f"{what} {_text(host, port)} is not ours to listen on: {err.strerror}"
    return None


def status(conf: RelaySettings, actors: list[dict[str, Any]], ready: bool, generation: int) -> dict[str, Any]:
    r = conf.relay
    totals: dict[str, dict[str, int]] = {"counters": {}, "bad_input": {}, "dropped": {}}
    for a in actors:
        for section, total in totals.items():
            for k, v in a.get(section, {}).items():
                total[k] = total.get(k, 0) + v
    return {
        "relay": {
            "name": r.name,
            "public_key": keys.b64(r.public_key),
            "url": r.url,
            "stun": r.stun,
            "listen": _text(*r.listen),
            "stun_listen": _text(*r.stun_listen) if r.stun_listen else "",
            "tls": bool(r.tls_cert),
            "rate": r.rate,
            "burst": r.burst,
            "workers": conf.actors.relay,
            "ready": ready,
            "pid": os.getpid(),
            "generation": generation,
        },
        "actors": actors,
        **totals,
    }


def print_status(result: dict[str, Any]) -> None:
    r, counters = result["relay"], result["counters"]
    print(
        f"relay {r['name']}  {r['public_key']}  {r['url']}  stun {r['stun'] or 'off'}  "
        f"{'ready' if r['ready'] else 'starting'}"
    )
    print(f"\n{'WORKER':<12} {'PID':>7} {'STATE':<9} {'RESTARTS':>8} {'CLIENTS':>8} {'BAD INPUT':>10}")
    for a in result["actors"]:
        print(
            f"{a['name']:<12} {a['pid']:>7} {a['state']:<9} {a['restarts']:>8} "
            f"{a['counters'].get('clients', 0):>8} {sum(a['bad_input'].values()):>10}"
        )
    print(
        f"\nclients {counters.get('clients', 0)}  packets in {counters.get('packets_in', 0)}  "
        f"out {counters.get('packets_out', 0)}  STUN {counters.get('stun_requests', 0)}"
    )
    for title in ("bad_input", "dropped"):
        if result[title]:
            print(f"{title.replace('_', ' ')}: " + ", ".join(f"{k} {v}" for k, v in sorted(result[title].items())))

"""`meshsup demo`: two meshsup nodes and a wireguard-go peer in network namespaces, end to end.

It builds the mesh with `supervisor.lab`, pings every pair both ways over IPv4
and IPv6, runs a few seconds of iperf3 across each pair, prints each meshsup
node's status and removes everything it made, also on Ctrl-C or a failure.

`meshsup demo --mesh` shows a mesh that configures itself instead: a nats-server it
starts, and meshsup nodes whose configs hold nothing but [coordination]; they take
their addresses, find each other, ping, and see a newcomer arrive and leave.
"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from meshsup.actors.settings.keys import b64
from meshsup.supervisor.lab import (
    Identity,
    NatsServer,
    Netns,
    Node,
    Underlay,
    WgGo,
    descendants_by_state_dir,
    have,
    iperf3,
    is_root,
    meshsup_config,
    ping,
    ping_rtt,
    stalled_intervals,
)

TOOLS = ("ip", "wireguard-go", "wg", "ping", "iperf3")
MESH_TOOLS = ("ip", "ping", "nats-server")
MESH_NAMES = ("alpha", "bravo", "charlie")


@dataclass
class Member:
    ident: Identity
    ns: Netns
    underlay_addr: str
    runner: Node | WgGo

    @property
    def kind(self) -> str:
        return "meshsup" if isinstance(self.runner, Node) else "wireguard-go"


def say(text: str = "") -> None:
    try:
        print(text, flush=True)
    except BrokenPipeError:
        # The reader went away (`meshsup demo | head`): go on silently, so the clean-up still runs.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def build(underlay: Underlay, tmp: Path) -> list[Member]:
    """alpha and bravo run meshsup, charlie runs wireguard-go; each knows the other two."""
    hosts = [underlay.host() for _ in range(3)]
    idents = [Identity(name, i + 1) for i, name in enumerate(("alpha", "bravo", "charlie"))]
    for ident, (_, addr) in zip(idents, hosts):
        ident.endpoint = f"{addr}:51820"
    members = []
    for ident, (ns, addr) in zip(idents, hosts):
        others = [o for o in idents if o is not ident]
        runner: Node | WgGo
        if ident.name == "charlie":
            runner = underlay.track(WgGo(ns, ident, tmp))
            for other in others:
                runner.add_peer(other)
        else:
            config = meshsup_config(tmp, ident, others)
            runner = underlay.track(Node(tmp, "--config", str(config), netns=ns, faults=False))
        members.append(Member(ident, ns, addr, runner))
    for m in members:
        if isinstance(m.runner, Node):
            m.runner.wait_ready()
    return members


def describe(underlay: Underlay, members: list[Member], tmp: Path) -> None:
    for m in members:
        say(
            f"  {m.ident.name:<8} {m.kind:<13} namespace {m.ns.name}  underlay {m.underlay_addr:<14} "
            f"tunnel {m.runner.iface} {m.ident.v4} {m.ident.v6}  pid {m.runner.proc.pid}"
        )
    pairs = " ".join(f"{a}-{b}" for a, b in underlay.links)
    say(f"  bridge namespace {underlay.switch.name}; veth pairs {pairs}")
    say(f"  keys, configs and logs in {tmp}")


def check_pings(members: list[Member]) -> list[str]:
    say("\nping through the tunnel, each pair both ways (average of 3 echoes):")
    for a, b in itertools.combinations(members, 2):
        ping(a.ns, b.ident.v4, count=1)  # the first packet waits for the handshake; not timed
    failures = []
    for a, b in itertools.permutations(members, 2):
        rtts = {family: ping_rtt(a.ns, addr) for family, addr in (("IPv4", b.ident.v4), ("IPv6", b.ident.v6))}
        shown = "   ".join(
            f"{family} {'no answer' if rtt is None else f'{rtt:.2f} ms':<9}" for family, rtt in rtts.items()
        )
        say(f"  {a.ident.name:<8} -> {b.ident.name:<8} {shown}".rstrip())
        failures += [
            f"ping {a.ident.name} -> {b.ident.name} over {family}" for family, rtt in rtts.items() if rtt is None
        ]
    return failures


def check_iperf3(members: list[Member], seconds: int) -> list[str]:
    say(f"\niperf3 TCP through the tunnel, {seconds} s per pair:")
    failures = []
    for a, b in itertools.combinations(members, 2):
        result = iperf3(a.ns, b.ns, b.ident.v4, seconds=seconds)
        label = f"{a.ident.name:<8} -> {b.ident.name:<8}"
        if "error" in result:
            say(f"  {label} failed: {result['error'].strip()}")
            failures.append(f"iperf3 {a.ident.name} -> {b.ident.name}")
            continue
        mbits = result["end"]["sum_received"]["bits_per_second"] / 1e6
        stalled = stalled_intervals(result)
        say(f"  {label} {mbits:8.1f} Mbit/s" + (f"  (seconds {stalled} carried nothing)" if stalled else ""))
        if stalled:
            failures.append(f"iperf3 {a.ident.name} -> {b.ident.name} stalled")
    return failures


def show_status(members: list[Member]) -> None:
    for m in members:
        if isinstance(m.runner, Node):
            say(f"\nmeshsup status on {m.ident.name}:")
            for line in m.runner.cli("status").stdout.splitlines():
                say(f"  {line}".rstrip())


def end_stragglers(tmp: Path, grace: float = 5.0) -> None:
    """Wait for the processes naming our directory to go, then kill what is left by PID.

    A node's fork server (its command line names the directory the node ran
    in) exits on its own shortly after its supervisor; nothing else should remain.
    """
    deadline = time.monotonic() + grace
    while (pids := descendants_by_state_dir(tmp)) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 1.0
    while descendants_by_state_dir(tmp) and time.monotonic() < deadline:
        time.sleep(0.05)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _reason(err: Exception) -> str:
    if isinstance(err, subprocess.CalledProcessError):
        return f"{' '.join(map(str, err.cmd))} failed: {(err.stderr or '').strip()}"
    return str(err) or type(err).__name__


def run(seconds: int = 3, mesh: bool = False) -> int:
    if not is_root():
        say("meshsup demo needs root: it creates network namespaces")
        return 1
    if missing := have(*(MESH_TOOLS if mesh else TOOLS)):
        say(f"meshsup demo {missing}")
        return 1
    if mesh:
        say(
            "meshsup demo --mesh: a nats-server and three meshsup nodes whose configs say only where it is\n"
            "([coordination]); they take addresses, find each other and ping, then a fourth comes and goes.\n"
            "Each runs in its own network namespace on a bridged underlay (198.51.100.0/24).\n"
            "Everything it makes is removed at the end, also on Ctrl-C.\n"
        )
        done = "all good: the nodes configured themselves through NATS and every pair pinged both ways"
        return _in_lab(lambda underlay, tmp: run_mesh(underlay, tmp), done)
    say(
        "meshsup demo: two meshsup nodes (alpha, bravo) and a wireguard-go peer (charlie) in a full mesh,\n"
        "each in its own network namespace on a bridged underlay (198.51.100.0/24).\n"
        "Everything it makes is removed at the end, also on Ctrl-C.\n"
    )

    def steps(underlay: Underlay, tmp: Path) -> list[str]:
        members = build(underlay, tmp)
        describe(underlay, members, tmp)
        failures = check_pings(members)
        failures += check_iperf3(members, seconds)
        show_status(members)
        return failures

    return _in_lab(steps, "all good: every pair pinged both ways and carried TCP through the mesh")


def _in_lab(steps: Callable[[Underlay, Path], list[str]], done: str) -> int:
    """Run `steps` in a new lab, and remove everything it made whatever happens."""
    tmp = Path(tempfile.mkdtemp(prefix="meshsup-demo-"))
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGTERM, _interrupt)
    underlay: Underlay | None = None
    failures: list[str] = []
    try:
        underlay = Underlay()
        failures += steps(underlay, tmp)
    except KeyboardInterrupt:
        failures.append("interrupted")
    except Exception as err:  # any failure ends the demo, and the clean-up below still runs
        failures.append(_reason(err))
    finally:
        # A second Ctrl-C must not cut the clean-up short.
        for sig in previous:
            signal.signal(sig, signal.SIG_IGN)
        say("\nremoving the namespaces, links and processes it made")
        if underlay is not None:
            underlay.close()
        end_stragglers(tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        for sig, handler in previous.items():
            signal.signal(sig, handler or signal.SIG_DFL)
    if failures:
        say("FAILED: " + "; ".join(failures))
        return 1
    say(done)
    return 0


# --- the self-configuring mesh (--mesh) -------------------------------------------------


def _mesh_node(underlay: Underlay, tmp: Path, name: str, server: NatsServer) -> tuple[Netns, Node, str]:
    """A node whose config names its key, the NATS server and the mesh: no addresses, no peers."""
    ns, addr = underlay.host()
    key = tmp / f"{name}.key"
    key.write_text(b64(Identity(name, 0).private))
    key.chmod(0o600)
    config = tmp / f"{name}.toml"
    config.write_text(
        f'[node]\nname = "{name}"\nprivate_key_file = "{key}"\n\n'
        f'[coordination]\nservers = ["{server.url}"]\nmesh = "demo"\nlifetime = 9\n'
    )
    return ns, underlay.track(Node(tmp, "--config", str(config), netns=ns, faults=False)), addr


def _peers(node: Node) -> set[str]:
    return {p["name"] for p in node.status()["peers"]}


def run_mesh(underlay: Underlay, tmp: Path) -> list[str]:
    ns_nats, addr_nats = underlay.host()
    server = underlay.track(NatsServer(ns_nats, addr_nats, tmp, "demo"))
    server.wait_ready()
    say(f"  nats-server (JetStream) at {server.url}, namespace {ns_nats.name}, pid {server.proc.pid}")
    members = [_mesh_node(underlay, tmp, name, server) for name in MESH_NAMES]
    for name, (ns, node, addr) in zip(MESH_NAMES, members):
        node.wait_ready()
        others = set(MESH_NAMES) - {name}
        node.wait(lambda node=node, others=others: _peers(node) == others, 30, f"{name} to find the others")
        status = node.status()
        say(
            f"  {name:<8} namespace {ns.name}  underlay {addr:<14} tunnel {node.iface}  took "
            f"{' '.join(status['node']['addresses'])}  found {', '.join(sorted(others))}"
        )
    say(f"  bridge namespace {underlay.switch.name}; keys, configs and logs in {tmp}")
    addresses = {name: node.status()["node"]["addresses"] for name, (_, node, _) in zip(MESH_NAMES, members)}
    failures = []
    say("\nping through the tunnel, each pair both ways, at the addresses they took:")
    for (a, (ns, _, _)), (b, _) in itertools.permutations(zip(MESH_NAMES, members), 2):
        v4, v6 = (address.split("/")[0] for address in addresses[b])
        ping(ns, v4, count=1)  # the first packet waits for the handshake; not timed
        rtts = {"IPv4": ping_rtt(ns, v4), "IPv6": ping_rtt(ns, v6)}
        shown = "   ".join(f"{f} {'no answer' if r is None else f'{r:.2f} ms':<9}" for f, r in rtts.items())
        say(f"  {a:<8} -> {b:<8} {shown}".rstrip())
        failures += [f"ping {a} -> {b} over {f}" for f, r in rtts.items() if r is None]
    say("\na newcomer, delta, starts: nobody's config names it")
    started = time.monotonic()
    ns_d, delta, _ = _mesh_node(underlay, tmp, "delta", server)
    for name, (_, node, _) in zip(MESH_NAMES, members):
        node.wait(lambda node=node: "delta" in _peers(node), 30, f"{name} to see delta")
    delta_v4 = delta.status()["node"]["addresses"][0].split("/")[0]
    reached = [name for name, (ns, _, _) in zip(MESH_NAMES, members) if ping(ns, delta_v4, count=1)]
    say(
        f"  seen by {', '.join(MESH_NAMES)} {time.monotonic() - started:.1f} s after it was started; "
        f"pinged from {', '.join(reached) or 'none'}"
    )
    failures += [f"ping {name} -> delta" for name in MESH_NAMES if name not in reached]
    say("delta stops: its record goes with it")
    delta.close()
    for name, (_, node, _) in zip(MESH_NAMES, members):
        node.wait(lambda node=node: "delta" not in _peers(node), 15, f"{name} to forget delta")
    say(f"  gone from {', '.join(MESH_NAMES)}")
    say("\nmeshsup status on alpha:")
    for line in members[0][1].cli("status").stdout.splitlines():
        say(f"  {line}".rstrip())
    return failures

"""`meshsup demo`: two meshsup nodes and a wireguard-go peer in network namespaces, end to end.

It builds the mesh with `supervisor.lab`, pings every pair both ways over IPv4
and IPv6, runs a few seconds of iperf3 across each pair, prints each meshsup
node's status and removes everything it made, also on Ctrl-C or a failure.
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
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from meshsup.supervisor.lab import (
    Identity,
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


def run(seconds: int = 3) -> int:
    if not is_root():
        say("meshsup demo needs root: it creates network namespaces")
        return 1
    if missing := have(*TOOLS):
        say(f"meshsup demo {missing}")
        return 1
    say(
        "meshsup demo: two meshsup nodes (alpha, bravo) and a wireguard-go peer (charlie) in a full mesh,\n"
        "each in its own network namespace on a bridged underlay (198.51.100.0/24).\n"
        "Everything it makes is removed at the end, also on Ctrl-C.\n"
    )
    tmp = Path(tempfile.mkdtemp(prefix="meshsup-demo-"))
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGTERM, _interrupt)
    underlay: Underlay | None = None
    failures: list[str] = []
    try:
        underlay = Underlay()
        members = build(underlay, tmp)
        describe(underlay, members, tmp)
        failures += check_pings(members)
        failures += check_iperf3(members, seconds)
        show_status(members)
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
    say("all good: every pair pinged both ways and carried TCP through the mesh")
    return 0

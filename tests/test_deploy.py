"""The service as shipped: `deploy/setup.sh --install-service` puts in place every path the
units in deploy/ name, `systemd-analyze verify` passes them, and the node and the relay run
inside their units' sandboxes.

systemd need not be PID 1 here, so the sandboxes are rebuilt from the unit files with what
systemd itself uses: setpriv for the capability bounding set and no_new_privs, a mount
namespace for ProtectSystem=strict with ReadWritePaths=."""

from __future__ import annotations

import os
import shlex
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from meshsup.actors.router.resolvconf import for_this_namespace
from meshsup.supervisor.lab import Netns, Node, is_root
from tests.nodes import REPO

UNITS = sorted((REPO / "deploy").glob("*.service"))
NODE_UNIT, RELAY_UNIT = REPO / "deploy" / "meshsup.service", REPO / "deploy" / "meshsup-relay.service"

needs_root = pytest.mark.skipif(not is_root(), reason="needs root (installs, mounts)")


def service_section(unit: Path) -> dict[str, list[str]]:
    """[Service]'s settings, each key's values in order (a key may be given more than once)."""
    out: dict[str, list[str]] = {}
    section = ""
    for raw in unit.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line
        elif section == "[Service]":
            key, _, value = line.partition("=")
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def exec_start(unit: Path) -> list[str]:
    return shlex.split(service_section(unit)["ExecStart"][0])


def option(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def sandbox(unit: Path) -> tuple[str, ...]:
    """setpriv arguments that give a command the unit's capability bounding set and no_new_privs."""
    s = service_section(unit)
    caps = " ".join(s["CapabilityBoundingSet"]).split()
    bounding = ",".join(["-all", *(f"+{c.removeprefix('CAP_').lower()}" for c in caps)])
    nnp = ("--no-new-privs",) if s.get("NoNewPrivileges") == ["yes"] else ()
    return ("setpriv", "--bounding-set", bounding, *nnp, "--")


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A service install under a temporary root, as `setup.sh --install-service` makes it on /."""
    if not is_root():
        pytest.skip("needs root")
    root = tmp_path_factory.mktemp("root")
    install_service(root)
    return root


def install_service(root: Path) -> None:
    """`setup.sh --install-service` under ``root``, which must succeed."""
    r = subprocess.run(
        [str(REPO / "deploy" / "setup.sh"), "--install-service", "--root", str(root)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-2000:]


def in_root(root: Path, path: str) -> Path:
    return root / path.lstrip("/")


@needs_root
def test_install_puts_every_path_the_units_name_in_place(installed: Path) -> None:
    for unit in UNITS:
        assert in_root(installed, f"/etc/systemd/system/{unit.name}").read_text() == unit.read_text()
        program = in_root(installed, exec_start(unit)[0])
        assert os.access(program, os.X_OK), program
    config = in_root(installed, option(exec_start(NODE_UNIT), "--config"))
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    # The installed code reads the installed config: the embedded default, interface meshsup0.
    r = subprocess.run(
        [
            str(in_root(installed, "/opt/meshsup/.venv/bin/python")),
            "-c",
            "import sys, pathlib; from meshsup.supervisor.config import load_toml; "
            "print(load_toml(sys.argv[1], pathlib.Path(sys.argv[2])).node.interface)",
            str(config),
            str(installed / "state"),
        ],
        capture_output=True,
        text=True,
        cwd="/",
        env={"PATH": os.environ["PATH"]},
    )
    assert r.returncode == 0 and r.stdout.strip() == "meshsup0", r.stderr


@needs_root
def test_install_keeps_an_operators_config(installed: Path) -> None:
    config = in_root(installed, "/etc/meshsup/meshsup.toml")
    config.write_text('[node]\nname = "mine"\n')
    install_service(installed)
    assert config.read_text() == '[node]\nname = "mine"\n'


@needs_root
@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="needs systemd-analyze (package systemd)")
def test_systemd_analyze_verifies_every_unit_as_installed(installed: Path) -> None:
    # The units name /opt/meshsup; in a mount namespace of its own, the install is there.
    units = [str(in_root(installed, f"/etc/systemd/system/{u.name}")) for u in UNITS]
    script = (
        "mount --make-rprivate / && mount -t tmpfs tmpfs /opt && mkdir /opt/meshsup && "
        'mount --bind "$1" /opt/meshsup && shift && exec systemd-analyze verify "$@"'
    )
    r = subprocess.run(
        ["unshare", "--mount", "sh", "-c", script, "sh", str(installed / "opt" / "meshsup"), *units],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0 and not r.stdout.strip() and not r.stderr.strip(), r.stdout + r.stderr


@needs_root
@pytest.mark.netns
def test_node_runs_under_its_units_capabilities(tmp_path: Path, netns: Callable[..., Netns]) -> None:
    """Every actor comes up and stays up, DNS and netlog dropped to their user, and the node
    stops cleanly: with nothing the unit's CapabilityBoundingSet withholds."""
    node = Node(tmp_path, netns=netns(), faults=False, wrapper=sandbox(NODE_UNIT))
    try:
        status = node.wait_ready()
        states = {a["name"]: (a["state"], a["restarts"]) for a in status["actors"]}
        assert states.items() >= {
            ("dns-0", ("running", 0)),
            ("netlog", ("running", 0)),
            ("router", ("running", 0)),
        }, f"{states}\n{node.stderr()[-3000:]}"
        assert all(a["restarts"] == 0 for a in node.status()["actors"])
        assert "no eBPF queue steering" not in node.stderr()  # CAP_BPF: tun-io loaded its program
    finally:
        node.close()
    assert node.proc.returncode == 0, node.stderr()[-2000:]


@needs_root
@pytest.mark.netns
def test_relay_runs_under_its_units_capabilities(tmp_path: Path, netns: Callable[..., Netns]) -> None:
    relay = Node(
        tmp_path,
        "--listen",
        "127.0.0.1:8080",
        "--stun-listen",
        "off",
        netns=netns(),
        faults=False,
        command="relay",
        wrapper=sandbox(RELAY_UNIT),
    )
    try:
        status = relay.wait(lambda: (s := relay.status())["relay"]["ready"] and s, what="relay ready")
        assert all(a["state"] == "running" and a["restarts"] == 0 for a in status["actors"])
    finally:
        relay.close()
    assert relay.proc.returncode == 0, relay.stderr()[-2000:]


# Applies the node's resolver as the router does, then restores it, and prints what was seen.
_RESOLV_SCRIPT = """
import sys
from meshsup.actors.router.resolvconf import ResolvConf
conf = ResolvConf(sys.argv[1], backup=sys.argv[2])
assert conf.apply(["100.64.0.1"], ["mesh"]) == []
print(open(sys.argv[1]).read(), end="")
conf.restore()
"""


@needs_root
def test_resolv_conf_is_set_under_protect_system(tmp_path: Path) -> None:
    """set_os_resolver in the unit's sandbox: ProtectSystem=strict leaves /etc read-only and
    ReadWritePaths= makes resolv.conf alone writable, so the router cannot replace it by rename."""
    s = service_section(NODE_UNIT)
    writable = {p.lstrip("-") for p in " ".join(s["ReadWritePaths"]).split()}
    state_dir = option(exec_start(NODE_UNIT), "--state-dir")
    assert s["ProtectSystem"] == ["strict"]
    resolv = for_this_namespace(Path(state_dir))  # where the router writes, outside a named namespace
    assert {str(resolv.path), str(resolv.backup.parent)} <= writable
    # The same mounts systemd makes, on a stand-in /etc.
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "resolv.conf").write_text("nameserver 203.0.113.53\n")
    (tmp_path / "state").mkdir()
    script = (
        'mount --make-rprivate / && mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" && '
        'mount --bind "$1/resolv.conf" "$1/resolv.conf" && mount -o remount,bind,rw "$1/resolv.conf" && '
        'exec "$2" -c "$3" "$1/resolv.conf" "$4"'
    )
    r = subprocess.run(
        [
            "unshare",
            "--mount",
            "sh",
            "-c",
            script,
            "sh",
            str(etc),
            sys.executable,
            _RESOLV_SCRIPT,
            str(tmp_path / "state" / "resolv.conf.pre-meshsup"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "nameserver 100.64.0.1\nsearch mesh\n" in r.stdout
    assert (etc / "resolv.conf").read_text() == "nameserver 203.0.113.53\n"
    assert sorted(p.name for p in etc.iterdir()) == ["resolv.conf"]


@needs_root
@pytest.mark.netns
def test_a_node_sets_the_resolver_inside_its_units_sandbox(tmp_path: Path) -> None:
    """The whole node with set_os_resolver, in the mounts ProtectSystem=strict and ReadWritePaths=
    make (/etc read-only, resolv.conf writable) and the unit's capabilities, in a network namespace
    with no name, where the router takes /etc/resolv.conf as a service's node does: a stand-in
    mounted over it, so the machine's own is never touched."""
    standin = tmp_path / "resolv.conf"
    standin.write_text("nameserver 203.0.113.53\n")
    config = tmp_path / "node.toml"
    config.write_text('[dns]\nlisten = ["127.0.0.1:53"]\nset_os_resolver = true\n')
    config.chmod(0o600)
    script = (
        "ip link set lo up && mount --make-rprivate / && "
        "mount --bind /etc /etc && mount -o remount,bind,ro /etc && "
        'mount --bind "$0" /etc/resolv.conf && mount -o remount,bind,rw /etc/resolv.conf && exec "$@"'
    )
    wrapper = ("unshare", "--net", "--mount", "sh", "-c", script, str(standin), *sandbox(NODE_UNIT))
    node = Node(tmp_path, "--config", str(config), faults=False, wrapper=wrapper)
    try:
        node.wait_ready()
        applied = standin.read_text()
        assert applied.startswith("# Generated by meshsup") and "nameserver 127.0.0.1\n" in applied
    finally:
        node.close()
    assert node.proc.returncode == 0, node.stderr()[-2000:]
    assert standin.read_text() == "nameserver 203.0.113.53\n"  # given back when it stopped

"""The state dir and the files in it are trusted only if no other user could have put them there.

Another user is simulated by chown to a uid nobody has (the tests run as root),
a planted file by a symlink where meshsup would write or read.
"""

from __future__ import annotations

import os
import re
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import zmq

from meshsup.actors.bus.endpoints import Runtime
from meshsup.actors.kernel.files import UnsafePath
from meshsup.actors.netlog.spool import Spool
from meshsup.actors.netlog.wal import WindowLog
from meshsup.actors.router.resolvconf import BACKUP_SUFFIX, HEADER, ResolvConf
from meshsup.actors.settings.keys import b64, generate_private, load_or_create
from meshsup.supervisor import cli
from meshsup.supervisor import config as cfg
from meshsup.supervisor.control import NotRunning, call
from tests.nodes import REPO

OTHER_UID = 54321  # no one's: "another user"
pytestmark = [pytest.mark.netns, pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown to another user")]


def start(state_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    # --listen-port is out of range too, so that if the state dir were not refused the
    # config would be, and no node could start on the host.
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "meshsup.supervisor.cli",
            "start",
            "--state-dir",
            str(state_dir),
            "--listen-port",
            "99999",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


def one_line(r: subprocess.CompletedProcess[str]) -> str:
    assert r.returncode != 0 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    return lines[0]


# --- the state dir and the runtime dir -------------------------------------------------


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o702], ids=oct)
def test_start_refuses_a_state_dir_others_can_write(tmp_path: Path, mode: int) -> None:
    state = tmp_path / "state"
    state.mkdir()
    state.chmod(mode)
    line = one_line(start(state))
    assert f"state dir {state} (owner uid 0, mode {mode:04o}) is writable by group or others" in line
    assert f"chmod {mode & 0o755:04o} it" in line and "--state-dir" in line
    assert list(state.iterdir()) == []  # no key made, nothing started


def test_start_refuses_a_state_dir_of_another_user(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    os.chown(state, OTHER_UID, -1)
    line = one_line(start(state))
    assert f"state dir {state} (owner uid {OTHER_UID}, mode 0700) is not owned by uid 0" in line
    assert "chown 0 it" in line
    assert list(state.iterdir()) == []


def test_start_refuses_a_runtime_dir_that_is_a_symlink(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    (tmp_path / "elsewhere").mkdir(mode=0o700)
    (state / "run").symlink_to(tmp_path / "elsewhere")
    line = one_line(start(state))
    assert f"runtime dir {state / 'run'}" in line and "is a symlink: remove it" in line


def test_dirs_meshsup_makes_are_0700_and_unsafe_ones_are_refused(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        Runtime(tmp_path / "a" / "state").create()
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a" / "state").stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "a" / "state" / "run").stat().st_mode) == 0o700
    run = tmp_path / "a" / "state" / "run"
    os.chown(run, OTHER_UID, -1)
    with pytest.raises(UnsafePath, match=f"runtime dir {run} .owner uid {OTHER_UID}, mode 0700. is not owned"):
        Runtime(tmp_path / "a" / "state").create()
    os.chown(run, 0, -1)
    run.chmod(0o730)
    with pytest.raises(UnsafePath, match="mode 0730. is writable by group or others"):
        Runtime(tmp_path / "a" / "state").check()


# --- the commands that talk to a running node ------------------------------------------


def test_a_planted_control_socket_is_not_talked_to(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    runtime = Runtime(tmp_path / "state")
    runtime.create()
    ctx = zmq.Context()
    try:
        impostor = ctx.socket(zmq.REP)
        impostor.setsockopt(zmq.LINGER, 0)
        impostor.bind(f"ipc://{tmp_path / 'impostor.sock'}")
        (runtime.dir / "cli.sock").symlink_to(tmp_path / "impostor.sock")
        with pytest.raises(UnsafePath, match="control socket .* is a symlink"):
            call(runtime, "status", timeout=1)
        assert cli.main(["stop", "--state-dir", str(runtime.state_dir)]) == 1
        assert not impostor.poll(0)  # no request ever reached it
    finally:
        ctx.destroy(linger=0)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "refusing to connect: control socket" in err and "symlink" in err


def test_a_control_socket_of_another_user_is_not_talked_to(tmp_path: Path) -> None:
    runtime = Runtime(tmp_path / "state")
    runtime.create()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(str(runtime.dir / "cli.sock"))
        os.chown(runtime.dir / "cli.sock", OTHER_UID, -1)
        with pytest.raises(UnsafePath, match=f"owner uid {OTHER_UID}.* is not owned by uid 0"):
            call(runtime, "status", timeout=1)


def test_commands_on_a_state_dir_of_another_user_are_refused(tmp_path: Path) -> None:
    runtime = Runtime(tmp_path / "state")
    runtime.create()
    os.chown(runtime.state_dir, OTHER_UID, -1)
    with pytest.raises(UnsafePath, match="state dir .* is not owned by uid 0"):
        call(runtime, "status", timeout=1)
    with pytest.raises(NotRunning, match="no node is running"):  # nothing there is still just that
        call(Runtime(tmp_path / "absent"), "status", timeout=1)


# --- the key ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o620], ids=oct)
def test_a_generated_key_others_can_read_is_refused(tmp_path: Path, mode: int) -> None:
    key = tmp_path / "private.key"
    key.write_text(b64(generate_private()) + "\n")
    key.chmod(mode)
    with pytest.raises(UnsafePath, match=f"private key file {key} .owner uid 0, mode {mode:04o}. is"):
        load_or_create(key)


def test_start_refuses_a_generated_key_others_can_read(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    (state / "private.key").write_text(b64(generate_private()) + "\n")
    (state / "private.key").chmod(0o644)
    line = one_line(start(state))
    assert f"private key file {state / 'private.key'} (owner uid 0, mode 0644) is readable by group or others" in line
    assert "chmod 0600 it" in line
    assert not (state / "run").exists()


def test_a_generated_key_of_another_user_is_refused_and_a_new_one_is_0600(tmp_path: Path) -> None:
    key = tmp_path / "state" / "private.key"
    made = load_or_create(key)
    assert stat.S_IMODE(key.stat().st_mode) == 0o600 and load_or_create(key) == made
    assert stat.S_IMODE(key.parent.stat().st_mode) == 0o700
    os.chown(key, OTHER_UID, -1)
    with pytest.raises(UnsafePath, match="is not owned by uid 0"):
        load_or_create(key)


# --- the interface name given on the command line -----------------------------------------


@pytest.mark.parametrize("name", ["a/b", "x" * 16, "", ".", "..", "a:b", "a b", "a\tb"])
def test_interface_names_linux_refuses_are_refused_at_the_cli(tmp_path: Path, name: str) -> None:
    args = cli._parser().parse_args(["start", "--state-dir", str(tmp_path), "--interface", name])
    with pytest.raises(cfg.ConfigError, match=r"--interface: interface: .* is not a valid interface name"):
        cli.load_config(args, tmp_path)


def test_a_good_interface_name_is_taken(tmp_path: Path) -> None:
    args = cli._parser().parse_args(["start", "--state-dir", str(tmp_path), "--interface", "x" * 15])
    assert cli.load_config(args, tmp_path).node.interface == "x" * 15


# --- resolv.conf --------------------------------------------------------------------------


def test_resolvconf_writes_through_no_symlink_planted_at_its_temp_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A local user who plants a symlink at every temp name it can predict, again as
    soon as one is removed, must not get the write (or the chmod) through it."""
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    victim.chmod(0o600)
    path = tmp_path / "etc" / "resolv.conf"
    path.parent.mkdir()
    path.write_text("nameserver 198.51.100.53\n")
    predictable = path.with_name(f".{path.name}.meshsup-{os.getpid()}")
    unlink = Path.unlink

    def replant(self: Path, missing_ok: bool = False) -> None:
        unlink(self, missing_ok=missing_ok)
        if self == predictable:
            self.symlink_to(victim)

    monkeypatch.setattr(Path, "unlink", replant)
    predictable.symlink_to(victim)
    rc = ResolvConf(path, backup=tmp_path / "backup")
    rc.apply(["100.64.0.53"])
    assert victim.read_text() == "precious\n" and stat.S_IMODE(victim.stat().st_mode) == 0o600
    assert path.read_text().startswith(HEADER) and stat.S_IMODE(path.stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "backup").stat().st_mode) == 0o600
    rc.restore()
    assert path.read_text() == "nameserver 198.51.100.53\n"
    assert sorted(p.name for p in path.parent.iterdir()) == [predictable.name, "resolv.conf"]  # just the plant


def crashed(tmp_path: Path) -> tuple[Path, Path]:
    """resolv.conf as a run that died left it (ours, not restored), and where its backup goes."""
    path = tmp_path / "resolv.conf"
    path.write_text(HEADER + "nameserver 100.64.0.53\n")
    return path, tmp_path / ("resolv.conf" + BACKUP_SUFFIX)


def planted(backup: Path, tmp_path: Path, how: str) -> None:
    evil = tmp_path / "evil.conf"
    evil.write_text("nameserver 203.0.113.66\n")
    if how == "symlink":
        backup.symlink_to(evil)
        return
    backup.write_text("nameserver 203.0.113.66\n")
    if how == "other user":
        os.chown(backup, OTHER_UID, -1)
    else:
        backup.chmod(0o622)


@pytest.mark.parametrize(
    "how,problem",
    [
        ("symlink", "is a symlink"),
        ("other user", f"owner uid {OTHER_UID}, mode 0644. is not owned by uid 0"),
        ("writable", "mode 0622. is writable by group or others"),
    ],
    ids=["symlink", "other-user", "writable"],
)
def test_a_planted_backup_is_not_restored(tmp_path: Path, how: str, problem: str) -> None:
    path, backup = crashed(tmp_path)
    planted(backup, tmp_path, how)
    rc = ResolvConf(path, backup=backup)
    rc.apply(["100.64.0.54"])
    assert rc.refused_backup.startswith(f"resolv.conf backup {backup} (")
    assert re.search(problem, rc.refused_backup)
    rc.restore()
    # Refused, the backup counts as none: there was no resolv.conf before the crashed run.
    assert not path.exists() and not path.is_symlink()
    assert (tmp_path / "evil.conf").read_text() == "nameserver 203.0.113.66\n"


def test_a_symlink_original_survives_a_crash_in_its_backup(tmp_path: Path) -> None:
    stub = tmp_path / "stub-resolv.conf"
    stub.write_text("nameserver 127.0.0.53\n")
    link = tmp_path / "resolv.conf"
    link.symlink_to(stub)
    backup = tmp_path / "backup"
    ResolvConf(link, backup=backup).apply(["100.64.0.53"])  # this run "dies"
    assert backup.is_file() and not backup.is_symlink()
    rc = ResolvConf(link, backup=backup)
    rc.apply(["100.64.0.54"])
    assert rc.refused_backup == ""
    rc.restore()
    assert link.is_symlink() and os.readlink(link) == str(stub) and not backup.exists()


# --- the netlog's spool and window log -------------------------------------------------------


def test_a_spool_write_goes_through_no_symlink_planted_at_its_temp_name(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    spool = Spool(tmp_path / "spool")
    (tmp_path / "spool" / "00000000000000000000.json.tmp").symlink_to(victim)
    name = spool.append({"nodeId": "n", "i": 0})
    assert victim.read_text() == "precious\n"
    assert spool.read(name) == {"nodeId": "n", "i": 0}
    assert stat.S_IMODE((tmp_path / "spool" / name).stat().st_mode) == 0o600


def test_a_spooled_record_that_is_a_symlink_is_not_shipped(tmp_path: Path) -> None:
    secret = tmp_path / "secret.json"
    secret.write_text('{"nodeId": "n", "secret": 1}')
    (tmp_path / "spool").mkdir()
    (tmp_path / "spool" / "00000000000000000000.json").symlink_to(secret)
    spool = Spool(tmp_path / "spool")
    assert spool.read("00000000000000000000.json") is None and spool.corrupt == 1
    assert secret.exists() and not (tmp_path / "spool" / "00000000000000000000.json").is_symlink()


def test_a_window_log_that_is_a_symlink_is_refused_not_truncated(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious, and no window log\n")
    (tmp_path / "netlog").mkdir()
    (tmp_path / "netlog" / "window.wal").symlink_to(victim)
    with pytest.raises(UnsafePath, match="netlog window log .* is a symlink"):
        WindowLog(tmp_path / "netlog" / "window.wal").recover(1.0)
    assert victim.read_text() == "precious, and no window log\n"

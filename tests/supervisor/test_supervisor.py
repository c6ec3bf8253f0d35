"""The supervision tree with real processes: nothing of the supervisor is mocked."""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path

import msgpack
import pytest

from meshsup.actors.bus import datapath
from meshsup.actors.bus.codec import encode
from meshsup.actors.bus.messages import Heartbeat
from tests.nodes import pid_alive, process_title

pytestmark = pytest.mark.netns

KINDS = {"tun-io", "crypto", "magicsock", "dns", "router", "netlog"}


def write_config(tmp_path: Path, body: str) -> Path:
    path = tmp_path / f"node-{os.urandom(3).hex()}.toml"
    path.write_text(body)
    return path


def relaxed(tmp_path: Path, intensity: int = 50) -> Path:
    return write_config(tmp_path, f"[supervisor]\nintensity = {intensity}\nperiod = 10\n")


def test_embedded_default_runs_every_kind(node_factory) -> None:
    node = node_factory()
    status = node.wait_ready()
    actors = status["actors"]
    assert {a["kind"] for a in actors} == KINDS
    assert all(a["state"] == "running" for a in actors)
    pids = [a["pid"] for a in actors]
    assert len(set(pids)) == len(pids) and node.proc.pid not in pids
    for a in actors:
        assert process_title(a["pid"]).startswith(f"meshsup: {a['name']}")
    names = {a["name"] for a in actors}
    assert {"crypto-0", "crypto-1", "dns-0"} <= names
    assert status["node"]["public_key"] in node.stdout()  # printed with a peer stanza
    assert "[Peer]" in node.stdout()
    assert (node.state_dir / "private.key").stat().st_mode & 0o077 == 0
    # Only the unprivileged actors' group may search it (tests/test_privileges.py); no one else.
    assert (node.state_dir / "run").stat().st_mode & 0o7777 == 0o2710


def test_kill_each_kind_is_replaced_others_untouched(node_factory, tmp_path) -> None:
    node = node_factory("--config", str(relaxed(tmp_path)))
    node.wait_ready()
    for name in ["netlog", "router", "magicsock", "crypto-1", "tun-io", "dns-0"]:
        before = node.actors()
        os.kill(before[name]["pid"], signal.SIGKILL)
        after = node.wait(
            lambda: (a := node.actors())[name]["pid"] != before[name]["pid"] and a[name]["state"] == "running" and a,
            what=f"{name} replaced",
        )
        assert after[name]["restarts"] == before[name]["restarts"] + 1
        assert "SIGKILL" in after[name]["last_exit"]
        for other, info in before.items():
            if other != name:
                assert after[other]["pid"] == info["pid"], f"{other} was disturbed by {name}'s death"
    assert node.proc.poll() is None


def test_hung_actor_is_killed_and_replaced(node_factory) -> None:
    node = node_factory()
    node.wait_ready()
    old = node.actors()["magicsock"]["pid"]
    node.cli("fault", "magicsock", "hang")
    after = node.wait(
        lambda: (a := node.actors()["magicsock"])["pid"] != old and a["state"] == "running" and a,
        what="hung actor replaced",
    )
    assert after["restarts"] == 1 and "hung" in after["last_exit"]
    assert not pid_alive(old)


def test_fault_switches_refused_outside_tests(node_factory) -> None:
    node = node_factory(faults=False)
    node.wait_ready()
    r = node.cli("fault", "magicsock", "hang", check=False)
    assert r.returncode != 0
    time.sleep(2.5)
    assert node.actors()["magicsock"]["restarts"] == 0


def test_crash_loop_trips_intensity(node_factory, tmp_path) -> None:
    conf = write_config(tmp_path, "[supervisor]\nintensity = 3\nperiod = 10\n")
    node = node_factory("--config", str(conf), env={"MESHSUP_TEST_CRASH": "router"})
    assert node.proc.wait(30) != 0
    err = node.stderr()
    assert "router" in err.splitlines()[-1] and "giving up" in err.splitlines()[-1]
    assert "exited with status 3" in err
    time.sleep(0.5)
    assert not list((node.state_dir / "run").glob("*.sock"))  # an absent dir globs to nothing


def test_garbage_on_every_bus_endpoint_is_counted(node_factory) -> None:
    node = node_factory()
    status = node.wait_ready()
    garbage = [
        os.urandom(200),  # random bytes
        encode(Heartbeat(name="x", seq=1, status={}))[:-3],  # truncated msgpack
        msgpack.packb(["no.such.type", 1, []]),  # unknown type
        msgpack.packb(["actor.heartbeat", 1, ["x", "not-an-int", {}]]),  # wrong field type
        b"\0" * (datapath.MAX_MESSAGE + 1),  # longer than any data message
    ]
    for a in status["actors"]:  # each actor's data path socket (actors.bus.datapath)
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
            s.connect(str(node.state_dir / "run" / f"{a['name']}.sock"))
            for frame in garbage:
                s.send(frame)

    def all_counted():
        actors = node.actors()
        return all(sum(a["bus_dropped"].values()) >= len(garbage) for a in actors.values()) and actors

    actors = node.wait(all_counted, what="drops counted by every actor")
    for name, a in actors.items():
        assert a["state"] == "running" and a["restarts"] == 0, name
        assert a["pid"] == next(x["pid"] for x in status["actors"] if x["name"] == name)
        # Each frame counted once, under its own reason.
        assert a["bus_dropped"] == {"malformed": 2, "unknown_type": 1, "bad_field": 1, "oversized": 1}, (name, a)
    lines = node.cli("status").stdout.splitlines()
    header = lines.index(next(line for line in lines if line.startswith("ACTOR")))
    rows = {f[0]: f for f in (line.split() for line in lines[header + 1 : header + 1 + len(actors)])}
    assert lines[header].endswith("BUS DROPS") and {n: int(f[-1]) for n, f in rows.items()} == {
        n: len(garbage) for n in actors
    }


def test_scale_crypto_up_and_down(node_factory) -> None:
    node = node_factory()
    before = {n: a["pid"] for n, a in node.wait_ready() and node.actors().items()}
    node.cli("scale", "crypto", "4")
    node.wait(
        lambda: sum(1 for a in node.actors().values() if a["kind"] == "crypto" and a["state"] == "running") == 4,
        what="4 crypto",
    )
    node.cli("scale", "crypto", "1")
    actors = node.wait(
        lambda: (a := node.actors()) and [n for n in a if n.startswith("crypto")] == ["crypto-0"] and a, what="1 crypto"
    )
    for name, pid in before.items():
        if name != "crypto-1":
            assert actors[name]["pid"] == pid, f"{name} was restarted by scaling"
    assert not pid_alive(before["crypto-1"])
    r = node.cli("scale", "router", "2", check=False)
    assert r.returncode != 0 and "cannot be scaled" in r.stderr


def test_sigterm_leaves_nothing(node_factory) -> None:
    node = node_factory()
    pids = [a["pid"] for a in node.wait_ready()["actors"]]
    start = time.monotonic()
    node.proc.send_signal(signal.SIGTERM)
    assert node.proc.wait(10) == 0
    assert time.monotonic() - start < 10
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline and any(pid_alive(p) for p in pids):
        time.sleep(0.05)
    assert not [p for p in pids if pid_alive(p)]
    run = node.state_dir / "run"
    assert not run.exists() or not list(run.iterdir())


def test_reload_unchanged_is_noop_and_bad_reload_keeps_config(node_factory, tmp_path) -> None:
    conf = relaxed(tmp_path)
    node = node_factory("--config", str(conf))
    node.wait_ready()
    r = node.cli("reload")
    assert '"changed": false' in r.stdout
    conf.write_text("[supervisor]\nintensity = 'lots'\n")
    r = node.cli("reload", check=False)
    assert r.returncode != 0 and "supervisor.intensity" in r.stderr and "kept" in r.stderr
    assert node.status()["node"]["generation"] == 1
    conf.write_text("[supervisor]\nintensity = 40\nperiod = 10\n")
    pids = {n: a["pid"] for n, a in node.actors().items()}
    os.kill(node.proc.pid, signal.SIGHUP)
    node.wait(lambda: node.status()["node"]["generation"] == 2, what="SIGHUP reload applied")
    assert {n: a["pid"] for n, a in node.actors().items()} == pids


def test_systemd_notify_ready_and_watchdog(node_factory, tmp_path) -> None:
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(30)
    try:
        node = node_factory(env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "1000000"})
        seen: set[str] = set()
        deadline = time.monotonic() + 30
        while not {"READY=1", "WATCHDOG=1"} <= seen and time.monotonic() < deadline:
            seen.update(sock.recv(4096).decode().splitlines())
        assert "READY=1" in seen and "WATCHDOG=1" in seen
        assert node.status()["node"]["ready"]
    finally:
        sock.close()


def test_logs_name_actor_and_pid_and_hide_secrets(node_factory, tmp_path) -> None:
    key_file = tmp_path / "k.key"
    key_file.write_text("qPy5tY6oGkHz2bIYwfqR1E5mY0f3k8aD2k1d1v4vV0M=\n")
    key_file.chmod(0o600)
    conf = write_config(tmp_path, f'[node]\nprivate_key_file = "{key_file}"\n')
    node = node_factory("--config", str(conf))
    status = node.wait_ready()
    node.close()
    import json

    lines = [json.loads(line) for line in node.stderr().splitlines() if line.startswith("{")]
    assert lines
    assert all("actor" in e and isinstance(e["pid"], int) for e in lines)
    assert {e["actor"] for e in lines} >= {"supervisor"}
    assert "qPy5tY6oGkHz2bIYwfqR1E5mY0f3k8aD2k1d1v4vV0M" not in node.stderr() + node.stdout()
    assert status["node"]["public_key"] in node.stdout()


def test_a_second_node_on_a_taken_port_is_refused(node_factory) -> None:
    first = node_factory()
    first.wait_ready()
    second = node_factory(ns=first.netns)  # same namespace, same default port 51820
    assert second.proc.wait(30) == 1
    assert "UDP port 51820 is in use" in second.stderr()
    assert first.status()["node"]["ready"]

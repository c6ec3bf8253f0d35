"""Who holds keys and who runs as root: only the crypto workers get key material; DNS and
netlog run as the unprivileged user (meshsup), DNS keeping only CAP_NET_BIND_SERVICE,
and an actor that cannot drop refuses to run."""

from __future__ import annotations

import json
import os
import pwd
import select
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq

from meshsup.actors.base import Actor
from meshsup.actors.bus.codec import Message, encode
from meshsup.actors.bus.endpoints import Runtime
from meshsup.actors.bus.messages import FlowCountsAck, Heartbeat, LinkChanged, LogLine, PacketBatch
from meshsup.actors.kernel.files import UnsafePath
from meshsup.actors.kernel.privileges import CAP_NET_BIND_SERVICE, USER, Account
from meshsup.actors.registry import EXIT_NO_DROP, KINDS, START_ORDER, settings_for
from meshsup.actors.registry import accounts as registry_accounts
from meshsup.actors.settings import Settings, parse
from meshsup.actors.settings.keys import b64, generate_private, load_or_create_disco, public_of
from meshsup.supervisor.resources import open_state_dir
from meshsup.supervisor.supervision import Tree
from tests.dns_fixtures import dig
from tests.netlog_fixtures import Rsyslog, free_port, wait_until
from tests.nodes import REPO, Netns, Node
from tests.topology import have

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch users")
DROPPED = {"netlog": 0, "dns": 1 << CAP_NET_BIND_SERVICE}  # kind -> the capabilities it keeps
NODE_KEY, PSK = generate_private(), generate_private()
MESH_ADDRESS = "100.64.0.1"


@pytest.fixture(scope="module")
def accounts() -> dict[str, Account]:
    """Each unprivileged kind's own user."""
    found = registry_accounts()
    if any(a.name != KINDS[kind].user for kind, a in found.items()):
        pytest.skip(f"no user of its own for some unprivileged kind: {found} (deploy/setup.sh makes them)")
    return found


def settings(tmp_path: Path) -> Settings:
    peer = {
        "name": "bravo",
        "public_key": b64(public_of(generate_private())),
        "preshared_key": b64(PSK),
        "allowed_ips": ["100.64.0.2/32"],
    }
    doc = {
        "node": {"name": "alpha", "private_key": b64(NODE_KEY), "addresses": [f"{MESH_ADDRESS}/32"]},
        "peers": [peer, {**peer, "name": "charlie", "public_key": b64(public_of(generate_private()))}],
    }
    return parse("node.toml", doc, tmp_path, tmp_path)


def holds_a_key(blob: bytes) -> bool:
    return NODE_KEY in blob or PSK in blob


def encode_settings(s: Settings) -> bytes:
    return msgpack.packb(s.to_wire())


# --- the keys: one place decides, per kind ---------------------------------------------


def test_only_the_crypto_workers_get_the_keys(tmp_path: Path) -> None:
    full = settings(tmp_path)
    full = replace(full, node=replace(full.node, disco_key=load_or_create_disco(tmp_path)))  # as the CLI loads it
    assert full.holds_secrets and holds_a_key(encode_settings(full))
    for kind in START_ORDER:  # a node's kinds (a relay's workers get the relay's settings, its own key)
        given = settings_for(kind, full)
        assert given.holds_secrets == (kind == "crypto") == holds_a_key(encode_settings(given)), kind
        # Nothing else is taken away, and what is left still crosses the bus.
        assert Settings.from_wire(given.to_wire()) == given
        assert given.without_secrets() == full.without_secrets()
        # The disco key is magicsock's alone (and the crypto workers', which get everything).
        assert (given.node.disco_key == full.node.disco_key != b"") == (kind in ("magicsock", "crypto")), kind
    stripped = full.without_secrets()
    assert stripped.node.private_key == b"" and {p.preshared_key for p in stripped.peers} == {None}
    assert stripped.node.public_key == full.node.public_key and stripped.dns_for_mesh() == full.dns_for_mesh()


def test_the_supervisor_configures_each_kind_with_keys_only_for_crypto(
    tmp_path: Path, accounts: dict[str, Account]
) -> None:
    tree = Tree(settings(tmp_path), Runtime(tmp_path), None, None, accounts, None)  # type: ignore[arg-type]
    for kind in START_ORDER:
        message = tree.configure_message(kind, req=7, generation=3)
        assert (message.req, message.generation) == (7, 3)
        assert holds_a_key(encode(message)) == (kind == "crypto"), kind


# --- the drop, and what happens when it cannot be done ------------------------------------

REFUSE = """
import importlib, os, sys
from meshsup.actors.registry import PRELOAD, account_of, run_actor
for module in PRELOAD:  # as the fork server does (and the interpreter may be where nobody can read)
    importlib.import_module(module)
how = sys.argv[2]
if how == "setresuid fails":
    def refuse(*ids): raise PermissionError(1, "Operation not permitted")
    os.setresuid = refuse
elif how == "setresuid does nothing":
    os.setresuid = lambda *ids: None
elif how == "not root":
    os.seteuid(65534)
run_actor(sys.argv[3], sys.argv[3] + "-0" if sys.argv[3] == "dns" else sys.argv[3], sys.argv[1], None,
          account_of(sys.argv[3]))
"""


@pytest.mark.parametrize("kind", ["dns", "netlog"])
@pytest.mark.parametrize(
    "how, reason",
    [
        ("setresuid fails", "cannot switch to meshsup-"),
        ("setresuid does nothing", "privileges not dropped as asked: thread"),
        ("not root", "not root"),
    ],
)
def test_an_actor_that_cannot_drop_privileges_refuses_to_run(
    tmp_path: Path, accounts: dict[str, Account], kind: str, how: str, reason: str
) -> None:
    account = accounts[kind]
    Runtime(tmp_path).create()
    r = subprocess.run(
        [sys.executable, "-c", REFUSE, str(tmp_path), how, kind],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert r.returncode == EXIT_NO_DROP, r.stderr
    [line] = [json.loads(line) for line in r.stderr.splitlines() if line.startswith("{")]
    assert line["event"] == "refusing to run: cannot drop privileges" and line["level"] == "error", line
    assert reason in line["error"] and line["user"] == account.name
    if how == "setresuid does nothing":
        assert f"Uid 0 0 0 0, not {account.uid}" in line["error"]


class Recorder(Actor):
    kind = "tun-io"

    def __init__(self, name: str, runtime: Runtime) -> None:
        super().__init__(name, runtime)
        self.got: list[Message] = []

    def on_message(self, msg: Message) -> None:
        self.got.append(msg)


def send_as(uid: int, gid: int, path: str, messages: list[Message]) -> None:
    """Send on the data path from a child process running as uid:gid."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            # Its tmp dir's parents are root's alone: reach the socket as the actors do.
            directory = os.open(os.path.dirname(path), os.O_PATH | os.O_DIRECTORY)
            os.setgroups([])
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
            with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
                s.connect(f"/proc/self/fd/{directory}/{os.path.basename(path)}")
                for msg in messages:
                    s.send(encode(msg))
            code = 0
        finally:
            os._exit(code)
    assert os.waitpid(pid, 0)[1] == 0


def test_a_shared_inbox_takes_only_acks_from_netlog(tmp_path: Path, accounts: dict[str, Account]) -> None:
    netlog, dns = accounts["netlog"], accounts["dns"]
    runtime = Runtime(tmp_path)
    runtime.create()
    runtime.open_to(netlog.gid)
    actor = Recorder("tun-io", runtime)
    try:
        path = runtime.inbox("tun-io")
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        actor.accept_from_unprivileged("netlog", FlowCountsAck)
        assert (stat.S_IMODE(os.stat(path).st_mode), os.stat(path).st_gid) == (0o660, netlog.gid)
        ack, packets = FlowCountsAck(epoch=1, seq=2), PacketBatch(packets=b"")
        send_as(netlog.uid, netlog.gid, path, [ack, packets])  # netlog's ack, and what only crypto may send
        send_as(dns.uid, dns.gid, path, [FlowCountsAck(epoch=1, seq=3)])  # another kind speaking for netlog
        send_as(0, 0, path, [packets])
        deadline = time.monotonic() + 10
        while (len(actor.got) < 2 or sum(actor.bus_dropped.values()) < 2) and time.monotonic() < deadline:
            for fd in select.select(list(actor._fds), [], [], 0.1)[0]:
                actor._fds[fd][0]()
        assert sorted((m.TAG, getattr(m, "seq", 0)) for m in actor.got) == sorted([(ack.TAG, 2), (packets.TAG, 0)])
        assert actor.bus_dropped == {"unprivileged_sender": 2}
    finally:
        actor.inbox.close()
        actor.ctx.destroy(linger=0)


def run_as(user: Account, check: Callable[[], None]) -> None:
    """`check` in a child process running as `user`: it must not fail."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.setgroups([])
            os.setresgid(user.gid, user.gid, user.gid)
            os.setresuid(user.uid, user.uid, user.uid)
            check()
            code = 0
        finally:
            os._exit(code)
    assert os.waitpid(pid, 0)[1] == 0, f"as {user.name}"


class Impostor:
    """A process of an unprivileged user (a compromised DNS worker) connected to the
    unprivileged actors' control socket by their names, speaking for them (heartbeats) and
    counting what it is sent, until `stop` (or the test's end)."""

    def __init__(self, user: Account, runtime_dir: Path, names: list[str]) -> None:
        stop_r, self._stop_w = os.pipe()
        self._out_r, out_w = os.pipe()
        directory = os.open(runtime_dir, os.O_PATH | os.O_DIRECTORY)
        self.pid = os.fork()
        if self.pid == 0:
            code = 1
            try:
                os.close(self._stop_w)  # so that the test's end, however it ends, ends this too
                os.setgroups([])
                os.setresgid(user.gid, user.gid, user.gid)
                os.setresuid(user.uid, user.uid, user.uid)
                endpoint = f"ipc:///proc/self/fd/{directory}/control-u.sock"
                os.write(out_w, str(_speak_for(endpoint, names, stop_r, out_w)).encode())
                code = 0
            finally:
                os._exit(code)
        for fd in (directory, stop_r, out_w):
            os.close(fd)
        self._out = os.fdopen(self._out_r)
        if self._out.read(1) != "+":
            os.waitpid(self.pid, 0)
            raise AssertionError("the impostor could not connect")

    def stop(self) -> int:
        """What it was sent, as any of the actors it spoke for."""
        os.close(self._stop_w)
        assert os.waitpid(self.pid, 0)[1] == 0
        with self._out:
            return int(self._out.read())

    def __enter__(self) -> Impostor:
        return self

    def __exit__(self, *_: object) -> None:
        if not self._out.closed:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
            self._out.close()


def _speak_for(endpoint: str, names: list[str], stop: int, out: int) -> int:
    """The impostor's body: returns how many frames it was sent."""
    got, seq, connected = 0, 0, set()
    with zmq.Context() as ctx:
        sockets = []
        for name in names:
            s = ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.IDENTITY, name.encode())
            s.setsockopt(zmq.LINGER, 0)
            s.connect(endpoint)
            sockets.append((name, s))
        while not select.select([stop], [], [], 0.1)[0]:
            seq += 1
            for name, s in sockets:
                try:
                    s.send(encode(Heartbeat(name=name, seq=seq, status={})), zmq.NOBLOCK)
                    connected.add(name)
                except zmq.Again:  # not connected yet
                    pass
                while s.poll(0):
                    s.recv()
                    got += 1
            if seq > 3 and len(connected) == len(names) and out >= 0:
                os.write(out, b"+")  # speaking for all, a few heartbeats each
                out = -1
    return got


def test_the_state_dir_is_opened_to_the_group_and_a_root_spool_handed_over(
    tmp_path: Path, accounts: dict[str, Account]
) -> None:
    netlog = accounts["netlog"]
    shared = pwd.getpwnam(USER)
    runtime = Runtime(tmp_path / "state")
    runtime.create()
    flows = runtime.state_dir / "spool" / "flows"
    flows.mkdir(parents=True, mode=0o700)  # as a node whose netlog ran as root left it
    (flows / "1.json").write_text("{}")
    (flows / "root-file").symlink_to("/etc/passwd")
    (tmp_path / "elsewhere").write_text("")
    os.link(tmp_path / "elsewhere", flows / "linked")
    # As a node whose unprivileged kinds all ran as meshsup left it (DNS could have planted anything).
    window = runtime.state_dir / "netlog"
    window.mkdir(mode=0o700)
    (window / "window.wal").write_text("")
    (window / "planted").symlink_to("/etc/shadow")
    (window / "dns-file").write_text("")
    for path in (window, window / "window.wal", window / "planted"):
        os.chown(path, shared.pw_uid, shared.pw_gid, follow_symlinks=False)
    os.chown(window / "dns-file", accounts["dns"].uid, -1)
    open_state_dir(runtime, accounts)
    paths = [runtime.state_dir / "spool", flows, *flows.iterdir(), window, *window.iterdir()]
    owner = {p.name: p.lstat().st_uid for p in paths}
    assert owner == {
        "spool": netlog.uid,
        "flows": netlog.uid,
        "1.json": netlog.uid,
        "root-file": 0,
        "linked": 0,
        "netlog": netlog.uid,
        "window.wal": netlog.uid,
        "planted": shared.pw_uid,
        "dns-file": accounts["dns"].uid,
    }  # only what root or meshsup owned; never through a link, never a file linked elsewhere
    assert {stat.S_IMODE(p.stat().st_mode) for p in (runtime.state_dir / "spool", window)} == {0o700}
    st, run = runtime.state_dir.stat(), runtime.dir.stat()
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o710, 0, netlog.gid)
    assert (stat.S_IMODE(run.st_mode), run.st_uid, run.st_gid) == (0o2710, 0, netlog.gid)
    runtime.check()  # group-searchable is not group-writable: still safe
    os.chown(window, accounts["dns"].uid, -1)
    with pytest.raises(UnsafePath, match="netlog dir .* is neither root's, meshsup's nor meshsup-netlog's"):
        open_state_dir(runtime, accounts)


# --- a node --------------------------------------------------------------------------------


def proc_status(pid: int, tid: int | None = None) -> dict[str, str]:
    path = f"/proc/{pid}/task/{tid}/status" if tid else f"/proc/{pid}/status"
    return {k: v.strip() for k, _, v in (line.partition(":") for line in Path(path).read_text().splitlines())}


def check_privileges(actors: dict[str, dict[str, Any]], accounts: dict[str, Account]) -> None:
    for name, a in actors.items():
        assert a["holds_keys"] == (a["kind"] == "crypto"), name
        status = proc_status(a["pid"])
        if a["kind"] not in DROPPED:
            assert status["Uid"].split()[0] == "0", name  # README: why these stay root
            continue
        keep, account = DROPPED[a["kind"]], accounts[a["kind"]]
        for tid in os.listdir(f"/proc/{a['pid']}/task"):  # every thread, the ZeroMQ ones too
            thread = proc_status(a["pid"], int(tid))
            assert set(thread["Uid"].split()) == {str(account.uid)}, (name, thread["Uid"])
            assert set(thread["Gid"].split()) == {str(account.gid)} and thread["Groups"] == "", name
            assert thread["NoNewPrivs"] == "1" and int(thread["CapBnd"], 16) == keep, name
            assert int(thread["CapInh"], 16) == int(thread["CapAmb"], 16) == 0, name
        assert int(status["CapEff"], 16) == int(status["CapPrm"], 16) == keep, name
        # Not dumpable: no other process of its user (another DNS worker) may ptrace it or read its
        # memory, and so the kernel gives its /proc entries to root.
        assert os.stat(f"/proc/{a['pid']}/mem").st_uid == 0, name


def node_config(tmp_path: Path, port: int, peers: int) -> Path:
    key = tmp_path / "alpha.key"
    key.write_text(b64(NODE_KEY))
    key.chmod(0o600)
    peer_tables = "".join(
        f'[[peers]]\nname = "peer{i}"\npublic_key = "{b64(public_of(generate_private()))}"\n'
        f'preshared_key = "{b64(PSK)}"\nallowed_ips = ["100.64.0.{i + 2}/32"]\n'
        for i in range(peers)
    )
    collector = f'kind = "syslog"\naddress = "tcp://127.0.0.1:{port}"\n'
    path = tmp_path / "alpha.toml"
    path.write_text(
        f'[node]\nname = "alpha"\nprivate_key_file = "{key}"\naddresses = ["{MESH_ADDRESS}/32"]\n'
        f"[supervisor]\nintensity = 20\nperiod = 10\n"
        f'[dns]\nlisten = ["127.0.0.1:53", "{MESH_ADDRESS}:53"]\n'
        f"[netlog]\ninterval = 1\n[[netlog.collectors]]\n{collector}"
        f'[logging]\nlevel = "info"\n[[logging.collectors]]\n{collector}' + peer_tables
    )
    return path


@pytest.fixture
def rsyslogs() -> Iterator[list[Rsyslog]]:
    made: list[Rsyslog] = []
    yield made
    for r in made:
        r.stop()


@pytest.mark.netns
@pytest.mark.skipif(bool(have("dig", "rsyslogd")), reason=have("dig", "rsyslogd") or "")
def test_dns_and_netlog_run_unprivileged_hold_no_keys_and_still_work(
    node_factory: Callable[..., Node],
    netns: Callable[..., Netns],
    tmp_path: Path,
    accounts: dict[str, Account],
    rsyslogs: list[Rsyslog],
) -> None:
    ns = netns()
    rsyslog = Rsyslog(tmp_path / "rsyslog", free_port(), ns)
    rsyslogs.append(rsyslog)
    config = node_config(tmp_path, rsyslog.port, peers=1)
    node = node_factory("--config", str(config), ns=ns)
    node.wait_ready()

    # holds_keys comes with the heartbeat after an actor's configuration: ready can come first.
    def configured() -> list[dict[str, Any]] | None:
        actors = node.status()["actors"]
        return actors if all(a["holds_keys"] for a in actors if a["kind"] == "crypto") else None

    actors = node.wait(configured, what="the crypto workers' configured heartbeats")
    check_privileges({a["name"]: a for a in actors}, accounts)

    # DNS binds port 53, on loopback and on the mesh address.
    for host in ("127.0.0.1", MESH_ADDRESS):
        assert dig(host, 53, "alpha.mesh", ns=ns).rdata("A") == [MESH_ADDRESS], host

    # netlog, with its collector down, keeps the window log and spools: files of its user's own.
    spool = node.state_dir / "spool"
    assert wait_until(lambda: {p.parent.parent.name for p in spool.rglob("*.json")} == {"flows", "logs"}, 15)
    spooled = list(spool.rglob("*.json"))
    for path in [node.state_dir / "netlog" / "window.wal", *spooled]:
        st = path.lstat()
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (accounts["netlog"].uid, 0o600), path
    # DNS's user may neither signal netlog (0 asks the kernel whether it may: SIGSTOP's check)
    # nor reach its spool.
    netlog_pid, spool_dir = node.actors()["netlog"]["pid"], os.open(spool, os.O_PATH | os.O_DIRECTORY)
    run_dir = os.open(node.state_dir / "run", os.O_PATH | os.O_DIRECTORY)

    def refused() -> None:
        with pytest.raises(PermissionError):
            os.kill(netlog_pid, 0)
        # Root's event and log sockets: it may not announce a link change, nor write root's logs.
        for name in ("events-in.sock", "logs.sock"):
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s, pytest.raises(PermissionError):
                s.connect(f"/proc/self/fd/{run_dir}/{name}")
        # On its own log socket, a line in the router's name is dropped.
        with zmq.Context() as ctx, ctx.socket(zmq.PUSH) as push:
            push.connect(f"ipc:///proc/self/fd/{run_dir}/logs-u.sock")
            push.send(encode(LogLine(seq=0, line=json.dumps({"event": "route added", "actor": "router"}))))
            push.setsockopt(zmq.LINGER, 5000)
        for path in [spool, *spooled]:
            with pytest.raises(PermissionError):
                open(f"/proc/self/fd/{spool_dir}/{path.relative_to(spool)}", "rb")
        with pytest.raises(PermissionError):
            os.unlink(f"/proc/self/fd/{spool_dir}/{spooled[0].relative_to(spool)}")

    try:
        run_as(accounts["dns"], refused)
    finally:
        os.close(spool_dir)
        os.close(run_dir)
    node.wait(lambda: node.counters()["netlog"].get("log_lines_impersonating") == 1, what="the forged line dropped")

    # Restarted (forked from the root fork server again), they drop again.
    for name in ("dns-0", "netlog"):
        old = node.actors()[name]["pid"]
        os.kill(old, signal.SIGKILL)
        node.wait(lambda: (a := node.actors()[name])["pid"] != old and a["state"] == "running", what=name)
    # A process of DNS's user (a compromised DNS worker) connects to the control socket as netlog
    # and as the DNS worker: what the supervisor sends them (a reload's
    # changes) never reaches it, its frames are dropped as a stranger's, and they keep running
    # (a netlog whose connection was taken over would miss its heartbeats and be restarted).
    running = {name: a["pid"] for name, a in node.actors().items()}
    with Impostor(accounts["dns"], node.state_dir / "run", ["netlog", "dns-0"]) as impostor:
        # A reload reaches every actor through the sequencer: keys still only to crypto.
        config.write_text(node_config(tmp_path, rsyslog.port, peers=2).read_text())
        node.cli("reload")
        assert node.status()["node"]["generation"] == 2
        assert impostor.stop() == 0
    assert node.status()["supervisor"]["bus_dropped"]["unknown_sender"] >= 8
    actors = node.actors()
    assert {name: a["pid"] for name, a in actors.items() if a["state"] == "running"} == running
    check_privileges(actors, accounts)

    # What was spooled is shipped, and the restarted DNS logs through the restarted netlog:
    # a frame it cannot decode makes it log a warning.
    rsyslog.start()
    with zmq.Context() as ctx, ctx.socket(zmq.PUB) as pub:
        pub.connect(Runtime(node.state_dir).events_in)

        def dns_logged() -> bool:
            pub.send_multipart([LinkChanged.TAG.encode(), b"\xc1 not msgpack"])
            events = [json.loads(m["msg"]) for m in rsyslog.messages() if m["msgid"] == "log"]
            return any(e["event"] == "bus frame dropped" and e["actor"] == "dns-0" for e in events) and any(
                e["event"] == "node ready" for e in events
            )

        assert wait_until(dns_logged, 30, step=0.5), rsyslog.messages()[-5:]
    assert wait_until(lambda: not any(p.exists() for p in spooled), 15)
    assert any(m["msgid"] == "flowlog" for m in rsyslog.messages())

"""Nodes that find each other through NATS: no [[peers]], only [coordination] (namespaces)."""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest

from meshsup.actors.settings.coordination import node_permissions
from meshsup.actors.settings.keys import b64
from meshsup.supervisor.lab import descendants_by_state_dir
from tests.actors.coord.natsrv import NatsServer, client
from tests.topology import (
    ExitLab,
    Identity,
    Netns,
    Node,
    Underlay,
    have,
    meshsup_config,
    peer,
    ping,
    relay_up,
    relays_stanza,
    start_relay,
    start_wg,
    with_node_keys,
)

MISSING = have("nats-server", "wireguard-go", "wg", "dig")
pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
    pytest.mark.skipif(bool(MISSING), reason=str(MISSING)),
]

LIFETIME = 6


@pytest.fixture
def readable_dir() -> Iterator[Path]:
    """A directory the unprivileged coord actor can read files from (credentials)."""
    d = Path(tempfile.mkdtemp(prefix="coordtest"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def coordination(servers: list[NatsServer], **extra: object) -> str:
    urls = ", ".join(f'"{s.url}"' for s in servers)
    more = "".join(f"{k} = {v}\n" for k, v in extra.items())
    return f'\n[coordination]\nservers = [{urls}]\nmesh = "test"\nlifetime = {LIFETIME}\n{more}'


def launch(
    u: Underlay,
    tmp: Path,
    ident: Identity,
    servers: list[NatsServer],
    static: list[Identity] = (),
    args: tuple[str, ...] = (),
    **extra: object,
) -> tuple[Netns, Node]:
    """A node with [coordination] (and `static` [[peers]]) in a namespace of its own, started."""
    ns, addr = u.host()
    ident.endpoint = f"{addr}:51820"
    config = meshsup_config(tmp, ident, list(static), extra=coordination(servers, **extra))
    return ns, u.track(Node(tmp, "--config", str(config), *args, netns=ns))


def start_node(
    u: Underlay, tmp: Path, ident: Identity, servers: list[NatsServer], static: list[Identity] = (), **extra: object
) -> tuple[Netns, Node]:
    """As launch, ready."""
    ns, node = launch(u, tmp, ident, servers, static, **extra)
    node.wait_ready()
    return ns, node


# A newcomer's log lines that tell where its start went (the first of each after its launch)
MILESTONES = ("node ready", "coordination up", "record's endpoints changed", "applying the mesh's peers")


def events_after(node: Node, since: float, names: tuple[str, ...]) -> dict[str, float]:
    """Seconds from `since` (wall clock) to the first log line of each event at or after it."""
    out: dict[str, float] = {}
    for line in node.stderr().splitlines():
        try:
            entry = json.loads(line)
            at = datetime.fromisoformat(entry["timestamp"].replace("Z", "+00:00")).timestamp() - since
        except (ValueError, KeyError, TypeError):
            continue
        event = entry.get("event", "")
        if event in names and event not in out and at >= 0:
            out[event] = at
    return out


def peer_names(node: Node) -> set[str]:
    return {p["name"] for p in node.status()["peers"]}


def process_tree(pid: int) -> list[int]:
    """`pid` and every process below it (the supervisor, its fork server, the actors)."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return [pid]
    return [pid, *(p for c in children for p in process_tree(int(c)))]


def kill_node(node: Node) -> None:
    """The whole node at once, as a power cut: nothing takes its record away."""
    for pid in [*process_tree(node.proc.pid), *descendants_by_state_dir(node.state_dir)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    node.proc.wait(10)


def test_nodes_find_each_other_through_one_server(underlay: Underlay, tmp_path: Path) -> None:
    u = underlay
    ns_n, addr_n = u.host()
    server = u.track(NatsServer(ns_n, addr_n, tmp_path, "n1"))
    server.wait_ready()
    idents = [Identity(name, i) for i, name in enumerate(("alpha", "bravo", "charlie"), 1)]
    # alpha also has a [[peers]] entry: whisky, a plain wireguard-go peer the mesh knows nothing of
    whisky = Identity("whisky", 9)
    ns_w, addr_w = u.host()
    whisky.endpoint = f"{addr_w}:51820"
    nodes = [start_node(u, tmp_path, idents[0], [server], static=[whisky])]
    nodes += [start_node(u, tmp_path, ident, [server]) for ident in idents[1:]]
    start_wg(u, tmp_path, ns_w, whisky, [idents[0]])
    for ident, (_, node) in zip(idents, nodes):
        others = {i.name for i in idents} - {ident.name} | ({"whisky"} if ident.name == "alpha" else set())
        node.wait(lambda node=node, others=others: peer_names(node) == others, 20, f"{ident.name}'s peers")
    for ident, (ns, _) in zip(idents, nodes):
        for other in idents:
            if other is not ident:
                assert ping(ns, other.v4, count=2), f"{ident.name} -> {other.name}"
    assert ping(nodes[0][0], whisky.v4, count=2)
    # A reload re-reads the file and merges the mesh's peers in again: nothing changes.
    alpha = nodes[0][1]
    generation = alpha.status()["node"]["generation"]
    alpha.cli("reload")
    assert alpha.status()["node"]["generation"] == generation
    assert peer_names(alpha) == {"bravo", "charlie", "whisky"}
    # The operator's policy reaches every node within 2 s: only alpha may ping, names in "corp".
    policy = {
        "filter": {"default": "deny", "rules": [{"action": "accept", "src": ["alpha"], "dst": ["*:*"]}]},
        "dns": {"domain": "corp"},
    }
    client(ns_n, server.url, f"await kv.put('policy', {json.dumps(policy).encode()!r})")
    written = time.monotonic()
    for _, node in nodes:
        node.wait(lambda node=node: node.status()["filter"]["default"] == "deny", 5, "policy")
    assert time.monotonic() - written < 2.0
    (ns_a, _), (ns_b, _) = nodes[0], nodes[1]
    assert ping(ns_a, idents[1].v4, count=2)
    assert not ping(ns_b, idents[2].v4, count=1, timeout=2)  # charlie's filter refuses bravo
    answer = ns_a.run("dig", "+short", "+time=2", "@127.0.0.1", "bravo.corp", check=False).stdout.split()
    assert answer == [idents[1].v4]
    # Bad input: records that do not parse, a key that is no key, addresses outside the pools, and a
    # flood of updates to bravo's record: counted, none applied, no actor restarted, bravo untouched.
    bravo_record = client(ns_n, server.url, "print((await kv.get('node.bravo')).value.decode())").strip()
    flood = f"""
import json
good = json.loads({bravo_record!r})
for i in range(100):
    await kv.put('node.mallory', b'{{not json' + bytes([i]))
    await kv.put('node.bravo', json.dumps({{**good, 'key': 'not-a-key'}}).encode())
    await kv.put('node.bravo', json.dumps({{**good, 'addresses': ['10.9.9.9/32']}}).encode())
print(await kv.put('node.bravo', {bravo_record.encode()!r}))
"""
    last = int(client(ns_n, server.url, flood))
    alpha = nodes[0][1]
    alpha.wait(lambda: alpha.status()["coordination"]["revision"] >= last, 20, "the flood taken")
    status = alpha.status()
    refused = status["coordination"]["refused"]  # a watch behind a flood may see only a key's latest
    assert refused["not_json"] and refused["bad_key"] and refused["bad_address"], refused
    assert {p["name"] for p in status["peers"]} == {"bravo", "charlie", "whisky"}
    assert all(a["restarts"] == 0 for a in status["actors"])
    assert ping(nodes[0][0], idents[1].v4, count=2)
    # A node that stops takes its record with it: gone from the others at once, and the peers
    # that did not change keep their sessions (no new handshake).
    session = {p["name"]: p["last_handshake"] for p in alpha.status()["peers"]}
    nodes[2][1].close()
    for _, node in nodes[:2]:
        node.wait(lambda node=node: "charlie" not in peer_names(node), 5, "charlie gone")
    kept = {p["name"]: p["last_handshake"] for p in alpha.status()["peers"]}
    assert kept["bravo"] == session["bravo"] and kept["whisky"] == session["whisky"]
    # One that dies leaves its record to expire: gone within its lifetime.
    kill_node(nodes[1][1])
    alpha = nodes[0][1]
    alpha.wait(lambda: "bravo" not in peer_names(alpha), LIFETIME + 4, "bravo expired")
    assert alpha.status()["coordination"]["up"]


def cluster(u: Underlay, tmp: Path) -> list[NatsServer]:
    hosts = [u.host() for _ in range(3)]
    addrs = [a for _, a in hosts]
    servers = [
        u.track(NatsServer(ns, addr, tmp, f"n{i}", [a for a in addrs if a != addr]))
        for i, (ns, addr) in enumerate(hosts, 1)
    ]
    for s in servers:
        s.wait_ready()
    return servers


def test_a_cluster_loses_a_server_unnoticed_and_all_of_them_without_harm(underlay: Underlay, tmp_path: Path) -> None:
    u = underlay
    servers = cluster(u, tmp_path)
    idents = [Identity(name, i) for i, name in enumerate(("alpha", "bravo", "charlie"), 1)]
    nodes = [start_node(u, tmp_path, ident, servers, replicas=3) for ident in idents]
    everyone = {i.name for i in idents}
    for ident, (_, node) in zip(idents, nodes):
        node.wait(lambda node=node, ident=ident: peer_names(node) == everyone - {ident.name}, 30, "peers")
    # One server killed mid-run: a newcomer still reaches everyone, and everyone still pings.
    servers[0].stop()
    delta = Identity("delta", 4)
    ns_d, node_d = start_node(u, tmp_path, delta, servers, replicas=3)
    everyone.add("delta")
    for ident, (_, node) in [*zip(idents, nodes), (delta, (ns_d, node_d))]:
        node.wait(lambda node=node, ident=ident: peer_names(node) == everyone - {ident.name}, 20, "delta seen")
    assert ping(ns_d, idents[0].v4, count=2) and ping(nodes[0][0], delta.v4, count=2)
    # Every server down: the mesh runs on as it was, past the records' lifetime.
    generations = [node.status()["node"]["generation"] for _, node in nodes]
    for s in servers[1:]:
        s.stop()
    alpha = nodes[0][1]
    alpha.wait(lambda: not alpha.status()["coordination"]["up"], 15, "alpha sees the servers gone")
    for _ in range(2):
        assert ping(nodes[0][0], idents[1].v4, count=2, timeout=LIFETIME)  # takes a lifetime, twice
    for ident, (_, node) in zip(idents, nodes):
        assert {p["name"] for p in node.status()["peers"]} == everyone - {ident.name}
    warned = alpha.wait(lambda: [w for w in alpha.status()["health"] if w["code"] == "coordination-unreachable"], 20)
    assert "last known state" in warned[0]["message"]
    # Back: each node picks up where it left, reconfiguring nothing (no change was missed or replayed).
    for s in servers:
        s.start()
    for _, node in nodes:
        node.wait(lambda node=node: node.status()["coordination"]["up"], 40, "coordination back")
    for (_, node), generation in zip(nodes, generations):
        assert node.status()["node"]["generation"] == generation
    alpha.wait(lambda: not alpha.status()["health"], 5, "the warning cleared")
    # And changes flow again: a node that stops is gone from the others.
    node_d.close()
    for _, node in nodes:
        node.wait(lambda node=node: "delta" not in peer_names(node), 10, "delta gone")


def test_a_node_may_write_only_its_own_record(underlay: Underlay, tmp_path: Path, readable_dir: Path) -> None:
    """NATS permissions per node (node_permissions): alpha's attempts on bravo's record and on the
    policy are refused by the server, and bravo stays as it was everywhere."""
    u = underlay
    ns_n, addr_n = u.host()
    names = ("alpha", "bravo")
    users = [{"user": "admin", "password": "operator-secret"}] + [
        {"user": n, "password": f"{n}-secret", "permissions": node_permissions("test", n)} for n in names
    ]
    server = u.track(NatsServer(ns_n, addr_n, tmp_path, "n1", users=users))
    server.wait_ready()
    client(ns_n, server.url, "pass", "admin", "operator-secret")  # the operator makes the bucket
    idents = [Identity(n, i) for i, n in enumerate(names, 1)]
    nodes = []
    for ident in idents:
        secret = readable_dir / f"{ident.name}.password"
        secret.write_text(f"{ident.name}-secret")
        secret.chmod(0o644)  # the coord actor reads it as its user, meshsup-coord
        nodes.append(start_node(u, tmp_path, ident, [server], user=f'"{ident.name}"', password_file=f'"{secret}"'))
    for ident, (_, node) in zip(idents, nodes):
        node.wait(lambda node=node, ident=ident: peer_names(node) == set(names) - {ident.name}, 20, "peers")
    (ns_a, alpha), (_, bravo) = nodes
    before = next(p for p in alpha.status()["peers"] if p["name"] == "bravo")
    attempts = """
for key in ("node.bravo", "policy"):
    try:
        await kv.put(key, b'{"v":1,"name":"bravo","key":"x"}')
        print(key, "written")
    except Exception as err:
        print(key, "refused", type(err).__name__)
"""
    out = client(ns_a, server.url, attempts, "alpha", "alpha-secret")
    assert "node.bravo refused" in out and "policy refused" in out, out
    assert "Publish Violation" in server.log_path.read_text()
    after = next(p for p in alpha.status()["peers"] if p["name"] == "bravo")
    assert after["public_key"] == before["public_key"] and after["allowed_ips"] == before["allowed_ips"]
    assert ping(ns_a, idents[1].v4, count=2)
    assert bravo.status()["coordination"]["up"]


def test_nodes_without_addresses_take_free_ones(underlay: Underlay, tmp_path: Path) -> None:
    """No [node] addresses: each node takes one from 100.64.0.0/10 and one from the ULA pool by
    compare-and-set, all different, and the mesh uses them."""
    u = underlay
    ns_n, addr_n = u.host()
    server = u.track(NatsServer(ns_n, addr_n, tmp_path, "n1"))
    server.wait_ready()
    nodes = []
    for name in ("alpha", "bravo", "charlie"):
        ns, _ = u.host()
        ident = Identity(name, 0)
        key = tmp_path / f"{name}.key"
        key.write_text(b64(ident.private))
        key.chmod(0o600)
        config = tmp_path / f"{name}.toml"
        config.write_text(f'[node]\nname = "{name}"\nprivate_key_file = "{key}"\n' + coordination([server]))
        nodes.append((ns, u.track(Node(tmp_path, "--config", str(config), netns=ns))))
    taken = {}
    for _, node in nodes:
        node.wait_ready()
        status = node.wait(lambda node=node: len((s := node.status())["coordination"]["addresses"]) == 2 and s)
        taken[status["node"]["name"]] = status["coordination"]["addresses"]
    v4s = [ipaddress.ip_interface(a[0]) for a in taken.values()]
    v6s = [ipaddress.ip_interface(a[1]) for a in taken.values()]
    assert len(set(v4s)) == len(set(v6s)) == 3
    assert all(a.ip in ipaddress.ip_network("100.64.0.0/10") for a in v4s)
    assert all(a.ip in ipaddress.ip_network("fd7a:115c:a1e0::/48") for a in v6s)
    for (ns, node), name in zip(nodes, taken):
        node.wait(lambda node=node: len(node.status()["peers"]) == 2, 20, "peers")
        assert node.status()["node"]["addresses"] == taken[name]
        for other, addrs in taken.items():
            if other != name:
                assert ping(ns, str(ipaddress.ip_interface(addrs[0]).ip), count=2), f"{name} -> {other}"
    # The coord actor killed: restarted, it takes back its addresses, and the mesh is not disturbed.
    ns, node = nodes[0]
    before = node.status()
    coord = next(a for a in before["actors"] if a["kind"] == "coord")
    os.kill(coord["pid"], signal.SIGKILL)
    node.wait(lambda: next(a for a in node.actors().values() if a["kind"] == "coord")["restarts"] == 1, 20)
    node.wait(lambda: node.status()["coordination"]["up"], 20, "coord back")
    after = node.status()
    assert after["coordination"]["addresses"] == before["coordination"]["addresses"]
    assert after["node"]["generation"] == before["node"]["generation"]
    assert {p["name"] for p in after["peers"]} == {p["name"] for p in before["peers"]}


def test_exit_node_named_from_the_mesh(underlay: Underlay, tmp_path: Path) -> None:
    """`exit_node` names a node known only through the mesh, which advertises exit: the client's
    traffic to the internet goes through it, and its connection to NATS stays direct."""
    u = underlay
    lab = ExitLab(u, tmp_path)
    ns_n, addr_n = u.host()
    server = u.track(NatsServer(ns_n, addr_n, tmp_path, "n1"))
    server.wait_ready()
    exit_conf = meshsup_config(tmp_path, lab.exit, [], extra=coordination([server]))
    with_node_keys(exit_conf, "advertise_exit_node = true")
    u.track(Node(tmp_path, "--config", str(exit_conf), netns=lab.exit_ns)).wait_ready()
    client_conf = meshsup_config(tmp_path, lab.client, [], extra=coordination([server]))
    with_node_keys(client_conf, 'exit_node = "exit"')
    client = u.track(Node(tmp_path, "--config", str(client_conf), netns=lab.client_ns))
    client.wait_ready()
    allowed = client.wait(lambda: peer(client, "exit")["allowed_ips"], 20, "the exit from the mesh")
    assert "0.0.0.0/0" in allowed and "::/0" in allowed
    assert ping(lab.client_ns, lab.INTERNET_HOST, count=2)
    assert f"to {addr_n} lookup main" in lab.client_ns.run("ip", "-4", "rule").stdout
    assert client.status()["coordination"]["up"]
    assert all(a["restarts"] == 0 for a in client.status()["actors"])


def test_a_reload_moves_a_node_to_other_servers(underlay: Underlay, tmp_path: Path) -> None:
    """A changed [coordination] on reload: the coord actor connects to the new servers (in place, no
    restart) and the node joins the mesh there; adding or removing the table is refused."""
    u = underlay
    servers = []
    for name in ("s1", "s2"):  # two servers apart, each with a mesh "test" of its own
        ns_s, addr_s = u.host()
        servers.append(u.track(NatsServer(ns_s, addr_s, tmp_path, name)))
        servers[-1].wait_ready()
    idents = [Identity(name, i) for i, name in enumerate(("alpha", "bravo", "charlie"), 1)]
    nodes = [start_node(u, tmp_path, ident, servers[:1]) for ident in idents[:2]]
    ns_c, addr_c = u.host()
    idents[2].endpoint = f"{addr_c}:51820"
    config = meshsup_config(tmp_path, idents[2], [], extra=coordination(servers[1:]))
    charlie = u.track(Node(tmp_path, "--config", str(config), netns=ns_c))
    charlie.wait_ready()
    charlie.wait(lambda: charlie.status()["coordination"]["up"], 20, "charlie's coordination up")
    assert peer_names(charlie) == set()
    config.write_text(config.read_text().replace(servers[1].url, servers[0].url))
    charlie.cli("reload")
    charlie.wait(lambda: peer_names(charlie) == {"alpha", "bravo"}, 20, "charlie in alpha's mesh")
    for _, node in nodes:
        node.wait(lambda node=node: "charlie" in peer_names(node), 20, "charlie seen")
    assert ping(ns_c, idents[0].v4, count=2) and ping(nodes[1][0], idents[2].v4, count=2)
    assert all(a["restarts"] == 0 for a in charlie.status()["actors"])
    # A change within the same bucket (the lifetime): connected again, and nothing flaps anywhere.
    alpha = nodes[0][1]
    session = peer(alpha, "charlie")["last_handshake"]
    mine = {p["name"]: p["last_handshake"] for p in charlie.status()["peers"]}
    config.write_text(config.read_text().replace(f"lifetime = {LIFETIME}", f"lifetime = {LIFETIME + 1}"))
    ups = charlie.stderr().count('"coordination up"')
    charlie.cli("reload")
    charlie.wait(lambda: charlie.stderr().count('"coordination up"') > ups, 20, "charlie's coordination up again")
    assert {p["name"]: p["last_handshake"] for p in charlie.status()["peers"]} == mine
    assert peer(alpha, "charlie")["last_handshake"] == session
    plain = config.read_text()
    config.write_text(plain[: plain.index("[coordination]")])
    refused = charlie.cli("reload", check=False)
    assert refused.returncode != 0 and "[coordination] added or removed" in refused.stderr + refused.stdout
    assert peer_names(charlie) == {"alpha", "bravo"}


def test_a_peer_is_first_tried_at_the_home_relay_its_record_names(underlay: Underlay, tmp_path: Path) -> None:
    """alpha has two relays and bravo, which it cannot reach directly, only the one that is not
    alpha's home: alpha's first packets to bravo go to bravo's home as its record names it, not to
    alpha's own home (which would say bravo is not there); the disco key TSMP then tells alpha
    is the record's."""
    u = underlay
    ns_n, addr_n = u.host()
    server = u.track(NatsServer(ns_n, addr_n, tmp_path, "n1"))
    server.wait_ready()
    relays = {}
    for name in ("r1", "r2"):
        ns_r, addr_r = u.host()
        start_relay(u, tmp_path, ns_r, addr_r, name=name)
        relays[name] = addr_r
    alpha, bravo = Identity("alpha", 1), Identity("bravo", 2)
    stanzas = "".join(relays_stanza(addr, name) for name, addr in relays.items())
    ns_a, addr_a = u.host()
    alpha.endpoint = f"{addr_a}:51820"
    config = meshsup_config(tmp_path, alpha, [], extra=stanzas + coordination([server]))
    node_a = u.track(Node(tmp_path, "--config", str(config), netns=ns_a))
    node_a.wait_ready()
    node_a.wait(lambda: relay_up(node_a), 20, "alpha's relays up")
    home = node_a.wait(lambda: next((r["name"] for r in node_a.status()["relays"] if r["home"]), None), 20)
    other = next(n for n in relays if n != home)
    ns_b, addr_b = u.host()
    bravo.endpoint = f"{addr_b}:51820"
    for ns, there in ((ns_a, addr_b), (ns_b, addr_a)):  # no direct path: the relays alone carry
        chain = f"chain out {{ type filter hook output priority 0; ip daddr {there} udp dport 51820 drop; }}"
        rules = f"table ip direct {{ {chain}; }}"
        ns.run("nft", "-f", "-", input=rules)
    config_b = meshsup_config(tmp_path, bravo, [], extra=relays_stanza(relays[other], other) + coordination([server]))
    node_b = u.track(Node(tmp_path, "--config", str(config_b), netns=ns_b))
    node_b.wait_ready()
    node_a.wait(lambda: "bravo" in peer_names(node_a), 20, "bravo seen")
    assert ping(ns_a, bravo.v4, count=2, timeout=15)
    status = node_a.status()
    links = {r["name"]: r for r in status["relays"]}
    assert next(r["name"] for r in links.values() if r["home"]) == home  # (else the check below proves nothing)
    assert links[home].get("not_here", 0) == 0 and links[home].get("peer_gone", 0) == 0
    assert peer(node_a, "bravo")["relay"] == other
    node_a.wait(lambda: node_a.status()["disco"]["counters"].get("tsmp_adverts_received"), 20, "bravo's TSMP")
    assert node_a.counters()["magicsock"].get("disco_key_not_the_records", 0) == 0

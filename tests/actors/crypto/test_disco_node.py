"""A running crypto worker takes magicsock's side of disco from the bus, in network namespaces: the
test speaks for magicsock, sending PathSet and TsmpBatch into the worker's inbox, and watches
what the nodes do (status, counters, the datagrams at the endpoint it named)."""

from __future__ import annotations

import base64
import subprocess
from pathlib import Path
from typing import Any

import pytest

from meshsup.actors.bus import batch
from meshsup.actors.bus.datapath import Outbox
from meshsup.actors.bus.endpoints import Runtime
from meshsup.actors.bus.messages import PathSet, TsmpBatch
from meshsup.actors.routing.shard import owner
from meshsup.actors.wire import tsmp
from tests.actors.magicsock.test_relay_nat import run_python
from tests.nodes import is_root
from tests.topology import Identity, Node, Underlay, have, ping, start_meshsup

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(not is_root() or bool(have("ping")), reason=have("ping") or "needs root"),
]
PORT = 51820
ELSEWHERE = 51999  # where the test, as bravo's magicsock might have found, listens
TIMING = {"MESHSUP_TEST_FAULTS": "1", "MESHSUP_TEST_TIMING": "data_timeout=2"}

# At bravo's host, from ELSEWHERE: a disco datagram to alpha, then count the WireGuard transport
# datagrams that come there (until 3, or 20 s of silence).
LISTENER = """
import socket, sys
from meshsup.actors.wire import disco
host, alpha = sys.argv[1], sys.argv[2]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((host, int(sys.argv[3])))
s.settimeout(20.0)
print("ready", flush=True)
s.sendto(disco.MAGIC + bytes(40), (alpha, int(sys.argv[4])))
transport = 0
try:
    while transport < 3:
        transport += s.recv(2048)[:4] == bytes([4, 0, 0, 0])
except TimeoutError:
    pass
print(transport, flush=True)
"""


def peer_status(node: Node) -> dict[str, Any]:
    (peer,) = node.status()["peers"]
    return peer


def test_a_worker_takes_paths_and_tsmp_from_the_bus(underlay: Underlay, tmp_path: Path) -> None:
    (ns_a, host_a), (ns_b, host_b) = underlay.host(), underlay.host()
    a, b = Identity("alpha", 1), Identity("bravo", 2)
    a.endpoint, b.endpoint = f"{host_a}:{PORT}", f"{host_b}:{PORT}"
    node_a = start_meshsup(underlay, tmp_path, a, [b], ns=ns_a, env=TIMING)
    node_b = start_meshsup(underlay, tmp_path, b, [a], ns=ns_b)
    assert ping(ns_a, b.v4)
    key_b = base64.b64decode(b.public)
    workers = sum(1 for x in node_a.status()["actors"] if x["kind"] == "crypto")
    worker = f"crypto-{owner(key_b, workers)}"
    magicsock = Outbox(Runtime(node_a.state_dir).inbox)

    def path_set(port: int) -> None:
        assert magicsock.send(worker, PathSet(peer=key_b, host=host_b, port=port, trusted_for=3600.0))

    listener: subprocess.Popen[str] | None = None
    try:
        # magicsock moves bravo: alpha's socket for it follows, and what it reads there of disco is magicsock's.
        path_set(ELSEWHERE)
        node_a.wait(lambda: peer_status(node_a)["endpoint"] == f"{host_b}:{ELSEWHERE}", what="the path moved")
        listener = run_python(ns_b, LISTENER, host_b, host_a, str(ELSEWHERE), str(PORT))
        node_a.wait(lambda: node_a.counters()["crypto"].get("underlay_in", 0) == 1, what="disco handed on")
        # Nothing answers WireGuard there (bravo still sends from its port, which no longer moves it):
        # after data_timeout of pings the path is demoted.
        assert not ping(ns_a, b.v4, count=4, timeout=5)
        stdout, _ = listener.communicate(timeout=10)
        assert int(stdout.split()[-1]) == 3, "alpha's pings went where magicsock said"
        demoted = node_a.wait(lambda: peer_status(node_a)["demoted"], what="the path demoted")
        assert demoted == "no WireGuard data from it for 2 s while sending"
        assert peer_status(node_a)["endpoint"] == f"{host_b}:{ELSEWHERE}"  # no relay: still the only way
        # magicsock names bravo's port again: the tunnel works, and the demotion is gone with the path.
        path_set(PORT)
        node_a.wait(lambda: peer_status(node_a)["endpoint"] == b.endpoint, what="the path moved back")
        assert ping(ns_a, b.v4) and peer_status(node_a)["demoted"] is None
        # TSMP from magicsock is sealed to bravo, whose worker hands it to its magicsock, not its TUN.
        packets = [tsmp.disco_advertisement(a.v4, b.v4, bytes(range(1, 33))), tsmp.ping(a.v4, b.v4, b"12345678")]
        assert magicsock.send(worker, TsmpBatch(peer=key_b, packets=batch.pack(packets)))
        node_b.wait(lambda: node_b.counters()["crypto"].get("tsmp_received", 0) >= 2, what="TSMP at bravo")
        assert node_a.counters()["crypto"]["tsmp_sent"] >= 2
        assert all(x["restarts"] == 0 for x in node_a.status()["actors"])
    finally:
        magicsock.close()
        if listener is not None and listener.poll() is None:
            listener.kill()
            listener.wait()

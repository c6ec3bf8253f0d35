"""The filter's rule in flow records, through real namespaces: alpha filters and ships flow
records to rsyslog; bravo's ping, accepted by rule 1, is logged with `"rule": 1`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.netlog_fixtures import Rsyslog, free_port, wait_until
from tests.nodes import is_root
from tests.topology import Underlay, alpha_and_bravo, filter_stanza, have, ping, start_meshsup

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(not is_root() or bool(have("ping")), reason=have("ping") or "needs root"),
]

RULES = filter_stanza(
    ("accept", ["bravo"], ["alpha:22"], "tcp"),
    ("accept", ["bravo"], ["alpha:*"], "icmp"),
)


def test_a_connection_a_rule_accepted_names_the_rule_in_flow_records(tmp_path: Path) -> None:
    u = Underlay()
    rsyslog: Rsyslog | None = None
    try:
        (ns_a, a), (ns_b, b) = alpha_and_bravo(u)
        rsyslog = Rsyslog(tmp_path / "rsyslog", free_port(), ns_a)
        rsyslog.start()
        netlog = f'[netlog]\ninterval = 1\n[[netlog.collectors]]\nkind = "syslog"\naddress = "tcp://127.0.0.1:{rsyslog.port}"\n'
        start_meshsup(u, tmp_path, a, [b], ns=ns_a, extra=RULES + netlog)
        start_meshsup(u, tmp_path, b, [a], ns=ns_b)
        assert ping(ns_b, a.v4)  # accepted by rule 1
        assert ping(ns_a, b.v6)  # alpha opened it: no rule decided it

        def pings(proto: int, mine: str, theirs: str) -> list[dict[str, Any]]:
            assert rsyslog is not None
            records = [json.loads(x["msg"]) for x in rsyslog.messages() if x["msgid"] == "flowlog"]
            ends = (proto, f"{mine}:0", f"{theirs}:0")
            return [e for r in records for e in r.get("virtualTraffic", []) if (e["proto"], e["src"], e["dst"]) == ends]

        v4, v6 = (1, a.v4, b.v4), (58, f"[{a.v6}]", f"[{b.v6}]")
        assert wait_until(lambda: bool(pings(*v4)) and bool(pings(*v6)), 15), (pings(*v4), pings(*v6))
        first = pings(*v4)[0]  # the window bravo's first echo was accepted in
        assert first["rule"] == 1 and first["rxPkts"] >= 1, first
        assert all("rule" not in e for e in pings(*v6)), pings(*v6)
    finally:
        if rsyslog is not None:
            rsyslog.stop()
        u.close()

"""Flow logs and the node's own logs of real meshsup nodes, read back from real collectors.

Each node ships to collectors on the loopback of its own network namespace:
rsyslog (RFC 5424 over TCP), nfcapd (IPFIX) and systemd-journal-remote
(journal export over HTTP). Traffic is iperf3 and ping through the tunnel to
a second meshsup node or to wireguard-go.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from tests.netlog_fixtures import JournalRemote, Nfcapd, Rsyslog, free_port, wait_until
from tests.nodes import MESHSUP, REPO, Netns, Node, is_root
from tests.topology import Identity, Underlay, WgGo, have, iperf3, meshsup_config, ping

TOOLS = ("wireguard-go", "wg", "iperf3", "ping", "rsyslogd")
pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(not is_root() or bool(have(*TOOLS)), reason=have(*TOOLS) or "needs root"),
]

INTERVAL = 1  # seconds per window: short, so tests see many windows
TCP, ICMP = 6, 1


class Site:
    """A meshsup node ("alpha") and a peer ("bravo") on the underlay, alpha's collectors in its namespace."""

    def __init__(
        self, u: Underlay, tmp: Path, bravo_kind: str = "wireguard-go", bravo_extra_ips: tuple[str, ...] = ()
    ) -> None:
        self.u, self.tmp = u, tmp
        (self.ns_a, addr_a), (self.ns_b, addr_b) = u.host(), u.host()
        self.a, self.b = Identity("alpha", 1), Identity("bravo", 2)
        self.a.endpoint, self.b.endpoint = f"{addr_a}:51820", f"{addr_b}:51820"
        self.bravo_allowed = [*self.b.allowed(), *bravo_extra_ips]
        self.rsyslog = Rsyslog(tmp / "rsyslog", free_port(), self.ns_a)
        self.node: Node | None = None
        self.config: Path | None = None
        if bravo_kind == "wireguard-go":
            wg = u.track(WgGo(self.ns_b, self.b, tmp))
            wg.add_peer(self.a)
        else:
            cfg = meshsup_config(tmp, self.b, [self.a])
            u.track(Node(tmp, "--config", str(cfg), netns=self.ns_b)).wait_ready()

    def write_config(self, extra: str, dns_listen: str = "127.0.0.1:53") -> Path:
        path = meshsup_config(self.tmp, self.a, [self.b], extra=extra)
        text = path.read_text().replace('listen = ["127.0.0.1:53"]', f'listen = ["{dns_listen}"]')
        allowed = json.dumps(self.b.allowed())
        path.write_text(text.replace(f"allowed_ips = {allowed}", f"allowed_ips = {json.dumps(self.bravo_allowed)}"))
        self.config = path
        return path

    def start(self, state_dir: Path | None = None) -> Node:
        """Start alpha; with `state_dir`, the same node again (its key, spool and window log)."""
        assert self.config is not None
        again = ("--state-dir", str(state_dir)) if state_dir else ()  # the last --state-dir wins
        node = self.u.track(Node(self.tmp, "--config", str(self.config), *again, netns=self.ns_a))
        node.state_dir = state_dir or node.state_dir
        self.node = node
        node.wait_ready()
        return node

    def start_shipping(self, extra: str, dns_listen: str = "127.0.0.1:53") -> Node:
        """alpha with `extra` config, shipping to its rsyslog."""
        self.write_config(extra, dns_listen)
        self.rsyslog.start()
        return self.start()

    def pings(self) -> dict[str, Any]:
        """How alpha's pings to bravo show in virtualTraffic."""
        return {"proto": ICMP, "src": f"{self.a.v4}:0", "dst": f"{self.b.v4}:0"}

    def close(self) -> None:
        self.rsyslog.stop()


@pytest.fixture
def site_factory(underlay: Underlay, tmp_path: Path) -> Iterator[Any]:
    sites: list[Site] = []

    def make(**kw: Any) -> Site:
        site = Site(underlay, tmp_path, **kw)
        sites.append(site)
        return site

    yield make
    for site in sites:
        site.close()


def syslog_netlog(port: int) -> str:
    return (
        f'[netlog]\ninterval = {INTERVAL}\n[[netlog.collectors]]\nkind = "syslog"\naddress = "tcp://127.0.0.1:{port}"\n'
    )


def flow_records(rsyslog: Rsyslog) -> list[dict[str, Any]]:
    """Flow records as rsyslog wrote them, duplicates (at least once) removed, in window order."""
    unique = {m["msg"]: json.loads(m["msg"]) for m in rsyslog.messages() if m["msgid"] == "flowlog"}
    return sorted(unique.values(), key=lambda r: (r["start"], r["end"]))


def entries(records: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [e for r in records for e in r.get(kind, [])]


def totals(records: list[dict[str, Any]], kind: str, match: dict[str, Any]) -> Counter[str]:
    out: Counter[str] = Counter()
    for e in entries(records, kind):
        if all(e.get(k) == v for k, v in match.items()):
            out.update({k: v for k, v in e.items() if isinstance(v, int) and k != "proto"})
    return out


def both_ways(site: Site, packets: int) -> bool:
    """Whether alpha's records hold `packets` pings each way. Sent and received are counted by
    different actors (tun-io reads the echoes, crypto writes the replies), so their flushes
    may land in different windows: wait for both."""
    got = totals(flow_records(site.rsyslog), "virtualTraffic", site.pings())
    return got["txPkts"] >= packets and got["rxPkts"] >= packets


def parse_time(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def assert_contiguous(records: list[dict[str, Any]], since: float, until: float) -> None:
    """Every window of a busy time has its record: each starts where the previous one ended.

    (A window without traffic has no record, so only windows inside
    [since, until], while traffic flowed, are checked.)
    """
    windows = sorted(
        {
            (r["start"], r["end"])
            for r in records
            if parse_time(r["end"]) > since + INTERVAL and parse_time(r["start"]) < until - INTERVAL
        }
    )
    assert windows, "no record while traffic flowed"
    assert parse_time(windows[0][0]) <= since + 2 * INTERVAL, f"{since}: first window {windows[0]}"
    assert parse_time(windows[-1][1]) >= until - 2 * INTERVAL, f"{until}: last window {windows[-1]}"
    gaps = [(a, b) for a, b in zip(windows, windows[1:]) if a[1] != b[0]]
    assert not gaps, f"missing windows between {gaps}"


class Pinger:
    """ping at 5 per second in the background; `wait` checks every echo had its reply."""

    def __init__(self, ns: Netns, addr: str, count: int, warm_up: str) -> None:
        # The handshake first, so that no echo waits for it; to another address, so that
        # these echoes are all the ones counted under `addr`.
        assert ping(ns, warm_up, count=1)
        self.started = time.time()
        self.proc = ns.popen(
            "ping", "-c", str(count), "-i", "0.2", "-W", "2", addr, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        self.ended = 0.0

    def wait(self, timeout: float) -> int:
        out, _ = self.proc.communicate(timeout=timeout)
        self.ended = time.time()
        line = next(line for line in out.splitlines() if "packets transmitted" in line)
        sent, received = (int(part.split()[0]) for part in line.split(", ")[:2])
        assert sent == received, out
        return received


# --- counting: what iperf3 moved, in the records ---------------------------------


def test_iperf_transfer_is_in_rsyslog_and_nfcapd_records(site_factory: Any, tmp_path: Path) -> None:
    site = site_factory(bravo_kind="meshsup")
    nfcapd = Nfcapd(tmp_path / "nfcapd", free_port(), site.ns_a)
    site.write_config(
        syslog_netlog(site.rsyslog.port)
        + f'[[netlog.collectors]]\nkind = "ipfix"\naddress = "udp://127.0.0.1:{nfcapd.port}"\n'
    )
    site.rsyslog.start()
    nfcapd.start()
    try:
        node = site.start()
        assert ping(site.ns_a, site.b.v4)
        since = time.time()
        result = iperf3(site.ns_a, site.ns_b, site.b.v4, seconds=5)
        until = time.time()
        assert "error" not in result, result["error"]
        pings = Pinger(site.ns_a, site.b.v4, count=100, warm_up=site.b.v6)  # traffic up to the stop
        time.sleep(1)
        stopped_at = time.time()
        node.cli("stop")  # netlog stops last: the last window is closed and flushed on the way out
        assert node.proc.wait(20) == 0
        pings.proc.terminate()
        pings.proc.wait()
    finally:
        nfcapd.stop()
    path = nfcapd.last_file()
    received, sent_by_iperf = result["end"]["sum_received"]["bytes"], result["end"]["sum_sent"]["bytes"]
    records = flow_records(site.rsyslog)
    assert_contiguous(records, since, until)
    data = [e for e in entries(records, "virtualTraffic") if e.get("dst") == f"{site.b.v4}:5201"]
    port = max(data, key=lambda e: e.get("txBytes", 0))["src"]  # iperf3's data connection
    sent = totals(records, "virtualTraffic", {"proto": TCP, "src": port, "dst": f"{site.b.v4}:5201"})
    # Inner IP bytes are iperf3's payload plus 52 bytes of IPv4 and TCP header per 1368-byte
    # segment: at least what the receiver got, at most what the sender wrote (the end of its
    # send buffer still crosses after the receiver stops counting) and its retransmissions.
    overhead = (1368 + 52) / 1368
    retransmitted = result["end"]["sum_sent"].get("retransmits", 0) * 1368
    low, high = received * overhead * 0.98, (sent_by_iperf + retransmitted) * overhead * 1.02
    assert low <= sent["txBytes"] <= high, (sent, result["end"]["sum_sent"], received)
    assert sent["rxPkts"] > 0 and sent["txPkts"] >= received // 1368
    assert not any(port in json.dumps(entries(records, k)) for k in ("subnetTraffic", "exitTraffic"))
    physical = totals(records, "physicalTraffic", {"src": f"{site.b.v4}:0", "dst": site.b.endpoint})
    assert physical["txBytes"] > sent["txBytes"]  # the same packets, wrapped in WireGuard
    # Every inner packet crossed in a datagram at least; the crypto worker counts those on its
    # peer socket, both ways (only the first handshake goes through magicsock).
    assert physical["txPkts"] >= sent["txPkts"] and physical["rxPkts"] >= sent["rxPkts"] > 0, (physical, sent)
    last = records[-1]
    assert parse_time(last["end"]) >= stopped_at and totals([last], "virtualTraffic", site.pings())["txPkts"] > 0
    assert not list((node.state_dir / "spool" / "flows" / "syslog-0").iterdir())  # all delivered at stop
    # nfcapd holds the same counts, per window, and saw no sequence gap.
    ip, sport = port.rsplit(":", 1)
    flows = [f for f in nfcapd.flows(path) if (f["sa"], f["sp"], f["da"], f["dp"]) == (ip, sport, site.b.v4, "5201")]
    assert sum(int(f["ibyt"]) for f in flows) == sent["txBytes"]
    assert sum(int(f["ipkt"]) for f in flows) == sent["txPkts"]
    assert sum(int(f["obyt"]) for f in flows) == sent["rxBytes"]
    assert nfcapd.stats(path)["Sequence failures"] == "0"


# --- classification ----------------------------------------------------------------


def test_virtual_subnet_exit_and_physical_traffic_each_land_in_their_list(site_factory: Any) -> None:
    if have("dig"):
        pytest.skip(have("dig"))
    # bravo routes a LAN (10.20.0.0/16) and is alpha's exit node (0.0.0.0/0).
    site = site_factory(bravo_extra_ips=("10.20.0.0/16", "0.0.0.0/0"))
    site.ns_b.run("ip", "addr", "add", "10.20.0.1/32", "dev", "lo")  # a host on bravo's LAN
    site.ns_b.run("ip", "addr", "add", "203.0.113.5/32", "dev", "lo")  # a host out on the internet
    node = site.start_shipping(syslog_netlog(site.rsyslog.port), dns_listen=f"{site.a.v4}:53")
    for target in (site.b.v4, "10.20.0.1", "203.0.113.5"):
        assert ping(site.ns_a, target, count=3), target
    # bravo asks alpha's own DNS, over the tunnel: the node's service, never logged.
    site.ns_b.run("dig", f"@{site.a.v4}", "alpha.mesh", "+tries=1", "+time=2", check=False)
    a0, b0 = f"{site.a.v4}:0", f"{site.b.v4}:0"
    wanted = {
        "virtualTraffic": site.pings(),
        "subnetTraffic": {"proto": ICMP, "src": a0, "dst": "10.20.0.1:0"},
        "exitTraffic": {"proto": ICMP},
        "physicalTraffic": {"src": b0, "dst": site.b.endpoint},
    }

    def seen() -> dict[str, Counter[str]]:
        records = flow_records(site.rsyslog)
        return {kind: totals(records, kind, match) for kind, match in wanted.items()}

    assert wait_until(lambda: all(t["txPkts"] >= 3 and t["rxPkts"] >= 3 for t in seen().values()), 15), seen()
    records = flow_records(site.rsyslog)
    exits = entries(records, "exitTraffic")
    assert exits and all("src" not in e and "dst" not in e for e in exits)  # anonymised
    assert "203.0.113.5" not in json.dumps(records)
    assert "10.20.0.1" not in json.dumps(entries(records, "virtualTraffic") + exits)
    assert f"{site.a.v4}:53" not in json.dumps(records)  # DNS to the node itself
    assert node.counters()["netlog"]["skipped_flows"] > 0


# --- delivery: nothing lost ------------------------------------------------------------


@pytest.mark.slow
def test_every_window_arrives_after_rsyslog_was_stopped_for_30_s(site_factory: Any) -> None:
    site = site_factory()
    node = site.start_shipping(syslog_netlog(site.rsyslog.port))
    pings = Pinger(site.ns_a, site.b.v4, count=200, warm_up=site.b.v6)  # 40 s
    time.sleep(4)
    site.rsyslog.stop()
    time.sleep(30)
    assert not site.rsyslog.proc and node.counters()["netlog"]["flows.syslog-0.errors"] > 0
    site.rsyslog.start()
    replies = pings.wait(timeout=60)
    icmp = site.pings()
    assert wait_until(lambda: both_ways(site, replies), 30)
    records = flow_records(site.rsyslog)
    assert_contiguous(records, pings.started, pings.ended)
    got = totals(records, "virtualTraffic", icmp)
    assert (got["txPkts"], got["rxPkts"]) == (replies, replies)


def test_no_record_is_lost_to_a_killed_netlog_or_a_node_restart(site_factory: Any) -> None:
    site = site_factory()
    node = site.start_shipping(syslog_netlog(site.rsyslog.port))
    pings = Pinger(site.ns_a, site.b.v4, count=40, warm_up=site.b.v6)  # 8 s
    time.sleep(3)
    victim = node.actors()["netlog"]["pid"]
    os.kill(victim, signal.SIGKILL)  # mid-window, with counts not yet in any record
    node.wait(
        lambda: (a := node.actors()["netlog"])["state"] == "running" and a["pid"] != victim, what="netlog restarted"
    )
    first = pings.wait(timeout=30)
    site.rsyslog.stop()  # the node stops with records still to deliver
    node.cli("stop")
    assert node.proc.wait(20) == 0
    assert list((node.state_dir / "spool" / "flows" / "syslog-0").iterdir())
    restarted_at = time.time()
    again = site.start(node.state_dir)
    pings_again = Pinger(site.ns_a, site.b.v4, count=25, warm_up=site.b.v6)
    second = pings_again.wait(timeout=30)
    site.rsyslog.start()
    icmp = site.pings()
    total = first + second
    assert wait_until(lambda: both_ways(site, total), 30), (
        total,
        totals(flow_records(site.rsyslog), "virtualTraffic", icmp),
        again.counters()["netlog"],
    )
    records = flow_records(site.rsyslog)
    got = totals(records, "virtualTraffic", icmp)
    assert (got["txPkts"], got["rxPkts"]) == (total, total)
    assert all(parse_time(r["end"]) <= restarted_at or parse_time(r["start"]) >= restarted_at for r in records)
    assert_contiguous(records, pings.started, pings.ended)  # across the kill too
    assert_contiguous(records, pings_again.started, pings_again.ended)
    assert again.counters()["netlog"]["records"] > 0


# --- the node's own logs, and HTTP to systemd-journal-remote ------------------------------


def test_the_nodes_own_logs_reach_rsyslog_as_rfc5424_naming_the_actor(site_factory: Any) -> None:
    site = site_factory()
    node = site.start_shipping(
        f'[logging]\nlevel = "info"\n[[logging.collectors]]\nkind = "syslog"\n'
        f'address = "tcp://127.0.0.1:{site.rsyslog.port}"\n'
    )
    magicsock = node.actors()["magicsock"]["pid"]
    node.cli("fault", "crypto-0", "crash", check=False)  # dies unacked; the supervisor logs it (warning)

    def logs() -> list[dict[str, str]]:
        return [m for m in site.rsyslog.messages() if m["msgid"] == "log"]

    def died() -> list[dict[str, str]]:
        return [m for m in logs() if json.loads(m["msg"])["event"] == "actor died"]

    assert wait_until(lambda: bool(died()), 15), logs()[-5:]
    actors = {m["sd"].split('actor="')[1].split('"')[0] for m in logs()}
    assert {"supervisor", "magicsock"} <= actors, actors
    [listening] = [m for m in logs() if json.loads(m["msg"]).get("event") == "listening"]
    assert (listening["hostname"], listening["app_name"], listening["procid"]) == ("alpha", "meshsup", str(magicsock))
    assert listening["sd"] == '[meshsup@32473 actor="magicsock" level="info"]'
    [death] = died()
    event = json.loads(death["msg"])
    assert death["sd"] == '[meshsup@32473 actor="supervisor" level="warning"]'
    assert (event["name"], event["actor"]) == ("crypto-0", "supervisor")
    assert not [m for m in site.rsyslog.messages() if m["msgid"] == "flowlog"]  # no [netlog] collectors


def test_journal_remote_takes_flow_records_and_logs_over_http(site_factory: Any, tmp_path: Path) -> None:
    site = site_factory()
    journal = JournalRemote(tmp_path / "journal", free_port(), site.ns_a)
    http = f'kind = "http"\naddress = "http://127.0.0.1:{journal.port}/upload"\nformat = "journal"\n'
    site.write_config(f"[netlog]\ninterval = {INTERVAL}\n[[netlog.collectors]]\n{http}[[logging.collectors]]\n{http}")
    journal.start()
    try:
        node = site.start()
        assert ping(site.ns_a, site.b.v4, count=5)
        icmp = site.pings()

        def flows() -> list[dict[str, Any]]:
            return [json.loads(str(e["MESSAGE"])) for e in journal.entries() if e.get("MESHSUP_RECORD") == "flowlog"]

        assert wait_until(lambda: totals(flows(), "virtualTraffic", icmp)["rxPkts"] >= 5, 15), flows()
        got = totals(flows(), "virtualTraffic", icmp)
        assert got["txPkts"] == got["rxPkts"] == 5
        logs = [e for e in journal.entries() if e.get("MESHSUP_RECORD") == "log"]
        # At least once: a resend after a slow answer may deliver a line twice; the newest counts.
        *_, listening = [e for e in logs if e["MESSAGE"] == "listening"]
        assert listening["MESHSUP_ACTOR"] == "magicsock" and listening["PRIORITY"] == "6"
        assert listening["SYSLOG_PID"] == str(node.actors()["magicsock"]["pid"])
        assert listening["SYSLOG_IDENTIFIER"] == "meshsup"
    finally:
        journal.stop()


# --- configuration --------------------------------------------------------------------


@pytest.mark.parametrize(
    "table, key",
    [
        ('kind = "ipfix"\naddress = "udp://127.0.0.1:4739"', "logging.collectors[0].kind"),
        ('kind = "http"\naddress = "http://127.0.0.1:port/"', "logging.collectors[0].address"),
        ('kind = "syslog"\naddress = "tls://127.0.0.1:6514"\nca_file = "garbage.pem"', "logging.collectors[0].ca_file"),
        (
            'kind = "http"\naddress = "http://127.0.0.1/upload"\nformat = "journal"\ngzip = true',
            "logging.collectors[0].gzip",
        ),
        ('kind = "syslog"\naddress = "tcp://127.0.0.1:6514"\nlevel = "loud"', "logging.collectors[0].level"),
    ],
)
def test_a_wrong_log_collector_is_refused_at_start(tmp_path: Path, table: str, key: str) -> None:
    (tmp_path / "garbage.pem").write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    config = tmp_path / "node.toml"
    config.write_text(f"[[logging.collectors]]\n{table}\n")
    r = subprocess.run(
        [*MESHSUP, "start", "--state-dir", str(tmp_path / "state"), "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert r.returncode == 2, r.stderr
    [line] = r.stderr.strip().splitlines()
    assert line.startswith(f"meshsup: config error: {config}: {key}: "), line

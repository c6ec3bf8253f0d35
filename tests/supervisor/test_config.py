"""Wrong configs are refused before anything starts, with file, key and problem."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from meshsup.actors.settings.keys import b64, generate_private, public_of
from meshsup.supervisor import cli
from meshsup.supervisor import config as cfg
from tests.nodes import REPO

PEER = b64(public_of(generate_private()))


def write(tmp_path: Path, body: str, mode: int = 0o600, name: str = "n.toml") -> Path:
    p = tmp_path / name
    p.write_text(body)
    p.chmod(mode)
    return p


def start(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "meshsup.supervisor.cli", "start", "--state-dir", str(tmp_path / "state"), *args],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


BAD = [
    ("unknown key", "[node]\ncolour = 'red'\n", "node.colour", "unknown key"),
    ("bad key", "[node]\nprivate_key = 'abc'\n", "node.private_key", "base64"),
    ("short key", "[node]\nprivate_key = 'YWJj'\n", "node.private_key", "decodes to 3 bytes"),
    (
        "bad cidr",
        f"[[peers]]\npublic_key = '{PEER}'\nallowed_ips = ['10.0.0.0/33']\n",
        "peers[0].allowed_ips",
        "not an IP prefix",
    ),
    (
        "bad endpoint",
        f"[[peers]]\npublic_key = '{PEER}'\nendpoints = ['198.51.100.2']\n",
        "peers[0].endpoints",
        "not host:port",
    ),
    ("missing peer key", "[[peers]]\nname = 'x'\n", "peers[0].public_key", "is required"),
    ("unreadable key file", "[node]\nprivate_key_file = 'nope.key'\n", "node.private_key_file", "cannot read"),
    ("wrong type", "[node]\nlisten_port = '51820'\n", "node.listen_port", "must be int"),
    ("syntax", "[node\n", "(syntax)", ""),
]


@pytest.mark.parametrize("label,body,key,problem", BAD, ids=[b[0] for b in BAD])
def test_bad_toml_is_refused_with_one_line(tmp_path, label, body, key, problem) -> None:
    path = write(tmp_path, body)
    r = start(tmp_path, "--config", str(path))
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1
    assert str(path) in lines[0] and key in lines[0] and problem in lines[0]
    assert not (tmp_path / "state" / "run").exists()  # nothing started
    assert r.stdout == ""


def test_missing_config_file(tmp_path) -> None:
    r = start(tmp_path, "--config", str(tmp_path / "absent.toml"))
    assert r.returncode == 2 and "absent.toml" in r.stderr and "cannot read" in r.stderr


def test_key_file_readable_by_others(tmp_path) -> None:
    key = write(tmp_path, b64(generate_private()), mode=0o644, name="k.key")
    path = write(tmp_path, f"[node]\nprivate_key_file = '{key}'\n")
    r = start(tmp_path, "--config", str(path))
    assert r.returncode == 2
    assert "node.private_key_file" in r.stderr and "readable by others" in r.stderr


def test_wg_quick_refusals(tmp_path) -> None:
    path = write(tmp_path, "[Interface]\nPrivateKey = nope\n", name="wg0.conf")
    r = start(tmp_path, "--wg-config", str(path))
    assert r.returncode == 2 and "[Interface] PrivateKey: decodes to 3 bytes" in r.stderr
    path = write(
        tmp_path,
        f"[Interface]\nPrivateKey = {b64(generate_private())}\n[Peer]\nPublicKey = {PEER}\nAllowedIPs = 10.1.0.0/99\n",
        name="wg4.conf",
    )
    r = start(tmp_path, "--wg-config", str(path))
    assert r.returncode == 2 and "[Peer] 1 AllowedIPs" in r.stderr and "not an IP prefix" in r.stderr
    path = write(tmp_path, f"[Interface]\nPrivateKey = {b64(generate_private())}\n", mode=0o644, name="wg2.conf")
    r = start(tmp_path, "--wg-config", str(path))
    assert r.returncode == 2 and "readable by others" in r.stderr


UNAPPLIED = [
    ("Table = 1234", "routes AllowedIPs in the main table"),
    ("Table = off", "routes AllowedIPs in the main table"),
    ("FwMark = 0x1234", "no policy routing"),
    ("SaveConfig = true", "never writes the file back"),
    ("PreUp = true", "runs no commands"),
    ("PostUp = rm -rf /", "runs no commands"),
    ("predown = true", "runs no commands"),
    ("PostDown = true", "runs no commands"),
]


@pytest.mark.parametrize("line,why", UNAPPLIED, ids=[u[0].split()[0] for u in UNAPPLIED])
def test_wg_quick_keys_meshsup_does_not_apply_are_refused_by_name(tmp_path, line, why) -> None:
    path = write(tmp_path, f"[Interface]\nPrivateKey = {b64(generate_private())}\n{line}\n", name="wg1.conf")
    r = start(tmp_path, "--wg-config", str(path))
    key = line.split()[0]
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert f"{path}: line 3: {key}: not applied" in r.stderr and why in r.stderr


def test_wg_quick_keys_that_ask_for_nothing_are_accepted(tmp_path) -> None:
    path = write(
        tmp_path,
        f"[Interface]\nPrivateKey = {b64(generate_private())}\nTable = auto\nFwMark = off\nSaveConfig = false\n",
        name="wg1.conf",
    )
    assert cfg.load_wg_quick(path, tmp_path).node.interface == "wg1"


def _args(*argv: str) -> argparse.Namespace:
    return cli._parser().parse_args(["start", *argv])


def test_wg_quick_names_the_interface_after_the_file(tmp_path) -> None:
    body = f"[Interface]\nPrivateKey = {b64(generate_private())}\n"
    path = write(tmp_path, body, name="wg-office.conf")
    assert cli.load_config(_args("--wg-config", str(path)), tmp_path).node.interface == "wg-office"
    conf = cli.load_config(_args("--wg-config", str(path), "--interface", "tun7"), tmp_path)
    assert conf.node.interface == "tun7"  # --interface wins, as over a TOML file
    # A file that names no interface is fine once --interface names it.
    odd = write(tmp_path, body, name="my office vpn.conf")
    assert cli.load_config(_args("--wg-config", str(odd), "--interface", "tun7"), tmp_path).node.interface == "tun7"


@pytest.mark.parametrize("name", ["my office.conf", "wg0.cfg", "averyveryverylong.conf", "..conf", "wg:0.conf"])
def test_wg_quick_file_that_names_no_interface_is_refused(tmp_path, name) -> None:
    path = write(tmp_path, f"[Interface]\nPrivateKey = {b64(generate_private())}\n", name=name)
    r = start(tmp_path, "--wg-config", str(path))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert f"{path}: (file name): wg-quick names the interface after the file" in r.stderr
    assert "--interface" in r.stderr


def test_wg_quick_is_read_as_wg_quick_reads_it(tmp_path) -> None:
    priv = generate_private()
    psk = b64(generate_private())
    path = write(
        tmp_path,
        f"""
[Interface]
PrivateKey = {b64(priv)}
ListenPort = 51999
Address = 100.64.0.1/32, fd7a:115c:a1e0::1/128
DNS = 198.51.100.53, corp.example
MTU = 1380

[Peer]
PublicKey = {PEER}
PresharedKey = {psk}
AllowedIPs = 100.64.0.2/32, 10.20.0.0/16
Endpoint = 198.51.100.2:51820
PersistentKeepalive = 25
""",
        name="wg3.conf",
    )
    c = cfg.load_wg_quick(path, tmp_path)
    assert c.node.public_key == public_of(priv) and c.node.interface == "wg3"
    assert c.node.listen_port == 51999 and c.node.mtu == 1380
    assert [str(a) for a in c.node.addresses] == ["100.64.0.1/32", "fd7a:115c:a1e0::1/128"]
    (peer,) = c.peers
    assert [str(n) for n in peer.allowed_ips] == ["100.64.0.2/32", "10.20.0.0/16"]
    assert peer.endpoints == (("198.51.100.2", 51820),) and peer.persistent_keepalive == 25
    assert peer.preshared_key is not None and b64(peer.preshared_key) == psk
    assert [str(u) for u in c.dns.upstreams] == ["udp://198.51.100.53:53"] and c.dns.set_os_resolver
    assert c.dns.search == ("corp.example",)


def test_toml_full_example_is_accepted(tmp_path) -> None:
    c = cfg.load_toml(REPO / "deploy" / "example.toml", tmp_path)
    assert c.peers[0].name == "bravo"
    assert (c.actors.crypto, c.actors.dns) == (2, 1)


def test_embedded_default_is_stable(tmp_path) -> None:
    a = cfg.embedded_default(tmp_path)
    b = cfg.embedded_default(tmp_path)
    assert a.node.public_key == b.node.public_key
    assert a.node.interface == "meshsup0" and a.peers == ()
    v4, v6 = (str(address) for address in a.node.addresses)
    assert v4.startswith("100.") and v6.startswith("fd7a:115c:a1e0:")


@pytest.mark.parametrize(
    "body,key,problem",
    [
        ("[dns]\nupstreams = ['ftp://198.51.100.53']\n", "dns.upstreams", "ftp"),
        ("[dns]\nbogus = 1\n", "dns", "bogus"),
        ("[dns]\nsearch = ['corp example']\n", "dns.search[0]", "has a label"),
        ("[[dns.rules]]\nmatch = 'nope:x'\naction = 'reject'\n", "dns.rules[0]", ""),
        (
            "[[netlog.collectors]]\nkind = 'carrier-pigeon'\naddress = 'tcp://127.0.0.1:1'\n",
            "netlog.collectors[0].kind",
            "",
        ),
        ("[[netlog.collectors]]\nkind = 'syslog'\naddress = 'not a url'\n", "netlog.collectors[0].address", ""),
        (
            "[[netlog.collectors]]\nkind = 'syslog'\naddress = 'tls://127.0.0.1:6514'\n"
            "ca_file = '/nonexistent/ca.pem'\n",
            "netlog.collectors[0].ca_file",
            "",
        ),
    ],
)
def test_dns_and_collector_sections_are_checked_at_start(tmp_path, body, key, problem) -> None:
    path = write(tmp_path, body)
    r = start(tmp_path, "--config", str(path))
    assert r.returncode == 2, r.stderr
    assert key in r.stderr and problem in r.stderr and len(r.stderr.strip().splitlines()) == 1

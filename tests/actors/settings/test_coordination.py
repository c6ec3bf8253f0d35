"""[coordination]: parsed and checked, carried on the bus whole."""

from __future__ import annotations

from pathlib import Path

import pytest

from meshsup.actors.settings import ConfigError, Settings, parse
from meshsup.actors.settings.keys import b64, generate_private


def settings(tmp_path: Path, coordination: dict[str, object], node: dict[str, object] | None = None) -> Settings:
    doc = {"node": {"private_key": b64(generate_private()), **(node or {})}, "coordination": coordination}
    return parse("node.toml", doc, tmp_path, tmp_path)


def test_coordination_parses_and_travels_whole(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text("x")
    s = settings(tmp_path, {"servers": ["nats://198.51.100.10:4222"], "mesh": "home", "ca_file": "ca.pem"})
    c = s.coordination
    assert c is not None and c.bucket == "meshsup-home" and c.allocate and c.lifetime == 30.0
    assert c.ca_file == tmp_path / "ca.pem"
    assert Settings.from_wire(s.to_wire()) == s
    given = settings(tmp_path, {"servers": ["nats://h:4222"], "mesh": "m"}, {"addresses": ["100.64.0.1/32"]})
    assert given.coordination is not None and not given.coordination.allocate


@pytest.mark.parametrize(
    ("table", "key", "problem"),
    [
        ({"mesh": "m"}, "coordination.servers", "is required"),
        ({"servers": ["http://h:1"], "mesh": "m"}, "coordination.servers", "not nats://"),
        ({"servers": ["nats://h:1"]}, "coordination.mesh", "is required"),
        ({"servers": ["nats://h:1"], "mesh": "a.b"}, "coordination.mesh", "letters"),
        ({"servers": ["nats://h:1"], "mesh": "m", "lifetime": 1}, "coordination.lifetime", "outside"),
        ({"servers": ["nats://h:1"], "mesh": "m", "creds_file": "none"}, "coordination.creds_file", "not a readable"),
        ({"servers": ["nats://h:1"], "mesh": "m", "pool4": "fd00::/64"}, "coordination.pool4", "IPv4"),
        ({"servers": ["nats://h:1"], "mesh": "m", "colour": 1}, "coordination.colour", "unknown key"),
    ],
)
def test_wrong_coordination_is_refused_by_key(tmp_path: Path, table: dict[str, object], key: str, problem: str) -> None:
    with pytest.raises(ConfigError) as err:
        settings(tmp_path, table)
    assert err.value.key == key and problem in err.value.problem

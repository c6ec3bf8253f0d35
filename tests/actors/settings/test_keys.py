"""The node's disco key: made once in the state dir, apart from its WireGuard key, and
held to the same safety checks."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from nacl.public import PrivateKey

from meshsup.actors.kernel.files import UnsafePath
from meshsup.actors.settings import keys


def test_the_disco_key_is_made_once_0600_and_apart_from_the_wireguard_key(tmp_path: Path) -> None:
    state = tmp_path / "state"
    disco = keys.load_or_create_disco(state)
    path = state / keys.DISCO_KEY_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(state.stat().st_mode) == 0o700
    assert keys.parse_key(path.read_text()) == disco
    assert keys.load_or_create_disco(state) == disco, "a restart keeps it"
    assert keys.load_or_create(state / "private.key") != disco
    assert bytes(PrivateKey(disco).public_key) == keys.public_of(disco), "a NaCl box key as X25519 has it"


def test_a_disco_key_others_can_read_is_refused_by_its_name(tmp_path: Path) -> None:
    keys.load_or_create_disco(tmp_path)
    path = tmp_path / keys.DISCO_KEY_FILE
    path.chmod(0o640)
    with pytest.raises(UnsafePath, match=f"disco key file {path} .* is readable by group or others: chmod 0600 it"):
        keys.load_or_create_disco(tmp_path)

"""Which crypto worker owns a peer: every stage computes the same answer.

Sharding by peer keeps each peer's packets on one worker, so per-peer order
and nonce order hold with no re-sequencing, and a peer's sessions live in
exactly one process.
"""
from __future__ import annotations

import hashlib


def owner(public_key: bytes, workers: int) -> int:
    return int.from_bytes(hashlib.blake2s(public_key, digest_size=4).digest(), "big") % workers

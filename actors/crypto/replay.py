"""Sliding-window replay filter for transport counters (RFC 6479 style).

A ring of 128 64-bit blocks; one block is always being recycled, so the
window covers (128 - 1) * 64 = 8128 counters behind the highest seen, as in
wireguard-go's replay.go. Checked only after a packet decrypted, so forged
packets cannot move the window.
"""

from __future__ import annotations

_BLOCK_BITS_LOG = 6
_BLOCK_BITS = 1 << _BLOCK_BITS_LOG
_RING_BLOCKS = 1 << 7
_BLOCK_MASK = _RING_BLOCKS - 1
_BIT_MASK = _BLOCK_BITS - 1
WINDOW_SIZE = (_RING_BLOCKS - 1) * _BLOCK_BITS


class ReplayFilter:
    __slots__ = ("_last", "_ring")

    def __init__(self) -> None:
        self._last = 0
        self._ring = [0] * _RING_BLOCKS

    def validate(self, counter: int, limit: int) -> bool:
        """Accept ``counter`` once: False if at/over ``limit``, too old, or already seen."""
        if counter >= limit:
            return False
        ring = self._ring
        block = counter >> _BLOCK_BITS_LOG
        last = self._last
        if counter > last:
            current = last >> _BLOCK_BITS_LOG
            if block != current:
                # Clear the blocks the window slides over (all of them on a big jump).
                for i in range(current + 1, current + min(block - current, _RING_BLOCKS) + 1):
                    ring[i & _BLOCK_MASK] = 0
            self._last = counter
        elif last - counter > WINDOW_SIZE:
            return False
        block &= _BLOCK_MASK
        bit = 1 << (counter & _BIT_MASK)
        old = ring[block]
        if old & bit:
            return False
        ring[block] = old | bit
        return True

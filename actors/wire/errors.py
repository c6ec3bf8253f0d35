"""The one error the wire formats raise for input they refuse."""

from __future__ import annotations


class WireError(ValueError):
    """Input that is not a usable message; `reason` is a short label to count it by."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason

"""Fixtures the DNS tests share."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest


@pytest.fixture
def later() -> Iterator[Callable[[Any], Any]]:
    """Register things with stop(); they are stopped at teardown, newest first."""
    items: list[Any] = []

    def register(item: Any) -> Any:
        items.append(item)
        return item

    yield register
    for item in reversed(items):
        item.stop()

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, closing
from pathlib import Path
from typing import Any

import pytest

from tests.nodes import Netns, Node, is_root
from tests.topology import Underlay


def require_netns_mark(request: pytest.FixtureRequest) -> None:
    """`pytest -m "not netns"` runs the unit tests alone: a test making namespaces must say so."""
    if request.node.get_closest_marker("netns") is None:
        pytest.fail(f"{request.node.nodeid} makes network namespaces but is not marked netns")


@pytest.fixture
def netns(request: pytest.FixtureRequest) -> Iterator[Callable[..., Netns]]:
    """Factory for network namespaces, all removed at teardown."""
    require_netns_mark(request)
    if not is_root():
        pytest.skip("needs root for network namespaces")
    with ExitStack() as made:
        yield lambda prefix="ms": made.enter_context(closing(Netns(prefix)))


@pytest.fixture
def node_factory(tmp_path: Path, netns: Callable[..., Netns]) -> Iterator[Callable[..., Node]]:
    """Start meshsup nodes, each in a fresh namespace; all stopped at teardown."""
    with ExitStack() as started:

        def make(*args: str, env: dict[str, Any] | None = None, ns: Netns | None = None, faults: bool = True) -> Node:
            return started.enter_context(closing(Node(tmp_path, *args, env=env, netns=ns or netns(), faults=faults)))

        yield make


@pytest.fixture
def underlay(request: pytest.FixtureRequest) -> Iterator[Underlay]:
    require_netns_mark(request)
    u = Underlay()
    yield u
    u.close()

from __future__ import annotations

from collections.abc import Callable, Iterator
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
    made: list[Netns] = []

    def make(prefix: str = "ms") -> Netns:
        ns = Netns(prefix)
        made.append(ns)
        return ns

    yield make
    for ns in made:
        ns.close()


@pytest.fixture
def node_factory(tmp_path: Path, netns: Callable[..., Netns]) -> Iterator[Callable[..., Node]]:
    """Start meshsup nodes, each in a fresh namespace; all stopped at teardown."""
    nodes: list[Node] = []

    def make(*args: str, env: dict[str, Any] | None = None, ns: Netns | None = None, faults: bool = True) -> Node:
        n = Node(tmp_path, *args, env=env, netns=ns or netns(), faults=faults)
        nodes.append(n)
        return n

    yield make
    for n in nodes:
        n.close()


@pytest.fixture
def underlay(request: pytest.FixtureRequest) -> Iterator[Underlay]:
    require_netns_mark(request)
    u = Underlay()
    yield u
    u.close()

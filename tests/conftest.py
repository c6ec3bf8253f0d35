from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import pytest

from tests.nodes import Netns, Node, is_root
from tests.topology import Underlay


@pytest.fixture
def netns() -> Iterator[Callable[..., Netns]]:
    """Factory for network namespaces, all removed at teardown."""
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

    def make(*args: str, env: dict[str, Any] | None = None, ns: Netns | None = None,
             faults: bool = True) -> Node:
        n = Node(tmp_path, *args, env=env, netns=ns or netns(), faults=faults)
        nodes.append(n)
        return n

    yield make
    for n in nodes:
        n.close()


@pytest.fixture
def underlay() -> Iterator[Underlay]:
    u = Underlay()
    yield u
    u.close()

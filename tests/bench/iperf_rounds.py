"""What the iperf3 benchmarks share: options, figures in Mbit/s, and rounds that take the settings
compared in turn, so that the machine's other load falls on all of them alike."""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable, Sequence
from typing import Any

from tests.topology import Netns, iperf3


def options(doc: str | None, rounds: int) -> argparse.Namespace:
    """--seconds (of one transfer) and --rounds."""
    ap = argparse.ArgumentParser(description=doc)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=rounds)
    return ap.parse_args()


def mbit(result: dict[str, Any]) -> float:
    if "error" in result:
        raise SystemExit(f"iperf3 failed: {result['error']}")
    return result["end"]["sum_received"]["bits_per_second"] / 1e6


def medians_in_turn(
    settings: Sequence[str], rounds: int, seconds: int, prepare: Callable[[str], tuple[Netns, Netns, str]]
) -> dict[str, tuple[float, float]]:
    """Each setting's median Mbit/s from client to server and back, over ``rounds`` rounds of every
    setting in turn; ``prepare`` switches to a setting and says (client, server, address)."""
    figures: dict[str, tuple[list[float], list[float]]] = {s: ([], []) for s in settings}
    for _ in range(rounds):
        for setting in settings:
            client, server, addr = prepare(setting)
            for taken, reverse in zip(figures[setting], (False, True)):
                taken.append(mbit(iperf3(client, server, addr, seconds=seconds, reverse=reverse)))
    return {s: (statistics.median(up), statistics.median(down)) for s, (up, down) in figures.items()}

"""Span choice: which contiguous blocks a joining server takes.

Pure: given what the swarm already serves (a throughput figure per block), a server of `size` blocks
takes the window whose weakest block is the weakest in the swarm, so gaps close first and replication
rises evenly after that. Ties go to the window with the least total, then to the lowest start.
"""

from __future__ import annotations

from collections.abc import Sequence


def choose_span(served: Sequence[float], size: int) -> tuple[int, int]:
    """The [start, end) of `size` blocks covering the least-served blocks of `served`."""
    n = len(served)
    if n == 0:
        raise ValueError("a model has at least one block")
    size = max(1, min(size, n))
    best: tuple[float, float, int] | None = None
    for start in range(n - size + 1):
        window = served[start : start + size]
        key = (min(window), sum(window), start)
        if best is None or key < best:
            best = key
    assert best is not None
    return best[2], best[2] + size

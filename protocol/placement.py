"""Span choice and re-balancing: which contiguous blocks a server takes, and when it should move.

Pure: nothing here touches a socket, a clock or a device. Inputs are the swarm's announcements (or a
throughput figure per block derived from them) and numbers measured by the node.

Throughput unit: block-steps per second, one token through one block (an announcement carries it x1000
as an integer, see `SpanAnnouncement.throughput`). The swarm's throughput at a block is the sum over the
servers covering it; the swarm is as fast as its weakest block, so every rule below looks at the minimum.

- `choose_span`: a server of `size` blocks takes the window whose weakest block is the weakest in the
  swarm, so gaps close first and replication rises evenly after that. Ties go to the window with the
  least total, then to the lowest start.
- `should_move` (Petals' rule): a server moves to the best window for its size only when that would raise
  the swarm's minimum per-block throughput by more than `MOVE_THRESHOLD`.
- `blocks_for_memory`: how many blocks, with their KV cache budget, fit in free memory after a reserve.
- `rebalance_delay`: the re-check period with jitter.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .announce import SpanAnnouncement

# A server announcing throughput 0 has not measured itself (or runs an older node): count it as a typical
# CPU server, so that an unmeasured replica still counts as a replica rather than as a gap. Measured with
# node.hardware.measure_throughput: one block of the embedded model, one torch thread on a 2-core
# machine, ~1000 block-steps/s (1 ms a step). The route planner's DEFAULT_BLOCK_S (10 ms) is deliberately
# pessimistic, to prefer measured servers; here a pessimistic figure would pile new servers onto the
# spans of unmeasured ones.
DEFAULT_THROUGHPUT = 1000.0
# States whose servers take (or are about to take) sessions. A draining server is leaving its span:
# counting it would hide the gap it is about to open.
SERVING_STATES = ("online", "joining")
# Move only when the swarm's minimum per-block throughput would rise by more than 25% (Petals'
# balance_quality of 0.75, seen from the other side). Measured throughputs jitter by a few percent and
# equal servers make many windows tie; without hysteresis a stable swarm would flap between them, and
# every move costs a drain, a reload and the sessions it cuts short.
MOVE_THRESHOLD = 0.25
# Keep a fifth of free memory for what the blocks and caches do not count: activations of a prefill,
# allocator fragmentation, torch's own buffers, and other programs on the machine.
RESERVE_FRACTION = 0.2
# ...and at least 256 MiB on small machines: the client model (embedding + head, ~113 MB for the embedded
# model) and the Python/torch runtime live in the same process.
RESERVE_MIN_BYTES = 256 * 1024 * 1024
# Re-check periods vary by +-20%, so nodes started together (the demo, a restart) do not all evaluate
# the same swarm map in the same instant and all move into the same gap.
JITTER = 0.2


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


def announced_throughput(server: SpanAnnouncement) -> float:
    """A server's block-steps per second; `DEFAULT_THROUGHPUT` when it announced 0 (unknown)."""
    return server.throughput / 1000.0 if server.throughput > 0 else DEFAULT_THROUGHPUT


def block_throughput(
    servers: Iterable[SpanAnnouncement], n_blocks: int, *, exclude: bytes | None = None
) -> list[float]:
    """Per block of [0, n_blocks), the summed block-steps/s of the serving (online or joining) servers
    covering it, leaving out the peer `exclude`. Pass the servers of one model
    (`SwarmMap.servers(model_id, states=STATES)`); spans reaching past the model are clipped."""
    if n_blocks <= 0:
        raise ValueError(f"a model has at least one block, got {n_blocks}")
    out = [0.0] * n_blocks
    for s in servers:
        if s.state not in SERVING_STATES or s.peer_id == exclude:
            continue
        t = announced_throughput(s)
        for b in range(max(0, s.start), min(s.end, n_blocks)):
            out[b] += t
    return out


def choose_span_for(
    servers: Iterable[SpanAnnouncement], n_blocks: int, size: int, my_peer_id: bytes
) -> tuple[int, int]:
    """The span a joining server of `size` blocks takes, given what the others serve."""
    return choose_span(block_throughput(servers, n_blocks, exclude=my_peer_id), size)


@dataclass(frozen=True)
class MoveEvaluation:
    """What `evaluate_move` found: the swarm's minimum per-block throughput with me where I am
    (`current_min`) and at the best span of the same size (`best_span`, `best_min`), and the
    decision (`move`: the span to move to, or None to stay)."""

    current_min: float
    best_span: tuple[int, int]
    best_min: float
    move: tuple[int, int] | None


def evaluate_move(
    servers: Iterable[SpanAnnouncement],
    n_blocks: int,
    my_peer_id: bytes,
    my_span: tuple[int, int],
    my_throughput: float,
    *,
    threshold: float = MOVE_THRESHOLD,
) -> MoveEvaluation:
    """Petals' re-balancing rule, with the figures behind it (see `should_move`)."""
    start, end = my_span
    if not 0 <= start < end <= n_blocks:
        raise ValueError(f"my span [{start}, {end}) is not inside [0, {n_blocks})")
    mine = my_throughput if my_throughput > 0 else DEFAULT_THROUGHPUT
    others = block_throughput(servers, n_blocks, exclude=my_peer_id)
    current_min = _min_with(others, my_span, mine)
    best_span = choose_span(others, end - start)
    best_min = _min_with(others, best_span, mine)
    move = None
    if best_span != my_span and best_min > current_min * (1.0 + threshold):
        move = best_span
    return MoveEvaluation(current_min, best_span, best_min, move)


def should_move(
    servers: Iterable[SpanAnnouncement],
    n_blocks: int,
    my_peer_id: bytes,
    my_span: tuple[int, int],
    my_throughput: float,
    *,
    threshold: float = MOVE_THRESHOLD,
) -> tuple[int, int] | None:
    """The span this server should move to, or None to stay.

    The swarm's minimum per-block throughput is computed with me (`my_throughput` block-steps/s, 0 for
    unknown) on `my_span`, and with me on the best span of the same size for the others' throughput
    (`choose_span`). Move only when the latter exceeds the former by more than `threshold` (relative), so
    a swarm that is merely a little uneven stays put. A current minimum of 0 (a gap I could close) makes
    any positive new minimum a move.
    """
    return evaluate_move(servers, n_blocks, my_peer_id, my_span, my_throughput, threshold=threshold).move


def _min_with(others: Sequence[float], span: tuple[int, int], mine: float) -> float:
    start, end = span
    return min(t + mine if start <= b < end else t for b, t in enumerate(others))


def blocks_for_memory(
    free_bytes: int,
    block_bytes: int,
    cache_bytes_per_token_per_block: int,
    cache_tokens: int,
    n_blocks: int,
    *,
    reserve_fraction: float = RESERVE_FRACTION,
    reserve_min_bytes: int = RESERVE_MIN_BYTES,
) -> int:
    """How many blocks a node offers: each costs its weights plus a KV cache of `cache_tokens` tokens,
    and they share `free_bytes` less a reserve (`reserve_fraction` of it, at least `reserve_min_bytes`).

    At least 1 (a node that serves offers one block even on a tight machine, and the operator sees its
    memory figures in the log) and at most `n_blocks`.
    """
    if n_blocks <= 0:
        raise ValueError(f"a model has at least one block, got {n_blocks}")
    if not 0 <= reserve_fraction < 1:
        raise ValueError(f"reserve_fraction must be in [0, 1), got {reserve_fraction}")
    reserve = max(int(free_bytes * reserve_fraction), reserve_min_bytes)
    usable = max(0, free_bytes - reserve)
    per_block = max(1, block_bytes + cache_bytes_per_token_per_block * max(0, cache_tokens))
    return max(1, min(n_blocks, usable // per_block))


def rebalance_delay(period_s: float, rng: random.Random) -> float:
    """`period_s` varied uniformly by +-`JITTER`, so that nodes re-check at different moments."""
    if period_s <= 0:
        raise ValueError(f"the re-balancing period must be positive, got {period_s}")
    return period_s * (1.0 + rng.uniform(-JITTER, JITTER))

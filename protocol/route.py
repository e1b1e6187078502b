"""Route planning: which servers carry a token through every block of a model.

A route is a list of hops, each a server and the span [start, end) it computes for us, that covers the
blocks 0..n exactly once and in order. The planner is a shortest path over block boundaries: from
boundary b, a server whose span holds b can take us to its own end, or to the start of another
server's span inside it (we only switch servers at span borders). An edge costs the estimated
per-token latency of that hop: the network RTT to the server plus its compute time per block times
the blocks it computes, plus a penalty when the server is short of cache.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from .announce import SpanAnnouncement

# Without a measured RTT we assume a LAN-ish 5 ms: high enough that a measured loopback peer wins,
# low enough not to rule an unmeasured peer out.
DEFAULT_RTT_S = 0.005
# Without an announced throughput, assume 10 ms per block-step (the embedded model on one CPU core).
DEFAULT_BLOCK_S = 0.010
# A server announcing less cache than a session needs is a last resort: it will likely answer busy.
SHORT_OF_CACHE_PENALTY_S = 1.0


@dataclass(frozen=True)
class Hop:
    peer_id: bytes
    start: int
    end: int


class NoRoute(Exception):
    """Raised when no set of known servers covers every block; `missing` lists the uncovered blocks.

    The caller should wait for more servers to announce, or fail the generation naming the blocks.
    """

    def __init__(self, missing: list[int]) -> None:
        super().__init__(f"no server covers block{'s' if len(missing) > 1 else ''} {_ranges(missing)}")
        self.missing = missing


def plan_route(
    servers: Iterable[SpanAnnouncement],
    start: int,
    end: int,
    *,
    rtt_s: Callable[[bytes], float | None] = lambda p: None,
    exclude: frozenset[bytes] = frozenset(),
    cache_needed: int = 0,
) -> list[Hop]:
    """Cheapest covering of blocks [start, end) by `servers` minus `exclude`; NoRoute if none."""
    usable = [s for s in servers if s.peer_id not in exclude and s.end > start and s.start < end]
    borders = {start, end} | {s.start for s in usable if start < s.start < end}
    best: dict[int, float] = {start: 0.0}
    back: dict[int, tuple[int, Hop]] = {}
    queue = [(0.0, start)]
    while queue:
        cost, b = heapq.heappop(queue)
        if cost > best.get(b, float("inf")):
            continue
        if b == end:
            break
        for s in usable:
            if not s.start <= b < s.end:
                continue
            stop = min(s.end, end)
            for e in sorted(x for x in borders if b < x <= stop):
                c = cost + _hop_cost(s, e - b, rtt_s(s.peer_id), cache_needed)
                if c < best.get(e, float("inf")):
                    best[e] = c
                    back[e] = (b, Hop(s.peer_id, b, e))
                    heapq.heappush(queue, (c, e))
    if end not in best:
        covered = set()
        for s in usable:
            covered.update(range(max(s.start, start), min(s.end, end)))
        missing = [b for b in range(start, end) if b not in covered]
        if not missing:  # covered but unreachable cannot happen with contiguous spans; be explicit anyway
            missing = [max(best)]
        raise NoRoute(missing)
    hops: list[Hop] = []
    b = end
    while b != start:
        b, hop = back[b]
        hops.append(hop)
    return hops[::-1]


def _hop_cost(s: SpanAnnouncement, blocks: int, rtt: float | None, cache_needed: int) -> float:
    per_block = 1000.0 / s.throughput if s.throughput > 0 else DEFAULT_BLOCK_S
    cost = (DEFAULT_RTT_S if rtt is None else rtt) + blocks * per_block
    if cache_needed and s.cache_tokens_left < cache_needed:
        cost += SHORT_OF_CACHE_PENALTY_S
    return cost


def _ranges(blocks: list[int]) -> str:
    """[3, 4, 5, 9] -> '3-5, 9'."""
    out: list[str] = []
    i = 0
    while i < len(blocks):
        j = i
        while j + 1 < len(blocks) and blocks[j + 1] == blocks[j] + 1:
            j += 1
        out.append(str(blocks[i]) if i == j else f"{blocks[i]}-{blocks[j]}")
        i = j + 1
    return ", ".join(out)


# A server that failed is avoided for BAN_BASE_S, doubling with each further failure up to BAN_MAX_S:
# a restart takes seconds, a dead host never comes back, and a flapping one should cost us little.
BAN_BASE_S = 2.0
BAN_MAX_S = 120.0
# A server that answered "busy" or "draining" is healthy: avoid it briefly, without a strike.
BUSY_BAN_S = 5.0


class BanList:
    """Peers to route around, with exponential backoff. Pure: times are passed in (seconds)."""

    def __init__(self) -> None:
        self._strikes: dict[bytes, int] = {}
        self._until: dict[bytes, float] = {}

    def strike(self, peer: bytes, now: float) -> float:
        """Record a failure; returns how long the peer is banned."""
        n = self._strikes.get(peer, 0) + 1
        self._strikes[peer] = n
        duration = min(BAN_MAX_S, BAN_BASE_S * 2 ** (n - 1))
        self._until[peer] = max(self._until.get(peer, 0.0), now + duration)
        return duration

    def busy(self, peer: bytes, now: float) -> None:
        self._until[peer] = max(self._until.get(peer, 0.0), now + BUSY_BAN_S)

    def forgive(self, peer: bytes) -> None:
        """A session completed: the peer's next failure starts from the base ban again."""
        self._strikes.pop(peer, None)

    def banned(self, now: float) -> frozenset[bytes]:
        return frozenset(p for p, t in self._until.items() if t > now)

    def until(self, peer: bytes) -> float:
        return self._until.get(peer, 0.0)

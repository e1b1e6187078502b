"""The balancer: every period or so, ask whether moving this server's span would help the swarm.

A thin trio pump around `protocol.placement.evaluate_move`: sleep `rebalance_delay(period_s)` (the
period with jitter, so nodes started together do not all move into the same gap at once), read the
swarm map and our span through the callables given, and when the rule says so await `move(span)`.
The runtime's `move` announces draining, lets open sessions finish (with a timeout), loads the new
blocks and announces online; no check runs while a move is in progress. An exception from `move`
propagates: the runtime decides whether a failed move ends the node.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from protocol.announce import SpanAnnouncement
from protocol.placement import MOVE_THRESHOLD, evaluate_move, rebalance_delay

log = logging.getLogger("poolai.balancer")

# Petals re-checks its placement every minute or so: long against a move (seconds to drain and load),
# short against how fast a swarm's membership changes.
DEFAULT_PERIOD_S = 60.0


@dataclass(frozen=True)
class BalancerStatistics:
    checks: int
    moves: int
    last_check_at: float | None  # the balancer clock's time of the last check
    last_check_min_throughput: float | None  # swarm minimum block-steps/s with us where we were
    last_decision: tuple[int, int] | None  # the span the last check moved to; None: it stayed


class Balancer:
    def __init__(
        self,
        get_servers: Callable[[], list[SpanAnnouncement]],
        n_blocks: int,
        my_peer_id: bytes,
        get_span: Callable[[], tuple[int, int]],
        my_throughput: float,
        move: Callable[[tuple[int, int]], Awaitable[None]],
        period_s: float = DEFAULT_PERIOD_S,
        rng: random.Random | None = None,
        clock: Callable[[], float] = trio.current_time,
        *,
        threshold: float = MOVE_THRESHOLD,
    ) -> None:
        if period_s <= 0:
            raise ValueError(f"period_s must be positive, got {period_s}")
        self.get_servers = get_servers
        self.n_blocks = n_blocks
        self.my_peer_id = my_peer_id
        self.get_span = get_span
        self.my_throughput = my_throughput
        self._move = move
        self.period_s = period_s
        self.rng = rng if rng is not None else random.Random()
        self.clock = clock
        self.threshold = threshold
        self._checks = self._moves = 0
        self._last_at: float | None = None
        self._last_min: float | None = None
        self._last_decision: tuple[int, int] | None = None

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Check forever, one period (with jitter) apart, starting one period after the start."""
        task_status.started()
        while True:
            await trio.sleep(rebalance_delay(self.period_s, self.rng))
            await self.check_once()

    async def check_once(self) -> tuple[int, int] | None:
        """Evaluate the rule now and move if it says so; the span moved to, or None."""
        span = self.get_span()
        found = evaluate_move(self.get_servers(), self.n_blocks, self.my_peer_id, span, self.my_throughput,
                              threshold=self.threshold)
        self._checks += 1
        self._last_at = self.clock()
        self._last_min = found.current_min
        self._last_decision = found.move
        if found.move is None:
            log.debug("span %d:%d stays: swarm minimum %.1f block-steps/s, %.1f at best span %d:%d",
                      *span, found.current_min, found.best_min, *found.best_span)
            await trio.lowlevel.checkpoint()
            return None
        log.info("moving span %d:%d -> %d:%d: swarm minimum %.1f -> %.1f block-steps/s",
                 *span, *found.move, found.current_min, found.best_min)
        await self._move(found.move)
        self._moves += 1
        return found.move

    def statistics(self) -> BalancerStatistics:
        return BalancerStatistics(self._checks, self._moves, self._last_at, self._last_min, self._last_decision)

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol.announce import SpanAnnouncement
from protocol.placement import (
    DEFAULT_THROUGHPUT,
    JITTER,
    MOVE_THRESHOLD,
    RESERVE_MIN_BYTES,
    block_throughput,
    blocks_for_memory,
    choose_span_for,
    evaluate_move,
    rebalance_delay,
    should_move,
)

N = 30


def peer(i: int) -> bytes:
    return bytes([i]) * 38


def server(i, start, end, throughput=100_000, state="online"):
    return SpanAnnouncement(peer(i), b"m" * 32, start, end, (), 0, 1, state=state, throughput=throughput)


def test_block_throughput_sums_serving_servers_and_counts_unknown_as_default():
    servers = [server(1, 0, 10, 50_000), server(2, 5, 15, 0), server(3, 0, 30, 70_000, state="draining"),
               server(4, 20, 40, 10_000, state="joining")]
    t = block_throughput(servers, N)
    assert t[0] == 50.0 and t[5] == 50.0 + DEFAULT_THROUGHPUT and t[12] == DEFAULT_THROUGHPUT
    assert t[17] == 0.0 and t[29] == 10.0 and len(t) == N  # draining ignored, span clipped to the model
    assert block_throughput(servers, N, exclude=peer(1))[0] == 0.0


# -- invariants ------------------------------------------------------------------------------------

spans = st.integers(1, 40).flatmap(
    lambda n: st.tuples(st.just(n), st.lists(
        st.tuples(st.integers(0, n + 3), st.integers(1, n + 5), st.integers(0, 300_000),
                  st.sampled_from(["online", "joining", "draining"])).filter(lambda t: t[0] < t[1]),
        max_size=10)))


@given(spans, st.integers(-3, 50))
def test_chosen_span_inside_model_of_requested_size_and_covers_a_weakest_block(swarm, size):
    n, records = swarm
    servers = [server(i + 1, a, b, t, s) for i, (a, b, t, s) in enumerate(records)]
    a, b = choose_span_for(servers, n, size, peer(99))
    assert 0 <= a < b <= n and b - a == max(1, min(size, n))
    served = block_throughput(servers, n)
    assert min(served[a:b]) == min(served)


@given(spans, st.data(), st.floats(0, 1000))
def test_should_move_stays_inside_model_keeps_size_and_improves_enough(swarm, data, mine):
    n, records = swarm
    servers = [server(i + 1, a, b, t, s) for i, (a, b, t, s) in enumerate(records)]
    start = data.draw(st.integers(0, n - 1))
    end = data.draw(st.integers(start + 1, n))
    me = data.draw(st.sampled_from([peer(1), peer(99)]))  # my own (stale) record may be in the list
    found = evaluate_move(servers, n, me, (start, end), mine)
    assert found.move == should_move(servers, n, me, (start, end), mine)
    if found.move is not None:
        a, b = found.move
        assert 0 <= a < b <= n and b - a == end - start and found.move != (start, end)
        assert found.best_min > found.current_min * (1 + MOVE_THRESHOLD)


# -- swarms over balance periods --------------------------------------------------------------------


def simulate(spans: dict[int, tuple[int, int]], periods: int, seed: int = 0, throughput=100_000) -> list:
    """Each period every node, in a shuffled order (the jitter), evaluates should_move against the
    others' current records and moves at once when told. Returns the moves as (period, node, old, new)."""
    rng = random.Random(seed)
    moves = []
    for period in range(periods):
        order = list(spans)
        rng.shuffle(order)
        for i in order:
            records = [server(j, *s, throughput) for j, s in spans.items()]
            new = should_move(records, N, peer(i), spans[i], throughput / 1000)
            if new is not None:
                moves.append((period, i, spans[i], new))
                spans[i] = new
    return moves


@pytest.mark.parametrize("seed", range(5))
def test_stable_swarm_never_moves(seed):
    spans = {1: (0, 15), 2: (0, 15), 3: (15, 30), 4: (15, 30)}
    assert simulate(spans, 10, seed) == []


@pytest.mark.parametrize("seed", range(5))
def test_unbalanced_swarm_converges_with_one_move_and_no_flapping(seed):
    spans = {1: (0, 15), 2: (0, 15), 3: (0, 15), 4: (15, 30)}
    moves = simulate(spans, 10, seed)
    assert len(moves) == 1
    (period, node, old, new), = moves
    assert period == 0 and old == (0, 15) and new == (15, 30)
    assert sorted(spans.values()) == [(0, 15), (0, 15), (15, 30), (15, 30)]


def test_move_needs_more_than_25_percent():
    # Others: 0:15 at 120, 15:30 at 100 block-steps/s; I (20) on 0:15: the minimum is 100 (15:30).
    # Moving to 15:30 makes it min(120, 120) = 120: +20%, not enough.
    servers = [server(2, 0, 15, 120_000), server(3, 15, 30, 100_000)]
    found = evaluate_move(servers, N, peer(1), (0, 15), 20.0)
    assert (found.current_min, found.best_span, found.best_min, found.move) == (100.0, (15, 30), 120.0, None)
    # Others: 0:15 at 130; I (30) on 0:15: moving makes it min(130, 130) = 130: +30%, move.
    servers = [server(2, 0, 15, 130_000), server(3, 15, 30, 100_000)]
    assert should_move(servers, N, peer(1), (0, 15), 30.0) == (15, 30)
    assert should_move(servers, N, peer(1), (0, 15), 30.0, threshold=0.35) is None


def test_gap_is_closed_even_from_a_served_span():
    servers = [server(2, 0, 10), server(3, 0, 10), server(4, 10, 20)]
    assert should_move(servers, N, peer(1), (0, 10), 100.0) == (20, 30)


def test_best_span_equal_to_mine_is_no_move():
    assert should_move([server(2, 0, 15)], N, peer(1), (15, 30), 100.0) is None


def test_joining_node_takes_the_single_replica_range():
    servers = [server(1, 0, 10), server(2, 0, 10), server(3, 10, 20), server(4, 10, 20), server(5, 20, 30)]
    assert choose_span_for(servers, N, 10, peer(6)) == (20, 30)
    a, b = choose_span_for(servers, N, 15, peer(6))
    assert (a, b) == (15, 30)  # covers all of 20:30, the fewest doubly-served blocks


# -- memory and jitter -------------------------------------------------------------------------------

GIB = 1024**3
BLOCK = 14_160_384  # one fp32 block of the embedded model
PER_TOKEN = 2 * 3 * 64 * 4


def test_blocks_for_memory_examples():
    # 8 GiB free: 6.4 GiB usable / (14 MB + 16384 x 1.5 kB) = 174 blocks -> all 30
    assert blocks_for_memory(8 * GIB, BLOCK, PER_TOKEN, 16384, 30) == 30
    # 1 GiB free: 768 MiB usable (reserve = RESERVE_MIN) / 39.3 MB = 20 blocks
    usable = GIB - RESERVE_MIN_BYTES
    assert blocks_for_memory(GIB, BLOCK, PER_TOKEN, 16384, 30) == usable // (BLOCK + PER_TOKEN * 16384) == 20
    assert blocks_for_memory(0, BLOCK, PER_TOKEN, 16384, 30) == 1
    assert blocks_for_memory(GIB, BLOCK, PER_TOKEN, 0, 30) == min(30, usable // BLOCK)


@given(st.integers(0, 1 << 42), st.integers(0, 1 << 32), st.integers(0, 1 << 16), st.integers(0, 1 << 20),
       st.integers(1, 200), st.floats(0, 0.99))
def test_blocks_for_memory_bounds(free, block, per_token, tokens, n, fraction):
    got = blocks_for_memory(free, block, per_token, tokens, n, reserve_fraction=fraction)
    assert 1 <= got <= n
    if got > 1:  # more than the floor of one: the blocks and their caches really fit after the reserve
        assert got * (block + per_token * tokens) <= free - max(int(free * fraction), RESERVE_MIN_BYTES)


def test_rebalance_delay_within_jitter_and_spread():
    rng = random.Random(1)
    delays = [rebalance_delay(60.0, rng) for _ in range(200)]
    assert all(60 * (1 - JITTER) <= d <= 60 * (1 + JITTER) for d in delays)
    assert max(delays) - min(delays) > 60 * JITTER  # actually spread, not a constant
    with pytest.raises(ValueError):
        rebalance_delay(0, rng)

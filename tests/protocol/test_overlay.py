"""Overlay geometry, size estimate, long links and greedy routing (protocol/overlay.py).

Plain pytest + hypothesis, no network. Tables are built with the real functions: stabilisation
(``merge_ring``) given each node's ring neighbours, ``estimate_size``/``smooth_estimate``,
``draw_long_link_targets``, ``wants_long_link``/``accept_inbound``.
"""

from __future__ import annotations

import math
import random
from bisect import bisect_left

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from node import sim
from protocol import overlay as ov
from protocol._overlay_np import (
    RingIndex,
    abs_distance_np,
    estimate_size_np,
    greedy_next_hop_np,
    harmonic_distance_np,
    owner_index_np,
    ring_distance_np,
    smooth_estimate_np,
)

# ---------------------------------------------------------------------------------------------
# A swarm of RoutingTables built with the protocol's own rules
# ---------------------------------------------------------------------------------------------


class Swarm:
    def __init__(self, ids: list[bytes], rng: random.Random) -> None:
        self.tables = {pid: ov.RoutingTable(pid) for pid in ids}
        self.order = sorted(self.tables.values(), key=lambda t: t.my_pos)
        self.sorted_pos = [t.my_pos for t in self.order]
        self.positions = {t.my_id: t.my_pos for t in self.order}
        n = len(self.order)
        w = min(ov.SUCCESSORS, n - 1)
        # Stabilisation, converged: every node has heard of its w ring neighbours on each side.
        for i, t in enumerate(self.order):
            window = {self.order[(i + j) % n].my_id: self.order[(i + j) % n].my_pos for j in range(-w, w + 1) if j}
            t.merge_ring(window)
        raw = {pid: t.own_estimate() for pid, t in self.tables.items()}
        for t in self.tables.values():
            t.update_estimate(raw[p] for p in t.short_links())
        self.link(rng)
        # Re-smooth over every neighbour (long links bring independent samples); redraw if moved 2x.
        for t in self.tables.values():
            redraw = t.update_estimate(raw[p] for p in t.neighbours())
            for peer in t.clear_long_links() if redraw else t.trim_long_links():
                self.tables[peer].inbound.pop(t.my_id, None)
        self.link(rng)

    def owner_of(self, key: int) -> bytes:
        """``ov.owner`` over the two nodes bracketing ``key`` (the only possible owners)."""
        n = len(self.order)
        i = bisect_left(self.sorted_pos, key)
        pair = {self.order[i % n].my_id: self.order[i % n].my_pos}
        pair[self.order[i - 1].my_id] = self.order[i - 1].my_pos
        return ov.owner(key, pair)

    def link(self, rng: random.Random) -> None:
        for t in self.tables.values():
            for _ in range(ov.LONG_LINK_DRAW_ATTEMPTS):
                if not t.missing_long_links():
                    break
                for target in t.draw_targets(rng):
                    peer = self.owner_of(target)
                    if t.wants_long_link(peer) and self.tables[peer].accept_inbound(t.my_id, t.my_pos):
                        t.add_long_link(peer, self.positions[peer])

    def route(self, src: bytes, key: int, dead: frozenset[bytes] = frozenset()) -> tuple[bytes, int]:
        cur, hops = src, 0
        while True:
            table = self.tables[cur]
            nbrs = {p: q for p, q in table.neighbours().items() if p not in dead}
            lookahead = {p: self.tables[p].neighbours() for p in table.neighbours()}
            nxt = ov.greedy_next_hop(table.my_pos, key, nbrs, lookahead, exclude=dead)
            if nxt is None:
                return cur, hops
            assert ov.check_hop_answer(table.my_pos, key, self.positions[nxt])
            cur, hops = nxt, hops + 1
            assert hops <= len(self.tables), "strict progress bounds hops by n"


def make_ids(n: int, rng: random.Random) -> list[bytes]:
    ids: set[bytes] = set()
    while len(ids) < n:
        ids.add(rng.randbytes(34))  # the size of an Ed25519 libp2p peer ID
    return sorted(ids)


# ---------------------------------------------------------------------------------------------
# Geometry
# ---------------------------------------------------------------------------------------------


def test_ring_position_is_sha256_prefix() -> None:
    import hashlib

    pid = b"\x00\x24\x08\x01\x12\x20" + bytes(range(32))
    assert ov.ring_position(pid) == int.from_bytes(hashlib.sha256(pid).digest()[:8], "big")
    assert 0 <= ov.ring_position(pid) < ov.RING_SIZE


def test_distances_wrap_around() -> None:
    top = ov.RING_SIZE - 1
    assert ov.ring_distance(top, 0) == 1
    assert ov.ring_distance(0, top) == top
    assert ov.abs_distance(top, 0) == 1
    assert ov.abs_distance(0, top) == 1
    assert ov.abs_distance(0, 1 << 63) == 1 << 63
    assert ov.abs_distance(5, 5) == 0


@given(st.integers(0, ov.RING_SIZE - 1), st.integers(0, ov.RING_SIZE - 1))
def test_abs_distance_is_symmetric_min(a: int, b: int) -> None:
    d = ov.abs_distance(a, b)
    assert d == ov.abs_distance(b, a)
    assert d == min(ov.ring_distance(a, b), ov.ring_distance(b, a))
    assert d <= 1 << 63


# ---------------------------------------------------------------------------------------------
# Routing on stable rings
# ---------------------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(2, 300),
    seed=st.integers(0, 2**32 - 1),
    keys=st.lists(st.integers(0, ov.RING_SIZE - 1), min_size=1, max_size=6),
)
@example(n=300, seed=1, keys=[0, 1 << 63, ov.RING_SIZE - 1, 12345])
@example(n=2, seed=2, keys=[0, 1 << 63])
@example(n=17, seed=3, keys=[1 << 62])
def test_greedy_reaches_owner_on_stable_ring(n: int, seed: int, keys: list[int]) -> None:
    rng = random.Random(seed)
    swarm = Swarm(make_ids(n, rng), rng)
    ids = list(swarm.tables)
    for key in keys:
        want = ov.owner(key, swarm.positions)
        assert want == swarm.owner_of(key)
        src = rng.choice(ids)
        got, hops = swarm.route(src, key)
        assert got == want
        assert hops <= ov.hop_limit(n)
        assert hops <= ov.hop_limit(swarm.tables[src].n_hat)


def test_owner_is_none_iff_closest() -> None:
    rng = random.Random(3)
    swarm = Swarm(make_ids(200, rng), rng)
    for _ in range(200):
        key = rng.getrandbits(64)
        owner = ov.owner(key, swarm.positions)
        for pid, t in swarm.tables.items():
            if pid == owner:
                assert t.next_hop(key) is None
        # Any other node sees a neighbour closer than itself.
        other = rng.choice([p for p in swarm.tables if p != owner])
        assert swarm.tables[other].next_hop(key) is not None


def test_closest_peers_orders_by_rank_and_replicas() -> None:
    cands = {b"a": 100, b"b": 90, b"c": 115, b"d": ov.RING_SIZE - 5}
    assert ov.closest_peers(100, cands, 2) == [b"a", b"b"]  # 0, then 10 (c is 15)
    assert ov.closest_peers(0, cands, 1) == [b"d"]  # wraps around
    # Equidistant on both sides: the lower position wins, the same in every implementation.
    assert ov.closest_peers(100, {b"x": 110, b"y": 90}, 1) == [b"y"]
    assert len(ov.closest_peers(7, cands, ov.RECORD_REPLICAS)) == ov.RECORD_REPLICAS


def test_routing_with_dead_nodes_reaches_alive_owner() -> None:
    rng = random.Random(11)
    swarm = Swarm(make_ids(400, rng), rng)
    ids = list(swarm.tables)
    dead = frozenset(rng.sample(ids, 200))
    alive = {p: swarm.positions[p] for p in ids if p not in dead}
    for _ in range(100):
        key = rng.getrandbits(64)
        src = rng.choice(list(alive))
        got, hops = swarm.route(src, key, dead)
        assert got == ov.owner(key, alive)
        assert hops <= ov.hop_limit(400)


# ---------------------------------------------------------------------------------------------
# Long links
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_hat", [1000.0, 1e6])
def test_long_link_targets_are_harmonic(n_hat: float) -> None:
    """log(distance / ring) / log(n_hat) + 1 is uniform on [0, 1): Kolmogorov-Smirnov at 0.1%."""
    rng = random.Random(1234)
    my_pos = rng.getrandbits(64)
    samples = 20_000
    targets = ov.draw_long_link_targets(my_pos, n_hat, samples, rng)
    x = sorted(math.log(ov.ring_distance(my_pos, t) / ov.RING_SIZE) / math.log(n_hat) + 1.0 for t in targets)
    assert 0.0 <= x[0] and x[-1] < 1.0
    d = max(max((i + 1) / samples - v, v - i / samples) for i, v in enumerate(x))
    assert d < 1.95 / math.sqrt(samples), d  # KS critical value at alpha = 0.001
    # Sanity of the test itself: uniform distances (not harmonic) are rejected.
    y = sorted(math.log(rng.random()) / math.log(n_hat) + 1.0 for _ in range(samples))
    y = [min(max(v, 0.0), 1.0) for v in y]
    d_uniform = max(max((i + 1) / samples - v, v - i / samples) for i, v in enumerate(y))
    assert d_uniform > 10 * 1.95 / math.sqrt(samples)


def test_long_link_count_clamps() -> None:
    assert ov.long_link_count(1.0) == ov.LONG_LINKS_MIN
    assert ov.long_link_count(100.0) == 8
    assert ov.long_link_count(1000.0) == 10
    assert ov.long_link_count(1024.0) == 10
    assert ov.long_link_count(1025.0) == 11
    assert ov.long_link_count(1e6) == 20
    assert ov.long_link_count(1e12) == ov.LONG_LINKS_MAX


@pytest.mark.parametrize("n", [100, 1000, 10_000])
def test_size_estimate_within_factor_two(n: int) -> None:
    rng = random.Random(42)
    swarm = Swarm(make_ids(n, rng), rng)
    raw = sorted(t.own_estimate() for t in swarm.tables.values())
    assert 0.8 * n < raw[n // 2] < 1.25 * n  # the raw estimate is nearly unbiased (8/7 n)
    worst = max(max(t.n_hat / n, n / t.n_hat) for t in swarm.tables.values())
    assert worst < 2.0, worst


def test_estimate_edge_cases() -> None:
    assert ov.estimate_size(5, []) == 1.0
    half = 1 << 63
    assert ov.estimate_size(0, [half]) == 2.0
    assert ov.estimate_size(0, [1 << 62, half]) == 4.0
    assert ov.smooth_estimate(10.0, [1.0, 1e9]) == 10.0  # a liar cannot drag a median
    assert ov.smooth_estimate(100.0, [400.0]) == pytest.approx(200.0)  # geometric middle


def test_in_degree_cap_honoured() -> None:
    table = ov.RoutingTable(b"me", n_hat=1000.0)
    cap = ov.in_degree_cap(table.k)
    assert cap == 2 * 10
    accepted = [table.accept_inbound(bytes([i]) * 4) for i in range(cap + 5)]
    assert accepted == [True] * cap + [False] * 5
    assert table.accept_inbound(bytes([0]) * 4)  # an existing link is kept, not refused
    assert len(table.inbound) == cap
    assert not table.accept_inbound(b"me")
    table.remove(bytes([0]) * 4)
    assert table.accept_inbound(b"newcomer")


def test_in_degree_cap_honoured_in_swarm_and_sim() -> None:
    rng = random.Random(5)
    swarm = Swarm(make_ids(600, rng), rng)
    for t in swarm.tables.values():
        assert len(t.inbound) <= ov.in_degree_cap(t.k)
        assert len(t.long_links) <= t.k
        assert not set(t.long_links) & set(t.short_links())
    o = sim.build_overlay(sim.random_positions(5000, np.random.default_rng(5)), np.random.default_rng(6))
    indeg = np.bincount(o.long[o.long >= 0], minlength=o.n)
    assert (indeg <= ov.IN_DEGREE_FACTOR * o.k).all()
    assert indeg.max() == ov.IN_DEGREE_FACTOR * o.k.max() or indeg.max() < 2 * o.k.max()


@pytest.mark.parametrize(
    ("now", "then", "want"),
    [
        (1000, 1000, False),
        (1999, 1000, False),
        (2000, 1000, True),
        (5000, 1000, True),
        (501, 1000, False),
        (500, 1000, True),
        (10, 1000, True),
        (1000, 0, True),
    ],
)
def test_needs_redraw_on_doubling_or_halving_only(now: float, then: float, want: bool) -> None:
    assert ov.needs_redraw(now, then) is want


def test_routing_table_merges_successor_lists() -> None:
    me = ov.RoutingTable(b"me", my_pos=1000)
    me.merge_successors({b"p%d" % i: 1000 + 10 * i for i in range(1, 6)})
    me.merge_successors({b"q%d" % i: 1005 + 10 * i for i in range(1, 6)})
    assert list(me.successors) == [b"p1", b"q1", b"p2", b"q2", b"p3", b"q3", b"p4", b"q4"]
    me.remove(b"p1")  # its connection died
    assert b"p1" not in me.neighbours()
    me.merge_successors({b"me": 1000, b"far": 999})  # never myself; 999 is the farthest clockwise
    assert b"me" not in me.successors
    assert list(me.successors)[-1] == b"far"  # only because a slot was free
    me.merge_successors({b"p5": 1050})
    assert b"far" not in me.successors and len(me.successors) == ov.SUCCESSORS
    me.merge_predecessors({b"far": 999, b"p1": 1010})
    assert list(me.predecessors) == [b"far", b"p1"]


# ---------------------------------------------------------------------------------------------
# Lying neighbours
# ---------------------------------------------------------------------------------------------


def test_lying_neighbour_is_detected() -> None:
    rng = random.Random(9)
    swarm = Swarm(make_ids(300, rng), rng)
    flagged = 0
    for _ in range(200):
        key = rng.getrandbits(64)
        liar = rng.choice(list(swarm.tables))
        t = swarm.tables[liar]
        honest = t.next_hop(key)
        if honest is not None:
            assert ov.check_hop_answer(t.my_pos, key, swarm.positions[honest])
        # The liar answers with its farthest neighbour from the key (a detour or a loop).
        lie = max(t.neighbours().values(), key=lambda p: ov.abs_distance(p, key))
        if ov.abs_distance(lie, key) > ov.abs_distance(t.my_pos, key):
            assert not ov.check_hop_answer(t.my_pos, key, lie)
            flagged += 1
        assert not ov.check_hop_answer(t.my_pos, key, t.my_pos)  # "go to me" is no progress
    assert flagged > 150


_pids = st.binary(min_size=1, max_size=3)


@given(
    me=_pids,
    key=st.integers(0, ov.RING_SIZE - 1),
    nbrs=st.lists(_pids, max_size=12),
    la=st.dictionaries(_pids, st.lists(_pids, max_size=6), max_size=8),
    exclude=st.lists(_pids, max_size=4),
)
def test_next_hop_always_passes_check(
    me: bytes, key: int, nbrs: list[bytes], la: dict, exclude: list[bytes]
) -> None:
    """Whatever neighbours advertise (lies, dead or unknown peers), the answer is strictly closer."""
    pos = ov.ring_position
    nb = {p: pos(p) for p in nbrs if p != me}
    look = {p: {q: pos(q) for q in lst} for p, lst in la.items()}
    nxt = ov.greedy_next_hop(pos(me), key, nb, look, exclude=set(exclude))
    known = set(nb) | {q for lst in la.values() for q in lst}
    if nxt is None:
        assert not any(ov.check_hop_answer(pos(me), key, pos(p)) for p in known - set(exclude))
    else:
        assert nxt in known and nxt not in exclude
        assert ov.check_hop_answer(pos(me), key, pos(nxt))
        if any(ov.check_hop_answer(pos(me), key, q) for p, q in nb.items() if p not in exclude):
            assert nxt in nb  # a closer live neighbour always beats the fallback


# ---------------------------------------------------------------------------------------------
# numpy forms == scalar rules
# ---------------------------------------------------------------------------------------------


def test_numpy_helpers_match_scalar() -> None:
    g = np.random.default_rng(0)
    a = g.integers(0, 2**64, 2000, dtype=np.uint64)
    b = g.integers(0, 2**64, 2000, dtype=np.uint64)
    b[:5] = a[:5]
    b[5] = np.add(a[5:6], np.uint64(1 << 63), dtype=np.uint64)[0]
    assert abs_distance_np(a, b).tolist() == [ov.abs_distance(x, y) for x, y in zip(a.tolist(), b.tolist())]
    assert ring_distance_np(a, b).tolist() == [ov.ring_distance(x, y) for x, y in zip(a.tolist(), b.tolist())]
    est = estimate_size_np(a, b, 8)
    assert est.tolist() == [
        ov.estimate_size(x, [y]) * 8 if x != y else 8.0 for x, y in zip(a.tolist(), b.tolist())
    ]
    vals = g.lognormal(7, 1, size=(300, 17))
    vals_even = vals[:, :16].copy()
    vals_even[:10, 12:] = np.nan
    assert smooth_estimate_np(vals).tolist() == [ov.smooth_estimate(r[0], r[1:]) for r in vals.tolist()]
    want = [ov.smooth_estimate(r[0], [v for v in r[1:] if not math.isnan(v)]) for r in vals_even.tolist()]
    assert smooth_estimate_np(vals_even).tolist() == want
    n_hat, u = g.uniform(1, 2e6, 5000), g.random(5000)
    u[:3] = [0.0, 0.999999999999, 0.5]
    got = harmonic_distance_np(n_hat, u).astype(np.float64)
    exp = np.array([float(ov.harmonic_distance(x, y)) for x, y in zip(n_hat.tolist(), u.tolist())])
    assert np.allclose(got, exp, rtol=1e-12, atol=0)
    pos = np.sort(g.integers(0, 2**64, 3000, dtype=np.uint64))
    keys = g.integers(0, 2**64, 3000, dtype=np.uint64)
    keys[:3] = pos[:3]
    keys[3] = pos[10] // np.uint64(2) + pos[11] // np.uint64(2)
    cands = {i.to_bytes(4, "big"): p for i, p in enumerate(pos.tolist())}
    got_own = owner_index_np(pos, keys)
    assert (RingIndex(pos).owner(keys) == got_own).all()
    for key, o in zip(keys[:300].tolist(), got_own[:300].tolist()):
        assert ov.owner(key, cands) == o.to_bytes(4, "big")


def test_next_hop_np_matches_scalar_on_random_inputs() -> None:
    g = np.random.default_rng(2)
    L, D, D2 = 400, 7, 5
    # Positions on a coarse grid (2^12 points) so that equal distances, hence rank ties, occur;
    # distinct within a lookup, as node positions are.
    grid = np.stack([g.choice(2**12, 2 + D + D * D2, replace=False) for _ in range(L)])
    grid = grid.astype(np.uint64) << np.uint64(52)
    my, key = grid[:, 0], grid[:, 1]
    nb, la = grid[:, 2 : 2 + D], grid[:, 2 + D :].reshape(L, D, D2)
    nb_ok, la_ok = g.random((L, D)) < 0.7, g.random((L, D, D2)) < 0.8
    fb_ok = la_ok & (g.random((L, D, D2)) < 0.8)
    col, fb = greedy_next_hop_np(my, key, nb, nb_ok, la, la_ok, fb_ok)
    assert (col >= 0).sum() > 100 and ((col < 0) & (fb >= 0)).sum() > 10 and (fb < 0).sum() > 10
    pid = lambda p: int(p).to_bytes(8, "big")  # noqa: E731
    for i in range(L):
        nbrs = {pid(nb[i, j]): int(nb[i, j]) for j in range(D) if nb_ok[i, j]}
        # Lists the node holds: its live neighbours' (la_ok entries) and its dead ones' (the
        # fb_ok entries); entries the np form may not fall back to are what the caller excludes.
        look = {
            pid(nb[i, j]): {
                pid(la[i, j, m]): int(la[i, j, m])
                for m in range(D2)
                if (la_ok[i, j, m] if nb_ok[i, j] else fb_ok[i, j, m])
            }
            for j in range(D)
        }
        excluded = {pid(la[i, j, m]) for j in range(D) for m in range(D2) if la_ok[i, j, m] and not fb_ok[i, j, m]}
        want = ov.greedy_next_hop(int(my[i]), int(key[i]), nbrs, look, exclude=excluded)
        if col[i] >= 0:
            assert want == pid(nb[i, col[i]])
        elif fb[i] >= 0:
            assert want == pid(la[i].reshape(-1)[fb[i]])
        else:
            assert want is None


@pytest.mark.parametrize(("n", "fail"), [(60, 0.0), (400, 0.0), (400, 0.5), (1500, 0.3)])
def test_vectorised_sim_agrees_with_scalar(n: int, fail: float) -> None:
    g = np.random.default_rng(n)
    o = sim.build_overlay(sim.random_positions(n, g), g)
    alive = g.random(n) >= fail
    idx = np.nonzero(alive)[0]
    src = idx[g.integers(0, idx.size, 150)]
    keys = g.integers(0, 2**64, 150, dtype=np.uint64)
    final, hops = sim.route_batch(o, src, keys, alive)
    owners = idx[owner_index_np(o.pos[idx], keys)]
    assert (final == owners).all()
    for s, k, f, h in zip(src.tolist(), keys.tolist(), final.tolist(), hops.tolist()):
        assert sim.route_scalar(o, s, k, alive) == (f, h)

"""``poolai sim``: simulate the overlay at 10^3..10^6 nodes with the routing rules of protocol/.

    poolai sim overlay --n 1000,10000,100000,1000000 --fail 0,0.1,0.3,0.5 [--churn]
                       [--lookups 1000] [--seed S] [--json]
    poolai sim gossip --n 1000,1000000 --fail 0,0.3 [--trials T] [--seed S] [--json]

The overlay is built with the numpy forms of the rules in ``protocol.overlay`` (``protocol._overlay_np``,
proven equal to the scalar ones by tests/protocol/test_overlay.py): sorted uint64 positions,
successors and predecessors by index arithmetic, n_hat from successor spacing smoothed over the
short links, k = ``long_link_count(n_hat)``, harmonic long-link targets whose owners are found with
np.searchsorted, redraws for self/duplicate/short-link owners and for full in-degree (cap 2k).

Lookups advance as one batch, one hop per iteration, with ``greedy_next_hop_np`` (lookahead
included). Model of a failure: a node knows which of its own neighbours are dead (their connection
dropped) and skips them; the neighbour lists it holds for lookahead are the ones advertised before
the failure, so they may name dead nodes. A lookup succeeds when it stops at the key's owner among
the alive nodes within ``hop_limit(n_hat)`` hops of the source's estimate.

Progress goes to stderr; the table to stdout (with ``--json`` its last line is the table as JSON).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass

import numpy as np

from protocol import overlay as ov
from protocol._overlay_np import (
    abs_distance_np,
    estimate_size_np,
    greedy_next_hop_np,
    harmonic_distance_np,
    RingIndex,
    owner_index_np,
    smooth_estimate_np,
)

# Lookups advance in chunks of this many: the lookahead tensor is chunk x D x D entries
# (D <= 16 + 20 + 40 = 76), so 256 keeps each array near 12 MB at 10^6 nodes.
_CHUNK = 256

# Node indices: int32 halves the neighbour matrix (10^6 x 76) against int64; n < 2^31.
_IDX = np.int32


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Building the overlay
# ---------------------------------------------------------------------------------------------


@dataclass
class SimOverlay:
    """A built overlay. Node i sits at ``pos[i]`` (ascending); ``nbr[i]`` lists its neighbours.

    ``nbr`` columns: successors, predecessors, outbound long links, inbound long links; -1 pads.
    """

    pos: np.ndarray  # (n,) uint64, ascending, distinct
    succ: np.ndarray  # (n, s) int64
    pred: np.ndarray  # (n, s) int64
    long: np.ndarray  # (n, LONG_LINKS_MAX) int64, -1 for empty slots
    n_hat: np.ndarray  # (n,) float64, smoothed estimates
    k: np.ndarray  # (n,) int64
    nbr: np.ndarray  # (n, D) int32
    drawn_for: np.ndarray  # (n,) float64: n_hat when the long links were drawn

    @property
    def n(self) -> int:
        return int(self.pos.shape[0])


def random_positions(n: int, rng: np.random.Generator) -> np.ndarray:
    """n distinct uniform uint64 positions, sorted (stand-ins for SHA-256 of random peer IDs)."""
    pos = np.unique(rng.integers(0, 2**64, size=n, dtype=np.uint64, endpoint=False))
    while pos.shape[0] < n:  # a 64-bit collision: ~n^2 / 2^65, never in practice
        more = rng.integers(0, 2**64, size=n - pos.shape[0], dtype=np.uint64)
        pos = np.unique(np.concatenate([pos, more]))
    return pos


def _short_lists(n: int) -> tuple[np.ndarray, np.ndarray]:
    s = min(ov.SUCCESSORS, n - 1)
    idx = np.arange(n, dtype=np.int64)[:, None]
    succ = (idx + np.arange(1, s + 1)) % n
    pred = (idx - np.arange(1, min(ov.PREDECESSORS, n - 1) + 1)) % n
    return succ.astype(_IDX), pred.astype(_IDX)


def _estimates(pos: np.ndarray, succ: np.ndarray, pred: np.ndarray) -> np.ndarray:
    n = pos.shape[0]
    if succ.shape[1] == 0:
        return np.ones(n)
    raw = estimate_size_np(pos, pos[succ[:, -1]], succ.shape[1])
    # smooth_estimate over the node and its short links (known right after joining).
    return smooth_estimate_np(np.concatenate([raw[:, None], raw[succ], raw[pred]], axis=1))


def _fill_long_links(
    pos: np.ndarray,
    long: np.ndarray,
    k: np.ndarray,
    n_hat: np.ndarray,
    s: int,
    rng: np.random.Generator,
) -> None:
    """Fill empty slots ``long[i, j] == -1`` for ``j < k[i]`` by harmonic draws (in place).

    Same rules as ``RoutingTable.wants_long_link`` / ``accept_inbound``: a draw whose owner is the
    drawer, one of its 2s short neighbours or already linked is redrawn, and so is one refused by
    a target that already holds ``in_degree_cap(k)`` inbound links; at most
    ``LONG_LINK_DRAW_ATTEMPTS`` rounds.
    """
    n = pos.shape[0]
    ring = RingIndex(pos)
    cap = ov.IN_DEGREE_FACTOR * k
    have = long >= 0
    indeg = np.bincount(long[have], minlength=n)
    want = np.arange(long.shape[1])[None, :] < k[:, None]
    width = int(k.max()) if n else 0
    for _ in range(ov.LONG_LINK_DRAW_ATTEMPTS):
        rows, cols = np.nonzero(want & (long < 0))
        if rows.size == 0:
            break
        d = harmonic_distance_np(n_hat[rows], rng.random(rows.size))
        own = ring.owner(pos[rows] + d)
        off = (own - rows) % n
        ok = (off > s) & (off < n - s)  # not me, not a short neighbour
        # Not already linked, and not drawn twice this round (keep the lower slot): scan the row
        # with this round's proposals written into the empty slots.
        prop = long.copy()
        prop[rows, cols] = np.where(ok, own, -1)
        for c in range(width):
            other = prop[rows, c]
            ok &= ~((other == own) & ((long[rows, c] >= 0) | (c < cols)))
        del prop
        rows, cols, own = rows[ok], cols[ok], own[ok]
        # In-degree cap: each target accepts requests in random order until it is full.
        m = rows.size
        shift = max(1, int(m).bit_length())
        perm = rng.permutation(m)
        order = np.sort((own[perm].astype(np.int64) << shift) | np.arange(m))
        idx = perm[order & ((1 << shift) - 1)]  # grouped by target, random within a group
        rows, cols, own = rows[idx], cols[idx], own[idx]
        first = np.searchsorted(own, own, side="left")
        acc = indeg[own] + (np.arange(m) - first) < cap[own]
        long[rows[acc], cols[acc]] = own[acc]
        indeg += np.bincount(own[acc], minlength=n)


def _neighbour_matrix(succ: np.ndarray, pred: np.ndarray, long: np.ndarray) -> np.ndarray:
    n = long.shape[0]
    src_rows, _ = np.nonzero(long >= 0)
    dst = long[long >= 0].astype(np.int64)
    shift = max(1, int(n).bit_length())
    both = np.sort((dst << shift) | src_rows)
    dst, src_rows = both >> shift, both & ((1 << shift) - 1)
    indeg = np.bincount(dst, minlength=n)
    width = int(indeg.max()) if dst.size else 0
    inb = np.full((n, width), -1, _IDX)
    if dst.size:
        first = np.searchsorted(dst, dst, side="left")
        inb[dst, np.arange(dst.size) - first] = src_rows
    return np.concatenate([succ, pred, long, inb], axis=1)


def _resmooth(pos: np.ndarray, succ: np.ndarray, nbr: np.ndarray) -> np.ndarray:
    """n_hat smoothed over the node and all its distinct neighbours (short, long, inbound)."""
    n = pos.shape[0]
    raw = estimate_size_np(pos, pos[succ[:, -1]], succ.shape[1]) if succ.shape[1] else np.ones(n)
    out = np.empty(n)
    for lo in range(0, n, 100_000):
        rows = np.sort(nbr[lo : lo + 100_000], axis=1)
        dup = np.zeros(rows.shape, bool)
        dup[:, 1:] = rows[:, 1:] == rows[:, :-1]
        vals = np.where((rows >= 0) & ~dup, raw[np.maximum(rows, 0)], np.nan)
        out[lo : lo + 100_000] = smooth_estimate_np(
            np.concatenate([raw[lo : lo + 100_000, None], vals], axis=1)
        )
    return out


def _relink(
    pos: np.ndarray,
    succ: np.ndarray,
    pred: np.ndarray,
    long: np.ndarray,
    n_hat: np.ndarray,
    drawn_for: np.ndarray,
    rng: np.random.Generator,
) -> SimOverlay:
    """Apply ``needs_redraw``/``long_link_count`` for ``n_hat`` and fill missing long links."""
    k = np.array([ov.long_link_count(x) for x in n_hat.tolist()], np.int64)
    redraw = np.array(
        [d <= 0 or ov.needs_redraw(a, d) for a, d in zip(n_hat.tolist(), drawn_for.tolist())], bool
    )
    long[redraw] = -1
    drawn_for = np.where(redraw, n_hat, drawn_for)
    long[np.arange(long.shape[1])[None, :] >= k[:, None]] = -1  # k shrank: drop the extra ones
    _fill_long_links(pos, long, k, n_hat, succ.shape[1], rng)
    return SimOverlay(pos, succ, pred, long, n_hat, k, _neighbour_matrix(succ, pred, long), drawn_for)


def build_overlay(pos: np.ndarray, rng: np.random.Generator) -> SimOverlay:
    """Build the overlay for sorted distinct ``pos`` with the protocol's rules.

    As a joining node does: short lists first, n_hat smoothed over them, long links drawn for that
    n_hat; then n_hat re-smoothed over all neighbours, and links redrawn where it moved by
    ``REDRAW_FACTOR`` (and topped up or trimmed where k changed).
    """
    n = pos.shape[0]
    succ, pred = _short_lists(n)
    long = np.full((n, ov.LONG_LINKS_MAX), -1, _IDX)
    first = _relink(pos, succ, pred, long, _estimates(pos, succ, pred), np.zeros(n), rng)
    return _relink(pos, succ, pred, long, _resmooth(pos, succ, first.nbr), first.drawn_for, rng)


# ---------------------------------------------------------------------------------------------
# Routing
# ---------------------------------------------------------------------------------------------


def route_batch(
    o: SimOverlay,
    src: np.ndarray,
    keys: np.ndarray,
    alive: np.ndarray | None = None,
    lookahead: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Route lookups from nodes ``src`` to positions ``keys``; returns (final node, hops).

    Hops is -1 for a lookup still moving after ``MAX_LOOKUP_HOPS`` (never with strict progress).
    """
    if alive is None:
        alive = np.ones(o.n, bool)
    finals = np.empty(src.shape[0], np.int64)
    hops_out = np.empty(src.shape[0], np.int64)
    for lo in range(0, src.shape[0], _CHUNK):
        cur = src[lo : lo + _CHUNK].astype(np.int64).copy()
        key = keys[lo : lo + _CHUNK].astype(np.uint64)
        hops = np.zeros(cur.shape[0], np.int64)
        active = np.ones(cur.shape[0], bool)
        for _ in range(ov.MAX_LOOKUP_HOPS + 1):
            a = np.nonzero(active)[0]
            if a.size == 0:
                break
            c = cur[a]
            nb = o.nbr[c]
            has = nb >= 0
            nbc = np.where(has, nb, 0)
            nb_ok = has & alive[nbc]
            la_pos = la_ok = fb_ok = None
            if lookahead:
                # Advertised lists of every neighbour, the dead ones' included: stale, may name
                # dead nodes. The fallback may return only reachable (alive) entries: the scalar
                # caller learns the others by failed dials and excludes them.
                nn = o.nbr[nbc]
                la_ok = (nn >= 0) & nb_ok[:, :, None]
                nnc = np.where(nn >= 0, nn, 0)
                la_pos = o.pos[nnc]
                fb_ok = (nn >= 0) & has[:, :, None] & alive[nnc]
            col, fb = greedy_next_hop_np(o.pos[c], key[a], o.pos[nbc], nb_ok, la_pos, la_ok, fb_ok)
            rows = np.arange(a.size)
            nxt = np.where(col >= 0, nb[rows, np.maximum(col, 0)], -1)
            if lookahead:
                via = np.maximum(fb, 0)
                fbn = nn.reshape(a.size, -1)[rows, via]
                nxt = np.where((col < 0) & (fb >= 0), fbn, nxt)
            stop = nxt < 0
            active[a[stop]] = False
            mv = ~stop
            cur[a[mv]] = nxt[mv]
            hops[a[mv]] += 1
        hops[active] = -1
        finals[lo : lo + _CHUNK] = cur
        hops_out[lo : lo + _CHUNK] = hops
    return finals, hops_out


def route_scalar(
    o: SimOverlay, src: int, key: int, alive: np.ndarray | None = None, lookahead: bool = True
) -> tuple[int, int]:
    """Route one lookup with the scalar ``greedy_next_hop`` (peer ids = node index bytes)."""
    if alive is None:
        alive = np.ones(o.n, bool)
    pid = lambda i: int(i).to_bytes(8, "big")  # noqa: E731
    pos = o.pos.tolist()
    dead = {pid(j) for j in np.nonzero(~alive)[0].tolist()}
    cur, hops = int(src), 0
    while hops <= ov.MAX_LOOKUP_HOPS:
        row = [int(j) for j in o.nbr[cur] if j >= 0]
        nbrs = {pid(j): pos[j] for j in row if alive[j]}
        la = None
        if lookahead:
            la = {pid(j): {pid(m): pos[m] for m in o.nbr[j] if m >= 0} for j in row}
        # The caller excludes what it found unreachable: its dead neighbours and failed dials.
        nxt = ov.greedy_next_hop(pos[cur], int(key), nbrs, la, exclude=dead)
        if nxt is None:
            return cur, hops
        cur, hops = int.from_bytes(nxt, "big"), hops + 1
    return cur, -1


def degree_stats(o: SimOverlay, alive: np.ndarray) -> tuple[float, int]:
    """Mean and max number of distinct alive neighbours over alive nodes."""
    means, mx, total = 0.0, 0, 0
    idx = np.nonzero(alive)[0]
    for lo in range(0, idx.size, 200_000):
        rows = o.nbr[idx[lo : lo + 200_000]]
        rows = np.where((rows >= 0) & alive[np.where(rows >= 0, rows, 0)], rows, -1)
        rows = np.sort(rows, axis=1)
        distinct = (rows[:, :1] >= 0).sum(axis=1) + ((rows[:, 1:] != rows[:, :-1]) & (rows[:, 1:] >= 0)).sum(axis=1)
        means += float(distinct.sum())
        mx = max(mx, int(distinct.max()))
        total += distinct.size
    return means / max(total, 1), mx


def measure(
    o: SimOverlay, alive: np.ndarray, lookups: int, rng: np.random.Generator
) -> dict[str, float]:
    """Route ``lookups`` random lookups among alive nodes; success, hop and degree figures."""
    alive_idx = np.nonzero(alive)[0]
    src = alive_idx[rng.integers(0, alive_idx.size, size=lookups)]
    keys = rng.integers(0, 2**64, size=lookups, dtype=np.uint64)
    target = alive_idx[owner_index_np(o.pos[alive_idx], keys)]
    final, hops = route_batch(o, src, keys, alive)
    limits = np.array([ov.hop_limit(x) for x in o.n_hat[src].tolist()])
    ok = (final == target) & (hops >= 0) & (hops <= limits)
    h = hops[ok] if ok.any() else np.zeros(1)
    mean_deg, max_deg = degree_stats(o, alive)
    return {
        "success": float(ok.mean()),
        "mean_hops": float(h.mean()),
        "p99_hops": float(np.percentile(h, 99)),
        "max_hops": int(h.max()),
        "mean_degree": mean_deg,
        "max_degree": max_deg,
    }


# ---------------------------------------------------------------------------------------------
# Gossip: anti-entropy of a new chain head
# ---------------------------------------------------------------------------------------------

# A head that no node has seen after this many rounds counts as not converged: 4x the push-pull
# bound log3(n) + O(log log n) at 10^6 nodes, so only a partitioned swarm reaches it.
GOSSIP_MAX_ROUNDS = 64


def alive_neighbours(o: SimOverlay, alive: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per node, its distinct alive neighbours packed to the left, and how many there are.

    These are a node's live connections: the peers node/ledger.py picks from for anti-entropy (a dead
    neighbour's connection has dropped, so it is never picked)."""
    n = o.n
    out = np.full(o.nbr.shape, -1, _IDX)
    counts = np.zeros(n, np.int64)
    for lo in range(0, n, 200_000):
        rows = np.sort(o.nbr[lo : lo + 200_000], axis=1)
        ok = rows >= 0
        ok &= alive[np.where(ok, rows, 0)]
        ok[:, 1:] &= rows[:, 1:] != rows[:, :-1]
        ok &= alive[lo : lo + 200_000, None]
        # stable sort on "not ok" packs the kept ones to the left in their order
        order = np.argsort(~ok, axis=1, kind="stable")
        packed = np.take_along_axis(rows, order, axis=1)
        kept = np.take_along_axis(ok, order, axis=1)
        out[lo : lo + 200_000] = np.where(kept, packed, -1)
        counts[lo : lo + 200_000] = ok.sum(axis=1)
    return out, counts


def gossip_rounds(peers: np.ndarray, counts: np.ndarray, source: int, rng: np.random.Generator,
                  max_rounds: int = GOSSIP_MAX_ROUNDS) -> int:
    """Rounds of push-pull until every node with a live connection holds the head from ``source``.

    Each round every live node syncs with one uniformly chosen live connection, as the ledger's
    anti-entropy loop does every SYNC_INTERVAL_S: both sides leave with the union of what they hold
    (pull: the caller learns the head; push: the peer does). -1 when ``max_rounds`` pass first."""
    n = counts.shape[0]
    active = counts > 0
    nodes = np.nonzero(active)[0]
    if not active[source]:
        return -1  # a source with no live connection never spreads its head
    held = np.zeros(n, bool)
    held[source] = True
    need = int(active.sum())
    for r in range(1, max_rounds + 1):
        pick = (rng.random(nodes.size) * counts[nodes]).astype(np.int64)
        partner = peers[nodes, pick].astype(np.int64)
        had = held.copy()
        held[nodes] |= had[partner]  # pull
        held[partner[had[nodes]]] = True  # push
        if int(held[active].sum()) >= need:
            return r
    return -1


def measure_gossip(o: SimOverlay, alive: np.ndarray, trials: int, rng: np.random.Generator) -> dict[str, float]:
    """Spread ``trials`` heads, each from a random alive node; rounds until all live nodes hold it."""
    peers, counts = alive_neighbours(o, alive)
    sources = np.nonzero(alive & (counts > 0))[0]
    rounds = np.array([gossip_rounds(peers, counts, int(rng.choice(sources)), rng) for _ in range(trials)])
    done = rounds[rounds > 0]
    return {
        "trials": int(trials),
        "mean_rounds": float(done.mean()) if done.size else float("nan"),
        "p99_rounds": float(np.percentile(done, 99)) if done.size else float("nan"),
        "converged": float(done.size / trials),
    }


# ---------------------------------------------------------------------------------------------
# Churn
# ---------------------------------------------------------------------------------------------

# Session lengths: Weibull with shape 0.5, as measured for P2P sessions (Stutzbach & Rejaie,
# "Understanding churn in peer-to-peer networks", 2006): many short sessions, a heavy tail.
_WEIBULL_SHAPE = 0.5


def _lifetimes(size: int, mean_rounds: float, rng: np.random.Generator) -> np.ndarray:
    scale = mean_rounds / math.gamma(1.0 + 1.0 / _WEIBULL_SHAPE)
    return scale * rng.weibull(_WEIBULL_SHAPE, size)


def run_churn(
    n: int, rounds: int, session_mean: float, lookups: int, rng: np.random.Generator
) -> list[dict[str, float]]:
    """Churn with repair rounds at a constant population of ``n``.

    Each round: nodes whose session ends leave (new ones with fresh sessions replace them, and
    join at the next repair); then lookups run on the unrepaired overlay (dead links are skipped,
    lookahead lists are stale); then repair: successor/predecessor lists from the alive ring,
    n_hat re-estimated, dead long links (and all of a node's links when ``needs_redraw``)
    redrawn, joiners draw theirs.
    """
    pos = random_positions(n, rng)
    o = build_overlay(pos, rng)
    life = _lifetimes(n, session_mean, rng)
    out = []
    for r in range(1, rounds + 1):
        life -= 1.0
        alive = life > 0
        leaving = int((~alive).sum())
        # Stale links: entries of alive nodes' tables that point at dead nodes.
        rows = o.nbr[alive]
        have = rows >= 0
        stale = float((have & ~alive[np.where(have, rows, 0)]).sum() / max(have.sum(), 1))
        res = measure(o, alive, lookups, rng)
        res.update(round=r, n=n, left=leaving, stale_links=stale)
        out.append(res)
        _log(
            f"  churn n={n} round {r}: left {leaving}, stale links {stale:.3f}, "
            f"success {res['success']:.3f}, mean hops {res['mean_hops']:.2f}"
        )
        # Repair: survivors keep their long links (remapped), joiners arrive.
        joiners = random_positions(leaving, rng) if leaving else np.zeros(0, np.uint64)
        old = np.nonzero(alive)[0]
        all_pos = np.concatenate([o.pos[old], joiners])
        order = np.argsort(all_pos, kind="stable")
        new_pos = all_pos[order]
        if np.unique(new_pos).size != new_pos.size:  # a joiner collided: practically never
            raise RuntimeError("position collision in churn simulation")
        new_index_of_old = np.full(o.n, -1, np.int64)
        inv = np.empty_like(order)
        inv[order] = np.arange(order.size)
        new_index_of_old[old] = inv[: old.size]
        long = np.full((n, ov.LONG_LINKS_MAX), -1, _IDX)
        kept = o.long[old]
        long[inv[: old.size]] = np.where(kept >= 0, new_index_of_old[np.where(kept >= 0, kept, 0)], -1)
        prev_draw = np.zeros(n)
        prev_draw[inv[: old.size]] = o.drawn_for[old]
        succ, pred = _short_lists(n)
        # n_hat smoothed over the surviving links as they were plus the new short lists.
        draft = _neighbour_matrix(succ, pred, long)
        o = _relink(new_pos, succ, pred, long, _resmooth(new_pos, succ, draft), prev_draw, rng)
        life = np.concatenate([life[old], _lifetimes(leaving, session_mean, rng)])[order]
    return out


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def _ints(text: str) -> list[int]:
    return [int(float(x)) for x in text.split(",") if x]


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="poolai sim", description="Simulate the poolai overlay.")
    sub = p.add_subparsers(dest="what", required=True)
    o = sub.add_parser("overlay", help="greedy routing on the small-world overlay")
    o.add_argument("--n", type=_ints, default=[1000, 10000], help="comma-separated node counts")
    o.add_argument("--fail", type=_floats, default=[0.0], help="comma-separated failed fractions")
    o.add_argument("--lookups", type=int, default=1000, help="lookups per cell")
    o.add_argument("--seed", type=int, default=1)
    o.add_argument("--json", action="store_true", help="last line: the table as JSON")
    o.add_argument("--churn", action="store_true", help="also run churn with repair rounds")
    o.add_argument("--rounds", type=int, default=10, help="churn: repair rounds")
    o.add_argument(
        "--session-mean", type=float, default=60.0, help="churn: mean session length in rounds"
    )
    g = sub.add_parser("gossip", help="push-pull anti-entropy of a new chain head over the overlay")
    g.add_argument("--n", type=_ints, default=[1000, 1000000], help="comma-separated node counts")
    g.add_argument("--fail", type=_floats, default=[0.0, 0.3], help="comma-separated crashed fractions")
    g.add_argument("--trials", type=int, default=0,
                   help="heads spread per cell (default: 200 at 10^3, fewer as n grows, at least 5)")
    g.add_argument("--seed", type=int, default=1)
    g.add_argument("--json", action="store_true", help="last line: the table as JSON")
    return p


def _overlay_cmd(args: argparse.Namespace) -> int:
    rng = np.random.default_rng(args.seed)
    table: list[dict[str, float]] = []
    churn: list[dict[str, float]] = []
    for n in args.n:
        t0 = time.perf_counter()
        o = build_overlay(random_positions(n, rng), rng)
        _log(f"n={n}: built in {time.perf_counter() - t0:.1f}s ({int(o.k.min())}..{int(o.k.max())} long links per node)")
        for f in args.fail:
            t1 = time.perf_counter()
            alive = rng.random(n) >= f
            res = measure(o, alive, args.lookups, rng)
            row = {"n": n, "fail": f, **res}
            table.append(row)
            _log(
                f"  fail={f}: success {res['success']:.4f}, mean hops {res['mean_hops']:.2f} "
                f"({time.perf_counter() - t1:.1f}s)"
            )
        del o
        if args.churn:
            churn.extend(run_churn(n, args.rounds, args.session_mean, args.lookups, rng))

    print(f"{'n':>9} {'fail':>5} {'mean hops':>9} {'p99 hops':>8} {'success':>8} {'mean deg':>8} {'max deg':>7}")
    for r in table:
        print(
            f"{r['n']:>9} {r['fail']:>5.2f} {r['mean_hops']:>9.2f} {r['p99_hops']:>8.1f} "
            f"{r['success']:>8.4f} {r['mean_degree']:>8.1f} {r['max_degree']:>7}"
        )
    if churn:
        print(f"\n{'n':>9} {'round':>5} {'left':>7} {'stale':>6} {'success':>8} {'mean hops':>9}")
        for r in churn:
            print(
                f"{r['n']:>9} {r['round']:>5} {r['left']:>7} {r['stale_links']:>6.3f} "
                f"{r['success']:>8.4f} {r['mean_hops']:>9.2f}"
            )
    if args.json:
        if churn:
            print(json.dumps({"churn": churn}))
        keys = ("n", "fail", "mean_hops", "p99_hops", "success", "mean_degree", "max_degree")
        print(json.dumps([{k: r[k] for k in keys} for r in table]))
    return 0


def _gossip_cmd(args: argparse.Namespace) -> int:
    rng = np.random.default_rng(args.seed)
    table: list[dict[str, float]] = []
    for n in args.n:
        t0 = time.perf_counter()
        o = build_overlay(random_positions(n, rng), rng)
        _log(f"n={n}: built in {time.perf_counter() - t0:.1f}s")
        trials = args.trials or max(5, min(200, 200_000 // n))
        for f in args.fail:
            t1 = time.perf_counter()
            alive = rng.random(n) >= f
            res = measure_gossip(o, alive, trials, rng)
            table.append({"n": n, "fail": f, **res})
            _log(f"  fail={f}: mean {res['mean_rounds']:.2f} rounds, p99 {res['p99_rounds']:.0f}, "
                 f"{res['converged']:.3f} converged ({time.perf_counter() - t1:.1f}s)")
        del o
    print(f"{'n':>9} {'fail':>5} {'trials':>6} {'mean rounds':>11} {'p99 rounds':>10} {'converged':>9}")
    for r in table:
        print(f"{r['n']:>9} {r['fail']:>5.2f} {r['trials']:>6} {r['mean_rounds']:>11.2f} "
              f"{r['p99_rounds']:>10.1f} {r['converged']:>9.3f}")
    if args.json:
        print(json.dumps(table))
    return 0


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if args.what == "overlay":
        return _overlay_cmd(args)
    if args.what == "gossip":
        return _gossip_cmd(args)
    return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

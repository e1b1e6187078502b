"""numpy versions of the overlay's decision rules, for the simulator (``node/sim.py``).

Each function here is the array form of one scalar rule in ``protocol.overlay`` and
``tests/protocol/test_overlay.py`` checks that both give the same answers. Positions are ``uint64``
arrays; node indices are ``int64`` arrays with ``-1`` meaning "no node" (padding).
"""

from __future__ import annotations

import numpy as np

from protocol.overlay import RING_SIZE

_U64_MAX = np.uint64(np.iinfo(np.uint64).max)
_RING_F = float(RING_SIZE)


def ring_distance_np(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Clockwise distance a -> b, elementwise (``ring_distance``)."""
    return np.subtract(np.asarray(b, np.uint64), np.asarray(a, np.uint64), dtype=np.uint64)


def abs_distance_np(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The shorter way round, elementwise (``abs_distance``)."""
    a = np.asarray(a, np.uint64)
    b = np.asarray(b, np.uint64)
    return np.minimum(
        np.subtract(b, a, dtype=np.uint64), np.subtract(a, b, dtype=np.uint64)
    )


def estimate_size_np(my_pos: np.ndarray, farthest_pos: np.ndarray, count: int | np.ndarray) -> np.ndarray:
    """``estimate_size`` given each node's farthest successor and how many successors it has."""
    far = ring_distance_np(my_pos, farthest_pos).astype(np.float64)
    count = np.asarray(count, np.float64)
    with np.errstate(divide="ignore"):
        est = count * _RING_F / far
    est = np.where(far > 0, est, count)
    return np.where(count > 0, est, 1.0)


def smooth_estimate_np(values: np.ndarray) -> np.ndarray:
    """``smooth_estimate`` row by row: column 0 is the node's own estimate, NaN pads a row."""
    s = np.sort(values, axis=1)  # NaN sorts last
    m = (~np.isnan(s)).sum(axis=1)
    hi = np.take_along_axis(s, (m // 2)[:, None], axis=1)[:, 0]
    lo = np.take_along_axis(s, np.maximum(m // 2 - 1, 0)[:, None], axis=1)[:, 0]
    return np.where(m % 2 == 1, hi, np.sqrt(lo * hi))


def harmonic_distance_np(n_hat: np.ndarray, u: np.ndarray) -> np.ndarray:
    """``harmonic_distance`` elementwise, as uint64 in [1, 2**64)."""
    n_hat = np.maximum(np.asarray(n_hat, np.float64), 1.0)
    frac = np.exp((np.asarray(u, np.float64) - 1.0) * np.log(n_hat))
    big = frac >= 1.0
    d = (np.where(big, 0.0, frac) * _RING_F).astype(np.uint64)
    d = np.where(big, _U64_MAX, d)
    return np.maximum(d, np.uint64(1))


def owner_index_np(
    sorted_pos: np.ndarray, keys: np.ndarray, first: np.ndarray | None = None
) -> np.ndarray:
    """Index into ``sorted_pos`` (ascending, distinct) of each key's owner (``owner``).

    ``first``: ``np.searchsorted(sorted_pos, keys, side="left")`` if already known.
    """
    n = sorted_pos.shape[0]
    keys = np.asarray(keys, np.uint64)
    if first is None:
        first = np.searchsorted(sorted_pos, keys, side="left")
    hi = first % n  # first at or after the key
    lo = (hi - 1) % n  # last before it
    p_hi, p_lo = sorted_pos[hi], sorted_pos[lo]
    d_hi, d_lo = abs_distance_np(p_hi, keys), abs_distance_np(p_lo, keys)
    take_lo = (d_lo < d_hi) | ((d_lo == d_hi) & (p_lo < p_hi))
    return np.where(take_lo, lo, hi)


class RingIndex:
    """``owner_index_np`` for many lookups on one fixed ring, in O(1) per key.

    Positions are uniform, so a table of where each of ~n equal buckets of the ring starts turns
    the binary search (random memory access, the slow part at 10^6 nodes) into one table read and
    a scan of ~1 entry. Gives exactly ``np.searchsorted(sorted_pos, keys, side="left")``.
    """

    def __init__(self, sorted_pos: np.ndarray) -> None:
        self.pos = np.asarray(sorted_pos, np.uint64)
        n = self.pos.shape[0]
        self.bits = max(1, min(30, int(n).bit_length()))
        self.shift = np.uint64(64 - self.bits)
        edges = np.arange(1 << self.bits, dtype=np.uint64) << self.shift
        self.starts = np.append(np.searchsorted(self.pos, edges, side="left"), n).astype(np.int64)

    def first_at_or_after(self, keys: np.ndarray) -> np.ndarray:
        keys = np.asarray(keys, np.uint64)
        b = (keys >> self.shift).astype(np.int64)
        i = self.starts[b]
        end = self.starts[b + 1]
        act = np.nonzero(i < end)[0]
        n = self.pos.shape[0]
        while act.size:
            ia = i[act]
            step = (ia < end[act]) & (self.pos[np.minimum(ia, n - 1)] < keys[act])
            act = act[step]
            i[act] += 1
        return i

    def owner(self, keys: np.ndarray) -> np.ndarray:
        """Same as ``owner_index_np(self.pos, keys)``."""
        return owner_index_np(self.pos, keys, self.first_at_or_after(keys))


def _closer(d: np.ndarray, p: np.ndarray, d0: np.ndarray, p0: np.ndarray) -> np.ndarray:
    """rank (d, p) < rank (d0, p0), elementwise with broadcasting."""
    return (d < d0) | ((d == d0) & (p < p0))


def greedy_next_hop_np(
    my_pos: np.ndarray,
    key_pos: np.ndarray,
    nb_pos: np.ndarray,
    nb_ok: np.ndarray,
    la_pos: np.ndarray | None = None,
    la_ok: np.ndarray | None = None,
    fb_ok: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``greedy_next_hop`` for a batch of L lookups.

    Shapes: ``my_pos``, ``key_pos`` (L,); ``nb_pos``, ``nb_ok`` (L, D): each lookup's current
    node's neighbours and which of them it can reach (alive, not excluded); ``la_pos``, ``la_ok``
    (L, D, D2): each neighbour's advertised list and which entries exist; ``fb_ok`` (L, D, D2):
    which advertised entries the fallback may return (exist and not excluded, i.e. reachable).
    Positions must be distinct per node, so that ``rank`` alone orders them (the scalar rule's
    peer-id tie-break then never matters).

    Returns ``(col, fb)``: ``col[l]`` the chosen column of ``nb_pos`` or -1; when it is -1,
    ``fb[l]`` is the flat index into the (D, D2) lookahead of the fallback peer, or -1 (owner).
    """
    key = np.asarray(key_pos, np.uint64)[:, None]
    d0 = abs_distance_np(my_pos, key[:, 0])[:, None]
    p0 = np.asarray(my_pos, np.uint64)[:, None]
    d = abs_distance_np(nb_pos, key)
    eligible = nb_ok & _closer(d, nb_pos, d0, p0)
    la_d, la_p = d, nb_pos
    big = _U64_MAX
    L = nb_pos.shape[0]
    fb = np.full(L, -1, np.int64)
    if la_pos is not None:
        d2 = abs_distance_np(la_pos, key[:, :, None])
        dm = np.where(la_ok, d2, big)
        best_d2 = dm.min(axis=2)
        best_p2 = np.where(dm == best_d2[:, :, None], la_pos, big).min(axis=2)
        use2 = la_ok.any(axis=2) & _closer(best_d2, best_p2, d, nb_pos)
        la_d = np.where(use2, best_d2, d)
        la_p = np.where(use2, best_p2, nb_pos)
        if fb_ok is not None:
            stuck = ~eligible.any(axis=1)
            if stuck.any():
                rows = np.nonzero(stuck)[0]
                fd2 = d2[rows].reshape(rows.size, -1)
                fp2 = la_pos[rows].reshape(rows.size, -1)
                ok = fb_ok[rows].reshape(rows.size, -1) & _closer(fd2, fp2, d0[rows], p0[rows])
                pick = np.lexsort((np.where(ok, fp2, big), np.where(ok, fd2, big)), axis=-1)[:, 0]
                fb[rows] = np.where(ok.any(axis=1), pick, -1)
    keys = (
        np.where(eligible, nb_pos, big),
        np.where(eligible, d, big),
        np.where(eligible, la_p, big),
        np.where(eligible, la_d, big),
    )
    col = np.lexsort(keys, axis=-1)[:, 0]
    return np.where(eligible.any(axis=1), col, -1), fb

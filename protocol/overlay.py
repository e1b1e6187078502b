"""The small-world overlay: ring geometry, size estimation, long links and greedy routing.

Pure and sans-IO: no sockets, no clock, no trio/libp2p/torch. Randomness is passed in as a
``random.Random``. The node service (``node/``) runs these functions over real libp2p hosts and the
simulator (``node/sim.py``) runs the very same rules (or numpy versions of them that
``tests/protocol/test_overlay.py`` proves equal) for 10^3..10^6 nodes.

Geometry
--------
Every node sits at ``ring_position(peer_id)`` on a ring of ``2**RING_BITS`` points. Distances are
unsigned integers modulo ``2**RING_BITS``.

* Routing metric: ``abs_distance`` (the shorter way round). A node keeps 8 successors *and*
  8 predecessors, and a long link is a libp2p connection, which carries traffic both ways, so a node
  can use the links others drew towards it (its inbound links, which reach counter-clockwise at
  harmonic distances) as well as its own (which reach clockwise). With both directions available
  the shorter-way metric never has to walk the long way round, and it is symmetric, which makes the
  owner of a key well defined without a "successor of" convention.
* Owner of a key: the node that minimises ``rank(pos, key) = (abs_distance(pos, key), pos)``
  among the nodes alive; the position breaks the (measure-zero) tie of two nodes equally far on
  both sides. ``closest_peers(key, candidates, 1)`` returns it; a record is stored on the
  ``RECORD_REPLICAS`` first entries of ``closest_peers``.

Routing rule (``greedy_next_hop``)
----------------------------------
Every hop goes to a peer strictly closer to the key (by ``rank``) than the current node: a
neighbour, the one whose own advertised neighbours (lookahead) get closest to the key, ties
broken by the neighbour's own rank; or, when no live neighbour is closer (failures not yet
repaired), the closest peer named in the lists neighbours advertised, dialled directly. When
nobody known is closer, the current node owns the key. Strict progress means a lookup can never
loop, even when the lookahead lists are stale or a neighbour lies about them, and
``check_hop_answer`` can flag a peer that breaks it.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Container, Iterable, Mapping
from dataclasses import dataclass, field

__all__ = [
    "RING_BITS",
    "RING_SIZE",
    "SUCCESSORS",
    "PREDECESSORS",
    "LONG_LINKS_MIN",
    "LONG_LINKS_MAX",
    "IN_DEGREE_FACTOR",
    "MAX_LOOKUP_HOPS",
    "REDRAW_FACTOR",
    "RECORD_REPLICAS",
    "LONG_LINK_DRAW_ATTEMPTS",
    "ring_position",
    "ring_distance",
    "abs_distance",
    "rank",
    "estimate_size",
    "smooth_estimate",
    "long_link_count",
    "in_degree_cap",
    "harmonic_distance",
    "draw_long_link_targets",
    "greedy_next_hop",
    "closest_peers",
    "owner",
    "check_hop_answer",
    "hop_limit",
    "needs_redraw",
    "RoutingTable",
]

# 64 bits: positions only need to be distinct and uniform. With n = 10^6 nodes the chance that two
# share a position is about n^2 / 2^65 ~ 3e-8, and the smallest harmonic step (one n-th of the
# ring) is still 2^44 points wide, so the draw is never quantised. 64 bits also fit one uint64,
# which is what lets the simulator hold 10^6 positions in 8 MB and use np.searchsorted.
RING_BITS = 64
RING_SIZE = 1 << RING_BITS
_RING_MASK = RING_SIZE - 1

# 8 successors: the ring stays connected unless 8 consecutive nodes fail before stabilisation
# repairs it (0.5^8 = 0.4% per node even with half the nodes gone), and 8 gaps give a size estimate
# within a factor 2 for ~94% of nodes before smoothing.
SUCCESSORS = 8
# 8 predecessors: routing uses the shorter way round (abs_distance), so the last hops approach the
# key from either side and need the same redundancy counter-clockwise.
PREDECESSORS = 8

# Long links k = clamp(ceil(log2 n_hat), 8, 20). log2 n links give O(log n) greedy hops (Symphony);
# the floor of 8 keeps small swarms well meshed (gossipsub wants degree >= 6) and the ceiling of 20
# is log2 of 10^6: beyond that, extra links buy less than a hop and cost a libp2p connection each.
LONG_LINKS_MIN = 8
LONG_LINKS_MAX = 20

# In-degree cap 2k: a node whose gap on the ring is unusually wide attracts many harmonic draws;
# capping inbound links at twice the expected in-degree (k) bounds its connection count while
# refusing only a few percent of draws, which the drawer simply redraws.
IN_DEGREE_FACTOR = 2

# Hop bound: greedy routing with lookahead over k >= 8 harmonic links takes O(log n / log k) hops
# (Manku, Naor, Wieder: "Know thy neighbour's neighbour"). Measured (docs/overlay.md): p99 7 hops at
# 10^6 nodes, 15 with half of them failed and no repair. The TTL hop_limit(n_hat) =
# clamp(3 * ceil(log2 n_hat), 8, 64) is 60 at 10^6, four times that worst p99, and still holds if
# n_hat is off by a factor 2; the cap of 64 bounds a lookup whatever a (lied-to) estimate says.
# Every hop is strictly closer to the key, so the TTL never cuts a loop, only a pathological detour.
MAX_LOOKUP_HOPS = 64
_HOPS_PER_LOG2 = 3
_MIN_LOOKUP_HOPS = 8

# Long links are redrawn when n_hat doubles or halves: the harmonic distribution depends on n_hat
# only through log n_hat, so a factor 2 moves it by 1/log2(n) (under 10% at 10^3 nodes); redrawing
# more often would churn connections for no routing gain.
REDRAW_FACTOR = 2

# Records live on the 4 nodes closest to their key: a record survives unless all 4 of them fail
# before re-replication (0.5^4 = 6% at half the nodes gone at once, 0.3^4 < 1% at 30%), and a
# lookup that lands on any of them finds it.
RECORD_REPLICAS = 4

# A long-link draw whose owner is the drawer itself, an existing neighbour, or a node whose
# in-degree is full is redrawn, at most this many times per link: P(a draw lands among the 8
# short neighbours) = log(8)/log(n_hat), at most 3/8 for n_hat >= 256, so 8 tries fail with
# probability below 0.4^8 = 7e-4.
LONG_LINK_DRAW_ATTEMPTS = 8


# ---------------------------------------------------------------------------------------------
# Geometry
# ---------------------------------------------------------------------------------------------


def ring_position(peer_id: bytes) -> int:
    """The node's position: the first 8 bytes of SHA-256(peer_id) as a big-endian unsigned int."""
    return int.from_bytes(hashlib.sha256(peer_id).digest()[: RING_BITS // 8], "big")


def ring_distance(a: int, b: int) -> int:
    """Clockwise distance from ``a`` to ``b`` (how far ``b`` is ahead of ``a``), in [0, 2**64)."""
    return (b - a) & _RING_MASK


def abs_distance(a: int, b: int) -> int:
    """The shorter way round between ``a`` and ``b``: min of both clockwise distances.

    This is the routing metric (see the module docstring for why it is bidirectional).
    """
    d = (b - a) & _RING_MASK
    return min(d, RING_SIZE - d) if d else 0


def rank(pos: int, key_pos: int) -> tuple[int, int]:
    """Total order of nodes by closeness to ``key_pos``: distance first, position breaks ties."""
    return (abs_distance(pos, key_pos), pos)


# ---------------------------------------------------------------------------------------------
# Size estimate and long links
# ---------------------------------------------------------------------------------------------


def estimate_size(my_pos: int, successor_positions: Iterable[int]) -> float:
    """n_hat from the spacing of successors: ``len * 2**64 / distance to the farthest one``.

    ``s`` uniform random gaps summing to ``d`` suggest ``s / d`` nodes per ring unit. Returns 1.0
    for a node that knows no successor (it is alone), and ``float(len)`` if they all share its
    position (degenerate, never with SHA-256 positions).
    """
    dists = [ring_distance(my_pos, p) for p in successor_positions]
    if not dists:
        return 1.0
    far = max(dists)
    if far == 0:
        return float(len(dists))
    # float(far) first, exactly as the numpy version does, so both round the same way.
    return len(dists) * float(RING_SIZE) / float(far)


def smooth_estimate(own: float, neighbour_estimates: Iterable[float]) -> float:
    """Median of the node's own estimate and its neighbours' (geometric mean of the middle pair).

    Median, not mean: a neighbour that lies about its estimate (or has a wildly unlucky spacing:
    the raw estimate is 8 / Gamma(8), skewed with a heavy right tail) moves a median by at most one
    rank, and a minority of liars cannot drag it anywhere. In log space: n_hat is a scale, and only
    log n_hat matters to the harmonic draw; for an even count the middle pair is averaged as
    logs (sqrt(a * b)) so that factor-2 errors up and down weigh the same.
    """
    values = sorted([own, *neighbour_estimates])
    m = len(values)
    if m % 2:
        return values[m // 2]
    return math.sqrt(values[m // 2 - 1] * values[m // 2])


def long_link_count(n_hat: float) -> int:
    """k = clamp(ceil(log2 n_hat), LONG_LINKS_MIN, LONG_LINKS_MAX)."""
    if not n_hat > 1.0:
        return LONG_LINKS_MIN
    return max(LONG_LINKS_MIN, min(LONG_LINKS_MAX, math.ceil(math.log2(n_hat))))


def in_degree_cap(k: int) -> int:
    """How many inbound long links a node with ``k`` long links accepts."""
    return IN_DEGREE_FACTOR * k


def harmonic_distance(n_hat: float, u: float) -> int:
    """Clockwise distance ``2**64 * n_hat**(u - 1)`` for ``u`` in [0, 1), as an int in [1, 2**64).

    With u uniform, log(distance / 2**64) is uniform on [-log n_hat, 0): the Symphony / Kleinberg
    harmonic density p(x) ~ 1 / (x log n_hat) for x in [1/n_hat, 1) of the ring.
    """
    n_hat = max(n_hat, 1.0)
    frac = math.exp((u - 1.0) * math.log(n_hat))
    d = int(frac * float(RING_SIZE)) if frac < 1.0 else _RING_MASK
    return min(max(d, 1), _RING_MASK)


def draw_long_link_targets(my_pos: int, n_hat: float, k: int, rng: random.Random) -> list[int]:
    """``k`` long-link target positions ``my_pos + harmonic_distance(n_hat, u)`` (mod 2**64).

    The link goes to the target's owner (``owner``/``closest_peers``), found by a lookup.
    """
    return [(my_pos + harmonic_distance(n_hat, rng.random())) & _RING_MASK for _ in range(k)]


def needs_redraw(n_hat_now: float, n_hat_at_draw: float) -> bool:
    """True when n_hat has doubled or halved (``REDRAW_FACTOR``) since the long links were drawn."""
    if n_hat_at_draw <= 0.0:
        return True
    ratio = n_hat_now / n_hat_at_draw
    return ratio >= REDRAW_FACTOR or ratio <= 1.0 / REDRAW_FACTOR


# ---------------------------------------------------------------------------------------------
# Routing
# ---------------------------------------------------------------------------------------------


def closest_peers(key_pos: int, candidates: Mapping[bytes, int], count: int) -> list[bytes]:
    """The ``count`` candidates closest to ``key_pos`` by ``rank`` (peer id breaks exact ties)."""
    ordered = sorted(candidates.items(), key=lambda kv: (*rank(kv[1], key_pos), kv[0]))
    return [pid for pid, _ in ordered[: max(count, 0)]]


def owner(key_pos: int, candidates: Mapping[bytes, int]) -> bytes | None:
    """The node that owns ``key_pos`` among ``candidates`` (``None`` if there are none)."""
    best = closest_peers(key_pos, candidates, 1)
    return best[0] if best else None


def greedy_next_hop(
    my_pos: int,
    key_pos: int,
    neighbours: Mapping[bytes, int],
    lookahead: Mapping[bytes, Mapping[bytes, int]] | None = None,
    exclude: Container[bytes] = (),
) -> bytes | None:
    """The peer to forward a lookup for ``key_pos`` to, or ``None`` if this node owns the key.

    ``neighbours``: the peers this node is connected to right now (dead ones already removed).
    ``lookahead``: the neighbour lists that neighbours last advertised, by neighbour; may be stale,
    may name dead peers, and may include lists of neighbours that have since died.
    ``exclude``: peers known unreachable (dead neighbours, failed dials); never returned.
    Positions in ``lookahead`` must be ``ring_position`` of their peer id, recomputed by the
    caller: an advertised position is never trusted.

    1. Greedy with lookahead: only neighbours strictly closer to the key (``rank``) than this node
       are eligible (strict progress: no loops, whatever the lookahead says). The winner minimises
       ``(best rank among itself and its advertised neighbours, its own rank, peer id)``. Without
       lookahead this is plain greedy.
    2. Fallback, only when no neighbour is closer (after failures, before repair): the closest
       peer named in any advertised list, if strictly closer than this node and not excluded.
       It is not a neighbour: the caller dials it, and on failure adds it to ``exclude`` and asks
       again. On an intact ring this never triggers.

    ``None``: nobody known is closer. When successor and predecessor lists are right, that is
    exactly when this node is the key's owner.
    """
    mine = rank(my_pos, key_pos)
    best_key: tuple | None = None
    best_peer: bytes | None = None
    for pid, pos in neighbours.items():
        r = rank(pos, key_pos)
        if not r < mine or pid in exclude:
            continue
        la = r
        if lookahead is not None:
            for pos2 in lookahead.get(pid, {}).values():
                r2 = rank(pos2, key_pos)
                if r2 < la:
                    la = r2
        cand = (la, r, pid)
        if best_key is None or cand < best_key:
            best_key, best_peer = cand, pid
    if best_peer is not None or not lookahead:
        return best_peer
    fallback: tuple | None = None
    for table in lookahead.values():
        for pid2, pos2 in table.items():
            r2 = rank(pos2, key_pos)
            if pid2 in neighbours or pid2 in exclude or not r2 < mine:
                continue
            if fallback is None or (r2, pid2) < fallback:
                fallback = (r2, pid2)
    return None if fallback is None else fallback[1]


def check_hop_answer(my_pos_of_answerer: int, key_pos: int, answered_pos: int) -> bool:
    """False when a peer answered a lookup hop with a node not strictly closer to the key than itself.

    Honest peers follow ``greedy_next_hop``, which only ever names strictly closer nodes, so a
    False here is proof of a lie (or a bug): the caller drops the answer and penalises the peer
    (a RemoteProtocolError in the node). True does not prove the answer is the best one.
    """
    return rank(answered_pos, key_pos) < rank(my_pos_of_answerer, key_pos)


def hop_limit(n_hat: float) -> int:
    """The TTL of a lookup: clamp(3 * ceil(log2 n_hat), 8, MAX_LOOKUP_HOPS) hops."""
    logn = math.ceil(math.log2(n_hat)) if n_hat > 1.0 else 1
    return max(_MIN_LOOKUP_HOPS, min(MAX_LOOKUP_HOPS, _HOPS_PER_LOG2 * logn))


# ---------------------------------------------------------------------------------------------
# Routing table
# ---------------------------------------------------------------------------------------------


@dataclass
class RoutingTable:
    """One node's view of the overlay: short links, long links and inbound long links.

    Pure bookkeeping; the node service feeds it what it learns (stabilisation answers, link
    requests, dead connections) and acts on what it returns. All peer maps are ``{peer_id: pos}``.
    """

    my_id: bytes
    my_pos: int = -1
    n_hat: float = 1.0
    n_hat_at_draw: float = 0.0
    successors: dict[bytes, int] = field(default_factory=dict)
    predecessors: dict[bytes, int] = field(default_factory=dict)
    long_links: dict[bytes, int] = field(default_factory=dict)
    inbound: dict[bytes, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.my_pos < 0:
            self.my_pos = ring_position(self.my_id)

    # -- short links (stabilisation) --------------------------------------------------------

    def merge_successors(self, candidates: Mapping[bytes, int]) -> None:
        """Merge a successor list received from a peer (plus that peer); keep the 8 closest clockwise.

        ``candidates`` must be alive as far as the caller knows; dead peers are ``remove``d.
        """
        pool = {**self.successors, **candidates}
        pool.pop(self.my_id, None)
        ordered = sorted(pool.items(), key=lambda kv: (ring_distance(self.my_pos, kv[1]), kv[0]))
        self.successors = dict(ordered[:SUCCESSORS])

    def merge_predecessors(self, candidates: Mapping[bytes, int]) -> None:
        """As ``merge_successors``, counter-clockwise: keep the 8 closest predecessors."""
        pool = {**self.predecessors, **candidates}
        pool.pop(self.my_id, None)
        ordered = sorted(pool.items(), key=lambda kv: (ring_distance(kv[1], self.my_pos), kv[0]))
        self.predecessors = dict(ordered[:PREDECESSORS])

    def merge_ring(self, candidates: Mapping[bytes, int]) -> None:
        """Merge peers learnt from any stabilisation answer into both short lists."""
        self.merge_successors(candidates)
        self.merge_predecessors(candidates)

    def short_links(self) -> dict[bytes, int]:
        return {**self.successors, **self.predecessors}

    # -- size estimate ------------------------------------------------------------------------

    def own_estimate(self) -> float:
        """The raw n_hat from this node's successors (``estimate_size``)."""
        return estimate_size(self.my_pos, self.successors.values())

    def update_estimate(self, neighbour_estimates: Iterable[float]) -> bool:
        """Set n_hat to the smoothed estimate; True when the long links should now be redrawn.

        If it returns False, the caller still calls ``trim_long_links`` (k may have shrunk) and
        tops up ``missing_long_links`` (k may have grown).
        """
        self.n_hat = smooth_estimate(self.own_estimate(), neighbour_estimates)
        return bool(self.long_links) and needs_redraw(self.n_hat, self.n_hat_at_draw)

    @property
    def k(self) -> int:
        """How many long links this node keeps (``long_link_count(n_hat)``)."""
        return long_link_count(self.n_hat)

    def needs_redraw(self, n_hat_now: float | None = None) -> bool:
        return needs_redraw(self.n_hat if n_hat_now is None else n_hat_now, self.n_hat_at_draw)

    # -- long links ---------------------------------------------------------------------------

    def missing_long_links(self) -> int:
        return max(self.k - len(self.long_links), 0)

    def draw_targets(self, rng: random.Random, count: int | None = None) -> list[int]:
        """Targets for the missing long links (records n_hat as the value they were drawn for)."""
        self.n_hat_at_draw = self.n_hat
        return draw_long_link_targets(
            self.my_pos, self.n_hat, self.missing_long_links() if count is None else count, rng
        )

    def wants_long_link(self, peer: bytes) -> bool:
        """Whether the owner of a drawn target is worth a link: not me, not already a neighbour."""
        return (
            peer != self.my_id
            and peer not in self.successors
            and peer not in self.predecessors
            and peer not in self.long_links
            and len(self.long_links) < self.k
        )

    def add_long_link(self, peer: bytes, pos: int) -> bool:
        """Record an outbound long link the target accepted; False (and nothing kept) if unwanted."""
        if not self.wants_long_link(peer):
            return False
        self.long_links[peer] = pos
        return True

    def accept_inbound(self, peer: bytes, pos: int | None = None) -> bool:
        """Whether to accept ``peer``'s long link to us: at most ``in_degree_cap(k)`` inbound links."""
        if peer == self.my_id:
            return False
        if peer in self.inbound:
            return True
        if len(self.inbound) >= in_degree_cap(self.k):
            return False
        self.inbound[peer] = ring_position(peer) if pos is None else pos
        return True

    def trim_long_links(self) -> list[bytes]:
        """Drop the newest long links beyond ``k`` (k shrank with n_hat); returns the dropped peers."""
        extra = list(self.long_links)[self.k :]
        for peer in extra:
            del self.long_links[peer]
        return extra

    def clear_long_links(self) -> list[bytes]:
        """Drop all outbound long links (before a redraw); returns the peers to disconnect from."""
        gone = list(self.long_links)
        self.long_links.clear()
        return gone

    # -- whole table --------------------------------------------------------------------------

    def neighbours(self) -> dict[bytes, int]:
        """Every peer this node routes through: short links, long links and inbound long links."""
        return {**self.inbound, **self.long_links, **self.successors, **self.predecessors}

    def remove(self, peer: bytes) -> None:
        """Forget a peer everywhere (its connection died or it was penalised)."""
        for table in (self.successors, self.predecessors, self.long_links, self.inbound):
            table.pop(peer, None)

    def next_hop(
        self,
        key_pos: int,
        lookahead: Mapping[bytes, Mapping[bytes, int]] | None = None,
        exclude: Container[bytes] = (),
    ) -> bytes | None:
        """``greedy_next_hop`` over this table's neighbours."""
        return greedy_next_hop(self.my_pos, key_pos, self.neighbours(), lookahead, exclude)

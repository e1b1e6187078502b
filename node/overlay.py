"""The overlay service: this node's place in the small-world ring, over `/poolai/ring/1`.

The rules are `protocol/overlay.py` (geometry, size estimate, long links, greedy routing) and the
messages `protocol/ring.py`; this module is the trio pump around them:

- `join(peers)`: ask a known peer for its ring lists, route a lookup for our own position through it
  (finding our successor and predecessor), take their lists, then stabilise.
- `stabilise_once()` (every `period_s`, with jitter, from `run()`): exchange lists with every
  neighbour (which tells them about us: Chord's notify), drop the ones that do not answer, merge
  what they said, re-estimate n_hat, redraw long links when they died or n_hat doubled or halved,
  and push records to the replicas that lack them.
- `lookup(key_pos)`: iterative greedy routing from this node, hop by hop, each hop's answer checked
  (`check_hop_answer`); a peer that names a node no closer than itself is ignored and penalised.
- `put(key, value)` / `get(key)`: signed records on the RECORD_REPLICAS nodes closest to the key.

Neighbours are kept as libp2p connections, so gossipsub meshes over exactly these peers.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import multiaddr
import trio
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo

from protocol.codec import MAX_CONTROL_FRAME
from protocol.errors import RemoteProtocolError
from protocol.overlay import (
    LONG_LINK_DRAW_ATTEMPTS,
    PREDECESSORS,
    RECORD_REPLICAS,
    SUCCESSORS,
    RoutingTable,
    abs_distance,
    check_hop_answer,
    closest_peers,
    draw_long_link_targets,
    hop_limit,
    rank,
    ring_distance,
    ring_position,
)
from protocol.ring import (
    MAX_ADDRS,
    MAX_RECORDS_PER_MESSAGE,
    MAX_RING_FRAME,
    RING_PROTOCOL,
    Entry,
    Found,
    RecordRejected,
    Request,
    RingLists,
    RingRecord,
    check_record,
    decode_record,
    decode_reply,
    decode_request,
    error_reply,
    find_request,
    found_reply,
    get_request,
    key_position,
    link_request,
    linked_reply,
    make_record,
    records_reply,
    ring_reply,
    stab_request,
    store_request,
    stored_reply,
)
from protocol.signing import Signer, b58encode, short_id
from protocol.versions import RING, RING_MAJOR, neighbour_majors, protocol_id

from .errors import NodeError, describe
from .p2p import DIAL_TIMEOUT_S, P2P
from .wire import FramedStream, StreamClosed, TruncatedFrame

log = logging.getLogger("poolai.overlay")

# Stabilisation every 10 s: a dead neighbour is noticed within one period, and 24 exchanges of a few
# KiB every 10 s are nothing next to a node's other traffic. The jitter (+-20%) keeps nodes started
# together from stabilising in lockstep.
STABILISE_PERIOD_S = 10.0
STABILISE_JITTER = 0.2
# One request and its reply on loopback take ~7 ms, over the internet a few hundred; 5 s means gone.
REQUEST_TIMEOUT_S = 5.0
# A whole lookup: hop_limit hops of one request each is far below this; beyond it the caller gets
# LookupFailed rather than waiting on a swarm that is falling apart.
LOOKUP_TIMEOUT_S = 30.0
# A peer that did not answer is not merged back from others' (stale) lists for this long: a few
# stabilisation periods, by which time every neighbour has dropped it too.
DEAD_MEMORY_S = 60.0
# A peer caught lying about a lookup hop is ignored this long (penalised).
BAN_S = 600.0
# Long-link lookups per round at most 2k: at small n most draws land on short neighbours (decided
# locally), the rest cost a lookup each; this bounds a round whatever happens.
DRAW_LOOKUPS_PER_K = 2
# A round whose long-link draws found nobody new (small swarms: every owner is already a neighbour)
# makes the next draws wait 1, 2, 4, then at most 8 rounds; a dead link or a larger k resets it.
FILL_BACKOFF_MAX = 8
# At most this many records held (8192 at the 8 KiB value limit is ~70 MiB worst case).
MAX_RECORDS_HELD = 8192
# Concurrent requests of one stabilisation round (one per neighbour, ~76 at most).
STABILISE_CONCURRENCY = 32
# Long and inbound links are asked for their lists every 3rd round only (short links every round):
# their lists matter for lookahead, not for the ring's correctness, and a dead one is noticed at once
# anyway, since its connection closes. At 10^4 nodes that halves a round's requests (16 short, ~40 long).
LONG_REFRESH_ROUNDS = 3
# A channel (the stream kept open to a peer for ring requests) unused this long is closed by the
# side that accepted it; the asker opens a new one when it next needs it.
CHANNEL_IDLE_S = 120.0
# Addresses remembered for peers named in lists; pruned to the peers still referenced past this.
MAX_ADDR_BOOK = 4096


class LookupFailed(NodeError):
    """Raised when a lookup could not reach the key's owner within the hop bound or LOOKUP_TIMEOUT_S.

    The swarm is partitioned or falling apart around the key; retry after a stabilisation round.
    """


class PeerUnreachable(NodeError):
    """Raised when a peer could not be dialled or did not answer a ring request in time."""


@dataclass(frozen=True)
class Neighbour:
    peer_id: str  # base58
    role: str  # "successor", "predecessor", "long", "inbound"
    distance: int  # abs_distance on the 2^64 ring
    estimate: float  # its last advertised n_hat (0 = not heard yet)


@dataclass(frozen=True)
class LookupResult:
    key_pos: int
    peers: tuple[bytes, ...]  # the closest peers to the key, closest first
    hops: int


@dataclass(frozen=True)
class OverlayStatistics:
    position: int
    n_hat: float
    k: int
    neighbours: tuple[Neighbour, ...]
    successors: int
    predecessors: int
    long_links: int
    in_degree: int
    connected: int
    lookups_served: int
    lookups_made: int
    lookups_failed: int
    hop_histogram: tuple[tuple[int, int], ...]  # (hops, lookups)
    records_held: int
    records_rejected: int
    penalties: int
    malformed: int
    rounds: int
    last_reject_reason: str


def now_ms() -> int:
    return int(time.time() * 1000)


class OverlayService:
    def __init__(self, p2p: P2P, signer: Signer, *, period_s: float = STABILISE_PERIOD_S,
                 jitter: float = STABILISE_JITTER, clock: Callable[[], float] = time.monotonic,
                 wall_ms: Callable[[], int] = now_ms, rng: random.Random | None = None,
                 request_timeout_s: float = REQUEST_TIMEOUT_S) -> None:
        self.p2p = p2p
        self.signer = signer
        self.me = signer.peer_id
        self.period_s = period_s
        self.jitter = jitter
        self.clock = clock
        self.wall_ms = wall_ms
        self.rng = rng or random.Random()
        self.request_timeout_s = request_timeout_s
        self.table = RoutingTable(self.me)
        self.addr_book: dict[bytes, tuple[str, ...]] = {}
        self.lookahead: dict[bytes, dict[bytes, int]] = {}
        self.estimates: dict[bytes, float] = {}
        self.dead: dict[bytes, float] = {}
        self.banned: dict[bytes, float] = {}
        self.records: dict[tuple[bytes, bytes], RingRecord] = {}
        self._pushed: dict[tuple[bytes, bytes], set[bytes]] = {}
        self._served = self._made = self._failed = self._penalties = self._malformed = 0
        self._rejected = self._rounds = 0
        self._last_reject = ""
        self._hops: Counter[int] = Counter()
        self._round_lock = trio.Lock()
        self._channels: dict[bytes, _Channel] = {}
        self._fill_misses = self._fill_wait = self._fill_missing_before = 0

    # -- identity and addresses ---------------------------------------------------------------------

    @property
    def position(self) -> int:
        return self.table.my_pos

    def my_addrs(self) -> tuple[str, ...]:
        return tuple(_bare(a) for a in self.p2p.listen_addrs())[:MAX_ADDRS]

    def _entry(self, peer: bytes) -> Entry:
        return (peer, self.my_addrs() if peer == self.me else self.addr_book.get(peer, ()))

    def _learn(self, entries: Iterable[Entry]) -> dict[bytes, int]:
        """Remember the addresses of `entries`; returns {peer: position} of those worth knowing."""
        out = {}
        for pid, addrs in entries:
            if pid == self.me:
                continue
            if addrs:
                self.addr_book[pid] = addrs
            if self._excluded(pid):
                continue
            out[pid] = ring_position(pid)
        if len(self.addr_book) > MAX_ADDR_BOOK:
            keep = set(self.table.neighbours()) | {p for t in self.lookahead.values() for p in t}
            self.addr_book = {p: a for p, a in self.addr_book.items() if p in keep}
        return out

    def _excluded(self, peer: bytes) -> bool:
        now = self.clock()
        t = self.dead.get(peer)
        if t is not None and now - t < DEAD_MEMORY_S:
            return True
        t = self.banned.get(peer)
        return t is not None and now - t < BAN_S

    def _exclusions(self) -> set[bytes]:
        return {p for p in (*self.dead, *self.banned) if self._excluded(p)}

    def _mark_dead(self, peer: bytes, why: str) -> None:
        if peer == self.me:
            return
        was = peer in self.table.neighbours()
        self.dead[peer] = self.clock()
        channel = self._channels.pop(peer, None)
        if channel is not None:
            channel.broken = True
        self.table.remove(peer)
        self.lookahead.pop(peer, None)
        self.estimates.pop(peer, None)
        if was:
            log.info("overlay: neighbour %s is gone (%s)", short_id(peer), why)

    def _penalise(self, peer: bytes, why: str) -> None:
        self._penalties += 1
        self.banned[peer] = self.clock()
        self.table.remove(peer)
        self.lookahead.pop(peer, None)
        self.estimates.pop(peer, None)
        log.warning("overlay: penalised %s: %s", short_id(peer), why)

    def _alive(self, peer: bytes) -> None:
        """A peer just talked to us: it is not dead, whatever others said."""
        self.dead.pop(peer, None)

    # -- service --------------------------------------------------------------------------------------

    def register(self) -> None:
        self.p2p.handle(RING_PROTOCOL, self._handle)
        for major in neighbour_majors(RING_MAJOR):
            self.p2p.handle(protocol_id(RING, major), self._refuse_version(major))

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Serve the ring protocol and stabilise every `period_s` (+- jitter) until cancelled."""
        self.register()
        task_status.started()
        while True:
            await trio.sleep(self.period_s * (1.0 + self.jitter * (2.0 * self.rng.random() - 1.0)))
            try:
                await self.stabilise_once()
            except (trio.TooSlowError, NodeError, RemoteProtocolError) as e:
                log.warning("overlay: stabilisation round failed: %s", describe(e))
            except Exception:  # our bug: say so loudly, but keep the node (and the ring) running
                log.exception("overlay: stabilisation round crashed")

    def _refuse_version(self, major: int):
        theirs = protocol_id(RING, major)

        async def refuse(stream) -> None:
            framed = FramedStream(stream, MAX_CONTROL_FRAME)
            log.info("overlay: refused %s from %s: this node speaks %s", theirs,
                     short_id(framed.remote_peer.to_bytes()), RING_PROTOCOL)
            try:
                await framed.send(error_reply(f"this node speaks {RING_PROTOCOL}; the peer asked for {theirs}"))
            except Exception:
                pass
            await framed.close()

        return refuse

    # -- answering --------------------------------------------------------------------------------------

    async def _handle(self, stream) -> None:
        """Serve one channel: requests and replies in turn until the peer closes it or idles."""
        framed = FramedStream(stream, MAX_RING_FRAME)
        peer = framed.remote_peer.to_bytes()
        try:
            while True:
                try:
                    msg = await framed.receive(CHANNEL_IDLE_S)
                except (StreamClosed, trio.TooSlowError):
                    await framed.close()  # closed between requests, or idle: a normal end
                    return
                req = decode_request(msg)
                self._alive(peer)
                if req.addrs:
                    self.addr_book[peer] = tuple(_bare(a) for a in req.addrs)
                await framed.send(self._answer(peer, req), MAX_RING_FRAME)
        except RemoteProtocolError as e:
            self._malformed += 1
            log.warning("overlay: reset a ring stream from %s: %s", short_id(peer), describe(e))
            await framed.reset()
        except Exception as e:  # the stream broke while we answered (peer gone): nothing to do
            log.debug("overlay: ring stream from %s ended: %r", short_id(peer), e)
            await framed.reset()

    def _answer(self, peer: bytes, req: Request) -> dict:
        if req.kind == "find":
            self._served += 1
            return self.answer_find(req.key_pos)
        if req.kind == "stab":
            if not self._excluded(peer):
                self.table.merge_ring({peer: ring_position(peer)})
            self.estimates[peer] = req.n_hat
            return ring_reply([self._entry(p) for p in self.table.successors],
                              [self._entry(p) for p in self.table.predecessors],
                              [self._entry(p) for p in self.table.neighbours()], self.table.own_estimate())
        if req.kind == "link":
            if req.drop:
                self.table.inbound.pop(peer, None)
                return linked_reply(False)
            ok = not self._excluded(peer) and self.table.accept_inbound(peer)
            return linked_reply(ok)
        if req.kind == "store":
            return stored_reply(self._take_records(req.records, peer))
        recs = [r.encode() for (k, _), r in self.records.items() if k == req.key and r.expires_ms > self.wall_ms()]
        return records_reply(recs[:MAX_RECORDS_PER_MESSAGE])

    def answer_find(self, key_pos: int) -> dict:
        """Our answer to a lookup hop: the greedy next hop (None: we own the key) and our closest peers."""
        exclude = self._exclusions()
        nxt = self.table.next_hop(key_pos, self.lookahead, exclude)
        known = {self.me: self.position, **self.table.neighbours()}
        close = closest_peers(key_pos, known, max(SUCCESSORS, PREDECESSORS))
        return found_reply(None if nxt is None else self._entry(nxt), [self._entry(p) for p in close],
                           self.table.own_estimate())

    def _take_records(self, raws: Iterable[object], peer: bytes) -> int:
        taken = 0
        now = self.wall_ms()
        for raw in raws:
            try:
                rec = decode_record(raw)
                check_record(rec, now)
            except RemoteProtocolError as e:
                self._rejected += 1
                self._last_reject = str(e)
                log.warning("overlay: dropped a record from %s: %s", short_id(peer), describe(e))
                continue
            taken += self._keep(rec)
        return taken

    def _keep(self, rec: RingRecord) -> bool:
        held = self.records.get(rec.slot)
        if held is not None and held.issued_ms >= rec.issued_ms:
            return held.issued_ms == rec.issued_ms
        if held is None and len(self.records) >= MAX_RECORDS_HELD:
            self._rejected += 1
            self._last_reject = f"store full ({MAX_RECORDS_HELD} records)"
            log.warning("overlay: dropped a record: store full (%d records)", MAX_RECORDS_HELD)
            return False
        self.records[rec.slot] = rec
        self._pushed[rec.slot] = set()
        return True

    # -- asking -------------------------------------------------------------------------------------------

    async def _dial(self, peer: bytes) -> None:
        pid = ID(peer)
        if pid in self.p2p.host.get_network().get_connections_map():
            return
        addrs = self.addr_book.get(peer)
        if not addrs:
            raise PeerUnreachable(f"no address known for {short_id(peer)}")
        try:
            maddrs = [multiaddr.Multiaddr(a) for a in addrs]
        except Exception as e:
            raise PeerUnreachable(f"bad address for {short_id(peer)}: {e}") from None
        try:
            await self.p2p.connect_info(PeerInfo(pid, maddrs), min(DIAL_TIMEOUT_S, self.request_timeout_s))
        except trio.Cancelled:
            raise
        except BaseException as e:  # TooSlowError, SwarmException and friends
            raise PeerUnreachable(f"cannot dial {short_id(peer)}: {type(e).__name__}") from None

    async def request(self, peer: bytes, msg: dict) -> object:
        """Send one ring request to `peer` over its channel and decode the reply.

        A channel is one stream kept open per peer (a new stream per request costs ~5x the round trip);
        requests on it take turns. A channel that broke since its last use is replaced once by a fresh
        stream. PeerUnreachable when the peer cannot be dialled or does not answer in time;
        RemoteProtocolError (Refused, MalformedFrame...) when it answers wrongly.
        """
        for _ in range(2):
            channel = self._channels.get(peer)
            fresh = channel is None
            if fresh:
                channel = await self._open_channel(peer)
            async with channel.lock:
                if channel.broken:
                    continue
                try:
                    await channel.framed.send(msg, MAX_RING_FRAME)
                    reply = await channel.framed.receive(self.request_timeout_s)
                except trio.Cancelled:
                    await self._drop_channel(peer, channel)
                    raise
                except trio.TooSlowError:
                    await self._drop_channel(peer, channel)
                    raise PeerUnreachable(f"{short_id(peer)} did not answer within {self.request_timeout_s:g} s") from None
                except (StreamClosed, TruncatedFrame) as e:
                    await self._drop_channel(peer, channel)
                    if fresh:
                        raise PeerUnreachable(f"{short_id(peer)} did not answer: {e}") from None
                    continue  # a stale channel: try once more on a new stream
                except RemoteProtocolError:
                    await self._drop_channel(peer, channel)
                    raise
                except Exception as e:
                    await self._drop_channel(peer, channel)
                    if fresh:
                        raise PeerUnreachable(f"{short_id(peer)}: {type(e).__name__}") from None
                    continue
            return decode_reply(reply, msg["t"])
        raise PeerUnreachable(f"{short_id(peer)}: channel broke twice")

    async def _open_channel(self, peer: bytes) -> "_Channel":
        await self._dial(peer)
        try:
            stream = await self.p2p.new_stream(ID(peer), [RING_PROTOCOL], self.request_timeout_s)
        except trio.Cancelled:
            raise
        except BaseException as e:
            raise PeerUnreachable(f"no stream to {short_id(peer)}: {type(e).__name__}") from None
        channel = _Channel(FramedStream(stream, MAX_RING_FRAME))
        old = self._channels.get(peer)
        if old is not None:  # opened concurrently by another task: keep theirs, close ours
            await channel.framed.close()
            return old
        self._channels[peer] = channel
        return channel

    async def _drop_channel(self, peer: bytes, channel: "_Channel") -> None:
        channel.broken = True
        if self._channels.get(peer) is channel:
            del self._channels[peer]
        with trio.CancelScope(shield=True):
            await channel.framed.reset()

    # -- lookups ------------------------------------------------------------------------------------------

    async def lookup(self, key_pos: int, count: int = RECORD_REPLICAS) -> LookupResult:
        """The `count` peers closest to `key_pos` (this node included), routed greedily hop by hop.

        Raises LookupFailed past the hop bound (`hop_limit(n_hat)`) or LOOKUP_TIMEOUT_S.
        """
        self._made += 1
        try:
            with trio.fail_after(LOOKUP_TIMEOUT_S):
                result = await self._route(key_pos, count)
        except trio.TooSlowError:
            self._failed += 1
            raise LookupFailed(f"lookup of {key_pos:016x} took over {LOOKUP_TIMEOUT_S:g} s") from None
        except LookupFailed:
            self._failed += 1
            raise
        self._hops[result.hops] += 1
        return result

    async def _route(self, key_pos: int, count: int, *, first: bytes | None = None,
                     skip_self: bool = False) -> LookupResult:
        """Iterative greedy routing. `first`: the peer to ask first (joining: we know nobody else).
        `skip_self`: route as if this node were not on the ring (joining: find our own neighbours)."""
        exclude = self._exclusions()
        if skip_self:
            exclude.add(self.me)
        known: dict[bytes, int] = {p: q for p, q in self.table.neighbours().items() if p not in exclude}
        if not skip_self:
            known[self.me] = self.position
        queried: set[bytes] = {self.me}
        cur_rank = (math.inf,) if skip_self else rank(self.position, key_pos)
        nxt = first if first is not None else self.table.next_hop(key_pos, self.lookahead, exclude)
        limit = hop_limit(max(self.table.n_hat, float(len(known))))
        hops = 0
        while True:
            if nxt is None or nxt in exclude or nxt in queried:
                # Nobody named a closer peer: is anyone we heard of closer than the best so far?
                better = [p for p in known if p not in queried and p not in exclude
                          and rank(known[p], key_pos) < cur_rank]
                if not better:
                    break
                nxt = min(better, key=lambda p: (rank(known[p], key_pos), p))
            if hops >= limit:
                raise LookupFailed(f"lookup of {key_pos:016x} exceeded {limit} hops")
            hops += 1
            queried.add(nxt)
            nxt_pos = ring_position(nxt)
            try:
                found = await self.request(nxt, find_request(key_pos, self.my_addrs()))
            except PeerUnreachable as e:
                self._mark_dead(nxt, str(e))
                exclude.add(nxt)
                known.pop(nxt, None)
                nxt = None
                continue
            except RemoteProtocolError as e:
                self._penalise(nxt, f"bad answer to a lookup hop: {e}")
                exclude.add(nxt)
                known.pop(nxt, None)
                nxt = None
                continue
            assert isinstance(found, Found)
            if found.next is not None and found.next[0] != self.me and not check_hop_answer(
                    nxt_pos, key_pos, ring_position(found.next[0])):
                self._penalise(nxt, f"answered a lookup for {key_pos:016x} with {short_id(found.next[0])}, "
                                    f"which is no closer to the key than itself")
                exclude.add(nxt)
                known.pop(nxt, None)
                nxt = None
                continue
            # An honest answer (as far as we can tell): nxt is now the closest peer reached.
            if rank(nxt_pos, key_pos) < cur_rank:
                cur_rank = rank(nxt_pos, key_pos)
            known[nxt] = nxt_pos
            entries = list(found.close) + ([found.next] if found.next is not None else [])
            for pid, pos in self._learn(entries).items():
                if pid not in exclude:
                    known[pid] = pos
            nxt = None if found.next is None else found.next[0]
        peers = closest_peers(key_pos, {p: q for p, q in known.items() if p not in exclude}, count)
        return LookupResult(key_pos, tuple(peers), hops)

    # -- joining and stabilisation ---------------------------------------------------------------------

    async def join(self, peers: Iterable[bytes]) -> bool:
        """Join the ring through any of `peers` (already connected, or with known addresses).

        Takes the first peer's lists, routes a lookup for our own position through it (finding our
        successor), takes the lists around it, and stabilises. False when no peer answered.
        """
        for peer in peers:
            if peer == self.me:
                continue
            try:
                lists = await self.request(peer, stab_request(self.table.own_estimate(), self.my_addrs()))
            except (PeerUnreachable, RemoteProtocolError) as e:
                log.warning("overlay: cannot join through %s: %s", short_id(peer), describe(e))
                continue
            self._merge_lists(peer, lists)
            try:
                found = await self._route(self.position, SUCCESSORS, first=peer, skip_self=True)
                self.table.merge_ring({p: ring_position(p) for p in found.peers if not self._excluded(p)})
            except LookupFailed as e:
                log.warning("overlay: lookup of our own position failed while joining: %s", describe(e))
            await self.stabilise_once()
            log.info("overlay: joined through %s: %d successors, %d predecessors, n_hat %.0f",
                     short_id(peer), len(self.table.successors), len(self.table.predecessors), self.table.n_hat)
            return True
        return False

    def _merge_lists(self, peer: bytes, lists: RingLists) -> None:
        self.estimates[peer] = lists.n_hat
        ring = self._learn(lists.successors + lists.predecessors)
        self.lookahead[peer] = {p: ring_position(p) for p, _ in lists.neighbours}
        self._learn(lists.neighbours)
        self.table.merge_ring({peer: ring_position(peer), **ring})

    async def stabilise_once(self) -> None:
        """One stabilisation round (see the module docstring). Rounds never overlap."""
        async with self._round_lock:
            await self._stabilise()

    async def _stabilise(self) -> None:
        self._expire_records()
        # Short links every round; long and inbound links every LONG_REFRESH_ROUNDS-th round, or at
        # once when their connection is gone or we never heard their lists.
        connected = {p.to_bytes() for p in self.p2p.connected_peers()}
        short = self.table.short_links()
        refresh = self._rounds % LONG_REFRESH_ROUNDS == 0
        peers = [p for p in self.table.neighbours()
                 if refresh or p in short or p not in connected or p not in self.lookahead]
        if not self.table.neighbours():  # alone (or everyone died): start over from whoever we are connected to
            peers = [p.to_bytes() for p in self.p2p.connected_peers() if not self._excluded(p.to_bytes())]
        await self._exchange(peers)
        # Short links learnt this round that we have not talked to: exchange with them too (this is
        # also how they learn about us), dropping those that do not answer.
        fresh = [p for p in self.table.short_links() if p not in self.lookahead]
        if fresh:
            await self._exchange(fresh)
        neighbours = self.table.neighbours()
        redraw = self.table.update_estimate([self.estimates[p] for p in neighbours if p in self.estimates])
        dropped = self.table.clear_long_links() if redraw else self.table.trim_long_links()
        if redraw:
            log.info("overlay: n_hat moved to %.0f (drawn for %.0f): redrawing long links",
                     self.table.n_hat, self.table.n_hat_at_draw)
        for peer in dropped:
            await self._unlink(peer)
        await self._fill_long_links()
        await self._replicate()
        self._rounds += 1

    async def _exchange(self, peers: list[bytes]) -> None:
        replies: dict[bytes, RingLists] = {}
        limiter = trio.CapacityLimiter(STABILISE_CONCURRENCY)

        async def one(peer: bytes) -> None:
            async with limiter:
                try:
                    replies[peer] = await self.request(peer, stab_request(self.table.own_estimate(), self.my_addrs()))
                except PeerUnreachable as e:
                    self._mark_dead(peer, str(e))
                except RemoteProtocolError as e:
                    self._penalise(peer, f"bad answer to stabilisation: {e}")

        async with trio.open_nursery() as nursery:
            for peer in peers:
                nursery.start_soon(one, peer)
        for peer, lists in replies.items():
            if not self._excluded(peer):
                self._merge_lists(peer, lists)

    async def _unlink(self, peer: bytes) -> None:
        try:
            await self.request(peer, link_request(self.my_addrs(), drop=True))
        except (PeerUnreachable, RemoteProtocolError):
            pass

    def _local_owner(self, target: int) -> bytes | None:
        """The owner of `target` when it lies inside the arc our short lists cover (so the owner is in
        them), else None: then only a lookup can tell."""
        succ, pred = self.table.successors, self.table.predecessors
        if len(succ) < SUCCESSORS or len(pred) < PREDECESSORS:
            return None
        far_succ = max(ring_distance(self.position, p) for p in succ.values())
        far_pred = max(ring_distance(p, self.position) for p in pred.values())
        if ring_distance(self.position, target) <= far_succ or ring_distance(target, self.position) <= far_pred:
            return closest_peers(target, {self.me: self.position, **self.table.short_links()}, 1)[0]
        return None

    async def _fill_long_links(self) -> None:
        missing = self.table.missing_long_links()
        if not missing:
            self._fill_misses = self._fill_wait = 0
            return
        if missing > self._fill_missing_before:  # a link died, k grew or a redraw: try again at once
            self._fill_wait = 0
        self._fill_missing_before = missing
        if self._fill_wait > 0:
            self._fill_wait -= 1
            return
        before = len(self.table.long_links)
        await self._draw_long_links(missing)
        if len(self.table.long_links) > before:
            self._fill_misses = 0
        else:  # nobody new to link to (a small swarm): back off, 1, 2, 4.. rounds up to FILL_BACKOFF_MAX
            self._fill_misses += 1
            self._fill_wait = min(FILL_BACKOFF_MAX, 2 ** (self._fill_misses - 1))
        self._fill_missing_before = self.table.missing_long_links()

    async def _draw_long_links(self, missing: int) -> None:
        budget = DRAW_LOOKUPS_PER_K * self.table.k
        for target in self.table.draw_targets(self.rng, missing):
            for _ in range(LONG_LINK_DRAW_ATTEMPTS):
                peer = self._local_owner(target)
                if peer is None and budget > 0:
                    budget -= 1
                    try:
                        found = await self._route(target, 1)
                    except LookupFailed:
                        return
                    peer = found.peers[0] if found.peers else None
                if peer is not None and self.table.wants_long_link(peer) and not self._excluded(peer):
                    try:
                        ok = await self.request(peer, link_request(self.my_addrs()))
                    except PeerUnreachable as e:
                        self._mark_dead(peer, str(e))
                        ok = False
                    except RemoteProtocolError as e:
                        self._penalise(peer, f"bad answer to a link request: {e}")
                        ok = False
                    if ok and self.table.add_long_link(peer, ring_position(peer)):
                        break
                if budget <= 0 and peer is None:
                    return
                target = draw_long_link_targets(self.position, self.table.n_hat, 1, self.rng)[0]

    # -- records --------------------------------------------------------------------------------------------

    def _expire_records(self) -> None:
        now = self.wall_ms()
        for slot in [s for s, r in self.records.items() if r.expires_ms <= now]:
            del self.records[slot]
            self._pushed.pop(slot, None)

    async def _replicate(self) -> None:
        """Push every record we hold to those of its RECORD_REPLICAS closest peers (as far as our
        table knows) that have not had it from us yet."""
        known = {self.me: self.position, **self.table.neighbours()}
        batches: dict[bytes, list[tuple[bytes, bytes]]] = {}
        for slot, rec in self.records.items():
            pushed = self._pushed.setdefault(slot, set())
            for peer in closest_peers(rec.position, known, RECORD_REPLICAS):
                if peer != self.me and peer not in pushed:
                    batches.setdefault(peer, []).append(slot)

        async def push(peer: bytes, slots: list[tuple[bytes, bytes]]) -> None:
            for i in range(0, len(slots), MAX_RECORDS_PER_MESSAGE):
                chunk = [s for s in slots[i:i + MAX_RECORDS_PER_MESSAGE] if s in self.records]
                try:
                    await self.request(peer, store_request([self.records[s].encode() for s in chunk],
                                                           self.my_addrs()))
                except (PeerUnreachable, RemoteProtocolError) as e:
                    log.info("overlay: could not re-replicate to %s: %s", short_id(peer), describe(e))
                    return
                for s in chunk:
                    if s in self._pushed:
                        self._pushed[s].add(peer)

        async with trio.open_nursery() as nursery:
            for peer, slots in batches.items():
                nursery.start_soon(push, peer, slots)

    async def put(self, key: bytes, value: bytes, ttl_s: float = 3600.0) -> int:
        """Sign and store a record on the RECORD_REPLICAS peers closest to its key; returns how many
        took it. ValueError when the record breaks a size limit; LookupFailed when routing fails."""
        rec = make_record(self.signer, key, value, self.wall_ms(), int(ttl_s * 1000))
        found = await self.lookup(rec.position, RECORD_REPLICAS)
        stored = 0
        for peer in found.peers:
            if peer == self.me:
                stored += self._keep(rec)
                continue
            try:
                stored += bool(await self.request(peer, store_request([rec.encode()], self.my_addrs())))
            except (PeerUnreachable, RemoteProtocolError) as e:
                log.info("overlay: replica %s did not take a record: %s", short_id(peer), describe(e))
                continue
            self._pushed.setdefault(rec.slot, set()).add(peer)
        return stored

    async def get(self, key: bytes) -> list[RingRecord]:
        """The valid records under `key` (newest per author), read from the first replica that has any."""
        found = await self.lookup(key_position(key), RECORD_REPLICAS)
        now = self.wall_ms()
        for peer in found.peers:
            if peer == self.me:
                recs = [r for (k, _), r in self.records.items() if k == key and r.expires_ms > now]
            else:
                try:
                    raws = await self.request(peer, get_request(key, self.my_addrs()))
                except (PeerUnreachable, RemoteProtocolError) as e:
                    log.info("overlay: replica %s did not answer a get: %s", short_id(peer), describe(e))
                    continue
                recs = []
                for raw in raws:
                    try:
                        rec = decode_record(raw)
                        check_record(rec, now)
                        if rec.key != key:
                            raise RecordRejected("record under another key")
                    except RemoteProtocolError as e:
                        self._rejected += 1
                        self._last_reject = str(e)
                        log.warning("overlay: dropped a record from %s: %s", short_id(peer), describe(e))
                        continue
                    recs.append(rec)
            if recs:
                newest: dict[bytes, RingRecord] = {}
                for r in recs:
                    if r.author not in newest or r.issued_ms > newest[r.author].issued_ms:
                        newest[r.author] = r
                return sorted(newest.values(), key=lambda r: r.author)
        return []

    # -- statistics ---------------------------------------------------------------------------------------

    def statistics(self) -> OverlayStatistics:
        t = self.table
        roles: list[tuple[bytes, str]] = [(p, "successor") for p in t.successors]
        roles += [(p, "predecessor") for p in t.predecessors if p not in t.successors]
        roles += [(p, "long") for p in t.long_links if p not in t.short_links()]
        roles += [(p, "inbound") for p in t.inbound
                  if p not in t.short_links() and p not in t.long_links]
        neighbours = tuple(
            Neighbour(b58encode(p), role, abs_distance(self.position, ring_position(p)), self.estimates.get(p, 0.0))
            for p, role in roles)
        return OverlayStatistics(
            position=self.position, n_hat=t.n_hat, k=t.k, neighbours=neighbours,
            successors=len(t.successors), predecessors=len(t.predecessors), long_links=len(t.long_links),
            in_degree=len(t.inbound), connected=len(self.p2p.connected_peers()),
            lookups_served=self._served, lookups_made=self._made, lookups_failed=self._failed,
            hop_histogram=tuple(sorted(self._hops.items())), records_held=len(self.records),
            records_rejected=self._rejected, penalties=self._penalties, malformed=self._malformed,
            rounds=self._rounds, last_reject_reason=self._last_reject)


class _Channel:
    """One open ring stream to a peer; requests take turns on it."""

    def __init__(self, framed: FramedStream) -> None:
        self.framed = framed
        self.lock = trio.Lock()
        self.broken = False


def _bare(addr: str) -> str:
    """A listen address without its /p2p/<id> suffix (the peer ID travels beside it)."""
    head, sep, _ = addr.partition("/p2p/")
    return head if sep else addr


async def start_overlay(nursery: trio.Nursery, p2p: P2P, signer: Signer, bootstrap: Iterable[str],
                        period_s: float = STABILISE_PERIOD_S) -> OverlayService:
    """Run the overlay service in `nursery` and join the ring through the bootstrap peers (already
    dialled by the caller). A node that cannot join starts a ring of its own and keeps trying to
    join through whoever connects: a stabilisation round of a lonely node asks its connections."""
    overlay = OverlayService(p2p, signer, period_s=period_s)
    await nursery.start(overlay.run)
    peers = []
    for addr in bootstrap:
        try:
            peers.append(ID.from_base58(multiaddr.Multiaddr(addr).value_for_protocol("p2p")).to_bytes())
        except Exception:
            continue  # the config check already refused malformed addresses
    if peers and not await overlay.join(peers):
        log.warning("overlay: could not join through any of %d bootstrap peers; will retry", len(peers))
    return overlay

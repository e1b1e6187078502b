"""The ledger service: records this node's receipts and spreads every chain by gossip and anti-entropy.

It owns the node's `LedgerStore` (SQLite in the data dir). Three channels carry the ledger between
nodes (SPEC §13):

* Heads gossip, topic LEDGER_HEADS_TOPIC: when our chain grows, we publish our newest entry (paced,
  coalesced: at most one per HEAD_MIN_GAP_S). The entry carries (author, seq, hash via its encoding,
  signature). A validator drops it unless it decodes, is signed by its author, and was published by
  its author. A receiver one entry behind appends it at once; one further behind pulls the gap from
  the author (or the peer that relayed it) by anti-entropy; one holding another entry at that seq
  has caught a fork.
* Anti-entropy, `/poolai/ledger-sync/1`: every SYNC_INTERVAL_S a node syncs with one random connected
  peer: both send {author: (head seq, head hash)} and the proofs they hold, the initiator pulls what
  it lacks in batches of at most MAX_ENTRIES_PER_BATCH and pushes what the responder lacks. Ranges
  overlap our head by one entry, so two chains that diverged are caught even when both are equally long.
* Fraud gossip, topic LEDGER_FRAUD_TOPIC: a node that stores two entries of one (author, seq) publishes
  the `EquivocationProof`; every node that receives it freezes that author.

Everything that touches SQLite runs in a worker thread; the store serialises the calls.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import trio
from libp2p.peer.id import ID

from protocol.codec import MAX_CONTROL_FRAME, bytes_field, field, int_field
from protocol.errors import MalformedFrame, RemoteProtocolError
from protocol.ledger import (
    CREDIT,
    DEBIT,
    FREE_TIER_UNITS,
    HASH_BYTES,
    MAX_ENTRIES_PER_BATCH,
    MAX_HEADS_PER_MESSAGE,
    EquivocationProof,
    InvalidProof,
    LogEntry,
    Receipt,
    ReceiptRejected,
    may_serve,
    plan_batches,
    pull_ranges,
)
from protocol.signing import PEER_ID_BYTES, Signer, b58encode, short_id
from protocol.versions import (
    LEDGER_FRAUD_TOPIC,
    LEDGER_HEADS_TOPIC,
    LEDGER_SYNC,
    LEDGER_SYNC_MAJOR,
    neighbour_majors,
    protocol_id,
)

from .errors import describe
from .ledger_store import LedgerStore
from .p2p import P2P
from .wire import FramedStream, StreamClosed

log = logging.getLogger("poolai.ledger")

LEDGER_FILE = "ledger.sqlite"
SYNC_PROTOCOL = protocol_id(LEDGER_SYNC, LEDGER_SYNC_MAJOR)

# Gossipsub stops relaying a topic from a peer that forwards more than 10 messages a second on it
# (LIBP2P-NOTES trap 10): one head per node every 0.5 s keeps a swarm of a few nodes well under that,
# and a busy node's heads coalesce (only the newest is published; anti-entropy fills the gaps).
HEAD_MIN_GAP_S = 0.5
# Anti-entropy with one random peer this often: push-pull spreads a change to n nodes in ~log2(n)
# rounds, so a head the gossip missed reaches a 30-node swarm in ~10 s at worst, while the cost is one
# heads exchange (~50 bytes per author) per node every 2 s.
SYNC_INTERVAL_S = 2.0
# A sync is a handful of round trips on loopback; 10 s tells a stuck peer from a slow one.
SYNC_TIMEOUT_S = 10.0
# At most this many syncs at once, so a burst of gossiped gaps cannot open a stream to everyone.
MAX_CONCURRENT_SYNCS = 4
# One sync stream serves at most this many requests: pulling 1024 authors x 1 batch, with room.
MAX_SYNC_REQUESTS = 4 * MAX_HEADS_PER_MESSAGE
# A peer that does not speak the sync protocol is not asked again for this long.
NOT_LEDGER_PEER_S = 60.0
# Balances are recomputed from the store at most this often after changes (settlement is not instant
# anyway: it waits for both halves of a receipt to arrive by gossip).
BALANCE_REFRESH_S = 1.0
# An equivocation proof holds two entries of at most 1 KiB each.
MAX_PROOF_MESSAGE = 4 * 1024
# Proofs exchanged in one sync message: a swarm with more proven cheats than this has bigger problems,
# and the fraud topic carries them anyway.
MAX_PROOFS_PER_MESSAGE = 16
RECENT_ENTRIES = 20
# Gossiped heads waiting to be stored; past this, heads are dropped (anti-entropy catches up).
MAX_HEADS_QUEUED = 1024


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass(frozen=True)
class LedgerServiceStatistics:
    entries: int  # entries stored, all authors
    authors: int  # chains held
    own_head_seq: int
    balance: int  # our settled balance
    proofs: int  # authors frozen
    recorded: int  # receipts we recorded in our own chain
    duplicates: int  # receipts offered again and not recorded (already held)
    heads_published: int
    heads_received: int
    heads_rejected: int  # gossiped heads that failed validation
    syncs: int  # sync sessions completed (either side)
    sync_failures: int
    entries_pulled: int  # entries stored from peers (gossip, pulls and pushes)
    fraud_published: int
    fraud_received: int
    last_error: str


class LedgerService:
    """Owns the ledger store and its gossip. Start with `await nursery.start(service.run)`."""

    def __init__(self, p2p: P2P, signer: Signer, store: LedgerStore, *, credit_limit: int = FREE_TIER_UNITS,
                 sync_interval_s: float = SYNC_INTERVAL_S, head_min_gap_s: float = HEAD_MIN_GAP_S,
                 clock: Callable[[], int] = now_ms) -> None:
        self.p2p = p2p
        self.signer = signer
        self.store = store
        self.credit_limit = credit_limit
        self.sync_interval_s = sync_interval_s
        self.head_min_gap_s = head_min_gap_s
        self.clock = clock
        self.me = signer.peer_id
        self._heads: dict[bytes, tuple[int, bytes]] = {}  # mirror of store.head_hashes()
        self._frozen: dict[bytes, int] = {}
        self._balances: dict[bytes, int] = {}
        self._balances_dirty = trio.Event()
        self._changed = trio.Condition()
        self._publish_wanted = trio.Event()
        self._sync_limiter = trio.CapacityLimiter(MAX_CONCURRENT_SYNCS)
        self._syncing: set[bytes] = set()
        self._not_ledger: dict[bytes, float] = {}
        self._relayed_by: dict[bytes, bytes] = {}  # author -> the peer that last relayed its head
        self._nursery: trio.Nursery | None = None
        self._recorded = self._duplicates = self._published = self._received = self._rejected = 0
        self._syncs = self._sync_failures = self._pulled = self._fraud_out = self._fraud_in = 0
        self._last_error = ""

    @classmethod
    def open_store(cls, data_dir: Path, signer: Signer) -> LedgerStore:
        return LedgerStore.open(Path(data_dir) / LEDGER_FILE, signer)

    # -- service ---------------------------------------------------------------------------------------
    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        await self._reload()
        pubsub = self.p2p.pubsub
        pubsub.set_topic_validator(LEDGER_HEADS_TOPIC, self._validate_head, False)
        pubsub.set_topic_validator(LEDGER_FRAUD_TOPIC, self._validate_fraud, False)
        heads = await pubsub.subscribe(LEDGER_HEADS_TOPIC)
        fraud = await pubsub.subscribe(LEDGER_FRAUD_TOPIC)
        self.p2p.handle(SYNC_PROTOCOL, self._handle_sync)
        for major in neighbour_majors(LEDGER_SYNC_MAJOR):
            self.p2p.handle(protocol_id(LEDGER_SYNC, major), self._refuse_version(major))
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._receive_heads, heads)
            nursery.start_soon(self._receive_fraud, fraud)
            nursery.start_soon(self._publish_loop)
            nursery.start_soon(self._anti_entropy_loop)
            nursery.start_soon(self._balance_loop)
            task_status.started()

    async def _reload(self) -> None:
        self._heads = await trio.to_thread.run_sync(self.store.head_hashes)
        self._frozen = await trio.to_thread.run_sync(self.store.proof_seqs)
        self._balances = await trio.to_thread.run_sync(self.store.balances)

    async def _changed_now(self) -> None:
        self._balances_dirty.set()
        async with self._changed:
            self._changed.notify_all()

    # -- recording our own receipts --------------------------------------------------------------------
    async def record(self, receipt: Receipt, kind: str) -> LogEntry | None:
        """Append a countersigned receipt to our chain as DEBIT (we were its client) or CREDIT (server).

        Returns the entry, or None when this receipt (or a later one of its session) is already
        recorded: a repeated receipt counts once. ReceiptRejected for an invalid receipt.
        """
        try:
            entry = await trio.to_thread.run_sync(self.store.append_own, kind, receipt, self.clock())
        except ReceiptRejected as e:
            if e.reason == "replay":
                self._duplicates += 1
                return None
            raise
        self._recorded += 1
        self._heads[self.me] = (entry.seq, entry.entry_hash())
        self._publish_wanted.set()
        await self._changed_now()
        return entry

    def submit(self, receipt: Receipt, kind: str) -> None:
        """Record without waiting (from a session's hot path); failures are logged and counted."""
        if self._nursery is None:
            log.warning("ledger not running; receipt of session %s not recorded", receipt.session_id.hex()[:8])
            return

        async def one() -> None:
            try:
                await self.record(receipt, kind)
            except Exception as e:  # an invalid receipt is the peer's fault; log it and go on
                self._last_error = f"record {kind}: {e}"
                log.warning("receipt of session %s not recorded: %s", receipt.session_id.hex()[:8], describe(e))

        self._nursery.start_soon(one)

    # -- queries ----------------------------------------------------------------------------------------
    def balance(self, peer: bytes | None = None) -> int:
        """Settled balance of `peer` (default: us) as of the last refresh."""
        return self._balances.get(peer if peer is not None else self.me, 0)

    def balances(self) -> dict[bytes, int]:
        return dict(self._balances)

    async def current_balances(self) -> dict[bytes, int]:
        """Balances recomputed from the store now."""
        self._balances = await trio.to_thread.run_sync(self.store.balances)
        return dict(self._balances)

    def is_frozen(self, peer: bytes) -> bool:
        return peer in self._frozen

    def frozen(self) -> dict[bytes, int]:
        return dict(self._frozen)

    def may_serve(self, peer: bytes) -> bool:
        """Policy for servers: serve `peer` while its balance is above -credit_limit and it is not frozen."""
        return may_serve(self.balance(peer), self.credit_limit, frozen=self.is_frozen(peer))

    def heads(self) -> dict[bytes, int]:
        return {a: s for a, (s, _) in self._heads.items()}

    def holds(self, author: bytes, seq: int) -> bool:
        """Whether we hold `author`'s chain up to `seq` (or have frozen it)."""
        return self._heads.get(author, (0, b""))[0] >= seq or author in self._frozen

    async def wait_changed(self) -> None:
        async with self._changed:
            await self._changed.wait()

    async def summary(self, recent: int = RECENT_ENTRIES) -> dict[str, Any]:
        """What `poolai ledger` shows: balance, recent entries, counterparties, fraud proofs."""
        return await trio.to_thread.run_sync(self._summary, recent)

    def _summary(self, recent: int) -> dict[str, Any]:
        return ledger_summary(self.store, self.credit_limit, recent, statistics=asdict(self.statistics()))

    async def verify(self) -> dict[str, Any]:
        """Re-validate the whole local store; {"ok", "faults", "entries", "authors", "proofs"}."""
        return await trio.to_thread.run_sync(verify_store, self.store)

    def statistics(self) -> LedgerServiceStatistics:
        own = self._heads.get(self.me, (0, b""))[0]
        return LedgerServiceStatistics(
            entries=sum(s for s, _ in self._heads.values()), authors=len(self._heads), own_head_seq=own,
            balance=self.balance(), proofs=len(self._frozen), recorded=self._recorded,
            duplicates=self._duplicates, heads_published=self._published, heads_received=self._received,
            heads_rejected=self._rejected, syncs=self._syncs, sync_failures=self._sync_failures,
            entries_pulled=self._pulled, fraud_published=self._fraud_out, fraud_received=self._fraud_in,
            last_error=self._last_error,
        )

    # -- storing what peers send -----------------------------------------------------------------------
    async def add_entries(self, entries: list[LogEntry], source: bytes | None = None) -> int:
        """Validate and store entries from a peer; publishes any fork they reveal. Returns how many were new."""
        if not entries:
            return 0
        accepted, proofs = await trio.to_thread.run_sync(self.store.add_foreign, entries)
        for e in accepted:
            if e.seq > self._heads.get(e.author, (0, b""))[0]:
                self._heads[e.author] = (e.seq, e.entry_hash())
        self._pulled += len(accepted)
        if proofs:
            await self._on_new_proofs(proofs, publish=True)
        if accepted or proofs:
            await self._changed_now()
        return len(accepted)

    async def add_proofs(self, proofs: list[EquivocationProof], publish: bool = False) -> int:
        changed = await trio.to_thread.run_sync(self.store.add_proofs, proofs)
        if changed:
            await self._on_new_proofs(changed, publish=publish)
            await self._changed_now()
        return len(changed)

    async def _on_new_proofs(self, proofs: list[EquivocationProof], publish: bool) -> None:
        for proof in proofs:
            log.warning("peer %s equivocated at seq %d: its balance is frozen", short_id(proof.author), proof.seq)
            self._frozen[proof.author] = proof.seq
        self._heads = await trio.to_thread.run_sync(self.store.head_hashes)
        if publish:
            for proof in proofs:
                try:
                    await self.p2p.pubsub.publish(LEDGER_FRAUD_TOPIC, proof.encode())
                    self._fraud_out += 1
                except Exception as e:
                    self._last_error = f"publish proof: {e}"
                    log.warning("could not publish an equivocation proof: %s", describe(e))

    # -- heads gossip ----------------------------------------------------------------------------------
    def _validate_head(self, sender, msg) -> bool:
        try:
            entry = LogEntry.decode(msg.data)
            if entry.author != bytes(msg.from_id):
                raise MalformedFrame("a head must be published by its author")
            if not entry.signature_ok():
                raise MalformedFrame("head entry not signed by its author")
        except RemoteProtocolError as e:
            self._rejected += 1
            self._last_error = f"head from {short_id(bytes(msg.from_id))}: {e}"
            log.info("dropped a ledger head relayed by %s: %s", sender, describe(e))
            return False
        try:
            self._relayed_by[entry.author] = sender.to_bytes()
        except Exception:
            pass
        return True

    async def _receive_heads(self, subscription) -> None:
        send, receive = trio.open_memory_channel(MAX_HEADS_QUEUED)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._store_heads, receive)
            while True:
                msg = await subscription.get()
                try:
                    entry = LogEntry.decode(msg.data)
                except RemoteProtocolError:
                    continue
                self._received += 1
                try:
                    send.send_nowait(entry)
                except trio.WouldBlock:  # anti-entropy brings what we drop here
                    pass

    async def _store_heads(self, receive) -> None:
        """Store gossiped heads in batches: one transaction (one fsync) for all that arrived meanwhile."""
        while True:
            batch = [await receive.receive()]
            while True:
                try:
                    batch.append(receive.receive_nowait())
                except trio.WouldBlock:
                    break
            take = []
            for entry in batch:
                if entry.author == self.me or entry.author in self._frozen:
                    continue
                have, have_hash = self._heads.get(entry.author, (0, b""))
                if entry.seq == have and entry.entry_hash() == have_hash:
                    continue
                take.append(entry)
            # The next entry of a chain is appended; one at a seq we hold is a fork if it differs; one
            # past a gap is dropped by the store and pulled by anti-entropy.
            if take:
                await self.add_entries(take)
            for entry in take:
                if self._heads.get(entry.author, (0, b""))[0] < entry.seq and entry.author not in self._frozen:
                    self._want_sync(entry.author)

    def _want_sync(self, author: bytes) -> None:
        """Pull a gap now: from the author when connected, else from the peer that relayed its head."""
        connected = {p.to_bytes() for p in self.p2p.connected_peers()}
        peer = author if author in connected else self._relayed_by.get(author)
        if peer is not None and peer in connected:
            self.sync_soon(peer)

    def sync_soon(self, peer: bytes) -> None:
        if self._nursery is None or peer in self._syncing:
            return
        self._syncing.add(peer)

        async def one() -> None:
            try:
                async with self._sync_limiter:
                    await self.sync_with(ID(peer))
            except Exception as e:
                self._sync_failures += 1
                self._last_error = f"sync with {short_id(peer)}: {type(e).__name__}: {e}"
                log.debug("sync with %s failed: %r", short_id(peer), e)
            finally:
                self._syncing.discard(peer)

        self._nursery.start_soon(one)

    async def _publish_loop(self) -> None:
        published: tuple[int, bytes] | None = None
        while True:
            await self._publish_wanted.wait()
            self._publish_wanted = trio.Event()
            head = self._heads.get(self.me)
            if head is not None and head != published:
                entry = await trio.to_thread.run_sync(self.store.head, self.me)
                if entry is not None:
                    try:
                        await self.p2p.pubsub.publish(LEDGER_HEADS_TOPIC, entry.encode())
                        self._published += 1
                        published = (entry.seq, entry.entry_hash())
                    except Exception as e:
                        self._last_error = f"publish head: {e}"
                        log.warning("could not publish our ledger head: %s", describe(e))
            await trio.sleep(self.head_min_gap_s)

    async def _fraud_message(self, raw: bytes) -> EquivocationProof:
        return EquivocationProof.decode(raw)

    def _validate_fraud(self, sender, msg) -> bool:
        try:
            if len(msg.data) > MAX_PROOF_MESSAGE:
                raise MalformedFrame(f"proof of {len(msg.data)} bytes, limit {MAX_PROOF_MESSAGE}")
            EquivocationProof.decode(msg.data)
        except (RemoteProtocolError, InvalidProof) as e:
            self._rejected += 1
            self._last_error = f"fraud proof relayed by {sender}: {e}"
            log.info("dropped a fraud proof relayed by %s: %s", sender, describe(e))
            return False
        return True

    async def _receive_fraud(self, subscription) -> None:
        while True:
            msg = await subscription.get()
            try:
                proof = EquivocationProof.decode(msg.data)
            except (RemoteProtocolError, InvalidProof):
                continue
            self._fraud_in += 1
            await self.add_proofs([proof])

    async def _balance_loop(self) -> None:
        while True:
            await self._balances_dirty.wait()
            self._balances_dirty = trio.Event()
            try:
                self._balances = await trio.to_thread.run_sync(self.store.balances)
            except Exception as e:
                self._last_error = f"balances: {e}"
                log.exception("could not compute balances")
            await trio.sleep(BALANCE_REFRESH_S)

    # -- anti-entropy ----------------------------------------------------------------------------------
    async def _anti_entropy_loop(self) -> None:
        while True:
            await trio.sleep(self.sync_interval_s * random.uniform(0.75, 1.25))
            now = time.monotonic()
            peers = [p.to_bytes() for p in self.p2p.connected_peers()]
            peers = [p for p in peers if self._not_ledger.get(p, 0) <= now and p not in self._syncing]
            if peers:
                self.sync_soon(random.choice(peers))

    def _heads_frame(self) -> dict[str, Any]:
        heads = sorted(self._heads.items())[:MAX_HEADS_PER_MESSAGE]
        proofs = sorted(self._frozen.items())[:MAX_PROOFS_PER_MESSAGE]
        return {"t": "heads", "heads": [[a, s, h] for a, (s, h) in heads], "proofs": [[a, s] for a, s in proofs]}

    async def sync_with(self, peer_id: ID) -> int:
        """One push-pull anti-entropy session with a peer; returns how many entries we gained."""
        peer = peer_id.to_bytes()
        try:
            stream = await self.p2p.new_stream(peer_id, [SYNC_PROTOCOL])
        except trio.TooSlowError:
            raise
        except Exception:
            self._not_ledger[peer] = time.monotonic() + NOT_LEDGER_PEER_S
            raise
        framed = FramedStream(stream, MAX_CONTROL_FRAME)
        gained = 0
        try:
            with trio.fail_after(SYNC_TIMEOUT_S):
                await framed.send(self._heads_frame())
                theirs, their_proofs = _parse_heads(await framed.receive())
                # Proofs first: they decide which chains we stop asking for.
                want_proofs = [a for a, s in their_proofs.items() if s < self._frozen.get(a, s + 1)]
                if want_proofs:
                    await framed.send({"t": "get_proofs", "authors": want_proofs})
                    await self.add_proofs(_parse_proofs(await framed.receive(), "proofs"), publish=False)
                ranges = pull_ranges(self._heads, theirs, frozen=self._frozen)
                forks: list[bytes] = []
                for author, lo, hi in plan_batches(ranges):
                    gained += await self._pull(framed, author, lo, hi, forks)
                for author in forks:  # find the lowest forked seq: the peer holds the other branch
                    fork_seq = self._frozen.get(author, 1)
                    for a, lo, hi in plan_batches({author: (1, fork_seq - 1)} if fork_seq > 1 else {}):
                        await self._pull(framed, a, lo, hi, [])
                # Push what the peer lacks (overlapping its head too), and proofs it lacks.
                push = pull_ranges(theirs, self._heads, frozen=set(their_proofs) | set(self._frozen))
                for author, lo, hi in plan_batches(push):
                    entries = await trio.to_thread.run_sync(self.store.entries, author, lo, hi)
                    if entries:
                        await framed.send({"t": "push", "entries": [e.encode() for e in entries]})
                        _expect(await framed.receive(), "ok")
                mine_only = [a for a, s in self._frozen.items() if s < their_proofs.get(a, s + 1)]
                if mine_only:
                    proofs = [p for p in await trio.to_thread.run_sync(self.store.proofs) if p.author in mine_only]
                    await framed.send({"t": "push_proofs",
                                       "proofs": [p.encode() for p in proofs[:MAX_PROOFS_PER_MESSAGE]]})
                    _expect(await framed.receive(), "ok")
                await framed.send({"t": "done"})
            self._syncs += 1
            return gained
        except BaseException:
            await framed.reset()
            raise
        finally:
            await framed.close()

    async def _pull(self, framed: FramedStream, author: bytes, lo: int, hi: int, forks: list[bytes]) -> int:
        await framed.send({"t": "get", "author": author, "from": lo, "to": hi})
        msg = await framed.receive()
        _expect(msg, "entries")
        raw = field(msg, "entries", list)
        if len(raw) > MAX_ENTRIES_PER_BATCH:
            raise MalformedFrame(f"{len(raw)} entries in one batch, limit {MAX_ENTRIES_PER_BATCH}")
        entries = [LogEntry.decode(r) if isinstance(r, bytes) else _bad("an entry is not bytes") for r in raw]
        if any(e.author != author or not lo <= e.seq <= hi for e in entries):
            raise MalformedFrame("the peer sent entries outside the range asked for")
        was_frozen = author in self._frozen
        gained = await self.add_entries(entries)
        if not was_frozen and author in self._frozen:
            forks.append(author)
        return gained

    async def _handle_sync(self, stream) -> None:
        framed = FramedStream(stream, MAX_CONTROL_FRAME)
        peer = framed.remote_peer.to_bytes()
        try:
            with trio.fail_after(SYNC_TIMEOUT_S):
                msg = await framed.receive()
                _parse_heads(msg)
                await framed.send(self._heads_frame())
                for _ in range(MAX_SYNC_REQUESTS):
                    msg = await framed.receive()
                    t = msg["t"]
                    if t == "done":
                        break
                    if t == "get":
                        author = bytes_field(msg, "author", PEER_ID_BYTES)
                        lo = int_field(msg, "from", 1, 2**63 - 1)
                        hi = int_field(msg, "to", lo, 2**63 - 1)
                        hi = min(hi, lo + MAX_ENTRIES_PER_BATCH - 1)
                        entries = await trio.to_thread.run_sync(self.store.entries, author, lo, hi)
                        await framed.send({"t": "entries", "entries": [e.encode() for e in entries]})
                    elif t == "get_proofs":
                        authors = field(msg, "authors", list)[:MAX_PROOFS_PER_MESSAGE]
                        proofs = [p for p in await trio.to_thread.run_sync(self.store.proofs) if p.author in authors]
                        await framed.send({"t": "proofs", "proofs": [p.encode() for p in proofs]})
                    elif t == "push":
                        raw = field(msg, "entries", list)
                        if len(raw) > MAX_ENTRIES_PER_BATCH:
                            raise MalformedFrame(f"{len(raw)} entries pushed at once, limit {MAX_ENTRIES_PER_BATCH}")
                        entries = [LogEntry.decode(r) if isinstance(r, bytes) else _bad("an entry is not bytes")
                                   for r in raw]
                        await self.add_entries(entries, source=peer)
                        await framed.send({"t": "ok"})
                    elif t == "push_proofs":
                        await self.add_proofs(_parse_proofs(msg, "proofs"), publish=False)
                        await framed.send({"t": "ok"})
                    else:
                        raise MalformedFrame(f"unexpected sync message {t!r}")
                else:
                    raise MalformedFrame(f"more than {MAX_SYNC_REQUESTS} requests in one sync")
            self._syncs += 1
            await framed.close()
        except StreamClosed:
            await framed.close()
        except (RemoteProtocolError, InvalidProof, trio.TooSlowError) as e:
            self._sync_failures += 1
            self._last_error = f"sync from {short_id(peer)}: {e}"
            log.info("ledger sync from %s failed: %s", short_id(peer), describe(e))
            try:
                with trio.move_on_after(1):
                    await framed.send({"t": "error", "message": str(e)[:512]})
            except Exception:
                pass
            await framed.reset()

    def _refuse_version(self, major: int):
        theirs = protocol_id(LEDGER_SYNC, major)

        async def refuse(stream) -> None:
            framed = FramedStream(stream)
            try:
                await framed.send({"t": "error", "code": "version",
                                   "message": f"this node speaks {SYNC_PROTOCOL}; the peer asked for {theirs}"})
            finally:
                await framed.close()

        return refuse


def _bad(what: str):
    raise MalformedFrame(what)


def _expect(msg: dict, t: str) -> None:
    if msg["t"] == "error":
        raise RemoteProtocolError(f"the peer refused: {str(msg.get('message', ''))[:512]}")
    if msg["t"] != t:
        raise MalformedFrame(f"expected {t!r}, got {msg['t']!r}")


def _parse_heads(msg: dict) -> tuple[dict[bytes, tuple[int, bytes]], dict[bytes, int]]:
    _expect(msg, "heads")
    raw = field(msg, "heads", list)
    if len(raw) > MAX_HEADS_PER_MESSAGE:
        raise MalformedFrame(f"{len(raw)} heads in one message, limit {MAX_HEADS_PER_MESSAGE}")
    heads: dict[bytes, tuple[int, bytes]] = {}
    for item in raw:
        if (not isinstance(item, list) or len(item) != 3 or type(item[0]) is not bytes or len(item[0]) != PEER_ID_BYTES
                or type(item[1]) is not int or not 1 <= item[1] < 2**63 or type(item[2]) is not bytes
                or len(item[2]) != HASH_BYTES):
            raise MalformedFrame("a head is [author(bin 38), seq >= 1, hash(bin 32)]")
        heads[item[0]] = (item[1], item[2])
    proofs_raw = field(msg, "proofs", list)
    if len(proofs_raw) > MAX_PROOFS_PER_MESSAGE:
        raise MalformedFrame(f"{len(proofs_raw)} proofs in one message, limit {MAX_PROOFS_PER_MESSAGE}")
    proofs: dict[bytes, int] = {}
    for item in proofs_raw:
        if (not isinstance(item, list) or len(item) != 2 or type(item[0]) is not bytes
                or type(item[1]) is not int or item[1] < 1):
            raise MalformedFrame("a proof head is [author(bin 38), seq >= 1]")
        proofs[item[0]] = item[1]
    return heads, proofs


def _parse_proofs(msg: dict, name: str) -> list[EquivocationProof]:
    if msg["t"] not in ("proofs", "push_proofs"):
        _expect(msg, "proofs")
    raw = field(msg, name, list)
    if len(raw) > MAX_PROOFS_PER_MESSAGE:
        raise MalformedFrame(f"{len(raw)} proofs in one message, limit {MAX_PROOFS_PER_MESSAGE}")
    return [EquivocationProof.decode(r) if isinstance(r, bytes) else _bad("a proof is not bytes") for r in raw]


# -- views shared by the service and `poolai ledger` on a store without a running node ------------------


def ledger_summary(store: LedgerStore, credit_limit: int = FREE_TIER_UNITS, recent: int = RECENT_ENTRIES,
                   statistics: dict | None = None) -> dict[str, Any]:
    """Balance, recent own entries, counterparties and fraud proofs, as plain JSON-able values."""
    me = store.peer_id
    state = store.state()
    settled = store.balances()
    own = list(state.chains.get(me, ())) if me is not None else []
    proofs = store.proofs()
    frozen = {p.author for p in proofs}
    entries = []
    for e in own[-recent:][::-1]:
        r = e.receipt()
        other = r.server if e.kind == DEBIT else r.client
        entries.append({"seq": e.seq, "time_ms": e.time_ms, "kind": e.kind, "counterparty": b58encode(other),
                        "session": r.session_id.hex(), "span": [r.span_start, r.span_end], "tokens": r.tokens,
                        "units": r.units, "balance_after": e.balance_after})
    parties: dict[bytes, dict[str, Any]] = {}
    highest: dict[tuple, tuple[str, Receipt]] = {}
    for e in own:
        r = e.receipt()
        highest[r.session_key] = (e.kind, r)
    for kind, r in highest.values():
        other = r.server if kind == DEBIT else r.client
        p = parties.setdefault(other, {"peer": b58encode(other), "sessions": 0, "served_us": 0, "we_served": 0})
        p["sessions"] += 1
        p["served_us" if kind == DEBIT else "we_served"] += r.units
    for p in parties.values():
        p["net"] = p["we_served"] - p["served_us"]
    balance = settled.get(me, 0) if me is not None else 0
    return {
        "peer_id": b58encode(me) if me else None,
        "balance": balance,
        "own_view": own[-1].balance_after if own else 0,  # our chain's balance_after (unilateral)
        "credit_limit": credit_limit,
        "may_consume": may_serve(balance, credit_limit, frozen=me in frozen),
        "entries": len(own),
        "recent": entries,
        "counterparties": sorted(parties.values(), key=lambda p: -p["sessions"]),
        "proofs": [{"author": b58encode(p.author), "seq": p.seq, "us": p.author == me} for p in proofs],
        "chains": len(state.chains),
        "balances_sum": sum(settled.values()),
        "statistics": statistics,
    }


def verify_store(store: LedgerStore) -> dict[str, Any]:
    faults = store.verify_all()
    st = store.statistics()
    return {"ok": not faults, "faults": faults, "entries": st.entries, "authors": st.authors, "proofs": st.proofs}


# -- a ledger-only node: a real libp2p host with pubsub and this service, no model (tests, bench) -------


@dataclass
class LedgerNode:
    p2p: P2P
    signer: Signer
    store: LedgerStore
    service: LedgerService

    @property
    def peer_id(self) -> bytes:
        return self.signer.peer_id

    def addr(self) -> str:
        return self.p2p.listen_addrs()[0]


def open_ledger_node(data_dir: Path, key_pair=None, **service_kw):
    """`async with open_ledger_node(dir) as node:` a host on 127.0.0.1 running only the ledger service."""
    from contextlib import asynccontextmanager

    from libp2p.crypto.ed25519 import create_new_key_pair

    from .p2p import open_p2p

    @asynccontextmanager
    async def cm():
        kp = key_pair or create_new_key_pair()
        signer = Signer.from_seed(kp.private_key.to_bytes())
        data_dir.mkdir(parents=True, exist_ok=True)
        store = LedgerService.open_store(data_dir, signer)
        try:
            async with open_p2p(kp, ["/ip4/127.0.0.1/tcp/0"]) as p2p:
                service = LedgerService(p2p, signer, store, **service_kw)
                async with trio.open_nursery() as nursery:
                    await nursery.start(service.run)
                    try:
                        yield LedgerNode(p2p, signer, store, service)
                    finally:
                        nursery.cancel_scope.cancel()
        finally:
            store.close()

    return cm()


def make_receipt(client: Signer, server: Signer, session_id: bytes, seq: int, tokens: int, *, model_id: bytes,
                 span: tuple[int, int], started_ms: int, last_ms: int, io_commitment: bytes = bytes(32),
                 client_nonce: bytes = bytes(16), server_nonce: bytes = bytes(16)) -> Receipt:
    """A receipt signed by both sides (both keys at hand: tests, the bench, simulations)."""
    r = Receipt(session_id, client.peer_id, server.peer_id, model_id, span[0], span[1], seq, tokens,
                tokens * (span[1] - span[0]), io_commitment, client_nonce, server_nonce, started_ms, last_ms)
    return r.sign_as_server(server).sign_as_client(client)


async def start_ledger(nursery: trio.Nursery, p2p: P2P, signer: Signer, data_dir: Path, *,
                       credit_limit: int = FREE_TIER_UNITS, sync_interval_s: float = SYNC_INTERVAL_S) -> LedgerService:
    """Open the data dir's ledger and run its service in `nursery`; the store closes when the service stops."""
    store = await trio.to_thread.run_sync(LedgerService.open_store, data_dir, signer)
    service = LedgerService(p2p, signer, store, credit_limit=credit_limit, sync_interval_s=sync_interval_s)

    async def run(*, task_status=trio.TASK_STATUS_IGNORED) -> None:
        try:
            await service.run(task_status=task_status)
        finally:
            store.close()

    await nursery.start(run)
    return service


def format_ledger(info: dict[str, Any]) -> str:
    """`poolai ledger` for a terminal."""
    lines = [f"peer {info['peer_id']}",
             f"balance {info['balance']:+,} units (settled; free tier down to -{info['credit_limit']:,}; "
             f"own chain says {info['own_view']:+,})",
             f"{info['entries']} entries in our chain; {info['chains']} chains held; sum of all balances "
             f"{info['balances_sum']}"]
    if info["proofs"]:
        lines.append("fraud proofs (authors frozen):")
        lines += [f"  {p['author']} forked at seq {p['seq']}{'  <- US' if p['us'] else ''}" for p in info["proofs"]]
    if info["counterparties"]:
        lines.append("counterparties:          peer  sessions  served us  we served        net")
        lines += [f"  {p['peer'][-22:]:>26}  {p['sessions']:8d}  {p['served_us']:9,d}  {p['we_served']:9,d}  "
                  f"{p['net']:+9,d}" for p in info["counterparties"]]
    if info["recent"]:
        lines.append("recent entries:")
        for e in info["recent"]:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e["time_ms"] / 1000))
            lines.append(f"  #{e['seq']:<5} {stamp}  {e['kind']:6} {e['units']:>9,} units  blocks "
                         f"{e['span'][0]}:{e['span'][1]}  with {e['counterparty'][-12:]}  balance {e['balance_after']:+,}")
    return "\n".join(lines)


def format_verify(report: dict[str, Any]) -> str:
    head = (f"ledger OK: {report['entries']} entries of {report['authors']} authors, {report['proofs']} fraud proofs"
            if report["ok"] else f"ledger has {len(report['faults'])} fault(s):")
    return "\n".join([head, *(f"  {f}" for f in report["faults"])])

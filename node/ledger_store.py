"""The ledger on disk: every chain this node knows, in one SQLite file in the data dir.

Plain synchronous code: each call is one short transaction. The node runs the calls through
`trio.to_thread.run_sync`; a lock serialises them, so any thread may call.

Tables:
    entries   (author, seq) -> one LogEntry: its columns, and `raw`, the canonical encoding
    receipts  (author, session_id, client, server) -> the highest receipt of that session in that chain
    proofs    author -> the one canonical equivocation proof held against it (protocol.ledger.canonical_proof)
    meta      'peer_id' -> the identity that owns this file

All validation is protocol.ledger's; the store only decides what to persist, atomically.
"""

from __future__ import annotations

import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from protocol.errors import LocalProtocolError, MalformedFrame
from protocol.ledger import (
    MAX_ENTRIES_PER_BATCH,
    ChainCursor,
    EquivocationProof,
    InvalidProof,
    LedgerState,
    LogEntry,
    Receipt,
    SessionKey,
    balances,
    canonical_proof,
    validate_chain,
)
from protocol.signing import Signer, short_id

from .errors import StartupError

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS entries (
    author        BLOB    NOT NULL,
    seq           INTEGER NOT NULL,
    hash          BLOB    NOT NULL,
    prev_hash     BLOB    NOT NULL,
    kind          TEXT    NOT NULL,
    body          BLOB    NOT NULL,
    balance_after INTEGER NOT NULL,
    time_ms       INTEGER NOT NULL,
    signature     BLOB    NOT NULL,
    raw           BLOB    NOT NULL,
    PRIMARY KEY (author, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS receipts (
    author     BLOB    NOT NULL,
    session_id BLOB    NOT NULL,
    client     BLOB    NOT NULL,
    server     BLOB    NOT NULL,
    seq        INTEGER NOT NULL,
    units      INTEGER NOT NULL,
    entry_seq  INTEGER NOT NULL,
    raw        BLOB    NOT NULL,
    PRIMARY KEY (author, session_id, client, server)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS proofs (
    author BLOB    PRIMARY KEY,
    seq    INTEGER NOT NULL,
    raw    BLOB    NOT NULL
) WITHOUT ROWID;
"""


@dataclass(frozen=True)
class LedgerStatistics:
    entries: int  # entries stored, all authors
    authors: int  # authors with at least one entry
    own_head_seq: int  # seq of our own last entry (0: none yet)
    proofs: int  # authors frozen by an equivocation proof
    balance: int  # our settled balance (protocol.ledger.balances)


class LedgerStore:
    """All known chains in SQLite. Open with `LedgerStore.open(path, signer)`; close when done."""

    def __init__(self, conn: sqlite3.Connection, path: Path, signer: Signer | None) -> None:
        self._conn = conn
        self._lock = threading.Lock()
        self.path = path
        self._signer = signer

    @classmethod
    def open(cls, path: str | Path, signer: Signer | None = None) -> "LedgerStore":
        """Open (creating if needed) the ledger at `path`. `signer` is needed only to append our entries.

        StartupError if the file belongs to another identity or is not a ledger.
        """
        path = Path(path)
        try:
            conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30.0)
            conn.execute("PRAGMA journal_mode=WAL")
            # FULL: each commit fsyncs the WAL before returning. An entry we acknowledged (signed and
            # possibly already gossiped) must survive kill -9 and power loss: if it were lost, the
            # next append would sign a different entry at the same seq, which is an equivocation.
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, SCHEMA_VERSION):
                raise StartupError(f"ledger {path} has schema version {version}; this node reads {SCHEMA_VERSION}")
            conn.executescript(_SCHEMA)
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except sqlite3.DatabaseError as e:
            raise StartupError(f"ledger {path} cannot be opened: {e}") from None
        store = cls(conn, path, signer)
        if signer is not None:
            row = conn.execute("SELECT value FROM meta WHERE key='peer_id'").fetchone()
            if row is None:
                conn.execute("INSERT INTO meta(key, value) VALUES ('peer_id', ?)", (signer.peer_id,))
            elif bytes(row[0]) != signer.peer_id:
                conn.close()
                raise StartupError(
                    f"ledger {path} belongs to peer {short_id(bytes(row[0]))}, not {short_id(signer.peer_id)}"
                )
        return store

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> "LedgerStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def peer_id(self) -> bytes | None:
        """Our identity: the signer's, or the one recorded in the file."""
        if self._signer is not None:
            return self._signer.peer_id
        row = self._conn.execute("SELECT value FROM meta WHERE key='peer_id'").fetchone()
        return bytes(row[0]) if row else None

    # ------------------------------------------------------------------------------------------------
    # writes

    def append_own(self, kind: str, body: Receipt | bytes, time_ms: int) -> LogEntry:
        """Record a countersigned receipt as our DEBIT (we were the client) or CREDIT (the server).

        The entry follows the head read inside the same write transaction (BEGIN IMMEDIATE), and is
        durable when this returns, so after any crash the next append continues the chain: a seq is
        never reused and the chain never forks. ReceiptRejected if the receipt is invalid or does not
        advance its session ("replay" when already recorded: a repeated receipt is recorded once).
        """
        if self._signer is None:
            raise LocalProtocolError("this ledger store was opened without a signer")
        receipt = body if isinstance(body, Receipt) else Receipt.decode(body)
        me = self._signer.peer_id
        with self._lock, self._write():
            if self._conn.execute("SELECT 1 FROM proofs WHERE author=?", (me,)).fetchone():
                raise LocalProtocolError("our own chain is frozen by an equivocation proof; refusing to extend it")
            cursor = self._cursor(me)
            entry = cursor.next_entry(self._signer, kind, receipt, time_ms)
            self._insert(entry, receipt)
        return entry

    def add_foreign(self, entries: Iterable[LogEntry]) -> tuple[list[LogEntry], list[EquivocationProof]]:
        """Validate and store entries from peers; returns (entries newly stored, proofs newly recorded).

        Entries may come in any order and mix authors. Each author's entries are taken in seq order
        from its stored head: one that continues the chain validly is stored; one whose seq is already
        held with another hash (and a valid signature) yields an equivocation proof; the rest of that
        author's batch after a gap or an invalid entry is dropped (anti-entropy pulls it again later).
        """
        by_author: dict[bytes, dict[bytes, LogEntry]] = {}
        for e in entries:
            if isinstance(e, LogEntry) and not e.shape_problem():
                by_author.setdefault(e.author, {})[e.entry_hash()] = e
        accepted: list[LogEntry] = []
        new_proofs: list[EquivocationProof] = []
        with self._lock, self._write():
            for author in sorted(by_author):
                batch = sorted(by_author[author].values(), key=lambda e: (e.seq, e.entry_hash()))
                cursor = self._cursor(author)
                frozen_at = self._proof_seq(author)
                batch_held: dict[int, LogEntry] = {}
                for e in batch:
                    head_seq = cursor.head.seq if cursor.head else 0
                    if e.seq <= head_seq:
                        held = batch_held.get(e.seq) or self._entry(author, e.seq)
                        if held is not None and held.entry_hash() != e.entry_hash() and e.signature_ok():
                            proof = self._record_proof(EquivocationProof.of(held, e))
                            if proof is not None:
                                new_proofs.append(proof)
                                frozen_at = proof.seq
                        continue
                    if frozen_at is not None and e.seq >= frozen_at:
                        continue
                    if e.seq != head_seq + 1 or cursor.check(e) is not None:
                        # A gap, or an invalid entry: what follows cannot link. A second entry at the same
                        # seq (a fork inside the batch) is met by the branch above on the next turn.
                        if e.seq == head_seq + 1:
                            continue
                        break
                    cursor.append(e)
                    self._insert(e, e.receipt())
                    batch_held[e.seq] = e
                    accepted.append(e)
        return accepted, new_proofs

    def add_proofs(self, proofs: Iterable[EquivocationProof]) -> list[EquivocationProof]:
        """Record gossiped equivocation proofs; returns those that changed what we hold. Invalid ones are
        dropped silently (the caller may count them against the sender)."""
        changed = []
        with self._lock, self._write():
            for proof in proofs:
                try:
                    proof.verify()
                except InvalidProof:
                    continue
                recorded = self._record_proof(EquivocationProof.of(proof.entry_a, proof.entry_b))
                if recorded is not None:
                    changed.append(recorded)
        return changed

    # ------------------------------------------------------------------------------------------------
    # reads

    def head(self, author: bytes | None = None) -> LogEntry | None:
        """The last stored entry of `author` (default: ours)."""
        author = author if author is not None else self.peer_id
        if author is None:
            return None
        with self._lock:
            return self._head(author)

    def heads(self) -> dict[bytes, int]:
        """{author: head seq} as advertised to peers: a frozen author's head stops below its fork."""
        return {author: seq for author, (seq, _) in self.head_hashes().items()}

    def head_hashes(self) -> dict[bytes, tuple[int, bytes]]:
        """{author: (head seq, hash of that entry)}, a frozen author's head stopping below its fork."""
        with self._lock:
            rows = self._conn.execute("SELECT author, MAX(seq) FROM entries GROUP BY author").fetchall()
            frozen = dict(self._conn.execute("SELECT author, seq FROM proofs").fetchall())
            out = {}
            for author, seq in rows:
                fork = frozen.get(author)
                seq = seq if fork is None else min(seq, fork - 1)
                if seq < 1:
                    continue
                row = self._conn.execute("SELECT hash FROM entries WHERE author=? AND seq=?", (author, seq)).fetchone()
                if row is not None:
                    out[bytes(author)] = (seq, bytes(row[0]))
        return out

    def proof_seqs(self) -> dict[bytes, int]:
        """{author: forked seq} of every author frozen by a proof we hold."""
        with self._lock:
            return {bytes(a): s for a, s in self._conn.execute("SELECT author, seq FROM proofs").fetchall()}

    def entries(
        self, author: bytes, from_seq: int = 1, to_seq: int | None = None, limit: int = MAX_ENTRIES_PER_BATCH
    ) -> list[LogEntry]:
        """Entries of `author` with from_seq <= seq <= to_seq, at most `limit` of them, in seq order."""
        to_seq = to_seq if to_seq is not None else 2**63 - 1
        with self._lock:
            rows = self._conn.execute(
                "SELECT raw FROM entries WHERE author=? AND seq BETWEEN ? AND ? ORDER BY seq LIMIT ?",
                (author, from_seq, to_seq, limit),
            ).fetchall()
        return [LogEntry.decode(bytes(r[0])) for r in rows]

    def proofs(self) -> list[EquivocationProof]:
        with self._lock:
            rows = self._conn.execute("SELECT raw FROM proofs ORDER BY author").fetchall()
        return [EquivocationProof.decode(bytes(r[0])) for r in rows]

    def chains(self) -> dict[bytes, list[LogEntry]]:
        """Every author's chain, a frozen author's cut below its fork (what balances count)."""
        state = self.state()
        return {author: list(chain) for author, chain in state.chains.items()}

    def state(self) -> LedgerState:
        with self._lock:
            rows = self._conn.execute("SELECT author, raw FROM entries ORDER BY author, seq").fetchall()
            proof_rows = self._conn.execute("SELECT raw FROM proofs").fetchall()
        chains: dict[bytes, list[LogEntry]] = {}
        for author, raw in rows:
            chains.setdefault(bytes(author), []).append(LogEntry.decode(bytes(raw)))
        proofs = [EquivocationProof.decode(bytes(r[0])) for r in proof_rows]
        # Entries were validated on the way in; `trusted` skips re-checking thousands of signatures.
        return LedgerState.trusted(chains, {p.author: p for p in proofs})

    def balances(self) -> dict[bytes, int]:
        """Settled balances of everything stored (protocol.ledger.balances)."""
        return balances(self.state())

    def verify_all(self) -> list[str]:
        """Re-check everything on disk; one line per fault (empty: all is well)."""
        faults: list[str] = []
        with self._lock:
            rows = self._conn.execute(
                "SELECT author, seq, hash, prev_hash, kind, balance_after, time_ms, signature, raw "
                "FROM entries ORDER BY author, seq"
            ).fetchall()
            receipt_rows = self._conn.execute("SELECT author, session_id, client, server, seq, raw FROM receipts").fetchall()
            proof_rows = self._conn.execute("SELECT author, seq, raw FROM proofs").fetchall()
        chains: dict[bytes, list[LogEntry]] = {}
        for author, seq, hash_, prev_hash, kind, balance_after, time_ms, signature, raw in rows:
            author = bytes(author)
            try:
                e = LogEntry.decode(bytes(raw))
            except MalformedFrame as err:
                faults.append(f"{short_id(author)}#{seq}: raw bytes do not decode: {err}")
                continue
            columns = (author, seq, bytes(hash_), bytes(prev_hash), kind, balance_after, time_ms, bytes(signature))
            if columns != (e.author, e.seq, e.entry_hash(), e.prev_hash, e.kind, e.balance_after, e.time_ms, e.signature):
                faults.append(f"{short_id(author)}#{seq}: columns disagree with the raw entry")
            chains.setdefault(author, []).append(e)
        highest: dict[tuple[bytes, SessionKey], Receipt] = {}
        for author, chain in chains.items():
            error = validate_chain(chain)
            if error is not None:
                faults.append(f"{short_id(author)}: {error}")
            for e in chain:
                r = e.receipt()
                highest[(author, r.session_key)] = r
        stored = {}
        for author, session_id, client, server, seq, raw in receipt_rows:
            key = (bytes(author), (bytes(session_id), bytes(client), bytes(server)))
            stored[key] = Receipt.decode(bytes(raw))
        if stored != highest:
            faults.append(f"receipts table disagrees with the chains ({len(stored)} rows, {len(highest)} sessions)")
        for author, seq, raw in proof_rows:
            try:
                proof = EquivocationProof.decode(bytes(raw))
            except (MalformedFrame, InvalidProof) as err:
                faults.append(f"proof against {short_id(bytes(author))}: {err}")
                continue
            if proof.author != bytes(author) or proof.seq != seq:
                faults.append(f"proof against {short_id(bytes(author))}: row disagrees with the proof")
        me = self.peer_id
        if me is not None and any(bytes(a) == me for a, _, _ in proof_rows):
            faults.append("our own chain is forked (an equivocation proof names us)")
        return faults

    def statistics(self) -> LedgerStatistics:
        me = self.peer_id
        with self._lock:
            n, authors = self._conn.execute("SELECT COUNT(*), COUNT(DISTINCT author) FROM entries").fetchone()
            n_proofs = self._conn.execute("SELECT COUNT(*) FROM proofs").fetchone()[0]
            own = self._head(me) if me is not None else None
        balance = self.balances().get(me, 0) if me is not None else 0
        return LedgerStatistics(
            entries=n, authors=authors, own_head_seq=own.seq if own else 0, proofs=n_proofs, balance=balance
        )

    # ------------------------------------------------------------------------------------------------
    # internals (called with the lock held)

    def _write(self) -> "_Transaction":
        return _Transaction(self._conn)

    def _head(self, author: bytes) -> LogEntry | None:
        row = self._conn.execute(
            "SELECT raw FROM entries WHERE author=? ORDER BY seq DESC LIMIT 1", (author,)
        ).fetchone()
        return LogEntry.decode(bytes(row[0])) if row else None

    def _entry(self, author: bytes, seq: int) -> LogEntry | None:
        row = self._conn.execute("SELECT raw FROM entries WHERE author=? AND seq=?", (author, seq)).fetchone()
        return LogEntry.decode(bytes(row[0])) if row else None

    def _cursor(self, author: bytes) -> ChainCursor:
        def lookup(key: SessionKey) -> Receipt | None:
            row = self._conn.execute(
                "SELECT raw FROM receipts WHERE author=? AND session_id=? AND client=? AND server=?", (author, *key)
            ).fetchone()
            return Receipt.decode(bytes(row[0])) if row else None

        return ChainCursor(author, self._head(author), lookup)

    def _proof_seq(self, author: bytes) -> int | None:
        row = self._conn.execute("SELECT seq FROM proofs WHERE author=?", (author,)).fetchone()
        return row[0] if row else None

    def _insert(self, e: LogEntry, receipt: Receipt) -> None:
        self._conn.execute(
            "INSERT INTO entries(author, seq, hash, prev_hash, kind, body, balance_after, time_ms, signature, raw) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (e.author, e.seq, e.entry_hash(), e.prev_hash, e.kind, e.body, e.balance_after, e.time_ms,
             e.signature, e.encode()),
        )
        self._conn.execute(
            "INSERT OR REPLACE INTO receipts(author, session_id, client, server, seq, units, entry_seq, raw) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (e.author, receipt.session_id, receipt.client, receipt.server, receipt.seq, receipt.units, e.seq,
             receipt.encode()),
        )

    def _record_proof(self, proof: EquivocationProof) -> EquivocationProof | None:
        """Keep the canonical proof for the author; returns it if it changed."""
        row = self._conn.execute("SELECT raw FROM proofs WHERE author=?", (proof.author,)).fetchone()
        old = EquivocationProof.decode(bytes(row[0])) if row else None
        seq = min(proof.seq, old.seq) if old else proof.seq
        stored = self._entry(proof.author, seq)
        best = canonical_proof([old, proof], [stored] if stored else [])
        if best is None or best == old:
            return None
        self._conn.execute(
            "INSERT OR REPLACE INTO proofs(author, seq, raw) VALUES (?, ?, ?)", (best.author, best.seq, best.encode())
        )
        return best


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on any exception.

    IMMEDIATE takes the write lock at the start, so the head we read is the head we extend, even if
    another process opened the same file.
    """

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def __enter__(self) -> None:
        self._conn.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self._conn.execute("COMMIT")
        else:
            self._conn.execute("ROLLBACK")

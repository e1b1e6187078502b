"""Receipts, hash-chained credit logs, and the settlement rule. Pure: no I/O, no clock reads.

Who owes whom is settled by signed records that any node can check alone:

* A `Receipt` is per inference session and cumulative: every step the server signs the running totals
  (tokens, units = tokens x blocks of the span) and the client countersigns them. The highest `seq` of a
  session supersedes all earlier ones, so nothing is ever counted twice.
* Each node appends to its own hash chain of `LogEntry` records: a DEBIT (it was the client of a
  receipt) or a CREDIT (it was the server). Each entry links to the previous one by SHA-256 and is
  signed by its author.
* `balances()` settles a set of chains: a session moves credit only when both halves exist, a DEBIT
  in the client's chain and a CREDIT in the server's chain, and then by min(units the client logged,
  units the server logged). Every counted session adds x to one peer and -x to another, so balances
  always sum to zero: nothing is minted, and fake work inside a ring of sybils only moves credit around
  the ring.
* Two validly signed entries with the same (author, seq) and different hashes are an
  `EquivocationProof`. It freezes the author: only its entries below the forked seq are counted.
* `LedgerState` is a grow-only set: `merge` is commutative, associative and idempotent.

Canonical encodings (msgpack, `use_bin_type=True`, a fixed-order array, no maps, no floats; times
are integer milliseconds since the Unix epoch, amounts are integer units). Decoders accept only the
canonical bytes: re-encoding a decoded value must give back the input.

    receipt signing bytes  [1, session_id(bin16), client(bin38), server(bin38), model_id(bin32),
                            span_start, span_end, seq, tokens, units, io_commitment(bin32),
                            client_nonce(bin16), server_nonce(bin16), started_ms, last_ms]
    receipt                the signing array + [server_sig(bin64 or empty), client_sig(bin64 or empty)]
    entry signing bytes    [1, author(bin38), seq, prev_hash(bin32), time_ms, kind(str), body(bin),
                            balance_after]
    entry                  the signing array + [signature(bin64)]
    entry_hash             SHA-256 of the entry encoding (signature included)
    equivocation proof     [entry_a(bin), entry_b(bin)], entry_a's hash < entry_b's

Signatures are Ed25519 over `domain + NUL + signing bytes` (see `signing`), with the domains
RECEIPT_SERVER_DOMAIN, RECEIPT_CLIENT_DOMAIN and ENTRY_DOMAIN, so no signature made for one role can be
replayed in another. The leading 1 is the record version.

Error tree (all RemoteProtocolError: a peer sent it, drop it and go on):

    ReceiptRejected  a receipt fails a check; `.reason` is one of RECEIPT_REJECTION_REASONS
    ChainError       a chain entry is invalid; `.reason` is one of CHAIN_ERROR_REASONS
    InvalidProof     an equivocation proof does not prove anything
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any, Callable, Iterable, Mapping, Sequence

import msgpack

from .errors import BadSignature, LocalProtocolError, MalformedFrame, RemoteProtocolError
from .signing import PEER_ID_BYTES, SIGNATURE_BYTES, Signer, public_key_from_peer_id, short_id, verify

RECEIPT_VERSION = 1
ENTRY_VERSION = 1
RECEIPT_SERVER_DOMAIN = b"poolai/receipt/server/1"
RECEIPT_CLIENT_DOMAIN = b"poolai/receipt/client/1"
ENTRY_DOMAIN = b"poolai/ledger/entry/1"

SESSION_ID_BYTES = 16
MODEL_ID_BYTES = 32
IO_COMMITMENT_BYTES = 32
NONCE_BYTES = 16
HASH_BYTES = 32
ZERO_HASH = bytes(HASH_BYTES)

DEBIT = "DEBIT"
CREDIT = "CREDIT"
KINDS = (DEBIT, CREDIT)

# Counters, times and seqs are non-negative int64: what msgpack, SQLite INTEGER and every language's
# integer type hold without loss. Balances are signed int64 for the same reason.
MAX_COUNTER = 2**63 - 1
MIN_BALANCE = -(2**63)
MAX_BALANCE = 2**63 - 1

# The largest legal receipt encodes to 385 bytes (every int at 9 bytes, both signatures) and the largest
# legal entry to 556. These bounds leave room for a later version without letting a peer make us parse much.
MAX_RECEIPT_BYTES = 512
MAX_ENTRY_BYTES = 1024

# A receipt time may run ahead of ours by at most this much: the same allowance as announcements,
# covering machines without NTP; more would let a peer date work into the future.
MAX_CLOCK_SKEW_MS = 30_000

# Anti-entropy pulls at most this many entries per request: 100 entries of at most 559 bytes each (with
# their bin headers) are 56 KB, which fits one 64 KiB control frame (codec.MAX_CONTROL_FRAME) with room
# for the envelope; checking them costs 3 signature checks each, ~50 ms of one core, short enough for
# one worker-thread call that does not hold up the node.
MAX_ENTRIES_PER_BATCH = 100
# A heads message lists {author: seq}, about 50 bytes per author: 1024 authors is ~51 KB, one control
# frame. Past that, peers exchange heads in pages.
MAX_HEADS_PER_MESSAGE = 1024

# Free tier: a new identity (balance 0) may consume this many units before it must serve in return.
# units = tokens x blocks, so 200_000 units is ~6,600 tokens through the 30 blocks of the embedded
# model: enough to try the swarm with a dozen answers, too little to make farming fresh identities pay.
FREE_TIER_UNITS = 200_000

RECEIPT_REJECTION_REASONS = frozenset(
    {
        "bad_server_signature",  # server_sig missing or not the server's signature over these fields
        "bad_client_signature",  # client_sig missing or not the client's signature over these fields
        "wrong_signer",  # a valid signature by the other party in a role, or client == server
        "span_not_announced",  # the server never announced a span of this model covering [start, end)
        "unknown_model",  # model_id is not a model this node knows
        "decreasing_counters",  # tokens, units or last_ms lower than in the receipt already held
        "replay",  # seq not above the receipt already held for this session
        "future_time",  # started_ms or last_ms beyond now + max clock skew
        "malformed",  # wrong types or lengths, inconsistent fields (units != tokens x blocks), ...
    }
)

CHAIN_ERROR_REASONS = frozenset(
    {
        "malformed",  # an entry of the wrong shape
        "wrong_author",  # an entry of another author inside this author's chain
        "bad_seq",  # seq not contiguous from 1
        "bad_link",  # prev_hash is not the hash of the previous entry (zeros for seq 1)
        "bad_signature",  # the entry is not signed by its author
        "time_order",  # time_ms lower than the previous entry's
        "bad_receipt",  # the body is not a valid countersigned receipt; see `.receipt_reason`
        "wrong_role",  # a DEBIT not by the receipt's client, or a CREDIT not by its server
        "receipt_order",  # a session's receipts not strictly increasing in seq, or counters going down
        "session_mismatch",  # a later receipt of a session changes its fixed fields (span, model, ...)
        "bad_balance",  # balance_after is not the previous balance -/+ the entry's amount
    }
)

# (session_id, client, server): a session belongs to one pair, so a peer reusing someone else's
# session id cannot touch that session's accounting.
SessionKey = tuple[bytes, bytes, bytes]


class ReceiptRejected(RemoteProtocolError):
    """Raised when a receipt fails a check. `.reason` names which (RECEIPT_REJECTION_REASONS).

    The caller should refuse the receipt, log one line naming the peer that sent it, and go on.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        assert reason in RECEIPT_REJECTION_REASONS, reason
        super().__init__(f"receipt rejected ({reason})" + (f": {detail}" if detail else ""))
        self.reason = reason


class ChainError(RemoteProtocolError):
    """Raised (or returned by `validate_chain`) when a chain entry is invalid.

    `.reason` is one of CHAIN_ERROR_REASONS, `.author` and `.seq` (the seq the entry claims) locate the
    first bad entry, and
    `.receipt_reason` holds the ReceiptRejected reason when `.reason` is "bad_receipt". The entries before
    it remain valid; the caller keeps that prefix and drops the rest.
    """

    def __init__(
        self, reason: str, detail: str, *, author: bytes | None = None, seq: int | None = None,
        receipt_reason: str | None = None,
    ) -> None:
        assert reason in CHAIN_ERROR_REASONS, reason
        where = f" at {short_id(author) if _is_peer_id(author) else '?'}#{seq}" if seq is not None else ""
        super().__init__(f"invalid chain entry{where} ({reason}): {detail}")
        self.reason = reason
        self.author = author
        self.seq = seq
        self.receipt_reason = receipt_reason


class InvalidProof(RemoteProtocolError):
    """Raised when an equivocation proof does not show two signed entries of one (author, seq).

    The caller should drop the proof and penalise the peer that gossiped it.
    """


# ----------------------------------------------------------------------------------------------------
# encoding helpers


def _pack(value: list[Any]) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def _unpack_array(raw: bytes, limit: int, what: str) -> list[Any]:
    """Strictly decode a canonical msgpack array; MalformedFrame otherwise."""
    if not isinstance(raw, (bytes, bytearray)):
        raise MalformedFrame(f"{what} must be bytes")
    raw = bytes(raw)
    if len(raw) > limit:
        raise MalformedFrame(f"{what} of {len(raw)} bytes is over the {limit}-byte limit")
    try:
        value = msgpack.unpackb(
            raw, raw=False, use_list=True, strict_map_key=True, max_str_len=limit, max_bin_len=limit,
            max_array_len=32, max_map_len=0, max_ext_len=0,
        )
    except Exception as e:  # msgpack raises several types on hostile input
        raise MalformedFrame(f"{what} is not valid msgpack: {type(e).__name__}: {e}") from None
    if not isinstance(value, list):
        raise MalformedFrame(f"{what} is not a msgpack array")
    try:
        canonical = _pack(value) == raw
    except Exception:
        canonical = False
    if not canonical:
        raise MalformedFrame(f"{what} is not in canonical encoding")
    return value


def _is_int(x: Any, lo: int = 0, hi: int = MAX_COUNTER) -> bool:
    return type(x) is int and lo <= x <= hi


def _is_bytes(x: Any, length: int | None = None) -> bool:
    return type(x) is bytes and (length is None or len(x) == length)


def _is_peer_id(x: Any) -> bool:
    if not _is_bytes(x, PEER_ID_BYTES):
        return False
    try:
        public_key_from_peer_id(x)
    except MalformedFrame:
        return False
    return True


def _is_sig(x: Any) -> bool:
    return type(x) is bytes and len(x) in (0, SIGNATURE_BYTES)


# Successful signature checks, memoised: a merge or a re-validation checks the same entries again and
# again. Keyed by a digest of everything checked, so a hit is exactly a repeat of a check that passed.
# Failures are not cached. Bounded; cleared wholesale when full (cheap, and safe across threads).
_VERIFIED: dict[bytes, None] = {}
_VERIFIED_MAX = 1 << 16


def _verify_cached(peer_id: bytes, domain: bytes, message: bytes, signature: bytes) -> None:
    key = hashlib.sha256(_pack([peer_id, domain, message, signature])).digest()
    if key in _VERIFIED:
        return
    verify(peer_id, domain, message, signature)
    if len(_VERIFIED) >= _VERIFIED_MAX:
        _VERIFIED.clear()
    _VERIFIED[key] = None


def _signature_ok(peer_id: bytes, domain: bytes, message: bytes, signature: bytes) -> bool:
    try:
        _verify_cached(peer_id, domain, message, signature)
    except (BadSignature, MalformedFrame):
        return False
    return True


# ----------------------------------------------------------------------------------------------------
# receipts


@dataclass(frozen=True)
class Receipt:
    """A cumulative, per-session record of work, signed by the server and countersigned by the client.

    All counters are totals since the session started; a later `seq` supersedes earlier ones.
    `units` = `tokens` x (`span_end` - `span_start`). `io_commitment` is a running hash of the steps'
    inputs and outputs (opaque here; spot checks and fraud proofs use it).
    """

    session_id: bytes
    client: bytes
    server: bytes
    model_id: bytes
    span_start: int
    span_end: int
    seq: int
    tokens: int
    units: int
    io_commitment: bytes
    client_nonce: bytes
    server_nonce: bytes
    started_ms: int
    last_ms: int
    server_sig: bytes = b""
    client_sig: bytes = b""

    @property
    def blocks(self) -> int:
        return self.span_end - self.span_start

    @property
    def session_key(self) -> SessionKey:
        return (self.session_id, self.client, self.server)

    def _signed_fields(self) -> list[Any]:
        return [
            RECEIPT_VERSION, self.session_id, self.client, self.server, self.model_id, self.span_start,
            self.span_end, self.seq, self.tokens, self.units, self.io_commitment, self.client_nonce,
            self.server_nonce, self.started_ms, self.last_ms,
        ]

    def signing_bytes(self) -> bytes:
        """The bytes both parties sign (every field but the two signatures)."""
        problem = self.shape_problem()
        if problem:
            raise LocalProtocolError(f"cannot encode a malformed receipt: {problem}")
        return _pack(self._signed_fields())

    def encode(self) -> bytes:
        problem = self.shape_problem()
        if problem:
            raise LocalProtocolError(f"cannot encode a malformed receipt: {problem}")
        return _pack(self._signed_fields() + [self.server_sig, self.client_sig])

    @classmethod
    def decode(cls, raw: bytes) -> "Receipt":
        """Parse a receipt; ReceiptRejected("malformed") for anything but a well-formed canonical one."""
        try:
            value = _unpack_array(raw, MAX_RECEIPT_BYTES, "receipt")
        except MalformedFrame as e:
            raise ReceiptRejected("malformed", str(e)) from None
        if len(value) != 17 or value[0] != RECEIPT_VERSION or type(value[0]) is not int:
            raise ReceiptRejected("malformed", "not a version-1 receipt array of 17 fields")
        receipt = cls(*value[1:])
        problem = receipt.shape_problem()
        if problem:
            raise ReceiptRejected("malformed", problem)
        return receipt

    def shape_problem(self) -> str | None:
        """What is structurally wrong with this receipt, or None."""
        for name, length in (
            ("session_id", SESSION_ID_BYTES), ("model_id", MODEL_ID_BYTES),
            ("io_commitment", IO_COMMITMENT_BYTES), ("client_nonce", NONCE_BYTES), ("server_nonce", NONCE_BYTES),
        ):
            if not _is_bytes(getattr(self, name), length):
                return f"{name} must be {length} bytes"
        for name in ("client", "server"):
            if not _is_peer_id(getattr(self, name)):
                return f"{name} is not an Ed25519 peer ID"
        for name in ("span_start", "span_end", "seq", "tokens", "units", "started_ms", "last_ms"):
            if not _is_int(getattr(self, name)):
                return f"{name} must be an integer in [0, 2**63)"
        for name in ("server_sig", "client_sig"):
            if not _is_sig(getattr(self, name)):
                return f"{name} must be empty or {SIGNATURE_BYTES} bytes"
        if self.span_start >= self.span_end:
            return f"empty span [{self.span_start}, {self.span_end})"
        if self.seq < 1:
            return "seq starts at 1"
        if self.units != self.tokens * self.blocks:
            return f"units {self.units} != tokens {self.tokens} x blocks {self.blocks}"
        if self.started_ms > self.last_ms:
            return "started_ms is after last_ms"
        return None

    def sign_as_server(self, signer: Signer) -> "Receipt":
        if signer.peer_id != self.server:
            raise LocalProtocolError("sign_as_server needs the receipt's server key")
        return replace(self, server_sig=signer.sign(RECEIPT_SERVER_DOMAIN, self.signing_bytes()))

    def sign_as_client(self, signer: Signer) -> "Receipt":
        if signer.peer_id != self.client:
            raise LocalProtocolError("sign_as_client needs the receipt's client key")
        return replace(self, client_sig=signer.sign(RECEIPT_CLIENT_DOMAIN, self.signing_bytes()))

    def verify(self, *, countersigned: bool = True) -> None:
        """Check shape and signatures; ReceiptRejected otherwise.

        With countersigned=False (a client checking the server's half before countersigning) a missing
        client signature is accepted; a present one must still be valid.
        """
        problem = self.shape_problem()
        if problem:
            raise ReceiptRejected("malformed", problem)
        if self.client == self.server:
            raise ReceiptRejected("wrong_signer", "client and server are the same identity")
        message = self._signing_bytes_unchecked()
        self._check_sig(message, self.server_sig, self.server, self.client, RECEIPT_SERVER_DOMAIN, "server")
        if countersigned or self.client_sig:
            self._check_sig(message, self.client_sig, self.client, self.server, RECEIPT_CLIENT_DOMAIN, "client")

    def _signing_bytes_unchecked(self) -> bytes:
        return _pack(self._signed_fields())

    @staticmethod
    def _check_sig(message: bytes, sig: bytes, signer: bytes, other: bytes, domain: bytes, role: str) -> None:
        if not sig:
            raise ReceiptRejected(f"bad_{role}_signature", f"no {role} signature")
        if _signature_ok(signer, domain, message, sig):
            return
        if _signature_ok(other, domain, message, sig):
            raise ReceiptRejected("wrong_signer", f"the {role} signature was made by the other party")
        raise ReceiptRejected(f"bad_{role}_signature", f"{role} signature does not verify")


_SESSION_FIXED_FIELDS = (
    "client", "server", "model_id", "span_start", "span_end", "client_nonce", "server_nonce", "started_ms",
)


def _session_change(receipt: Receipt, held: Receipt) -> str | None:
    for name in _SESSION_FIXED_FIELDS:
        if getattr(receipt, name) != getattr(held, name):
            return f"{name} differs from the receipt already held for this session"
    return None


def _check_progress(receipt: Receipt, held: Receipt | None) -> None:
    """ReceiptRejected unless `receipt` may follow `held` (same session, seq up, counters not down)."""
    if held is None:
        return
    change = _session_change(receipt, held)
    if change:
        raise ReceiptRejected("malformed", change)
    if receipt.seq <= held.seq:
        raise ReceiptRejected("replay", f"seq {receipt.seq} is not above {held.seq}")
    for name in ("tokens", "units", "last_ms"):
        if getattr(receipt, name) < getattr(held, name):
            raise ReceiptRejected("decreasing_counters", f"{name} went down from {getattr(held, name)}")


def validate_receipt(
    receipt: Receipt,
    *,
    known_models: set[bytes] | frozenset[bytes],
    announced_spans: Callable[[bytes, bytes], Sequence[tuple[int, int]] | None],
    previous: Receipt | None,
    now_ms: int,
    max_clock_skew_ms: int = MAX_CLOCK_SKEW_MS,
    countersigned: bool = True,
) -> None:
    """Check a receipt received live; ReceiptRejected with the first failing reason.

    `previous` is the highest-seq receipt already held for this session (None for a new session).
    `announced_spans(server, model_id)` returns the spans the server announced for the model, or None.
    Checks, in order: shape, signatures, model, span, time, replay, counters.
    """
    if previous is not None and previous.session_id != receipt.session_id:
        raise LocalProtocolError("previous is a receipt of another session")
    receipt.verify(countersigned=countersigned)
    if receipt.model_id not in known_models:
        raise ReceiptRejected("unknown_model", receipt.model_id.hex()[:16])
    spans = announced_spans(receipt.server, receipt.model_id) or ()
    if not any(s <= receipt.span_start and receipt.span_end <= e for s, e in spans):
        raise ReceiptRejected(
            "span_not_announced", f"[{receipt.span_start}, {receipt.span_end}) by {short_id(receipt.server)}"
        )
    horizon = now_ms + max_clock_skew_ms
    if receipt.last_ms > horizon or receipt.started_ms > horizon:
        raise ReceiptRejected("future_time", f"last_ms {receipt.last_ms} is past {horizon}")
    _check_progress(receipt, previous)


# ----------------------------------------------------------------------------------------------------
# log entries


@dataclass(frozen=True)
class LogEntry:
    """One record of an author's hash chain. `body` is the encoded countersigned Receipt."""

    author: bytes
    seq: int
    prev_hash: bytes
    time_ms: int
    kind: str
    body: bytes
    balance_after: int
    signature: bytes = b""

    def _signed_fields(self) -> list[Any]:
        return [
            ENTRY_VERSION, self.author, self.seq, self.prev_hash, self.time_ms, self.kind, self.body,
            self.balance_after,
        ]

    def shape_problem(self) -> str | None:
        if not _is_peer_id(self.author):
            return "author is not an Ed25519 peer ID"
        if not _is_int(self.seq, 1):
            return "seq must be an integer >= 1"
        if not _is_bytes(self.prev_hash, HASH_BYTES):
            return f"prev_hash must be {HASH_BYTES} bytes"
        if not _is_int(self.time_ms):
            return "time_ms must be an integer in [0, 2**63)"
        if type(self.kind) is not str or self.kind not in KINDS:
            return f"kind must be one of {KINDS}"
        if not _is_bytes(self.body) or len(self.body) > MAX_RECEIPT_BYTES:
            return f"body must be at most {MAX_RECEIPT_BYTES} bytes"
        if not _is_int(self.balance_after, MIN_BALANCE, MAX_BALANCE):
            return "balance_after must be a signed 64-bit integer"
        if not _is_sig(self.signature):
            return f"signature must be {SIGNATURE_BYTES} bytes"
        if self.seq == 1 and self.prev_hash != ZERO_HASH:
            return "the first entry links to the zero hash"
        return None

    def signing_bytes(self) -> bytes:
        problem = self.shape_problem()
        if problem:
            raise LocalProtocolError(f"cannot encode a malformed entry: {problem}")
        return _pack(self._signed_fields())

    def encode(self) -> bytes:
        return self._encoded

    @cached_property
    def _encoded(self) -> bytes:
        problem = self.shape_problem()
        if problem:
            raise LocalProtocolError(f"cannot encode a malformed entry: {problem}")
        return _pack(self._signed_fields() + [self.signature])

    def entry_hash(self) -> bytes:
        """SHA-256 of the canonical encoding, signature included: what the next entry links to."""
        return self._hash

    @cached_property
    def _hash(self) -> bytes:
        return hashlib.sha256(self._encoded).digest()

    @classmethod
    def decode(cls, raw: bytes) -> "LogEntry":
        """Parse an entry; MalformedFrame unless well-formed and canonical (signature not checked)."""
        value = _unpack_array(raw, MAX_ENTRY_BYTES, "ledger entry")
        if len(value) != 9 or type(value[0]) is not int or value[0] != ENTRY_VERSION:
            raise MalformedFrame("not a version-1 ledger entry array of 9 fields")
        entry = cls(*value[1:])
        problem = entry.shape_problem()
        if problem:
            raise MalformedFrame(f"ledger entry: {problem}")
        return entry

    @classmethod
    def create(
        cls, signer: Signer, prev: "LogEntry | None", kind: str, body: "Receipt | bytes", balance_after: int,
        time_ms: int,
    ) -> "LogEntry":
        """Sign the entry that follows `prev` (None: the first). Checks shape only, not the chain rules."""
        if prev is not None and prev.author != signer.peer_id:
            raise LocalProtocolError("prev belongs to another author")
        raw_body = body.encode() if isinstance(body, Receipt) else body
        unsigned = cls(
            author=signer.peer_id,
            seq=prev.seq + 1 if prev else 1,
            prev_hash=prev.entry_hash() if prev else ZERO_HASH,
            time_ms=time_ms,
            kind=kind,
            body=raw_body,
            balance_after=balance_after,
        )
        return replace(unsigned, signature=signer.sign(ENTRY_DOMAIN, unsigned.signing_bytes()))

    def receipt(self) -> Receipt:
        """The body decoded (ReceiptRejected("malformed") if it is not a receipt)."""
        return self._receipt

    @cached_property
    def _receipt(self) -> Receipt:
        return Receipt.decode(self.body)

    def signature_ok(self) -> bool:
        if self.shape_problem() or len(self.signature) != SIGNATURE_BYTES:
            return False
        return _signature_ok(self.author, ENTRY_DOMAIN, _pack(self._signed_fields()), self.signature)


def entry_amount(kind: str, receipt: Receipt, held: Receipt | None) -> int:
    """The signed change an entry makes to its author's own balance: units not yet accounted for."""
    amount = receipt.units - (held.units if held else 0)
    return amount if kind == CREDIT else -amount


class ChainCursor:
    """Validates one author's chain entry by entry, from a known head.

    `head` is the last entry already accepted (None: empty chain). `lookup(session_key)` gives the
    highest receipt of a session already in the chain (for a store: its receipts table); when
    validating from scratch it is not needed. The cursor keeps what it accepts itself.
    """

    def __init__(
        self, author: bytes, head: LogEntry | None = None,
        lookup: Callable[[SessionKey], Receipt | None] | None = None,
    ) -> None:
        if head is not None and head.author != author:
            raise LocalProtocolError("head belongs to another author")
        self.author = author
        self.head = head
        self._lookup = lookup
        self._sessions: dict[SessionKey, Receipt] = {}

    def held(self, key: SessionKey) -> Receipt | None:
        """The highest receipt of a session in this chain so far."""
        if key in self._sessions:
            return self._sessions[key]
        return self._lookup(key) if self._lookup else None

    def check(self, entry: LogEntry) -> ChainError | None:
        """The reason `entry` cannot follow the head, or None. Does not advance."""
        author, seq = self.author, getattr(entry, "seq", None)

        def err(reason: str, detail: str, receipt_reason: str | None = None) -> ChainError:
            return ChainError(reason, detail, author=author, seq=seq if type(seq) is int else None,
                              receipt_reason=receipt_reason)

        if not isinstance(entry, LogEntry):
            return err("malformed", "not a LogEntry")
        problem = entry.shape_problem()
        if problem:
            return err("malformed", problem)
        if entry.author != author:
            return err("wrong_author", f"entry by {short_id(entry.author)}")
        expected = self.head.seq + 1 if self.head else 1
        if entry.seq != expected:
            return err("bad_seq", f"expected seq {expected}")
        if entry.prev_hash != (self.head.entry_hash() if self.head else ZERO_HASH):
            return err("bad_link", "prev_hash does not match the previous entry")
        if not entry.signature_ok():
            return err("bad_signature", "not signed by its author")
        if self.head and entry.time_ms < self.head.time_ms:
            return err("time_order", f"time_ms {entry.time_ms} < {self.head.time_ms}")
        try:
            receipt = entry.receipt()
            receipt.verify(countersigned=True)
        except ReceiptRejected as e:
            return err("bad_receipt", str(e), e.reason)
        party = receipt.client if entry.kind == DEBIT else receipt.server
        if party != author:
            return err("wrong_role", f"a {entry.kind} must be written by the receipt's "
                       f"{'client' if entry.kind == DEBIT else 'server'}")
        held = self.held(receipt.session_key)
        if held is not None:
            change = _session_change(receipt, held)
            if change:
                return err("session_mismatch", change)
            if receipt.seq <= held.seq or any(
                getattr(receipt, n) < getattr(held, n) for n in ("tokens", "units", "last_ms")
            ):
                return err("receipt_order", f"receipt seq {receipt.seq} after {held.seq} in this chain")
        before = self.head.balance_after if self.head else 0
        want = before + entry_amount(entry.kind, receipt, held)
        if entry.balance_after != want:
            return err("bad_balance", f"balance_after {entry.balance_after}, expected {want}")
        return None

    def append(self, entry: LogEntry) -> None:
        """Accept `entry` as the new head; raises ChainError if it cannot follow."""
        error = self.check(entry)
        if error is not None:
            raise error
        self._advance(entry)

    def _advance(self, entry: LogEntry) -> None:
        receipt = entry.receipt()
        self._sessions[receipt.session_key] = receipt
        self.head = entry

    def next_entry(self, signer: Signer, kind: str, receipt: Receipt, time_ms: int) -> LogEntry:
        """Build, check and accept the entry that records `receipt` as our `kind`.

        ReceiptRejected if the receipt is invalid or does not advance its session in this chain
        ("replay" for a seq already recorded, so a repeated receipt is never recorded twice);
        LocalProtocolError if we are not the party that `kind` requires. `time_ms` is raised to the
        head's time if the clock went back.
        """
        if signer.peer_id != self.author:
            raise LocalProtocolError("signer is not this chain's author")
        if kind not in KINDS:
            raise LocalProtocolError(f"kind must be one of {KINDS}")
        receipt.verify(countersigned=True)
        if (receipt.client if kind == DEBIT else receipt.server) != self.author:
            raise LocalProtocolError(f"we are not the {'client' if kind == DEBIT else 'server'} of this receipt")
        held = self.held(receipt.session_key)
        _check_progress(receipt, held)
        before = self.head.balance_after if self.head else 0
        after = before + entry_amount(kind, receipt, held)
        if not MIN_BALANCE <= after <= MAX_BALANCE:
            raise ReceiptRejected("malformed", "balance would overflow 64 bits")
        if self.head:
            time_ms = max(time_ms, self.head.time_ms)
        entry = LogEntry.create(signer, self.head, kind, receipt, after, time_ms)
        self.append(entry)
        return entry


def valid_prefix(entries: Sequence[LogEntry]) -> tuple[list[LogEntry], ChainError | None]:
    """The longest valid prefix of a chain (entries in seq order from 1) and the first error after it."""
    if not entries:
        return [], None
    first = entries[0]
    author = first.author if isinstance(first, LogEntry) and _is_peer_id(first.author) else None
    if author is None:
        return [], ChainError("malformed", "the chain's first entry has no valid author", seq=1)
    cursor = ChainCursor(author)
    for i, entry in enumerate(entries):
        error = cursor.check(entry)
        if error is not None:
            return list(entries[:i]), error
        cursor._advance(entry)
    return list(entries), None


def validate_chain(entries: Sequence[LogEntry]) -> ChainError | None:
    """The first fault of a chain (entries in seq order from 1), or None when it is entirely valid.

    Checks: contiguous seq from 1, prev_hash links, author signatures, time never going back, countersigned
    receipts, DEBIT only by the receipt's client and CREDIT only by its server, per-session receipts
    strictly increasing in seq with fixed session fields, and balance_after = previous -/+ amount.
    """
    return valid_prefix(entries)[1]


# ----------------------------------------------------------------------------------------------------
# equivocation


@dataclass(frozen=True)
class EquivocationProof:
    """Two entries one author signed for the same seq: proof that it forked its chain.

    Needs nothing but itself to check: the author's public key is inside its peer ID. Build with `of`,
    which orders the entries by hash so that a proof has a single form.
    """

    entry_a: LogEntry
    entry_b: LogEntry

    @classmethod
    def of(cls, e1: LogEntry, e2: LogEntry) -> "EquivocationProof":
        a, b = sorted((e1, e2), key=LogEntry.entry_hash)
        return cls(a, b)

    @property
    def author(self) -> bytes:
        return self.entry_a.author

    @property
    def seq(self) -> int:
        return self.entry_a.seq

    def verify(self) -> None:
        """InvalidProof unless both entries are by one author at one seq, differ, and are both signed."""
        a, b = self.entry_a, self.entry_b
        if not isinstance(a, LogEntry) or not isinstance(b, LogEntry) or a.shape_problem() or b.shape_problem():
            raise InvalidProof("an equivocation proof holds two well-formed entries")
        if a.author != b.author or a.seq != b.seq:
            raise InvalidProof("the entries are not of the same (author, seq)")
        if a.entry_hash() == b.entry_hash():
            raise InvalidProof("the entries are identical")
        if not a.signature_ok() or not b.signature_ok():
            raise InvalidProof(f"an entry is not signed by {short_id(a.author)}")

    def encode(self) -> bytes:
        return _pack([self.entry_a.encode(), self.entry_b.encode()])

    @classmethod
    def decode(cls, raw: bytes) -> "EquivocationProof":
        """Parse and verify a proof; MalformedFrame or InvalidProof."""
        value = _unpack_array(raw, 2 * MAX_ENTRY_BYTES + 16, "equivocation proof")
        if len(value) != 2 or not all(type(v) is bytes for v in value):
            raise MalformedFrame("an equivocation proof is an array of two encoded entries")
        proof = cls.of(LogEntry.decode(value[0]), LogEntry.decode(value[1]))
        proof.verify()
        return proof


def canonical_proof(
    proofs: Iterable[EquivocationProof | None], entries: Iterable[LogEntry] = ()
) -> EquivocationProof | None:
    """The one proof kept for an author, from all evidence: the lowest forked seq, and at that seq the
    two entries with the smallest hashes among the proofs' entries and `entries` (chain entries seen
    at that seq). A function of the evidence alone, which keeps merge commutative and associative.
    """
    proofs = [p for p in proofs if p is not None]
    if not proofs:
        return None
    seq = min(p.seq for p in proofs)
    pool: dict[bytes, LogEntry] = {}
    for p in proofs:
        if p.seq == seq:
            pool[p.entry_a.entry_hash()] = p.entry_a
            pool[p.entry_b.entry_hash()] = p.entry_b
    for e in entries:
        if e.seq == seq and e.author == proofs[0].author:
            pool[e.entry_hash()] = e
    first, second = sorted(pool)[:2]
    return EquivocationProof(pool[first], pool[second])


def find_equivocation(entries_a: Iterable[LogEntry], entries_b: Iterable[LogEntry]) -> EquivocationProof | None:
    """A proof from two sets of entries (either may itself hold the fork), or None.

    Only validly signed entries count. When there are several forks the lowest (author, seq) is chosen.
    """
    groups: dict[tuple[bytes, int], dict[bytes, LogEntry]] = {}
    for e in [*entries_a, *entries_b]:
        if isinstance(e, LogEntry) and not e.shape_problem():
            groups.setdefault((e.author, e.seq), {})[e.entry_hash()] = e
    for key in sorted(groups):
        signed = {h: e for h, e in groups[key].items() if e.signature_ok()} if len(groups[key]) > 1 else {}
        if len(signed) > 1:
            first, second = sorted(signed)[:2]
            return EquivocationProof(signed[first], signed[second])
    return None


# ----------------------------------------------------------------------------------------------------
# the grow-only set of chains


@dataclass(frozen=True)
class LedgerState:
    """A set of valid chains, one per author, and at most one equivocation proof per author.

    Invariant: each chain is valid from seq 1, and a frozen author's chain stops below the proof's
    seq. Build with `of` (validates) or `trusted` (the caller validated already, e.g. a store).
    Treat the dicts as read-only.
    """

    chains: dict[bytes, tuple[LogEntry, ...]] = field(default_factory=dict)
    proofs: dict[bytes, EquivocationProof] = field(default_factory=dict)

    @classmethod
    def of(
        cls, chains: Mapping[bytes, Sequence[LogEntry]] | Iterable[Sequence[LogEntry]] = (),
        proofs: Iterable[EquivocationProof] = (),
    ) -> "LedgerState":
        """Validate and merge: each chain is cut to its longest valid prefix, invalid proofs dropped."""
        parts = chains.values() if isinstance(chains, Mapping) else chains
        state = cls()
        for entries in parts:
            prefix, _ = valid_prefix(list(entries))
            if prefix:
                state = merge(state, cls({prefix[0].author: tuple(prefix)}, {}))
        for proof in proofs:
            try:
                proof.verify()
            except InvalidProof:
                continue
            state = merge(state, cls({proof.author: ()}, {proof.author: EquivocationProof.of(proof.entry_a, proof.entry_b)}))
        return state

    @classmethod
    def trusted(
        cls, chains: Mapping[bytes, Sequence[LogEntry]], proofs: Mapping[bytes, EquivocationProof] | None = None
    ) -> "LedgerState":
        """Wrap chains already validated; cuts frozen authors' chains at their proofs."""
        proofs = proofs or {}
        out: dict[bytes, tuple[LogEntry, ...]] = {}
        for author in set(chains) | set(proofs):
            chain = tuple(chains.get(author, ()))
            proof = proofs.get(author)
            if proof is not None:
                chain = chain[: proof.seq - 1]
            if chain or proof is not None:
                out[author] = chain
        return cls(out, {a: p for a, p in proofs.items()})

    def frozen(self) -> dict[bytes, int]:
        """{author: forked seq} of every author with an equivocation proof."""
        return {a: p.seq for a, p in self.proofs.items()}

    def heads(self) -> dict[bytes, int]:
        return heads(self)

    def balances(self) -> dict[bytes, int]:
        return balances(self)


def _merge_author(
    ca: tuple[LogEntry, ...], pa: EquivocationProof | None, cb: tuple[LogEntry, ...], pb: EquivocationProof | None
) -> tuple[tuple[LogEntry, ...], EquivocationProof | None]:
    candidates = [pa, pb]
    if ca is cb or ca == cb:
        chain = ca
    else:
        n = min(len(ca), len(cb))
        fork = next((i for i in range(n) if ca[i].entry_hash() != cb[i].entry_hash()), None)
        if fork is None:
            chain = ca if len(ca) >= len(cb) else cb
        else:
            chain = ca[:fork]
            candidates.append(EquivocationProof.of(ca[fork], cb[fork]))
    seq_entries = []
    live = [p for p in candidates if p is not None]
    if live:
        k = min(p.seq for p in live)
        seq_entries = [c[k - 1] for c in (ca, cb) if len(c) >= k]
    proof = canonical_proof(candidates, seq_entries)
    if proof is not None:
        chain = chain[: proof.seq - 1]
    return chain, proof


def merge(a: LedgerState, b: LedgerState) -> LedgerState:
    """The union of two states: per author the longest chain both agree on, forks become proofs.

    Commutative, associative and idempotent: the result depends only on the set of entries and proofs
    ever seen (see docs/ledger.md for why).
    """
    chains: dict[bytes, tuple[LogEntry, ...]] = {}
    proofs: dict[bytes, EquivocationProof] = {}
    for author in sorted(set(a.chains) | set(b.chains) | set(a.proofs) | set(b.proofs)):
        chain, proof = _merge_author(
            a.chains.get(author, ()), a.proofs.get(author), b.chains.get(author, ()), b.proofs.get(author)
        )
        if chain or proof is not None:
            chains[author] = chain
        if proof is not None:
            proofs[author] = proof
    return LedgerState(chains, proofs)


def balances(chains: "LedgerState | Mapping[bytes, Sequence[LogEntry]]") -> dict[bytes, int]:
    """Settled balances of a set of chains; they always sum to 0.

    A session (session_id, client, server) counts only when the client's chain holds a DEBIT and the
    server's chain holds a CREDIT for it; it moves min(highest units in the client's chain, highest units
    in the server's chain) from the client to the server. A frozen author's chain is cut below its fork,
    so its entries past the fork count for nobody. Every chain author appears in the result (0 if
    nothing settled). A mapping is validated first (`LedgerState.of`).
    """
    state = chains if isinstance(chains, LedgerState) else LedgerState.of(chains)
    debited: dict[SessionKey, int] = {}
    credited: dict[SessionKey, int] = {}
    for author, chain in state.chains.items():
        for entry in chain:
            receipt = entry.receipt()
            side = debited if entry.kind == DEBIT else credited
            key = receipt.session_key
            side[key] = max(side.get(key, 0), receipt.units)
    out = {author: 0 for author in state.chains}
    for key in sorted(debited.keys() & credited.keys()):
        _, client, server = key
        amount = min(debited[key], credited[key])
        out[client] = out.get(client, 0) - amount
        out[server] = out.get(server, 0) + amount
    return out


# ----------------------------------------------------------------------------------------------------
# credit policy


def may_serve(balance: int, limit: int = FREE_TIER_UNITS, *, frozen: bool = False) -> bool:
    """Whether to serve a requester with this settled balance: yes while it is above -limit.

    A frozen author (proven equivocator) is never served. Settlement lags, so a requester can overshoot
    the floor by at most the sessions it has open.
    """
    if limit < 0:
        raise LocalProtocolError("the credit limit is a non-negative number of units")
    return not frozen and balance > -limit


# ----------------------------------------------------------------------------------------------------
# anti-entropy


def heads(chains: "LedgerState | Mapping[bytes, Sequence[LogEntry]]") -> dict[bytes, int]:
    """{author: seq of its last entry} (0 for an empty chain)."""
    items = chains.chains if isinstance(chains, LedgerState) else chains
    return {author: (chain[-1].seq if chain else 0) for author, chain in items.items()}


def missing(
    mine: Mapping[bytes, int], theirs: Mapping[bytes, int], *, frozen: Iterable[bytes] = ()
) -> dict[bytes, tuple[int, int]]:
    """{author: (from_seq, to_seq)} (inclusive) that the peer with heads `theirs` has and we lack.

    Frozen authors are skipped: their entries past the fork are never counted.
    """
    skip = set(frozen)
    out = {}
    for author, seq in theirs.items():
        have = mine.get(author, 0)
        if author not in skip and _is_int(seq) and seq > have:
            out[author] = (have + 1, seq)
    return out


def plan_batches(
    ranges: Mapping[bytes, tuple[int, int]], max_entries: int = MAX_ENTRIES_PER_BATCH
) -> list[tuple[bytes, int, int]]:
    """Split missing ranges into requests of at most `max_entries` entries each, in a stable order."""
    if max_entries < 1:
        raise LocalProtocolError("a batch holds at least one entry")
    out = []
    for author in sorted(ranges):
        lo, hi = ranges[author]
        while lo <= hi:
            top = min(hi, lo + max_entries - 1)
            out.append((author, lo, top))
            lo = top + 1
    return out


def pull_ranges(
    mine: Mapping[bytes, tuple[int, bytes]], theirs: Mapping[bytes, tuple[int, bytes]], *,
    frozen: Iterable[bytes] = (),
) -> dict[bytes, tuple[int, int]]:
    """{author: (from_seq, to_seq)} to pull from a peer, given both sides' heads {author: (seq, hash)}.

    Unlike `missing`, a range overlaps our own head by one entry: if the peer's chain does not extend
    ours, the overlapping entry differs from the one we hold, and storing it yields an equivocation
    proof. A peer head at our seq with another hash is pulled alone for the same reason. (A peer head
    below ours is the peer's to pull: the same rule run from its side, or our push, which overlaps
    too.) Frozen authors are skipped.
    """
    skip = set(frozen)
    out: dict[bytes, tuple[int, int]] = {}
    for author, (seq, digest) in theirs.items():
        if author in skip or not _is_int(seq, 1):
            continue
        have, have_hash = mine.get(author, (0, ZERO_HASH))
        if seq > have:
            out[author] = (max(1, have), seq)
        elif seq == have and digest != have_hash:
            out[author] = (seq, seq)
    return out

"""Wire messages of the overlay service (`/poolai/ring/1`) and its signed records.

Pure and sans-IO, like `protocol/overlay.py`: this module turns message maps (as decoded by
`protocol.codec`) into typed requests and replies and back, with every count and length bounded,
and defines the record the overlay stores (author, key, value, expiry, signature).

Conversation: one request per stream, one reply, then the stream closes. Requests and their replies:

    find  {key: uint64, a}            -> found   {next: entry | nil, close: [entry], n}
    stab  {n: float, a}               -> ring    {succ: [entry], pred: [entry], nbrs: [entry], n}
    link  {drop: bool, a}             -> linked  {ok: bool}
    store {records: [bin], a}         -> stored  {count: int}
    get   {key: bin, a}               -> records {records: [bin]}
    any                               -> error   {msg: str}   (the request was refused)

`a` is the sender's own listen addresses (so that peers can hand it on), `n` the sender's size
estimate, an entry is `[peer_id, [addr, ...]]`. Positions never travel: a receiver recomputes
`ring_position(peer_id)`, so no peer can claim a place on the ring it does not hash to.

Records: `[author, key, value, issued_ms, expires_ms, signature]`, msgpack, signed by the author
(Ed25519, domain RECORD_DOMAIN) over the msgpack list of the first five fields. A record's ring
position is `key_position(key)`; it is stored on the RECORD_REPLICAS nodes closest to it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from typing import Any

import msgpack

from .codec import bytes_field, field, int_field, str_field
from .errors import MalformedFrame, RemoteProtocolError
from .overlay import PREDECESSORS, RING_SIZE, SUCCESSORS, ring_position
from .versions import RING, RING_MAJOR, protocol_id
from .signing import PEER_ID_BYTES, SIGNATURE_BYTES, Signer, public_key_from_peer_id, verify

RING_PROTOCOL = protocol_id(RING, RING_MAJOR)
RECORD_DOMAIN = b"poolai/ring-record/1"

# A key names a thing (a hash, a peer ID plus a tag): 128 bytes hold any of them with room to spare.
MAX_KEY_BYTES = 128
# Values are small pointers (ledger witness heads, peer address records, both under 1 KiB); 8 KiB
# leaves room and keeps a full store message of MAX_RECORDS_PER_MESSAGE records under 1 MiB.
MAX_VALUE_BYTES = 8 * 1024
# An encoded record: the value and key at their limits plus author, times and signature.
MAX_RECORD_BYTES = MAX_VALUE_BYTES + MAX_KEY_BYTES + 256
# A record lives at most a day: its author republishes it; a vanished author's records fade.
MAX_RECORD_TTL_MS = 24 * 3600 * 1000
# Honest clocks differ by seconds; a record issued further ahead than this is refused.
MAX_CLOCK_SKEW_MS = 30_000
# Records per store / records reply: 100 records at the size limit are ~850 KiB, under the frame limit.
MAX_RECORDS_PER_MESSAGE = 100
# Ring messages: a full store message (above) plus framing; everything else is a few KiB.
MAX_RING_FRAME = 1024 * 1024
# Entries per list: successors, predecessors, lookup answers. Honest lists hold at most 8.
MAX_SHORT_ENTRIES = max(SUCCESSORS, PREDECESSORS)
# Advertised neighbours (lookahead): 16 short + at most 20 long + at most 40 inbound = 76.
MAX_ADVERTISED = 96
# A node listens on a handful of addresses; more is a peer padding its messages.
MAX_ADDRS = 4
MAX_ADDR_CHARS = 256
# The addresses a node can dial (SPEC §1: TCP only, by IP or DNS name, optionally with the peer ID).
# Anything else a peer sends is dropped before it is stored or handed on to others.
DIALABLE_ADDR = re.compile(r"/(ip4|ip6|dns|dns4|dns6)/[0-9A-Za-z.:%_-]{1,253}/tcp/[0-9]{1,5}(/p2p/[1-9A-HJ-NP-Za-km-z]{1,64})?")
# Error text sent back with a refusal.
MAX_ERROR_CHARS = 256

REQUESTS = ("find", "stab", "link", "store", "get")
REPLIES = {"find": "found", "stab": "ring", "link": "linked", "store": "stored", "get": "records"}


class RecordRejected(RemoteProtocolError):
    """Raised when a record is too large, badly signed, expired, issued in the future or lives too long.

    The receiver drops that record (only that one), logs the reason and keeps the rest.
    """


class Refused(RemoteProtocolError):
    """Raised when a peer answered a request with an `error` reply (the reason is the message)."""


Entry = tuple[bytes, tuple[str, ...]]


# ---------------------------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------------------------


def key_position(key: bytes) -> int:
    """Where a record with this key lives on the ring: the same hash as peer positions."""
    return ring_position(key)


@dataclass(frozen=True)
class RingRecord:
    author: bytes
    key: bytes
    value: bytes
    issued_ms: int
    expires_ms: int
    signature: bytes = b""

    def _fields(self) -> list[Any]:
        return [self.author, self.key, self.value, self.issued_ms, self.expires_ms]

    def signing_bytes(self) -> bytes:
        return msgpack.packb(self._fields(), use_bin_type=True)

    def signed(self, signer: Signer) -> "RingRecord":
        if signer.peer_id != self.author:
            raise ValueError("a record is signed by its author")
        return replace(self, signature=signer.sign(RECORD_DOMAIN, self.signing_bytes()))

    def encode(self) -> bytes:
        return msgpack.packb([*self._fields(), self.signature], use_bin_type=True)

    @property
    def position(self) -> int:
        return key_position(self.key)

    @property
    def slot(self) -> tuple[bytes, bytes]:
        """What a newer record replaces: one record per (key, author)."""
        return (self.key, self.author)


def decode_record(data: Any) -> RingRecord:
    """Decode (not yet verify) one record; RecordRejected when over the size limits, MalformedFrame
    when it is not a record at all."""
    if not isinstance(data, bytes):
        raise MalformedFrame("a record must be bytes")
    if len(data) > MAX_RECORD_BYTES:
        raise RecordRejected(f"record of {len(data)} bytes is over the {MAX_RECORD_BYTES}-byte limit")
    try:
        f = msgpack.unpackb(data, raw=False, use_list=True, max_array_len=8, max_map_len=0, max_ext_len=0,
                            max_str_len=0, max_bin_len=len(data))
    except Exception as e:
        raise MalformedFrame(f"record is not valid msgpack: {type(e).__name__}") from None
    if not isinstance(f, list) or len(f) != 6:
        raise MalformedFrame("a record is a list of 6 fields")
    m = dict(zip(("author", "key", "value", "issued_ms", "expires_ms", "sig"), f))
    m["t"] = "record"
    key = field(m, "key", bytes)
    value = field(m, "value", bytes)
    if len(key) > MAX_KEY_BYTES or not key:
        raise RecordRejected(f"record key of {len(key)} bytes (must be 1..{MAX_KEY_BYTES})")
    if len(value) > MAX_VALUE_BYTES:
        raise RecordRejected(f"record value of {len(value)} bytes is over the {MAX_VALUE_BYTES}-byte limit")
    return RingRecord(
        author=bytes_field(m, "author", PEER_ID_BYTES),
        key=key,
        value=value,
        issued_ms=int_field(m, "issued_ms", 0, 1 << 62),
        expires_ms=int_field(m, "expires_ms", 0, 1 << 62),
        signature=bytes_field(m, "sig", SIGNATURE_BYTES),
    )


def check_record(rec: RingRecord, now_ms: int) -> None:
    """Verify a decoded record at `now_ms`; RecordRejected naming the fault."""
    if not 0 < len(rec.key) <= MAX_KEY_BYTES:
        raise RecordRejected(f"record key of {len(rec.key)} bytes (must be 1..{MAX_KEY_BYTES})")
    if len(rec.value) > MAX_VALUE_BYTES:
        raise RecordRejected(f"record value of {len(rec.value)} bytes is over the {MAX_VALUE_BYTES}-byte limit")
    if rec.expires_ms <= now_ms:
        raise RecordRejected("record expired")
    if rec.issued_ms > now_ms + MAX_CLOCK_SKEW_MS:
        raise RecordRejected("record issued in the future")
    if rec.expires_ms < rec.issued_ms or rec.expires_ms - rec.issued_ms > MAX_RECORD_TTL_MS:
        raise RecordRejected(f"record lifetime over {MAX_RECORD_TTL_MS} ms")
    try:
        verify(rec.author, RECORD_DOMAIN, rec.signing_bytes(), rec.signature)
    except RemoteProtocolError as e:
        raise RecordRejected(f"bad signature: {e}") from None


def make_record(signer: Signer, key: bytes, value: bytes, now_ms: int, ttl_ms: int) -> RingRecord:
    """A signed record; ValueError (our own misuse) when it breaks a limit."""
    if not 0 < len(key) <= MAX_KEY_BYTES:
        raise ValueError(f"a record key has 1..{MAX_KEY_BYTES} bytes, not {len(key)}")
    if len(value) > MAX_VALUE_BYTES:
        raise ValueError(f"a record value has at most {MAX_VALUE_BYTES} bytes, not {len(value)}")
    if not 0 < ttl_ms <= MAX_RECORD_TTL_MS:
        raise ValueError(f"a record lives 1..{MAX_RECORD_TTL_MS} ms, not {ttl_ms}")
    return RingRecord(signer.peer_id, key, value, now_ms, now_ms + ttl_ms).signed(signer)


# ---------------------------------------------------------------------------------------------
# Messages
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    kind: str  # one of REQUESTS
    addrs: tuple[str, ...]
    key_pos: int = 0  # find
    n_hat: float = 1.0  # stab
    drop: bool = False  # link
    records: tuple[bytes, ...] = ()  # store (each still to be decode_record-ed: one bad record is not the batch)
    key: bytes = b""  # get


@dataclass(frozen=True)
class Found:
    next: Entry | None
    close: tuple[Entry, ...]
    n_hat: float


@dataclass(frozen=True)
class RingLists:
    successors: tuple[Entry, ...]
    predecessors: tuple[Entry, ...]
    neighbours: tuple[Entry, ...]
    n_hat: float


def _entry(e: Entry) -> list:
    return [e[0], list(e[1][:MAX_ADDRS])]


def find_request(key_pos: int, addrs: tuple[str, ...]) -> dict:
    return {"t": "find", "key": key_pos, "a": list(addrs[:MAX_ADDRS])}


def stab_request(n_hat: float, addrs: tuple[str, ...]) -> dict:
    return {"t": "stab", "n": float(n_hat), "a": list(addrs[:MAX_ADDRS])}


def link_request(addrs: tuple[str, ...], drop: bool = False) -> dict:
    return {"t": "link", "drop": drop, "a": list(addrs[:MAX_ADDRS])}


def store_request(records: list[bytes], addrs: tuple[str, ...]) -> dict:
    if len(records) > MAX_RECORDS_PER_MESSAGE:
        raise ValueError(f"at most {MAX_RECORDS_PER_MESSAGE} records per store message")
    return {"t": "store", "records": list(records), "a": list(addrs[:MAX_ADDRS])}


def get_request(key: bytes, addrs: tuple[str, ...]) -> dict:
    return {"t": "get", "key": key, "a": list(addrs[:MAX_ADDRS])}


def found_reply(nxt: Entry | None, close: list[Entry], n_hat: float) -> dict:
    return {"t": "found", "next": None if nxt is None else _entry(nxt),
            "close": [_entry(e) for e in close[:MAX_SHORT_ENTRIES]], "n": float(n_hat)}


def ring_reply(succ: list[Entry], pred: list[Entry], nbrs: list[Entry], n_hat: float) -> dict:
    return {"t": "ring", "succ": [_entry(e) for e in succ[:MAX_SHORT_ENTRIES]],
            "pred": [_entry(e) for e in pred[:MAX_SHORT_ENTRIES]],
            "nbrs": [_entry(e) for e in nbrs[:MAX_ADVERTISED]], "n": float(n_hat)}


def linked_reply(ok: bool) -> dict:
    return {"t": "linked", "ok": bool(ok)}


def stored_reply(count: int) -> dict:
    return {"t": "stored", "count": count}


def records_reply(records: list[bytes]) -> dict:
    return {"t": "records", "records": list(records[:MAX_RECORDS_PER_MESSAGE])}


def error_reply(text: str) -> dict:
    return {"t": "error", "msg": text[:MAX_ERROR_CHARS]}


def _addrs(msg: dict, name: str = "a") -> tuple[str, ...]:
    addrs = field(msg, name, list)
    if len(addrs) > MAX_ADDRS or not all(isinstance(a, str) and 0 < len(a) <= MAX_ADDR_CHARS for a in addrs):
        raise MalformedFrame(f"field {name!r} of {msg.get('t')!r}: at most {MAX_ADDRS} addresses "
                             f"of 1..{MAX_ADDR_CHARS} characters")
    return tuple(a for a in addrs if DIALABLE_ADDR.fullmatch(a))


def _n_hat(msg: dict) -> float:
    n = field(msg, "n", (float, int))
    if not (math.isfinite(n) and 1.0 <= n <= float(RING_SIZE)):
        raise MalformedFrame(f"size estimate {n!r} of {msg.get('t')!r} is outside [1, 2^64]")
    return float(n)


def _decode_entry(raw: Any, where: str) -> Entry:
    if not isinstance(raw, list) or len(raw) != 2:
        raise MalformedFrame(f"an entry of {where} is not [peer_id, addrs]")
    pid, addrs = raw
    if not isinstance(pid, bytes):
        raise MalformedFrame(f"an entry of {where} has no peer ID")
    public_key_from_peer_id(pid)  # MalformedFrame unless an Ed25519 peer ID
    return pid, _addrs({"t": where, "a": addrs})


def _entries(msg: dict, name: str, limit: int) -> tuple[Entry, ...]:
    raw = field(msg, name, list)
    if len(raw) > limit:
        raise MalformedFrame(f"{len(raw)} entries in {name!r} of {msg.get('t')!r}, limit {limit}")
    return tuple(_decode_entry(e, f"{msg.get('t')}.{name}") for e in raw)


def _records(msg: dict) -> tuple[bytes, ...]:
    raw = field(msg, "records", list)
    if len(raw) > MAX_RECORDS_PER_MESSAGE:
        raise MalformedFrame(f"{len(raw)} records in one message, limit {MAX_RECORDS_PER_MESSAGE}")
    return tuple(raw)  # each checked by decode_record, one by one


def decode_request(msg: dict) -> Request:
    """A request map (from `codec.decode_body`) as a Request; MalformedFrame naming the fault."""
    kind = msg.get("t")
    if kind not in REQUESTS:
        raise MalformedFrame(f"unknown ring request {kind!r} (known: {', '.join(REQUESTS)})")
    addrs = _addrs(msg)
    if kind == "find":
        return Request(kind, addrs, key_pos=int_field(msg, "key", 0, RING_SIZE - 1))
    if kind == "stab":
        return Request(kind, addrs, n_hat=_n_hat(msg))
    if kind == "link":
        return Request(kind, addrs, drop=field(msg, "drop", bool))
    if kind == "store":
        return Request(kind, addrs, records=_records(msg))
    return Request(kind, addrs, key=bytes_field(msg, "key", max_length=MAX_KEY_BYTES))


def decode_reply(msg: dict, request: str) -> Any:
    """The reply to a `request` kind: Found, RingLists, bool (linked), int (stored) or a tuple of
    record bytes; Refused for an error reply, MalformedFrame for anything else."""
    kind = msg.get("t")
    if kind == "error":
        raise Refused(f"peer refused {request}: {str_field(msg, 'msg', MAX_ERROR_CHARS)}")
    expected = REPLIES[request]
    if kind != expected:
        raise MalformedFrame(f"expected a {expected!r} reply to {request!r}, got {kind!r}")
    if kind == "found":
        raw = msg.get("next", 0)
        if "next" not in msg:
            raise MalformedFrame("found reply lacks field 'next'")
        nxt = None if raw is None else _decode_entry(raw, "found.next")
        return Found(nxt, _entries(msg, "close", MAX_SHORT_ENTRIES), _n_hat(msg))
    if kind == "ring":
        return RingLists(_entries(msg, "succ", MAX_SHORT_ENTRIES), _entries(msg, "pred", MAX_SHORT_ENTRIES),
                         _entries(msg, "nbrs", MAX_ADVERTISED), _n_hat(msg))
    if kind == "linked":
        return field(msg, "ok", bool)
    if kind == "stored":
        return int_field(msg, "count", 0, MAX_RECORDS_PER_MESSAGE)
    return _records(msg)

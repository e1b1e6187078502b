"""Span announcements and the swarm map built from them.

A server announces, on the gossip topic `ANNOUNCE_TOPIC`, a signed record saying which blocks of which
model it serves, where to reach it and until when the record holds. Every node keeps the latest valid
record per (peer, model) in a `SwarmMap` and drops records once they expire, so a node that vanishes
without a word leaves the map within one TTL.

Signature: Ed25519 by the announcing peer over DOMAIN + canonical encoding (a msgpack list in the
field order of `SpanAnnouncement`, signature excluded). Records relayed by others stay verifiable.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import msgpack

from .codec import bytes_field, decode_body, field, int_field, str_field
from .errors import MalformedFrame, RemoteProtocolError
from .manifest import MAX_BLOCKS
from .signing import PEER_ID_BYTES, SIGNATURE_BYTES, Signer, verify

DOMAIN = b"poolai/announce/1"

# A record lives at most 2 minutes: long enough to survive a few lost refreshes at the default
# 15 s period, short enough that a vanished server leaves every map quickly.
MAX_TTL_MS = 120_000
# Clocks of honest peers differ by seconds, not minutes; a record issued further ahead is refused.
MAX_CLOCK_SKEW_MS = 30_000
MAX_ADDRS = 8  # a node listens on a handful of addresses; more is a peer padding records
MAX_ADDR_CHARS = 256
MAX_DEVICE_CHARS = 64
STATES = ("joining", "online", "draining")


class AnnouncementRejected(RemoteProtocolError):
    """Raised when a received announcement is invalid: bad signature, expired, from the future or
    out of bounds. The caller drops it (gossip validator returns False) and logs the reason."""


@dataclass(frozen=True)
class SpanAnnouncement:
    peer_id: bytes
    model_id: bytes
    start: int
    end: int
    addrs: tuple[str, ...]
    issued_ms: int
    expires_ms: int
    state: str = "online"
    device: str = "cpu"
    throughput: int = 0  # block-steps per second x 1000 (one token through one block), 0 = unknown
    cache_tokens_left: int = 0
    signature: bytes = b""

    def _fields(self) -> list[Any]:
        return [self.peer_id, self.model_id, self.start, self.end, list(self.addrs), self.issued_ms,
                self.expires_ms, self.state, self.device, self.throughput, self.cache_tokens_left]

    def signing_bytes(self) -> bytes:
        return msgpack.packb(self._fields(), use_bin_type=True)

    def signed(self, signer: Signer) -> "SpanAnnouncement":
        if signer.peer_id != self.peer_id:
            raise ValueError("an announcement is signed by the peer it announces")
        return replace(self, signature=signer.sign(DOMAIN, self.signing_bytes()))

    def encode(self) -> bytes:
        return msgpack.packb({"t": "announce", "f": self._fields(), "sig": self.signature}, use_bin_type=True)

    @property
    def span(self) -> tuple[int, int]:
        return self.start, self.end

    def covers(self, block: int) -> bool:
        return self.start <= block < self.end


def decode_announcement(data: bytes) -> SpanAnnouncement:
    """Decode (not yet verify) a gossiped announcement; MalformedFrame on any structural fault."""
    msg = decode_body(data)
    if msg["t"] != "announce":
        raise MalformedFrame(f"expected an announcement, got {msg['t']!r}")
    f = field(msg, "f", list)
    if len(f) != 11:
        raise MalformedFrame(f"announcement has {len(f)} fields, expected 11")
    names = ["peer_id", "model_id", "start", "end", "addrs", "issued_ms", "expires_ms", "state", "device",
             "throughput", "cache_tokens_left"]
    m = dict(zip(names, f))
    m["t"] = "announce"
    addrs = field(m, "addrs", list)
    if len(addrs) > MAX_ADDRS or not all(isinstance(a, str) and len(a) <= MAX_ADDR_CHARS for a in addrs):
        raise MalformedFrame(f"announcement addrs: at most {MAX_ADDRS} strings of {MAX_ADDR_CHARS} chars")
    state = str_field(m, "state", 16)
    if state not in STATES:
        raise MalformedFrame(f"announcement state {state!r} not in {STATES}")
    return SpanAnnouncement(
        peer_id=bytes_field(m, "peer_id", PEER_ID_BYTES),
        model_id=bytes_field(m, "model_id", 32),
        start=int_field(m, "start", 0, MAX_BLOCKS - 1),
        end=int_field(m, "end", 1, MAX_BLOCKS),
        addrs=tuple(addrs),
        issued_ms=int_field(m, "issued_ms", 0, 1 << 62),
        expires_ms=int_field(m, "expires_ms", 0, 1 << 62),
        state=state,
        device=str_field(m, "device", MAX_DEVICE_CHARS),
        throughput=int_field(m, "throughput", 0, 1 << 40),
        cache_tokens_left=int_field(m, "cache_tokens_left", 0, 1 << 40),
        signature=bytes_field(msg, "sig", SIGNATURE_BYTES),
    )


def check_announcement(ann: SpanAnnouncement, now_ms: int, sender: bytes | None = None) -> None:
    """Verify a decoded announcement at time `now_ms`; AnnouncementRejected naming the fault.

    `sender`, when given, is the gossip message's signed origin: a record may only be published by the
    peer it describes (relays forward the same message, so its origin stays the author).
    """
    if ann.start >= ann.end:
        raise AnnouncementRejected(f"empty span [{ann.start}, {ann.end})")
    if sender is not None and sender != ann.peer_id:
        raise AnnouncementRejected("announcement published by another peer than its author")
    if ann.expires_ms <= now_ms:
        raise AnnouncementRejected("announcement expired")
    if ann.issued_ms > now_ms + MAX_CLOCK_SKEW_MS:
        raise AnnouncementRejected("announcement issued in the future")
    if ann.expires_ms - ann.issued_ms > MAX_TTL_MS or ann.expires_ms < ann.issued_ms:
        raise AnnouncementRejected(f"announcement lifetime over {MAX_TTL_MS} ms")
    try:
        verify(ann.peer_id, DOMAIN, ann.signing_bytes(), ann.signature)
    except RemoteProtocolError as e:
        raise AnnouncementRejected(f"bad signature: {e}") from None


class SwarmMap:
    """Which peer serves which blocks of which model, from the latest valid record of each peer."""

    def __init__(self) -> None:
        self._records: dict[tuple[bytes, bytes], SpanAnnouncement] = {}

    def apply(self, ann: SpanAnnouncement, now_ms: int) -> bool:
        """Store a verified record if it is newer than what we hold; True when the map changed."""
        if ann.expires_ms <= now_ms:
            return False
        key = (ann.peer_id, ann.model_id)
        held = self._records.get(key)
        if held is not None and held.issued_ms >= ann.issued_ms:
            return False
        self._records[key] = ann
        return True

    def remove_peer(self, peer_id: bytes) -> None:
        for key in [k for k in self._records if k[0] == peer_id]:
            del self._records[key]

    def expire(self, now_ms: int) -> list[SpanAnnouncement]:
        gone = [a for a in self._records.values() if a.expires_ms <= now_ms]
        for a in gone:
            del self._records[(a.peer_id, a.model_id)]
        return gone

    def servers(self, model_id: bytes, *, states: tuple[str, ...] = ("online",)) -> list[SpanAnnouncement]:
        return sorted(
            (a for (p, m), a in self._records.items() if m == model_id and a.state in states),
            key=lambda a: (a.start, a.end, a.peer_id),
        )

    def records(self) -> list[SpanAnnouncement]:
        return list(self._records.values())

    def coverage(self, model_id: bytes, n_blocks: int) -> list[int]:
        """Replicas per block among online servers."""
        counts = [0] * n_blocks
        for a in self.servers(model_id):
            for b in range(a.start, min(a.end, n_blocks)):
                counts[b] += 1
        return counts

    def missing_blocks(self, model_id: bytes, n_blocks: int) -> list[int]:
        return [b for b, c in enumerate(self.coverage(model_id, n_blocks)) if c == 0]

    def __len__(self) -> int:
        return len(self._records)

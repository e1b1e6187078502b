"""The swarm map service: announces this node's span and keeps everyone else's.

Records travel two ways. Gossip (topic ANNOUNCE_TOPIC) carries each server's signed record, refreshed
every `announce_interval_s`; a validator drops anything unsigned, expired or malformed before it is
relayed. And a joining node exchanges records directly with each peer it dials
(`/poolai/swarm/1`), so it knows the swarm within one round trip instead of one refresh period.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import trio

from protocol.announce import (
    MAX_TTL_MS,
    AnnouncementRejected,
    SpanAnnouncement,
    SwarmMap,
    check_announcement,
    decode_announcement,
)
from protocol.codec import field
from protocol.errors import MalformedFrame, RemoteProtocolError
from protocol.route import NoRoute
from protocol.signing import Signer, short_id
from protocol.versions import ANNOUNCE_TOPIC, SWARM, SWARM_MAJOR, protocol_id

from .p2p import P2P
from .errors import describe
from .wire import FramedStream

log = logging.getLogger("poolai.swarm")

SWARM_PROTOCOL = protocol_id(SWARM, SWARM_MAJOR)
# An exchange carries every record a node holds; 4096 records of ~300 bytes fit in the 1.5 MiB frame.
MAX_RECORDS_PER_EXCHANGE = 4096
MAX_EXCHANGE_FRAME = 3 * 512 * 1024
EXCHANGE_TIMEOUT_S = 5.0
# Right after start, publish a few times quickly: the first publish may precede the gossip mesh.
EARLY_REPUBLISH_GAPS_S = (0.5, 1.0, 1.5)
EXPIRY_CHECK_S = 1.0


@dataclass(frozen=True)
class SwarmStatistics:
    records: int
    accepted: int
    rejected: int
    published: int
    exchanges: int
    last_reject_reason: str


def now_ms() -> int:
    return int(time.time() * 1000)


class SwarmService:
    def __init__(self, p2p: P2P, signer: Signer, *, interval_s: float = 15.0, ttl_s: float = 60.0,
                 clock: Callable[[], int] = now_ms) -> None:
        self.p2p = p2p
        self.signer = signer
        self.interval_s = interval_s
        self.ttl_ms = min(int(ttl_s * 1000), MAX_TTL_MS)
        self.clock = clock
        self.map = SwarmMap()
        self._local: SpanAnnouncement | None = None
        self._dynamic: Callable[[], dict] | None = None
        self._changed = trio.Condition()
        self._accepted = self._rejected = self._published = self._exchanges = 0
        self._last_reject = ""
        self._republish = trio.Event()

    # -- what we announce --------------------------------------------------------------------------
    def set_local(self, model_id: bytes, start: int, end: int, dynamic: Callable[[], dict] | None = None,
                  **extra) -> None:
        """Announce (or update) our span; published now and on every refresh. `dynamic()` supplies
        fields that change between refreshes (cache tokens left, state)."""
        self._local = SpanAnnouncement(self.signer.peer_id, model_id, start, end,
                                       tuple(self.p2p.listen_addrs()), 0, 0, **extra)
        self._dynamic = dynamic
        self._republish.set()

    def republish_now(self) -> None:
        self._republish.set()

    def update_local(self, **changes) -> None:
        if self._local is not None:
            self._local = replace(self._local, **changes)
            self._republish.set()

    def _fresh_record(self) -> SpanAnnouncement | None:
        if self._local is None:
            return None
        t = self.clock()
        fields = self._dynamic() if self._dynamic is not None else {}
        return replace(self._local, issued_ms=t, expires_ms=t + self.ttl_ms, **fields).signed(self.signer)

    # -- service -------------------------------------------------------------------------------------
    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        self.p2p.pubsub.set_topic_validator(ANNOUNCE_TOPIC, self._validate, False)
        subscription = await self.p2p.pubsub.subscribe(ANNOUNCE_TOPIC)
        self.p2p.handle(SWARM_PROTOCOL, self._handle_exchange)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._receive, subscription)
            nursery.start_soon(self._publish_loop)
            nursery.start_soon(self._expire_loop)
            task_status.started()

    def _validate(self, sender, msg) -> bool:
        try:
            ann = decode_announcement(msg.data)
            check_announcement(ann, self.clock(), sender=bytes(msg.from_id))
        except RemoteProtocolError as e:
            self._rejected += 1
            self._last_reject = str(e)
            log.info("dropped announcement from %s: %s", short_id(bytes(msg.from_id)), describe(e))
            return False
        return True

    async def _receive(self, subscription) -> None:
        while True:
            msg = await subscription.get()
            try:
                ann = decode_announcement(msg.data)
            except RemoteProtocolError:
                continue  # the validator already counted it
            await self._apply(ann)

    async def _apply(self, ann: SpanAnnouncement) -> bool:
        changed = self.map.apply(ann, self.clock())
        if changed:
            self._accepted += 1
            async with self._changed:
                self._changed.notify_all()
        return changed

    async def _publish_loop(self) -> None:
        early = iter(EARLY_REPUBLISH_GAPS_S)
        while True:
            self._republish = trio.Event()  # before reading _local, so no update is missed
            record = self._fresh_record()
            if record is not None:
                await self._apply(record)
                try:
                    await self.p2p.pubsub.publish(ANNOUNCE_TOPIC, record.encode())
                    self._published += 1
                except Exception as e:
                    log.warning("could not publish our announcement: %s", describe(e))
            with trio.move_on_after(next(early, self.interval_s)):
                await self._republish.wait()

    async def _expire_loop(self) -> None:
        while True:
            await trio.sleep(EXPIRY_CHECK_S)
            gone = self.map.expire(self.clock())
            for a in gone:
                log.info("record of %s for blocks %d:%d expired", short_id(a.peer_id), a.start, a.end)
            if gone:
                async with self._changed:
                    self._changed.notify_all()

    # -- direct exchange ----------------------------------------------------------------------------
    def _records_frame(self) -> dict:
        records = [a.encode() for a in self.map.records()][:MAX_RECORDS_PER_EXCHANGE]
        return {"t": "records", "records": records}

    async def _take_records(self, msg: dict, peer: bytes) -> int:
        records = field(msg, "records", list)
        if len(records) > MAX_RECORDS_PER_EXCHANGE:
            raise MalformedFrame(f"{len(records)} records in one exchange, limit {MAX_RECORDS_PER_EXCHANGE}")
        taken = 0
        for raw in records:
            try:
                if not isinstance(raw, bytes):
                    raise MalformedFrame("record is not bytes")
                ann = decode_announcement(raw)
                check_announcement(ann, self.clock())
            except RemoteProtocolError as e:
                self._rejected += 1
                self._last_reject = str(e)
                log.info("dropped a record from %s in an exchange: %s", short_id(peer), describe(e))
                continue
            taken += await self._apply(ann)
        return taken

    async def _handle_exchange(self, stream) -> None:
        framed = FramedStream(stream, MAX_EXCHANGE_FRAME)
        peer = framed.remote_peer.to_bytes()
        try:
            msg = await framed.receive(EXCHANGE_TIMEOUT_S)
            if msg["t"] != "records":
                raise MalformedFrame(f"expected 'records', got {msg['t']!r}")
            await self._take_records(msg, peer)
            await framed.send(self._records_frame())
            self._exchanges += 1
            await framed.close()
        except (RemoteProtocolError, trio.TooSlowError) as e:
            log.info("swarm exchange with %s failed: %s", short_id(peer), describe(e))
            await framed.reset()

    async def exchange_with(self, peer_id) -> int:
        """Send our records to a peer and take theirs; returns how many records were new to us."""
        stream = await self.p2p.new_stream(peer_id, [SWARM_PROTOCOL])
        framed = FramedStream(stream, MAX_EXCHANGE_FRAME)
        try:
            await framed.send(self._records_frame())
            msg = await framed.receive(EXCHANGE_TIMEOUT_S)
            if msg["t"] != "records":
                raise MalformedFrame(f"expected 'records', got {msg['t']!r}")
            self._exchanges += 1
            return await self._take_records(msg, peer_id.to_bytes())
        finally:
            await framed.close()

    # -- queries -------------------------------------------------------------------------------------
    async def wait_changed(self) -> None:
        """Return at the next change of the map (a record added, replaced or expired)."""
        async with self._changed:
            await self._changed.wait()

    async def wait_covered(self, model_id: bytes, n_blocks: int, timeout: float) -> None:
        """Return once every block has an online server; NoRoute naming the missing blocks after timeout."""
        with trio.move_on_after(timeout):
            async with self._changed:
                while self.map.missing_blocks(model_id, n_blocks):
                    await self._changed.wait()
                return
        raise NoRoute(self.map.missing_blocks(model_id, n_blocks))

    def statistics(self) -> SwarmStatistics:
        return SwarmStatistics(len(self.map), self._accepted, self._rejected, self._published,
                               self._exchanges, self._last_reject)

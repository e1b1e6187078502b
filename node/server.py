"""The span server: serves `/poolai/infer/1` sessions over the blocks this node holds.

Each session is one stream. The server keeps a KV cache per session, sized by the session's
`max_length` and reserved against the node's token budget when the session opens, so a server never
runs out of memory mid-generation: a session that does not fit is refused with "busy" and the client
routes around. Computation runs in a worker thread, one step at a time, so the trio loop keeps
answering gossip and new streams while torch works.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

import trio

from protocol.codec import MAX_TENSOR_FRAME
from protocol.errors import RemoteProtocolError
from protocol.errors import MalformedFrame
from protocol.infer import MAX_SESSION_TOKENS, PositionError, ReceiptBook, ServerSession, error_frame
from protocol.ledger import CREDIT, NONCE_BYTES, Receipt, ReceiptRejected
from protocol.signing import Signer, short_id
from protocol.versions import INFER, INFER_MAJOR, neighbour_majors, protocol_id

from .errors import describe
from .model import SpanModel
from .tensors import from_wire, to_wire
from .wire import FramedStream, StreamClosed

log = logging.getLogger("poolai.server")

INFER_PROTOCOL = protocol_id(INFER, INFER_MAJOR)
# A client that opened a stream sends `open` at once; 10 s covers a slow link without letting idle
# streams pile up.
OPEN_TIMEOUT_S = 10.0
# Decode steps (a token or a few) take ~12 ms for 10 blocks of the embedded model: computing them on
# the trio thread saves two thread hand-offs per step, and holds the loop no longer than a gossip
# round trip. Longer steps (prefill, replay) go to the worker thread so the node stays responsive.
INLINE_STEP_TOKENS = 4
IDLE_POLL_S = 0.1


@dataclass(frozen=True)
class ServerStatistics:
    model_id: str
    span: tuple[int, int]
    sessions_open: int
    sessions_total: int
    sessions_refused: int
    steps: int
    tokens: int
    cache_tokens_reserved: int
    cache_tokens_budget: int
    compute_s: float
    protocol_errors: int
    receipts: int = 0  # countersigned receipts received from clients (recorded as CREDIT)
    refused_credit: int = 0  # sessions refused because the client is below the free tier


@dataclass
class SessionInfo:
    client: str
    start: int
    end: int
    max_length: int
    opened: float
    tokens: int = 0


class SpanServer:
    def __init__(self, p2p, model_id: bytes, span: SpanModel, *, cache_tokens: int, max_sessions: int,
                 idle_timeout_s: float, signer: Signer | None = None, ledger=None) -> None:
        self.p2p = p2p
        self.model_id = model_id
        self.span = span
        self.cache_budget = cache_tokens
        self.max_sessions = max_sessions
        self.idle_timeout_s = idle_timeout_s
        self.state = "online"  # "draining": refuses new sessions while it moves or stops
        self._reserved = 0
        self._open = 0
        self._total = self._refused = self._steps = self._tokens = self._errors = 0
        self._compute_s = 0.0
        self._limiter = trio.CapacityLimiter(1)
        self._sessions: dict[bytes, SessionInfo] = {}
        # Receipts: with a signer the server signs each session's cumulative receipt on every step; with
        # a ledger (node.ledger.LedgerService) it records countersigned ones and applies the credit policy.
        self.signer = signer
        self.ledger = ledger
        self._receipts = self._refused_credit = 0

    def register(self) -> None:
        self.p2p.handle(INFER_PROTOCOL, self._handle)
        for major in neighbour_majors(INFER_MAJOR):
            self.p2p.handle(protocol_id(INFER, major), self._refuse_version(major))

    @property
    def cache_tokens_left(self) -> int:
        return max(0, self.cache_budget - self._reserved)

    def _refuse_version(self, major: int):
        theirs, ours = protocol_id(INFER, major), INFER_PROTOCOL

        async def refuse(stream) -> None:
            framed = FramedStream(stream)
            peer = framed.remote_peer.to_bytes()
            log.info("refused %s from %s: this node speaks %s", theirs, short_id(peer), ours)
            try:
                await framed.send(error_frame("version", f"this node speaks {ours}; the peer asked for {theirs}"))
            finally:
                await framed.close()

        return refuse

    async def _handle(self, stream) -> None:
        framed = FramedStream(stream, MAX_TENSOR_FRAME)
        peer = framed.remote_peer.to_bytes()
        proto = ServerSession(self.span.config.hidden)
        reserved = 0
        was_reset = False
        try:
            req = proto.receive(await framed.receive(OPEN_TIMEOUT_S))
            if req is None:
                return
            refusal = self._check_open(req, peer)
            if refusal:
                self._refused += 1
                log.info("refused session from %s: %s", short_id(peer), refusal[1])
                await framed.send(proto.refuse(*refusal))
                return
            reserved = req.max_length
            self._reserved += reserved
            self._open += 1
            info = SessionInfo(short_id(peer), req.start, req.end, req.max_length, time.time())
            self._sessions[req.session_id] = info
            self._total += 1
            sub = self._subspan(req.start, req.end)
            cache = sub.new_cache(req.max_length)
            book = None
            if self.signer is not None and req.nonce is not None and peer != self.signer.peer_id:  # no self-pay
                started = _now_ms()
                book = ReceiptBook(req.session_id, peer, self.signer.peer_id, self.model_id, req.start, req.end,
                                   req.nonce, os.urandom(NONCE_BYTES), started)
                await framed.send(proto.accept(reserved, book.latest.server_nonce, started))
            else:
                await framed.send(proto.accept(reserved))
            while True:
                try:
                    msg = await framed.receive(self.idle_timeout_s)
                except trio.TooSlowError:
                    await framed.send(proto.refuse("timeout", f"idle for {self.idle_timeout_s:.0f} s"))
                    return
                try:
                    step = proto.receive(msg)
                except PositionError as e:
                    await framed.send(proto.refuse("position", str(e)))
                    return
                if step is None:
                    if proto.final_receipt is not None:
                        self._take_receipt(proto.final_receipt, book, peer)
                    return
                if step.receipt is not None:
                    self._take_receipt(step.receipt, book, peer)
                hidden = from_wire(step.hidden)
                t0 = time.perf_counter()
                if hidden.shape[1] <= INLINE_STEP_TOKENS:
                    out = sub.forward(hidden, cache, step.position)
                else:
                    out = await trio.to_thread.run_sync(sub.forward, hidden, cache, step.position,
                                                        limiter=self._limiter)
                self._compute_s += time.perf_counter() - t0
                self._steps += 1
                self._tokens += hidden.shape[1]
                info.tokens = step.position + hidden.shape[1]
                out_wire = to_wire(out)
                receipt = None
                if book is not None:
                    unsigned = book.advance(hidden.shape[1], step.hidden.data, out_wire.data, _now_ms())
                    receipt = unsigned.sign_as_server(self.signer).encode()
                await framed.send(proto.respond(step, out_wire, receipt), MAX_TENSOR_FRAME)
        except StreamClosed:
            pass
        except (RemoteProtocolError, trio.TooSlowError) as e:
            self._errors += 1
            log.warning("session from %s: %s; resetting the stream", short_id(peer), describe(e))
            try:
                with trio.move_on_after(1):
                    await framed.send(error_frame("bad_request", str(e)))
            except Exception:
                pass
            was_reset = True
            await framed.reset()
            return
        except Exception as e:  # a bug or a torch failure: answer, log, keep serving others
            self._errors += 1
            log.exception("session from %s failed", short_id(peer))
            try:
                with trio.move_on_after(1):
                    await framed.send(error_frame("internal", f"{type(e).__name__}: {e}"))
            except Exception:
                pass
            was_reset = True
            await framed.reset()
            return
        finally:
            if reserved:
                self._reserved -= reserved
                self._open -= 1
                self._sessions.pop(req.session_id, None)
            if not was_reset:  # also after a refusal: the peer sees the end of the stream at once
                await framed.close()

    def _take_receipt(self, raw: bytes, book: ReceiptBook | None, peer: bytes) -> None:
        """Check a receipt the client countersigned and record it as our CREDIT; MalformedFrame if bad."""
        if book is None:
            raise MalformedFrame("a receipt in a session without receipts")
        try:
            r = Receipt.decode(raw)
            r.verify(countersigned=True)
        except ReceiptRejected as e:
            raise MalformedFrame(f"countersigned receipt: {e}") from None
        mine = book.latest
        if (r.session_key != mine.session_key or r.client != peer or r.seq > mine.seq
                or r.server_nonce != mine.server_nonce):
            raise MalformedFrame("countersigned receipt of another session, or of a step not yet served")
        self._receipts += 1
        if self.ledger is not None:
            self.ledger.submit(r, CREDIT)

    def _check_open(self, req, peer: bytes | None = None) -> tuple[str, str] | None:
        if self.state == "draining":
            return "draining", "this server is draining"
        if self.ledger is not None and peer is not None and not self.ledger.may_serve(peer):
            self._refused_credit += 1
            return "credit", (f"your settled balance {self.ledger.balance(peer)} is at or below the free tier "
                              f"-{self.ledger.credit_limit} units (or you are frozen for equivocation); "
                              "serve blocks to earn credit")
        if req.model_id != self.model_id:
            return "unknown_model", f"this server serves model {self.model_id.hex()[:12]}, not {req.model_id.hex()[:12]}"
        if not (self.span.start <= req.start and req.end <= self.span.end):
            return "span", f"this server serves blocks {self.span.start}:{self.span.end}, not {req.start}:{req.end}"
        if req.session_id in self._sessions:  # sessions are told apart by id: statuses and receipts too
            return "bad_request", f"session {req.session_id.hex()[:8]} is already open here"
        if req.max_length > MAX_SESSION_TOKENS:
            return "too_long", f"max_length {req.max_length} is over {MAX_SESSION_TOKENS}"
        if self._open >= self.max_sessions or req.max_length > self.cache_tokens_left:
            return "busy", f"{self._open} sessions open, {self.cache_tokens_left} cache tokens left"
        return None

    async def wait_idle(self) -> None:
        """Return once no session is open (used while draining)."""
        while self._open:
            await trio.sleep(IDLE_POLL_S)

    def _subspan(self, start: int, end: int) -> SpanModel:
        if (start, end) == (self.span.start, self.span.end):
            return self.span
        blocks = self.span.blocks[start - self.span.start : end - self.span.start]
        return SpanModel(self.span.config, start, blocks, self.span.dtype)

    def sessions(self) -> list[SessionInfo]:
        return list(self._sessions.values())

    def statistics(self) -> ServerStatistics:
        return ServerStatistics(
            self.model_id.hex()[:12], (self.span.start, self.span.end), self._open, self._total, self._refused,
            self._steps, self._tokens, self._reserved, self.cache_budget, self._compute_s, self._errors,
            self._receipts, self._refused_credit,
        )


def _now_ms() -> int:
    return int(time.time() * 1000)

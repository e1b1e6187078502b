"""The client side of every node: embedding and head here, the blocks on the swarm's span servers.

A generation plans a route over the swarm map, opens one session per hop, and for every token sends
the hidden states through the hops in order. Each hop keeps the inputs it was sent in this session.
When a server fails (reset, end of stream inside or between frames, timeout, a refusal), the client
bans it with exponential backoff, plans a replacement for exactly the blocks it covered (one server
or several), replays the kept inputs step by step so the new servers rebuild the KV cache at the same
positions with the same arithmetic, and continues: the tokens are the same as without the failure.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import trio
from libp2p.peer.id import ID

from protocol.codec import MAX_TENSOR_FRAME
from protocol.errors import RemoteProtocolError, VersionMismatch
from protocol.infer import RECEIPT_EVERY_TOKENS, ClientSession, ReceiptBook, ServerRefused
from protocol.ledger import DEBIT, NONCE_BYTES, Receipt
from protocol.manifest import ModelManifest
from protocol.route import BanList, Hop, NoRoute, plan_route
from protocol.signing import b58encode, short_id
from protocol.versions import INFER, INFER_MAJOR, protocol_id

from .errors import GenerationError
from .latency import LatencyTracker
from .model import ClientModel, format_chat, sample_next
from .p2p import P2P
from .swarm import SwarmService
from .tensors import from_wire, to_wire
from .wire import FramedStream

log = logging.getLogger("poolai.client")

INFER_PROTOCOL = protocol_id(INFER, INFER_MAJOR)
# A span step of the embedded model takes ~15 ms on a CPU; a prefill of 2048 tokens a few seconds.
# 30 s separates a dead or stuck server from a slow one on any hardware we target.
STEP_TIMEOUT_S = 30.0
OPEN_TIMEOUT_S = 10.0
# Replacing failed servers is bounded twice: by count (a swarm where every server fails in turn is not
# worth chasing) and by time spent waiting for some server to cover blocks nobody serves.
MAX_FAILOVERS = 8
REROUTE_WAIT_S = 10.0


class HopFailed(Exception):
    """A server failed this session: the caller bans it and routes around it."""

    def __init__(self, peer: bytes, reason: str, busy: bool = False) -> None:
        super().__init__(f"server {short_id(peer)} failed: {reason}")
        self.peer = peer
        self.reason = reason
        self.busy = busy


@dataclass
class HopSession:
    hop: Hop
    framed: FramedStream
    proto: ClientSession
    inputs: list[torch.Tensor] = field(default_factory=list)  # kept for replay after a failure
    book: ReceiptBook | None = None  # the session's receipts, when the server signs them
    latest: Receipt | None = None  # the server's newest receipt, checked
    countersigned: Receipt | None = None  # the newest one we countersigned


@dataclass(frozen=True)
class Failover:
    step: int  # index of the generated token being computed when the server failed
    failed_peer: str
    blocks: tuple[int, int]
    replacement: list[dict]
    replayed_steps: int
    recovery_s: float
    reason: str


@dataclass(frozen=True)
class GenerationResult:
    text: str
    tokens: list[int]
    prompt_tokens: int
    route: list[dict]
    tokens_per_s: float
    elapsed_s: float
    first_token_s: float
    failovers: list[Failover]
    token_times: list[float]  # seconds since start at which each token was produced


@dataclass(frozen=True)
class ClientStatistics:
    generations: int
    tokens: int
    failovers: int
    banned: list[str]
    rtt_ms: dict[str, float]
    receipts: int = 0  # receipts countersigned (recorded as DEBIT)


def route_json(hops: list[Hop]) -> list[dict]:
    return [{"peer": b58encode(h.peer_id), "start": h.start, "end": h.end} for h in hops]


class InferenceClient:
    def __init__(self, p2p: P2P, swarm: SwarmService, model: ClientModel, tokenizer, manifest: ModelManifest,
                 chat_template: str | None) -> None:
        self.p2p = p2p
        self.swarm = swarm
        self.model = model
        self.tokenizer = tokenizer
        self.manifest = manifest
        self.model_id = manifest.model_id
        self.hidden_size = manifest.config_dict()["hidden"]
        self.chat_template = chat_template
        self.bans = BanList()
        self.latency = LatencyTracker()
        self.generations = 0
        self.last_route: list[Hop] = []  # the route of the generation in progress (or the last one)
        self._tokens = 0
        self._failovers = 0
        self._receipts = 0
        self.ledger = None  # node.ledger.LedgerService: records our countersigned receipts as DEBIT

    def encode_prompt(self, prompt: str, chat: bool = True) -> list[int]:
        text = format_chat(self.chat_template, prompt) if chat else prompt
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    async def wait_ready(self, timeout: float) -> None:
        """Wait until the swarm covers every block; GenerationError naming the missing ones."""
        try:
            await self.swarm.wait_covered(self.model_id, self.manifest.n_blocks, timeout)
        except NoRoute as e:
            raise GenerationError(f"{e} after waiting {timeout:g} s") from None

    def plan(self, start: int = 0, end: int | None = None, cache_needed: int = 0) -> list[Hop]:
        """Cheapest route over [start, end) avoiding banned peers; NoRoute names uncovered blocks."""
        return plan_route(self.swarm.map.servers(self.model_id), start,
                          self.manifest.n_blocks if end is None else end,
                          rtt_s=self.latency.get, exclude=self.bans.banned(time.monotonic()),
                          cache_needed=cache_needed)

    # -- one hop ----------------------------------------------------------------------------------------
    async def _open_hop(self, hop: Hop, max_length: int) -> HopSession:
        try:
            return await self._open_hop_inner(hop, max_length)
        except (GenerationError, VersionMismatch, trio.Cancelled):
            raise
        except ServerRefused as e:
            if e.code == "credit":
                raise GenerationError(f"server {short_id(hop.peer_id)} refused: {e.message}") from None
            raise HopFailed(hop.peer_id, str(e), busy=e.code in ("busy", "draining")) from None
        except (RemoteProtocolError, trio.TooSlowError, OSError, Exception) as e:
            raise HopFailed(hop.peer_id, f"{type(e).__name__}: {e}") from None

    async def _open_hop_inner(self, hop: Hop, max_length: int) -> HopSession:
        peer = ID(hop.peer_id)
        if peer not in self.p2p.connected_peers():
            record = next((a for a in self.swarm.map.servers(self.model_id) if a.peer_id == hop.peer_id), None)
            if record is None or not record.addrs:
                raise HopFailed(hop.peer_id, "no address known")
            await self.p2p.connect(record.addrs[0])
        t0 = time.monotonic()
        try:
            stream = await self.p2p.new_stream(peer, [INFER_PROTOCOL])
        except trio.TooSlowError:
            raise
        except Exception as e:
            theirs = [p for p in self.p2p.peer_protocols(peer) if p.startswith(f"/poolai/{INFER}/")]
            if theirs and INFER_PROTOCOL not in theirs:
                raise VersionMismatch(INFER_PROTOCOL, ", ".join(theirs)) from None
            raise HopFailed(hop.peer_id, f"cannot open {INFER_PROTOCOL}: {e}") from None
        framed = FramedStream(stream, MAX_TENSOR_FRAME)
        proto = ClientSession(os.urandom(16), self.model_id, hop.start, hop.end, max_length, self.hidden_size,
                              nonce=None if hop.peer_id == self.swarm.signer.peer_id else os.urandom(NONCE_BYTES))
        await framed.send(proto.open_frame())
        proto.on_ready(await framed.receive(OPEN_TIMEOUT_S))
        self.latency.sample(hop.peer_id, time.monotonic() - t0)
        book = None
        if proto.server_nonce is not None:
            book = ReceiptBook(proto.session_id, self.swarm.signer.peer_id, hop.peer_id, self.model_id, hop.start,
                               hop.end, proto.nonce, proto.server_nonce, proto.started_ms)
        return HopSession(hop, framed, proto, book=book)

    def _countersign(self, hs: HopSession, final: bool) -> bytes | None:
        """Countersign the server's newest receipt when due (every RECEIPT_EVERY_TOKENS tokens, or at the
        end) and record it as our DEBIT; the encoded receipt to send, or None."""
        r = hs.latest
        if r is None or (hs.countersigned is not None and hs.countersigned.seq >= r.seq):
            return None
        done = hs.countersigned.tokens if hs.countersigned is not None else 0
        if not final and r.tokens - done < RECEIPT_EVERY_TOKENS:
            return None
        signed = r.sign_as_client(self.swarm.signer)
        hs.countersigned = signed
        self._receipts += 1
        if self.ledger is not None:
            self.ledger.submit(signed, DEBIT)
        return signed.encode()

    async def _through(self, hs: HopSession, hidden: torch.Tensor) -> torch.Tensor:
        hs.inputs.append(hidden)
        try:
            wire_in = to_wire(hidden)
            await hs.framed.send(hs.proto.step_frame(wire_in, self._countersign(hs, final=False)), MAX_TENSOR_FRAME)
            wire_out = hs.proto.on_output(await hs.framed.receive(STEP_TIMEOUT_S))
            if hs.book is not None and hs.proto.last_receipt is not None:
                hs.latest = hs.book.check_server_receipt(hs.proto.last_receipt, hidden.shape[1], wire_in.data,
                                                         wire_out.data, int(time.time() * 1000))
            return from_wire(wire_out)
        except trio.Cancelled:
            raise
        except ServerRefused as e:
            raise HopFailed(hs.hop.peer_id, str(e), busy=e.code in ("busy", "draining")) from None
        except Exception as e:  # reset, truncated frame, timeout, a malformed answer: all the server's fault
            raise HopFailed(hs.hop.peer_id, f"{type(e).__name__}: {e}") from None

    async def _close(self, sessions: list[HopSession]) -> None:
        for hs in sessions:
            with trio.move_on_after(1):
                try:
                    await hs.framed.send(hs.proto.close_frame(self._countersign(hs, final=True)))
                except Exception:
                    pass
            await hs.framed.close()

    # -- failover -----------------------------------------------------------------------------------------
    def _penalise(self, failure: HopFailed) -> None:
        now = time.monotonic()
        if failure.busy:
            self.bans.busy(failure.peer, now)
            log.info("%s; routing around it", failure)
        else:
            d = self.bans.strike(failure.peer, now)
            log.warning("%s; banned for %.0f s", failure, d)

    async def _replace(self, start: int, end: int, inputs: list[torch.Tensor], max_length: int,
                       budget: list[int]) -> list[HopSession]:
        """Sessions covering [start, end) whose caches hold `inputs`, avoiding banned servers."""
        deadline = time.monotonic() + REROUTE_WAIT_S
        while True:
            if budget[0] <= 0:
                raise GenerationError(f"gave up on blocks {start}:{end} after {MAX_FAILOVERS} server failures")
            try:
                hops = self.plan(start, end, cache_needed=max_length)
            except NoRoute as e:
                if time.monotonic() >= deadline:
                    raise GenerationError(f"{e} (every server of them failed or is banned; "
                                          f"waited {REROUTE_WAIT_S:g} s for another)") from None
                with trio.move_on_after(min(1.0, max(0.05, deadline - time.monotonic()))):
                    await self.swarm.wait_changed()
                continue
            sessions: list[HopSession] = []
            try:
                for hop in hops:
                    sessions.append(await self._open_hop(hop, max_length))
                for x in inputs:  # same steps, same shapes: the same arithmetic as the first time
                    h = x
                    for hs in sessions:
                        h = await self._through(hs, h)
                return sessions
            except HopFailed as f:
                budget[0] -= 1
                self._failovers += 1
                self._penalise(f)
                await self._close(sessions)

    # -- generation ------------------------------------------------------------------------------------------
    async def generate(self, prompt: str, max_new_tokens: int, *, temperature: float = 0.0, top_p: float = 1.0,
                       seed: int | None = None, chat: bool = True, stop_at_eos: bool = True,
                       on_token: Callable[[int, str], None] | None = None) -> GenerationResult:
        prompt_ids = self.encode_prompt(prompt, chat)
        max_length = len(prompt_ids) + max_new_tokens
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        budget = [MAX_FAILOVERS]
        failovers: list[Failover] = []
        chain: list[HopSession] = []
        tokens: list[int] = []
        times: list[float] = []
        t0 = time.perf_counter()
        try:
            chain = await self._replace(0, self.manifest.n_blocks, [], max_length, budget)
            self.last_route = [hs.hop for hs in chain]
            step_ids = prompt_ids
            text_so_far = ""
            for step in range(max_new_tokens):
                hidden = self.model.embed(step_ids)
                i = 0
                while i < len(chain):
                    hs = chain[i]
                    try:
                        hidden_out = await self._through(hs, hidden)
                    except HopFailed as f:
                        t_fail = time.perf_counter()
                        budget[0] -= 1
                        self._failovers += 1
                        self._penalise(f)
                        await self._close([hs])
                        # Replay every earlier step of this hop; the current one is sent again below.
                        new = await self._replace(hs.hop.start, hs.hop.end, hs.inputs[:-1], max_length, budget)
                        chain[i : i + 1] = new
                        self.last_route = [hs.hop for hs in chain]
                        failovers.append(Failover(
                            step, b58encode(f.peer), (hs.hop.start, hs.hop.end), route_json([n.hop for n in new]),
                            len(hs.inputs) - 1, time.perf_counter() - t_fail, f.reason))
                        log.info("blocks %d:%d moved to %s after replaying %d steps in %.2f s", hs.hop.start,
                                 hs.hop.end, ", ".join(short_id(n.hop.peer_id) for n in new), len(hs.inputs) - 1,
                                 time.perf_counter() - t_fail)
                        continue
                    hidden = hidden_out
                    i += 1
                token = sample_next(self.model.logits(hidden[:, -1:])[0, -1], temperature, top_p, generator)
                tokens.append(token)
                times.append(time.perf_counter() - t0)
                if on_token is not None:
                    text = self.tokenizer.decode(tokens, skip_special_tokens=True)
                    on_token(token, text[len(text_so_far):])
                    text_so_far = text
                if stop_at_eos and token == self.model.config.eos_id:
                    break
                step_ids = [token]
        finally:
            with trio.CancelScope(shield=True):
                await self._close(chain)
        for hs in chain:
            self.bans.forgive(hs.hop.peer_id)
        elapsed = time.perf_counter() - t0
        self.generations += 1
        self._tokens += len(tokens)
        return GenerationResult(
            text=self.tokenizer.decode(tokens, skip_special_tokens=True),
            tokens=tokens, prompt_tokens=len(prompt_ids), route=route_json([hs.hop for hs in chain]),
            tokens_per_s=len(tokens) / elapsed if elapsed > 0 else 0.0, elapsed_s=elapsed,
            first_token_s=times[0] if times else 0.0, failovers=failovers, token_times=times,
        )

    def statistics(self) -> ClientStatistics:
        return ClientStatistics(
            self.generations, self._tokens, self._failovers,
            sorted(short_id(p) for p in self.bans.banned(time.monotonic())),
            {short_id(p): round(1000 * v, 2) for p, v in self.latency.rtt.items()},
            self._receipts,
        )

"""The client side of every node: embedding and head here, the blocks on the swarm's span servers.

A generation plans a route over the swarm map, opens one session per hop, and for every token sends
the hidden states through the hops in order. Each hop keeps the inputs it was sent in this session,
so a failed server can be replaced and its cache rebuilt by replaying them.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import trio

from protocol.codec import MAX_TENSOR_FRAME
from protocol.errors import RemoteProtocolError, VersionMismatch
from protocol.infer import ClientSession, ServerRefused
from protocol.manifest import ModelManifest
from protocol.route import Hop, NoRoute, plan_route
from protocol.signing import b58encode, short_id
from protocol.versions import INFER, INFER_MAJOR, protocol_id

from .errors import GenerationError
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


@dataclass
class HopSession:
    hop: Hop
    framed: FramedStream
    proto: ClientSession
    inputs: list[torch.Tensor] = field(default_factory=list)  # kept for replay after a failure


@dataclass(frozen=True)
class GenerationResult:
    text: str
    tokens: list[int]
    prompt_tokens: int
    route: list[dict]
    tokens_per_s: float
    elapsed_s: float
    first_token_s: float


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
        self.chat_template = chat_template
        self.generations = 0

    def encode_prompt(self, prompt: str, chat: bool = True) -> list[int]:
        text = format_chat(self.chat_template, prompt) if chat else prompt
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    async def wait_ready(self, timeout: float) -> None:
        """Wait until the swarm covers every block; GenerationError naming the missing ones."""
        try:
            await self.swarm.wait_covered(self.model_id, self.manifest.n_blocks, timeout)
        except NoRoute as e:
            raise GenerationError(f"{e} after waiting {timeout:g} s") from None

    def plan(self) -> list[Hop]:
        try:
            return plan_route(self.swarm.map.servers(self.model_id), 0, self.manifest.n_blocks)
        except NoRoute as e:
            raise GenerationError(str(e)) from None

    async def _open_hop(self, hop: Hop, max_length: int) -> HopSession:
        record = next((a for a in self.swarm.map.servers(self.model_id) if a.peer_id == hop.peer_id), None)
        from libp2p.peer.id import ID

        peer = ID(hop.peer_id)
        if peer not in self.p2p.connected_peers():
            if record is None or not record.addrs:
                raise GenerationError(f"no address known for server {short_id(hop.peer_id)}")
            await self.p2p.connect(record.addrs[0])
        try:
            stream = await self.p2p.new_stream(peer, [INFER_PROTOCOL])
        except trio.TooSlowError:
            raise
        except Exception as e:
            theirs = [p for p in self.p2p.peer_protocols(peer) if p.startswith(f"/poolai/{INFER}/")]
            if theirs:
                raise VersionMismatch(INFER_PROTOCOL, ", ".join(theirs)) from None
            raise GenerationError(f"cannot open {INFER_PROTOCOL} to {short_id(hop.peer_id)}: {e}") from None
        framed = FramedStream(stream, MAX_TENSOR_FRAME)
        proto = ClientSession(os.urandom(16), self.model_id, hop.start, hop.end, max_length,
                              self.manifest.config_dict()["hidden"])
        await framed.send(proto.open_frame())
        proto.on_ready(await framed.receive(OPEN_TIMEOUT_S))
        return HopSession(hop, framed, proto)

    async def _through(self, hs: HopSession, hidden: torch.Tensor) -> torch.Tensor:
        hs.inputs.append(hidden)
        await hs.framed.send(hs.proto.step_frame(to_wire(hidden)), MAX_TENSOR_FRAME)
        return from_wire(hs.proto.on_output(await hs.framed.receive(STEP_TIMEOUT_S)))

    async def generate(self, prompt: str, max_new_tokens: int, *, temperature: float = 0.0, top_p: float = 1.0,
                       seed: int | None = None, chat: bool = True, stop_at_eos: bool = True,
                       on_token: Callable[[int, str], None] | None = None) -> GenerationResult:
        prompt_ids = self.encode_prompt(prompt, chat)
        max_length = len(prompt_ids) + max_new_tokens
        hops = self.plan()
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        sessions: list[HopSession] = []
        tokens: list[int] = []
        t0 = time.perf_counter()
        first = 0.0
        try:
            for hop in hops:
                sessions.append(await self._open_hop(hop, max_length))
            step_ids = prompt_ids
            text_so_far = ""
            for _ in range(max_new_tokens):
                hidden = self.model.embed(step_ids)
                for hs in sessions:
                    hidden = await self._through(hs, hidden)
                token = sample_next(self.model.logits(hidden[:, -1:])[0, -1], temperature, top_p, generator)
                if not tokens:
                    first = time.perf_counter() - t0
                tokens.append(token)
                if on_token is not None:
                    text = self.tokenizer.decode(tokens, skip_special_tokens=True)
                    on_token(token, text[len(text_so_far):])
                    text_so_far = text
                if stop_at_eos and token == self.model.config.eos_id:
                    break
                step_ids = [token]
        except (RemoteProtocolError, trio.TooSlowError) as e:
            if isinstance(e, ServerRefused):
                raise GenerationError(str(e)) from None
            raise GenerationError(f"a server failed during generation: {e}") from None
        finally:
            for hs in sessions:
                with trio.move_on_after(1):
                    try:
                        await hs.framed.send(hs.proto.close_frame())
                    except Exception:
                        pass
                await hs.framed.close()
        elapsed = time.perf_counter() - t0
        self.generations += 1
        tps = len(tokens) / elapsed if elapsed > 0 else 0.0
        return GenerationResult(
            text=self.tokenizer.decode(tokens, skip_special_tokens=True),
            tokens=tokens, prompt_tokens=len(prompt_ids), route=route_json(hops),
            tokens_per_s=tps, elapsed_s=elapsed, first_token_s=first,
        )

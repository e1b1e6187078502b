"""A running node: identity, host, swarm map, span server and client, owned by one nursery.

`run_node` is what `poolai node` runs. It writes `node.json` in the data dir once it is reachable
(peer ID, addresses, span, model), which the demo and the tests read, and removes it on the way out.
"""

from __future__ import annotations

import fcntl
import functools
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import trio

from protocol.manifest import short_model_id
from protocol.placement import SERVING_STATES, choose_span_for
from protocol.signing import b58encode

from .balancer import Balancer
from .client import InferenceClient
from .control import CONTROL_SOCKET, ControlServer
from .config import NodeConfig
from .errors import ConfigError, StartupError
from .latency import Pinger
from .ledger import LedgerService, start_ledger
from .hardware import cpu_device, device_label, plan_capacity, probe_device
from .identity import load_or_create_identity
from .model import ClientModel, SpanModel
from .overlay import OverlayService, start_overlay
from .p2p import P2P, open_p2p
from .server import SpanServer
from .swarm import SwarmService
from .weights import default_model_cache, prepare_model, verify_blocks

log = logging.getLogger("poolai.node")

STATE_FILE = "node.json"
# A node moving its span waits this long for its sessions to end; sessions still open afterwards keep
# their blocks in memory until they finish, so nothing breaks, it only costs memory for a while.
DRAIN_TIMEOUT_S = 60.0
LOCK_FILE = "node.lock"


@dataclass
class Node:
    config: NodeConfig
    data_dir: Path
    p2p: P2P
    swarm: SwarmService
    client: InferenceClient
    server: SpanServer | None
    balancer: Balancer | None
    started: float
    steering: "SpanSteering | None" = None  # the operator's pin/release of the span (control API)
    ledger: "LedgerService | None" = None  # receipts, chains and their gossip (node/ledger.py)
    overlay: "OverlayService | None" = None  # the small-world ring (node/overlay.py)

    @property
    def peer_id(self) -> str:
        return b58encode(self.swarm.signer.peer_id)


def apply_torch_threads(requested: int) -> int:
    """Set torch's intra-op threads: `requested`, or for 0 a quarter of the cores (at least one).

    Decoding one token is bound by memory bandwidth, so more threads barely help, while on a machine
    shared by several span processes, two spinning threads per process collapse throughput (measured on
    2 cores: 21 tokens/s with one thread, 3.3 with two while another process computes).
    """
    import torch

    n = requested or max(1, (os.cpu_count() or 1) // 4)
    torch.set_num_threads(n)
    return n


def model_cache_dir(config: NodeConfig) -> Path:
    return Path(config.model_cache_dir) if config.model_cache_dir else default_model_cache()


def _log_progress(done: int, total: int, what: str) -> None:
    step = max(1, total // 10)
    if done == total or done % step == 0:
        log.info("converting the model once: %3d%% (%d/%d tensors)", 100 * done // total, done, total)


# The control socket's path must fit sockaddr_un: 108 bytes on Linux, 104 on macOS, with the NUL.
MAX_SOCKET_PATH = 103


def check_data_dir(data_dir: Path) -> None:
    """ConfigError naming the problem when `data_dir` cannot be a node's data dir; creates it if needed."""
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ConfigError(f"data dir {data_dir} is a file, not a directory") from None
    except OSError as e:
        raise ConfigError(f"cannot create data dir {data_dir}: {e.strerror or e}") from None
    if not data_dir.is_dir():
        raise ConfigError(f"data dir {data_dir} is not a directory")
    if not os.access(data_dir, os.W_OK | os.X_OK):
        raise ConfigError(f"data dir {data_dir} is not writable by this user")
    sock = len(os.fsencode(data_dir.resolve() / CONTROL_SOCKET))
    if sock > MAX_SOCKET_PATH:
        raise ConfigError(f"data dir {data_dir} is too deep: its control socket path would be {sock} bytes, "
                          f"over the {MAX_SOCKET_PATH} a Unix socket allows")


def lock_data_dir(data_dir: Path):
    """Hold an exclusive lock on the data dir for the node's life; StartupError if another node has it."""
    data_dir.mkdir(parents=True, exist_ok=True)
    f = open(data_dir / LOCK_FILE, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise StartupError(f"another poolai node is running with data dir {data_dir}") from None
    return f


async def connect_bootstrap(p2p: P2P, swarm: SwarmService, addrs: tuple[str, ...], timeout: float) -> int:
    """Dial every bootstrap peer and exchange swarm records; StartupError when none answers."""
    reached = 0
    errors: list[str] = []

    async def one(addr: str) -> None:
        nonlocal reached
        try:
            peer = await p2p.connect(addr, timeout)
            await swarm.exchange_with(peer)
            reached += 1
        except trio.TooSlowError:
            errors.append(f"{addr}: no answer within {timeout:g} s")
        except Exception as e:
            errors.append(f"{addr}: {type(e).__name__}: {e}")

    async with trio.open_nursery() as nursery:
        for addr in addrs:
            nursery.start_soon(one, addr)
    for e in errors:
        log.warning("bootstrap peer unreachable: %s", e)
    if addrs and not reached:
        raise StartupError(f"no bootstrap peer reachable ({len(addrs)} tried): {errors[0]}")
    return reached


class SpanSteering:
    """The operator's hold on the served span (control API `pin` / `release`).

    While pinned, the balancer leaves the span alone. `pin(span)` moves there in the background (drain,
    load, announce: the balancer's own move); a failed operator move is logged and the node keeps
    serving what it has. A span pinned in the config starts pinned, and with no balancer to release to.
    """

    def __init__(self, nursery, server: SpanServer, pinned: bool) -> None:
        self._nursery = nursery
        self.server = server
        self.pinned = pinned
        self.has_balancer = not pinned
        self.move = None  # set by start_serving: async (start, end) -> None
        self.moving = False

    async def balanced_move(self, new: tuple[int, int]) -> None:
        if not self.pinned:
            await self.move(new)

    async def pin(self, span: tuple[int, int]) -> bool:
        """Pin the span; True when a move to it started. Checkpoints; never waits for the move."""
        self.pinned = True
        await trio.lowlevel.checkpoint()
        if self.moving or (self.server.span.start, self.server.span.end) == tuple(span):
            return False
        self.moving = True
        self._nursery.start_soon(self._move_to, tuple(span))
        return True

    async def _move_to(self, span: tuple[int, int]) -> None:
        try:
            await self.move(span)
        except Exception as e:
            log.error("moving to blocks %d:%d failed: %s; still serving %d:%d", *span, e,
                      self.server.span.start, self.server.span.end)
            self.server.state = "online"
        finally:
            self.moving = False

    def release(self) -> bool:
        """Hand the span back to the balancer; False when there is none (span pinned by the config)."""
        self.pinned = False
        return self.has_balancer


async def start_serving(nursery, config: NodeConfig, swarm: SwarmService, converted, manifest,
                        my_peer_id: bytes) -> tuple[SpanServer, Balancer | None, SpanSteering]:
    """Measure capacity, choose a span (unless pinned), load and serve it, and keep it balanced."""
    n_blocks = manifest.n_blocks
    model_id = manifest.model_id
    # The blocks run on the CPU in this version, so CPU memory is the budget even when a GPU is present.
    gpu = await trio.to_thread.run_sync(probe_device)
    if gpu.kind == "cuda":
        log.warning("found %s; this version computes on the CPU", gpu.name)
    capacity = await trio.to_thread.run_sync(
        functools.partial(plan_capacity, converted, config.cache_tokens, n_blocks, device=cpu_device()))
    throughput = config.throughput or capacity.throughput
    size = config.blocks or capacity.blocks
    log.info("capacity: %s; %.0f block-steps/s; room for %d blocks", device_label(capacity.device),
             capacity.throughput, capacity.blocks)
    span = config.span or choose_span_for(swarm.map.servers(model_id, states=SERVING_STATES), n_blocks, size,
                                          my_peer_id)
    holder: dict = {"server": None}

    def dynamic() -> dict:
        srv = holder["server"]
        if srv is None:
            return {"state": "joining", "cache_tokens_left": config.cache_tokens}
        return {"state": srv.state, "cache_tokens_left": srv.cache_tokens_left}

    extras = dict(throughput=int(throughput * 1000), device=capacity.device.name[:64], dynamic=dynamic)
    swarm.set_local(model_id, *span, **extras)  # "joining": counted by placement, not yet routed to

    async def load(span: tuple[int, int]) -> SpanModel:
        await trio.to_thread.run_sync(verify_blocks, converted, manifest, *span)
        return await trio.to_thread.run_sync(SpanModel.load, converted, *span)

    server = SpanServer(swarm.p2p, model_id, await load(span), cache_tokens=config.cache_tokens,
                        max_sessions=config.max_sessions, idle_timeout_s=config.session_idle_timeout_s)
    server.register()
    holder["server"] = server
    swarm.set_local(model_id, *span, **extras)
    log.info("serving blocks %d:%d of model %s", *span, short_model_id(model_id))
    steering = SpanSteering(nursery, server, pinned=config.span is not None)

    async def move(new: tuple[int, int]) -> None:
        old = (server.span.start, server.span.end)
        log.info("moving from blocks %d:%d to %d:%d: draining first", *old, *new)
        server.state = "draining"
        swarm.republish_now()
        with trio.move_on_after(DRAIN_TIMEOUT_S):
            await server.wait_idle()
        server.span = await load(new)  # sessions still open keep the blocks they started on
        server.state = "online"
        swarm.set_local(model_id, *new, **extras)
        log.info("now serving blocks %d:%d", *new)

    steering.move = move
    if config.span is not None:
        return server, None, steering
    balancer = Balancer(lambda: swarm.map.servers(model_id, states=SERVING_STATES), n_blocks, my_peer_id,
                        lambda: (server.span.start, server.span.end), throughput, steering.balanced_move,
                        period_s=config.rebalance_period_s)
    await nursery.start(balancer.run)
    return server, balancer, steering


async def run_node(config: NodeConfig, data_dir: Path, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    lock = lock_data_dir(data_dir)
    try:
        apply_torch_threads(config.torch_threads)
        key_pair, signer = load_or_create_identity(data_dir)
        log.info("peer ID %s, data dir %s", b58encode(signer.peer_id), data_dir)
        converted, manifest = await trio.to_thread.run_sync(
            prepare_model, model_cache_dir(config), config.gguf, _log_progress)
        n_blocks = manifest.n_blocks
        if config.span is not None and config.span[1] > n_blocks:
            raise ConfigError(f"span {config.span[0]}:{config.span[1]} is outside the model's {n_blocks} blocks "
                              f"(0:{n_blocks})")
        tokenizer = converted.load_tokenizer()
        client_model = await trio.to_thread.run_sync(ClientModel.load, converted)
        async with open_p2p(key_pair, list(config.listen)) as p2p:
            swarm = SwarmService(p2p, signer, interval_s=config.announce_interval_s, ttl_s=config.announce_ttl_s)
            async with trio.open_nursery() as nursery:
                await nursery.start(swarm.run)
                ledger = await start_ledger(nursery, p2p, signer, data_dir, credit_limit=config.ledger_credit_limit,
                                            sync_interval_s=config.ledger_sync_interval_s)
                await connect_bootstrap(p2p, swarm, config.bootstrap, config.bootstrap_timeout_s)
                overlay = await start_overlay(nursery, p2p, signer, config.bootstrap, config.overlay_period_s)
                server, balancer, steering = None, None, None
                if config.serve:
                    server, balancer, steering = await start_serving(nursery, config, swarm, converted, manifest, signer.peer_id)
                if server is not None:
                    server.signer, server.ledger = signer, ledger
                client = InferenceClient(p2p, swarm, client_model, tokenizer, manifest, converted.chat_template)
                client.ledger = ledger
                await nursery.start(Pinger(p2p, swarm, client.latency, manifest.model_id).run)
                node = Node(config, data_dir, p2p, swarm, client, server, balancer, time.monotonic(), steering)
                node.ledger = ledger
                node.overlay = overlay
                await nursery.start(ControlServer(node, data_dir / CONTROL_SOCKET).run)
                if config.metrics_enabled:
                    from .metrics import MetricsServer

                    node.metrics = await nursery.start(MetricsServer(node, config.metrics_host,
                                                                     config.metrics_port).run)
                await p2p.push_identify()  # the bootstrap peers met us before our handlers existed
                write_state(data_dir, node, manifest)
                task_status.started(node)
                try:
                    await trio.sleep_forever()
                finally:
                    (data_dir / STATE_FILE).unlink(missing_ok=True)
                    if server is not None:
                        st = server.statistics()
                        log.info("served %d sessions, %d steps, %d tokens; compute %.2f ms per step",
                                 st.sessions_total, st.steps, st.tokens, 1000 * st.compute_s / max(1, st.steps))
    finally:
        lock.close()


def write_state(data_dir: Path, node: Node, manifest) -> None:
    state = {
        "peer_id": node.peer_id,
        "addrs": node.p2p.listen_addrs(),
        "pid": os.getpid(),
        "model_id": manifest.model_id.hex(),
        "span": [node.server.span.start, node.server.span.end] if node.server else None,
    }
    tmp = data_dir / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps(state))
    tmp.replace(data_dir / STATE_FILE)

"""The node's local control API: a Unix socket in the data dir carrying msgpack frames.

Every front end (the CLI's `status` and `generate`, the TUI, scripts) talks to a running node through
it, never to the node's insides. The socket is created mode 0600, so only the node's own user can
connect; the data dir's lock (node/runtime.py) means one node per data dir.

    client                                   node
      {"t": "hello", "v": 1}             ->
                                          <- {"t": "hello", "v": 1, "version": "0.1.0"}
      {"t": "call", "id": 1, "method": "status", "args": {}}  ->
                                          <- {"t": "result", "id": 1, "value": {...}}
                                             or {"t": "error", "id": 1, "code": "...", "message": "..."}

A streaming call (`generate`, `logs`, `events`) answers with any number of
`{"t": "item", "id": n, "value": ...}` frames before its `result` (or `error`); while it runs the
client may send `{"t": "cancel", "id": n}`, which ends it with `{"t": "result", "id": n, "value":
{"cancelled": true}}`. One call runs at a time on a connection: open a second one for a second stream.

A client speaking another major version gets an error naming both and the connection closes. A
malformed or oversized frame gets an error and the connection closes; the node keeps running. An
unknown method or bad arguments get an error and the connection stays open. A handler that fails
(our bug) answers `internal` and is logged; the node keeps running.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import trio

from protocol.codec import FrameDecoder, encode_frame, field, str_field
from protocol.errors import RemoteProtocolError
from protocol.manifest import short_model_id
from protocol.signing import PEER_ID_BYTES, b58decode, b58encode, is_peer_id, short_id

from .errors import describe
from .logs import ring_buffer

log = logging.getLogger("poolai.control")

CONTROL_SOCKET = "control.sock"
CONTROL_MAJOR = 1
# Requests are small; answers carry the swarm map, which for a few thousand servers is a few MiB.
MAX_REQUEST_FRAME = 64 * 1024
MAX_ANSWER_FRAME = 8 * 1024 * 1024
MAX_CLIENTS = 16  # a TUI, a few CLI calls, a metrics scraper: more is a runaway script
READ_TIMEOUT_S = 300.0  # an idle front end is dropped after 5 minutes; it reconnects by itself
# A client sends its hello at once; one that connects and says nothing holds one of MAX_CLIENTS slots,
# so it gets 10 s, not READ_TIMEOUT_S (16 silent connections locked the operator out for 5 minutes).
HELLO_TIMEOUT_S = 10.0
CONNECT_TIMEOUT_S = 5.0
# Streams (logs, events) are polled from in-memory rings: 4 times a second reads as live to a person
# and costs nothing measurable.
STREAM_POLL_S = 0.25
# Connected peers and the swarm map are compared this often to produce events.
EVENT_WATCH_S = 1.0
EVENT_LINES = 500  # the events ring: a few minutes of a busy swarm's joins, leaves and state changes
MAX_TAIL_LINES = 2000  # a log tail answer: the whole ring, a few hundred KiB
MAX_PROMPT_CHARS = 16_000  # about 4000 tokens: over the embedded model's 2048-token session limit
MAX_NEW_TOKENS = 1024  # same bound as the CLI's --max-new-tokens
DEFAULT_BAN_S = 3600.0  # an operator's ban lasts an hour unless they say otherwise
MAX_BAN_S = 30 * 86400.0
GENERATE_READY_TIMEOUT_S = 30.0  # wait this long for the swarm to cover every block before failing
MAX_READY_TIMEOUT_S = 600.0  # a front end may wait longer for a swarm to form, not forever


def poolai_version() -> str:
    try:
        return version("poolai")
    except PackageNotFoundError:
        return "0+unknown"


class ControlError(Exception):
    """An answer of the node's control API that is an error (`code`, message).

    Raised by handlers for bad arguments or an action that cannot be done now (the connection stays
    open), and by ControlClient when the node answers an error.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.detail = message


class NodeNotRunning(Exception):
    """No node answers on the data dir's control socket: start one, or pass the right --data-dir."""


class ControlProtocolError(RemoteProtocolError):
    """A control client sent something that is not a call."""


@dataclass(frozen=True)
class ControlStatistics:
    clients: int
    calls: int
    errors: int
    streams: int


# -- small helpers ---------------------------------------------------------------------------------------


def _ranges(values: list[int]) -> list[dict]:
    """Runs of equal replica counts: [{"start", "end", "replicas"}]."""
    out: list[dict] = []
    for b, v in enumerate(values):
        if out and out[-1]["replicas"] == v and out[-1]["end"] == b:
            out[-1]["end"] = b + 1
        else:
            out.append({"start": b, "end": b + 1, "replicas": v})
    return out


def _arg(args: dict, name: str, kind, default=None, *, required: bool = False):
    """args[name] checked against `kind`; ControlError("bad_args") naming it otherwise."""
    if name not in args or args[name] is None:
        if required:
            raise ControlError("bad_args", f"argument {name!r} is required")
        return default
    value = args[name]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds:
        raise ControlError("bad_args", f"argument {name!r} must be {kinds[0].__name__}, not bool")
    if float in kinds and isinstance(value, int):
        value = float(value)
    if not isinstance(value, kinds):
        raise ControlError("bad_args", f"argument {name!r} must be {kinds[0].__name__}, not {type(value).__name__}")
    return value


def _peer_arg(args: dict) -> bytes:
    text = _arg(args, "peer", str, required=True)
    shown = text if len(text) <= 60 else text[:57] + "..."
    try:
        peer = b58decode(text.strip()) if len(text) <= 2 * PEER_ID_BYTES else b""
    except Exception:
        raise ControlError("bad_args", f"peer {shown!r} is not a base58 peer ID") from None
    if not is_peer_id(peer):
        raise ControlError("bad_args", f"peer {shown!r} is not an Ed25519 peer ID (12D3KooW...)")
    return peer


def _rss_bytes() -> int:
    """This process's resident memory (Linux /proc; 0 elsewhere)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _overlay_estimate(node) -> float | None:
    """The overlay's network size estimate n̂ when the node runs an overlay service, else None."""
    overlay = getattr(node, "overlay", None)
    if overlay is None:
        return None
    try:
        stats = overlay.statistics()
        values = asdict(stats) if hasattr(stats, "__dataclass_fields__") else dict(stats)
    except Exception:
        values = {}
    for key in ("n_hat", "size_estimate", "estimate", "network_size"):
        if isinstance(values.get(key), (int, float)):
            return float(values[key])
    for obj in (overlay, getattr(overlay, "table", None), getattr(overlay, "state", None)):
        n = getattr(obj, "n_hat", None)
        if isinstance(n, (int, float)):
            return float(n)
    return None


def metrics_url(node) -> str | None:
    m = getattr(node, "metrics", None)  # set by the runtime when [metrics] is enabled
    return f"http://{m.host}:{m.port}/metrics" if m is not None else None


class EventRing:
    """Numbered events (joins, leaves, state changes, operator actions) kept in memory for `events`."""

    def __init__(self, capacity: int = EVENT_LINES) -> None:
        self._events: deque[dict] = deque(maxlen=capacity)
        self._seq = 0

    def add(self, kind: str, **fields) -> None:
        self._seq += 1
        self._events.append({"seq": self._seq, "time": time.time(), "kind": kind, **fields})

    @property
    def last_seq(self) -> int:
        return self._seq

    def since(self, seq: int) -> list[dict]:
        return [e for e in self._events if e["seq"] > seq]


# -- what the node answers -------------------------------------------------------------------------


def build_methods(node, events: EventRing | None = None,
                  device: dict | None = None) -> dict[str, Callable[..., Awaitable[Any]]]:
    """Plain calls: `handler(args) -> value`. Streaming calls are in build_streams."""
    manifest = node.client.manifest
    events = events if events is not None else EventRing()

    def my_span():
        s = node.server
        return [s.span.start, s.span.end] if s else None

    def bootstrap_state() -> list[dict]:
        connected = {p.to_bytes() for p in node.p2p.connected_peers()}
        out = []
        for addr in node.config.bootstrap:
            peer_text = addr.rsplit("/p2p/", 1)[-1] if "/p2p/" in addr else ""
            try:
                online = b58decode(peer_text) in connected
            except Exception:
                online = False
            out.append({"addr": addr, "peer": peer_text, "online": online})
        return out

    async def status(args: dict) -> dict:
        s = node.server
        dev = device or {}
        boot = bootstrap_state()
        return {
            "peer_id": node.peer_id,
            "addrs": node.p2p.listen_addrs(),
            "uptime_s": round(time.monotonic() - node.started, 1),
            "version": poolai_version(),
            "control_version": CONTROL_MAJOR,
            "pid": os.getpid(),
            "data_dir": str(node.data_dir),
            "model": {"id": manifest.model_id.hex(), "name": manifest.name, "blocks": manifest.n_blocks},
            "span": my_span(),
            "state": s.state if s else "client",
            "connected_peers": len(set(node.p2p.connected_peers()) - {node.p2p.peer_id}),
            "device": dev,
            "memory": {"rss_bytes": _rss_bytes(), "device_total_bytes": dev.get("total_bytes", 0),
                       "device_free_bytes": dev.get("free_bytes", 0)},
            "overlay_size_estimate": _overlay_estimate(node),
            "bootstrap": boot,
            "bootstrap_online": sum(1 for b in boot if b["online"]),
            "bootstrap_unreachable": sum(1 for b in boot if not b["online"]),
            "pinned": bool(getattr(node, "steering", None) and node.steering.pinned),
            "metrics_url": metrics_url(node),
        }

    async def swarm(args: dict) -> dict:
        servers = node.swarm.map.servers(manifest.model_id, states=("online", "joining", "draining"))
        online = [a for a in servers if a.state == "online"]
        replicas = node.swarm.map.coverage(manifest.model_id, manifest.n_blocks)
        throughput = [0.0] * manifest.n_blocks
        for a in online:
            for b in range(a.start, min(a.end, manifest.n_blocks)):
                throughput[b] += a.throughput / 1000
        return {
            "model": short_model_id(manifest.model_id),
            "model_name": manifest.name,
            "blocks": manifest.n_blocks,
            "replicas": replicas,
            "throughput": [round(t, 1) for t in throughput],
            "runs": _ranges(replicas),
            "servers": [{"peer": b58encode(a.peer_id), "start": a.start, "end": a.end, "state": a.state,
                         "throughput": a.throughput / 1000, "cache_tokens_left": a.cache_tokens_left,
                         "device": a.device, "expires_in_s": round(a.expires_ms / 1000 - time.time(), 1),
                         "me": a.peer_id == node.swarm.signer.peer_id}
                        for a in servers],
        }

    async def sessions(args: dict) -> dict:
        s = node.server
        return {
            "span": my_span(),
            "state": s.state if s else "client",
            "server": asdict(s.statistics()) if s else None,
            "sessions": [asdict(x) for x in s.sessions()] if s else [],
            "client": asdict(node.client.statistics()),
            "balancer": asdict(node.balancer.statistics()) if node.balancer else None,
            "pinned": bool(getattr(node, "steering", None) and node.steering.pinned),
        }

    async def peers(args: dict) -> dict:
        """Connected peers. py-libp2p 0.8.1 gives direction and the connection's creation time
        (a private field, `_created_at`), the peerstore's protocols (from identify) and transport
        addresses; it keeps no per-peer traffic counters and no agent version we can read."""
        now_wall, now_mono = time.time(), time.monotonic()
        serving: dict[bytes, list[list[int]]] = {}
        for a in node.swarm.map.servers(manifest.model_id, states=("online", "joining", "draining")):
            serving.setdefault(a.peer_id, []).append([a.start, a.end])
        banned = node.client.bans.banned(now_mono)
        out = []
        try:
            conns = node.p2p.host.get_network().get_connections_map()
        except Exception:
            conns = {p: [] for p in node.p2p.connected_peers()}
        me = node.swarm.signer.peer_id
        for pid, cs in conns.items():
            raw = pid.to_bytes()
            if raw == me:  # a node serving a hop of its own generation dials itself
                continue
            conn = cs[0] if cs else None
            # py-libp2p's Direction is an IntEnum with INBOUND = 0: name it, never test its value.
            d = getattr(conn, "direction", None)
            direction = d.name.lower() if hasattr(d, "name") else "unknown"
            created = getattr(conn, "_created_at", None)
            try:
                addrs = [str(a) for a in conn.get_transport_addresses()] if conn is not None else []
            except Exception:
                addrs = []
            rtt = node.client.latency.get(raw)
            out.append({
                "peer": b58encode(raw),
                "direction": str(direction),
                "since_s": round(now_wall - created, 1) if isinstance(created, (int, float)) else None,
                "latency_ms": round(rtt * 1000, 2) if rtt is not None else None,
                "protocols": sorted(node.p2p.peer_protocols(pid)),
                "addrs": addrs,
                "spans": serving.get(raw, []),
                "banned_for_s": round(node.client.bans.until(raw) - now_mono, 1) if raw in banned else 0,
            })
        out.sort(key=lambda p: p["peer"])
        return {"peers": out,
                "banned": [{"peer": b58encode(p), "for_s": round(node.client.bans.until(p) - now_mono, 1)}
                           for p in sorted(banned)]}

    async def log_tail(args: dict) -> dict:
        n = _arg(args, "lines", int, 200)
        if not 1 <= n <= MAX_TAIL_LINES:
            raise ControlError("bad_args", f"lines must be in 1..{MAX_TAIL_LINES}, not {n}")
        ring = ring_buffer()
        return {"lines": ring.since(0, n), "last_seq": ring.last_seq}

    async def ban(args: dict) -> dict:
        peer = _peer_arg(args)
        seconds = _arg(args, "seconds", float, DEFAULT_BAN_S)
        if not 0 < seconds <= MAX_BAN_S:
            raise ControlError("bad_args", f"seconds must be in (0, {MAX_BAN_S:g}], not {seconds}")
        if peer == node.swarm.signer.peer_id:
            raise ControlError("bad_args", "a node cannot ban itself")
        bans = node.client.bans
        # BanList has no operator ban of its own (see the report of issue 6): set the deadline it reads.
        bans._until[peer] = max(bans.until(peer), time.monotonic() + seconds)
        events.add("ban", peer=b58encode(peer), seconds=seconds)
        log.info("operator banned %s for %.0f s", short_id(peer), seconds)
        return {"peer": b58encode(peer), "banned_for_s": seconds}

    async def unban(args: dict) -> dict:
        peer = _peer_arg(args)
        bans = node.client.bans
        was = peer in bans.banned(time.monotonic())
        bans._until.pop(peer, None)
        bans.forgive(peer)
        events.add("unban", peer=b58encode(peer))
        log.info("operator unbanned %s", short_id(peer))
        return {"peer": b58encode(peer), "was_banned": was}

    def need_server():
        if node.server is None:
            raise ControlError("not_serving", "this node serves no blocks (a client-only node)")
        return node.server

    async def drain(args: dict) -> dict:
        s = need_server()
        s.state = "draining"
        steering = getattr(node, "steering", None)
        if steering is not None:
            steering.pinned = True  # the balancer must not move (and re-open) a draining server
        node.swarm.republish_now()
        events.add("state", peer=node.peer_id, state="draining")
        log.info("operator drained the server: no new sessions, %d open ones finish", s.statistics().sessions_open)
        return {"state": s.state, "sessions_open": s.statistics().sessions_open}

    async def resume(args: dict) -> dict:
        s = need_server()
        s.state = "online"
        node.swarm.republish_now()
        events.add("state", peer=node.peer_id, state="online")
        log.info("operator resumed the server")
        return {"state": s.state}

    async def pin(args: dict) -> dict:
        need_server()
        steering = getattr(node, "steering", None)
        if steering is None:
            raise ControlError("not_supported", "this node's runtime cannot move its span")
        start = _arg(args, "start", int, required=True)
        end = _arg(args, "end", int, required=True)
        if not 0 <= start < end <= manifest.n_blocks:
            raise ControlError("bad_args", f"span {start}:{end} is not inside the model's blocks 0:{manifest.n_blocks}")
        moving = await steering.pin((start, end))
        events.add("pin", peer=node.peer_id, span=[start, end])
        return {"span": [start, end], "moving": moving}

    async def release(args: dict) -> dict:
        need_server()
        steering = getattr(node, "steering", None)
        if steering is None:
            raise ControlError("not_supported", "this node's runtime cannot move its span")
        balanced = steering.release()
        events.add("release", peer=node.peer_id)
        return {"released": True, "balancer": balanced}

    def need_ledger():
        ledger = getattr(node, "ledger", None)
        if ledger is None:
            raise ControlError("not_supported", "this node runs no ledger")
        return ledger

    async def ledger(args: dict) -> dict:
        """Balance, recent entries, counterparties, fraud proofs (node.ledger.ledger_summary)."""
        recent = args.get("recent", 20)
        if isinstance(recent, bool) or not isinstance(recent, int) or not 0 <= recent <= 1000:
            raise ControlError("bad_args", "argument 'recent' must be a whole number in 0..1000")
        return await need_ledger().summary(recent)

    async def ledger_verify(args: dict) -> dict:
        """Re-validate the whole local ledger store: {"ok", "faults", "entries", "authors", "proofs"}."""
        return await need_ledger().verify()

    return {"status": status, "swarm": swarm, "sessions": sessions, "peers": peers, "log_tail": log_tail,
            "ban": ban, "unban": unban, "drain": drain, "resume": resume, "pin": pin, "release": release,
            "ledger": ledger, "ledger_verify": ledger_verify}


Emit = Callable[[Any], Awaitable[None]]


def build_streams(node, events: EventRing) -> dict[str, Callable[[dict, Emit], Awaitable[Any]]]:
    """Streaming calls: `handler(args, emit) -> final value`; `emit(item)` sends one item frame."""
    async def logs(args: dict, emit: Emit) -> dict:
        level = _arg(args, "level", str, "DEBUG").upper()
        if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise ControlError("bad_args", f"level must be debug, info, warning or error, not {level.lower()!r}")
        contains = _arg(args, "contains", str, "").lower()
        tail = _arg(args, "tail", int, 100)
        if not 0 <= tail <= MAX_TAIL_LINES:
            raise ControlError("bad_args", f"tail must be in 0..{MAX_TAIL_LINES}, not {tail}")
        min_level = logging.getLevelName(level)
        ring = ring_buffer()

        def wanted(x: dict) -> bool:
            return logging.getLevelName(x["level"]) >= min_level and (
                not contains or contains in x["message"].lower() or contains in x["logger"].lower())

        seq = 0
        first = [x for x in ring.since(0) if wanted(x)][-tail:] if tail else []
        for x in first:
            await emit(x)
        seq = ring.last_seq
        while True:
            await trio.sleep(STREAM_POLL_S)
            for x in ring.since(seq):
                seq = x["seq"]
                if wanted(x):
                    await emit(x)

    async def events_stream(args: dict, emit: Emit) -> dict:
        seq = _arg(args, "since", int, events.last_seq)
        while True:
            for e in events.since(seq):
                seq = e["seq"]
                await emit(e)
            await trio.sleep(STREAM_POLL_S)

    async def generate(args: dict, emit: Emit) -> dict:
        from .client import route_json

        prompt = _arg(args, "prompt", str, required=True)
        if not prompt.strip():
            raise ControlError("bad_args", "prompt is empty")
        if len(prompt) > MAX_PROMPT_CHARS:
            raise ControlError("bad_args", f"prompt is over {MAX_PROMPT_CHARS} characters")
        max_new = _arg(args, "max_new_tokens", int, 48)
        if not 1 <= max_new <= MAX_NEW_TOKENS:
            raise ControlError("bad_args", f"max_new_tokens must be in 1..{MAX_NEW_TOKENS}, not {max_new}")
        temperature = _arg(args, "temperature", float, 0.0)
        top_p = _arg(args, "top_p", float, 1.0)
        from .model import MAX_TEMPERATURE

        if not 0 <= temperature <= MAX_TEMPERATURE or not 0 < top_p <= 1:  # NaN fails both
            raise ControlError("bad_args", f"temperature must be in 0..{MAX_TEMPERATURE:g} and top_p in (0, 1]")
        seed = _arg(args, "seed", int, None)
        chat = _arg(args, "chat", bool, True)
        from .errors import GenerationError

        try:
            ready_s = _arg(args, "ready_timeout_s", float, GENERATE_READY_TIMEOUT_S)
            if not 0 < ready_s <= MAX_READY_TIMEOUT_S:
                raise ControlError("bad_args", f"ready_timeout_s must be in (0, {MAX_READY_TIMEOUT_S:g}]")
            await node.client.wait_ready(ready_s)
        except GenerationError as e:
            raise ControlError("generation_failed", str(e)) from None
        send, receive = trio.open_memory_channel(math.inf)  # bounded by max_new_tokens
        outcome: dict = {}
        last_route: list = []

        def on_token(token: int, text: str) -> None:
            nonlocal last_route
            route = route_json(node.client.last_route)
            item = {"token": token, "text": text}
            if route != last_route:
                item["route"] = route
                last_route = route
            send.send_nowait(item)

        async def run() -> None:
            try:
                r = await node.client.generate(prompt, max_new, temperature=temperature, top_p=top_p, seed=seed,
                                               chat=chat, on_token=on_token)
                outcome["value"] = asdict(r)
            except GenerationError as e:
                outcome["error"] = str(e)
            finally:
                send.close()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(run)
            async with receive:
                async for item in receive:
                    await emit(item)
        if "error" in outcome:
            raise ControlError("generation_failed", outcome["error"])
        events.add("generation", tokens=len(outcome["value"]["tokens"]),
                   tokens_per_s=round(outcome["value"]["tokens_per_s"], 2))
        return outcome["value"]

    return {"logs": logs, "events": events_stream, "generate": generate}


async def watch_events(node, events: EventRing) -> None:
    """Turn changes of the connected peers and of the swarm map into events, once a second."""
    model_id = node.client.manifest.model_id
    me = node.swarm.signer.peer_id
    peers: set[bytes] = {p.to_bytes() for p in node.p2p.connected_peers()} - {me}
    servers: dict[tuple[bytes, int, int], str] = {}
    first = True
    while True:
        now_peers = {p.to_bytes() for p in node.p2p.connected_peers()} - {me}
        for p in sorted(now_peers - peers):
            events.add("peer_connected", peer=b58encode(p))
        for p in sorted(peers - now_peers):
            events.add("peer_disconnected", peer=b58encode(p))
        peers = now_peers
        now_servers = {(a.peer_id, a.start, a.end): a.state
                       for a in node.swarm.map.servers(model_id, states=("online", "joining", "draining"))}
        if not first:
            for key, state in now_servers.items():
                if key not in servers:
                    events.add("server_joined", peer=b58encode(key[0]), span=[key[1], key[2]], state=state)
                elif servers[key] != state:
                    events.add("server_state", peer=b58encode(key[0]), span=[key[1], key[2]], state=state)
            for key in servers.keys() - now_servers.keys():
                events.add("server_left", peer=b58encode(key[0]), span=[key[1], key[2]])
        servers, first = now_servers, False
        await trio.sleep(EVENT_WATCH_S)


def _device_info() -> dict:
    from .hardware import probe_device

    d = probe_device()
    return {"kind": d.kind, "name": d.name, "total_bytes": d.total_bytes, "free_bytes": d.free_bytes}


class ControlServer:
    def __init__(self, node, path: Path) -> None:
        self.node = node
        self.path = path
        self.events = EventRing()
        self.device: dict = {}
        self.methods = build_methods(node, self.events, self.device)
        self.streams = build_streams(node, self.events)
        self._clients = 0
        self._calls = 0
        self._errors = 0
        self._streams = 0
        ring_buffer()  # the log tail starts now, even where the CLI's logging setup did not run

    def statistics(self) -> ControlStatistics:
        return ControlStatistics(self._clients, self._calls, self._errors, self._streams)

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        try:
            self.device.update(await trio.to_thread.run_sync(_device_info))
        except Exception as e:  # a broken NVML must not stop the control API
            log.debug("device probe failed: %s", e)
        self.path.unlink(missing_ok=True)  # a stale socket of a dead node; the data dir lock is ours
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # created 0600: only the node's user may connect
        try:
            await sock.bind(str(self.path))
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)  # whatever the umask did
        sock.listen(MAX_CLIENTS)
        listener = trio.SocketListener(sock)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(watch_events, self.node, self.events)
                task_status.started()
                while True:
                    stream = await listener.accept()
                    nursery.start_soon(self._serve, stream)
        finally:
            with trio.CancelScope(shield=True):
                await listener.aclose()
                self.path.unlink(missing_ok=True)

    async def _serve(self, stream: trio.SocketStream) -> None:
        if self._clients >= MAX_CLIENTS:
            try:
                await _send(stream, {"t": "error", "id": None, "code": "busy",
                                     "message": f"{MAX_CLIENTS} clients connected"})
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            await stream.aclose()
            return
        self._clients += 1
        decoder = FrameDecoder(MAX_REQUEST_FRAME)
        try:
            hello = await _receive(stream, decoder, HELLO_TIMEOUT_S)
            major = hello.get("v")
            if hello["t"] != "hello" or major != CONTROL_MAJOR:
                await _send(stream, {"t": "error", "id": None, "code": "version",
                                     "message": f"this node speaks control/{CONTROL_MAJOR}; the client sent "
                                                f"{hello['t']!r} for control/{major}"})
                return
            await _send(stream, {"t": "hello", "v": CONTROL_MAJOR, "version": poolai_version()})
            while True:
                msg = await _receive(stream, decoder, READ_TIMEOUT_S)
                call_id = msg.get("id")
                if msg["t"] != "call":
                    raise ControlProtocolError(f"expected 'call', got {msg['t']!r}")
                if not isinstance(call_id, int) or isinstance(call_id, bool):
                    raise ControlProtocolError("a call needs an integer 'id'")
                method = str_field(msg, "method", 64)
                args = field(msg, "args", dict)
                self._calls += 1
                if method in self.streams:
                    if not await self._stream_call(stream, decoder, call_id, method, args):
                        return
                    continue
                handler = self.methods.get(method)
                if handler is None:
                    self._errors += 1
                    known = ", ".join(sorted([*self.methods, *self.streams]))
                    await _send(stream, {"t": "error", "id": call_id, "code": "unknown_method",
                                         "message": f"no method {method!r}; known: {known}"})
                    continue
                try:
                    value = await handler(args)
                except ControlError as e:
                    self._errors += 1
                    await _send(stream, {"t": "error", "id": call_id, "code": e.code, "message": e.detail})
                    continue
                except Exception as e:  # our bug: answer it, log it, keep the node running
                    self._errors += 1
                    log.exception("control method %s failed", method)
                    await _send(stream, {"t": "error", "id": call_id, "code": "internal",
                                         "message": f"{method} failed in the node: {type(e).__name__}: {e}"})
                    continue
                await _send(stream, {"t": "result", "id": call_id, "value": value})
        except (trio.ClosedResourceError, trio.BrokenResourceError, EOFError):
            pass
        except (RemoteProtocolError, trio.TooSlowError) as e:
            self._errors += 1
            log.info("control client dropped: %s", describe(e))
            try:
                await _send(stream, {"t": "error", "id": None, "code": "bad_request", "message": str(e)})
            except Exception:
                pass
        finally:
            self._clients -= 1
            await stream.aclose()

    async def _stream_call(self, stream, decoder: FrameDecoder, call_id: int, method: str, args: dict) -> bool:
        """Run one streaming call; False when the client went away or broke the protocol meanwhile."""
        self._streams += 1
        state = {"cancelled": False, "gone": None}

        async def emit(value: Any) -> None:
            await _send(stream, {"t": "item", "id": call_id, "value": value})

        async with trio.open_nursery() as nursery:
            async def watch() -> None:
                try:
                    msg = await _receive(stream, decoder, math.inf)
                    if msg["t"] == "cancel" and msg.get("id") == call_id:
                        state["cancelled"] = True
                    else:
                        state["gone"] = f"expected 'cancel' for call {call_id} during a stream, got {msg['t']!r}"
                except (trio.ClosedResourceError, trio.BrokenResourceError, EOFError):
                    state["gone"] = ""
                except RemoteProtocolError as e:
                    state["gone"] = str(e)
                nursery.cancel_scope.cancel()

            async def work() -> None:
                try:
                    value = await self.streams[method](args, emit)
                    await _send(stream, {"t": "result", "id": call_id, "value": value})
                except ControlError as e:
                    self._errors += 1
                    await _send(stream, {"t": "error", "id": call_id, "code": e.code, "message": e.detail})
                except (trio.ClosedResourceError, trio.BrokenResourceError):
                    state["gone"] = ""
                except Exception as e:
                    self._errors += 1
                    log.exception("control stream %s failed", method)
                    await _send(stream, {"t": "error", "id": call_id, "code": "internal",
                                         "message": f"{method} failed in the node: {type(e).__name__}: {e}"})
                nursery.cancel_scope.cancel()

            nursery.start_soon(watch)
            nursery.start_soon(work)
        if state["gone"] is not None:
            if state["gone"]:
                self._errors += 1
                log.info("control client dropped: %s", state["gone"])
                try:
                    await _send(stream, {"t": "error", "id": None, "code": "bad_request", "message": state["gone"]})
                except Exception:
                    pass
            return False
        if state["cancelled"]:
            await _send(stream, {"t": "result", "id": call_id, "value": {"cancelled": True}})
        return True


async def _send(stream, msg: dict) -> None:
    await stream.send_all(encode_frame(msg, MAX_ANSWER_FRAME))


async def _receive(stream, decoder: FrameDecoder, timeout: float) -> dict:
    with trio.fail_after(timeout):
        while True:
            msg = decoder.next_message()
            if msg is not None:
                return msg
            data = await stream.receive_some(65536)
            if not data:
                raise EOFError
            decoder.feed(data)


class ControlClient:
    """The one way trio front ends talk to a node: `async with ControlClient(data_dir) as c: await c.call(...)`.

    (The TUI is asyncio and has its own client with the same frames, tui/client.py.)
    """

    def __init__(self, data_dir: Path) -> None:
        self.path = Path(data_dir) / CONTROL_SOCKET
        self._stream: trio.SocketStream | None = None
        self._decoder = FrameDecoder(MAX_ANSWER_FRAME)
        self._next_id = 0
        self.node_version = ""

    async def __aenter__(self) -> "ControlClient":
        try:
            with trio.fail_after(CONNECT_TIMEOUT_S):
                self._stream = await trio.open_unix_socket(str(self.path))
        except (FileNotFoundError, ConnectionRefusedError):
            raise NodeNotRunning(f"no node is running with data dir {self.path.parent} (no {CONTROL_SOCKET})") from None
        except PermissionError:
            raise NodeNotRunning(f"permission denied on {self.path}: the node runs as another user") from None
        except OSError as e:  # a data dir that is a file, a socket path too long...
            raise NodeNotRunning(f"cannot reach a node at {self.path}: {e.strerror or e}") from None
        try:
            await _send(self._stream, {"t": "hello", "v": CONTROL_MAJOR})
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # a busy node answers and closes at once: read what it said
        try:
            hello = await _receive(self._stream, self._decoder, CONNECT_TIMEOUT_S)
        except trio.TooSlowError:
            raise ControlError("timeout", f"the node did not answer within {CONNECT_TIMEOUT_S:g} s") from None
        except (EOFError, trio.BrokenResourceError, trio.ClosedResourceError, RemoteProtocolError) as e:
            raise ControlError("closed", f"the node closed the connection before answering ({type(e).__name__})") \
                from None
        if hello["t"] == "error":
            raise ControlError(hello.get("code", "error"), hello.get("message", ""))
        self.node_version = hello.get("version", "")
        return self

    async def __aexit__(self, *exc) -> None:
        if self._stream is not None:
            await self._stream.aclose()

    async def call(self, method: str, timeout: float = 30.0, **args) -> Any:
        assert self._stream is not None
        self._next_id += 1
        await _send(self._stream, {"t": "call", "id": self._next_id, "method": method, "args": args})
        answer = await _receive(self._stream, self._decoder, timeout)
        if answer["t"] == "error":
            raise ControlError(answer.get("code", "error"), answer.get("message", ""))
        return answer["value"]

    async def stream(self, method: str, on_item: Callable[[Any], None], timeout: float = 600.0, **args) -> Any:
        """A streaming call: `on_item(value)` for every item, then the final value."""
        assert self._stream is not None
        self._next_id += 1
        await _send(self._stream, {"t": "call", "id": self._next_id, "method": method, "args": args})
        with trio.fail_after(timeout):
            while True:
                answer = await _receive(self._stream, self._decoder, math.inf)
                if answer["t"] == "item":
                    on_item(answer["value"])
                elif answer["t"] == "error":
                    raise ControlError(answer.get("code", "error"), answer.get("message", ""))
                else:
                    return answer["value"]
